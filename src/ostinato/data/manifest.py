"""``manifest.json``: the description of a set of WebDataset shards, written last and atomically.

A manifest lists its shards relative to its own folder, so a shard folder can be moved or synced as a whole.

Sample layout inside every tar (one sample = one key):
  ``<key>.flac``  the audio, FLAC 16 or 24 bit, at ``sample_rate`` with ``channels`` channels
  ``<key>.json``  metadata: ``caption`` (str), ``source`` (relative path of the source file), ``offset`` and
                  ``duration`` (seconds in the source), ``segment`` (index), ``sample_rate``, ``channels``, and the
                  conditioning fields when known: ``genre``, ``instruments`` (list), ``bpm``, ``key``, ``composer``,
                  ``title``, ``piece`` (an id shared by every clip of one piece).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from ostinato.fileio import atomic_write_json, read_json

MANIFEST_NAME = "manifest.json"
FORMAT = "ostinato.audio-shards/1"


@dataclass
class StreamInfo:
    """One stream of an array shard: ``channels`` rows (latent size D, or 1 for codes) at ``rate`` frames/s.
    ``card``: the codebook size of integer streams, 0 for continuous ones. Here, not in ``arrays``, so
    that models describe their ``array_streams()`` without importing the datamodules (and Lightning)."""

    rate: float
    channels: int
    dtype: str
    card: int = 0


@dataclass
class CodecInfo:
    """The codec (or semantic tokenizer) that wrote a ``codes`` stream: what a token consumer needs to know."""

    id: str
    hash: str
    sample_rate: int
    channels: int
    frame_rate: float
    n_q: int
    card: int  # codebook size

    @property
    def dims(self) -> tuple[float, int, int]:
        """(frame rate, n_q, codebook size): what an LM trained on the tokens depends on."""
        return float(self.frame_rate), int(self.n_q), int(self.card)


def card_named(d: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry with its codebook size named ``card`` (manifests written before said ``cardinality`` or
    ``bins``)."""
    out = {k: v for k, v in d.items() if k not in ("cardinality", "bins")}
    for name in ("card", "cardinality", "bins"):
        if name in d:
            out["card"] = d[name]
            break
    return out


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    samples: int
    seconds: float
    bytes: int


class ShardManifest:
    """What every manifest shares (audio, token and array shards): ``shards`` with their sample counts, a
    ``format`` checked on load, written last and atomically with its totals. A subclass is a dataclass naming its
    ``FORMAT``, ``KIND`` and ``HINT`` (how to write one) and, when its fields are not plain, ``from_dict``."""

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]
    HINT: ClassVar[str]
    shards: list[Any]

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def totals(self) -> dict[str, Any]:
        return {"total_samples": self.total_samples}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.totals()}  # type: ignore[call-overload]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Load ``path`` (a manifest.json or the folder holding one)."""
        path = Path(path)
        path = path / MANIFEST_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.KIND} manifest at {path}; {cls.HINT}")
        return cls.from_dict(read_json(path), origin=str(path))

    @classmethod
    def check_format(cls, d: dict[str, Any], origin: str) -> dict[str, Any]:
        """``d`` less its totals, once its format is this class's."""
        if d.get("format") != cls.FORMAT:
            raise ValueError(f"{origin}: format {d.get('format')!r} is not {cls.FORMAT!r}")
        return {k: v for k, v in d.items() if not k.startswith("total_")}

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<manifest>") -> Self:
        raise NotImplementedError


@dataclass
class Manifest(ShardManifest):
    """Audio shards (``ostinato prep shards``)."""

    FORMAT: ClassVar[str] = FORMAT
    KIND: ClassVar[str] = "shard"
    HINT: ClassVar[str] = "run `ostinato prep shards` to create it"

    shards: list[ShardInfo]
    sample_rate: int
    channels: int
    options: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # root, files, hash
    skipped: int = 0
    format: str = FORMAT

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.shards)

    def totals(self) -> dict[str, Any]:
        return {"total_samples": self.total_samples, "total_seconds": round(self.total_seconds, 3)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<manifest>") -> "Manifest":
        d = cls.check_format(d, origin)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)

    def shard_paths(self, folder: str | Path) -> list[str]:
        return [str(Path(folder) / s.name) for s in self.shards]
