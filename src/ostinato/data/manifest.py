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
from typing import Any

from ostinato.fileio import atomic_write_json, read_json

MANIFEST_NAME = "manifest.json"
FORMAT = "ostinato.audio-shards/1"


@dataclass
class StreamInfo:
    """One stream of an array shard: ``channels`` rows (latent size D, or 1 for codes) at ``rate`` frames/s.
    ``cardinality``: the code vocabulary for integer streams, 0 for continuous ones. Here, not in ``arrays``, so
    that models describe their ``array_streams()`` without importing the datamodules (and Lightning)."""

    rate: float
    channels: int
    dtype: str
    cardinality: int = 0


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    samples: int
    seconds: float
    bytes: int


@dataclass
class Manifest:
    shards: list[ShardInfo]
    sample_rate: int
    channels: int
    options: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # root, files, hash
    skipped: int = 0
    format: str = FORMAT

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_samples"] = self.total_samples
        d["total_seconds"] = round(self.total_seconds, 3)
        return d

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Load ``path`` (a manifest.json or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"no shard manifest at {path}; run `ostinato prep shards` to create it")
        return cls.from_dict(read_json(path), origin=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<manifest>") -> "Manifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"{origin}: format {d.get('format')!r} is not {FORMAT!r}")
        d = {k: v for k, v in d.items() if k not in ("total_samples", "total_seconds")}
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)

    def shard_paths(self, folder: str | Path) -> list[str]:
        return [str(Path(folder) / s.name) for s in self.shards]
