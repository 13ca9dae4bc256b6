"""Token shards: the discrete codes of a codec, the contract between the codec and every LM family.

Layout of a token shard folder::

  shard-000000.tar   samples ``<key>.npy`` (int16 codes [K, F]) + ``<key>.json`` (the audio sample's metadata
                     plus ``frames`` and ``frame_rate``), one token shard per audio shard, same name
  shard-000000.json  done marker (samples, frames)
  manifest.json      written last: shards, the codec (id, weights hash, sample rate, frame rate, n_q,
                     card, channels) and the audio source

An LM family reads ``codec`` from the manifest, so the rate, frame rate and codebook sizes have one home.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ostinato.data.manifest import ShardManifest, card_named
from ostinato.data.sources import iter_raw_samples, resolve_listed
from ostinato.data.streams import CorruptSample

FORMAT = "ostinato.token-shards/1"


@dataclass
class CodecInfo:
    """What a token consumer needs to know about the codec that wrote the tokens."""

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


@dataclass
class TokenShard:
    name: str
    samples: int
    frames: int


@dataclass
class TokenManifest(ShardManifest):
    FORMAT: ClassVar[str] = FORMAT
    KIND: ClassVar[str] = "token"
    HINT: ClassVar[str] = "run `ostinato tokenize` to create it"

    shards: list[TokenShard]
    codec: CodecInfo
    source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def total_frames(self) -> int:
        return sum(s.frames for s in self.shards)

    def totals(self) -> dict[str, Any]:
        return {"total_samples": self.total_samples, "total_frames": self.total_frames}

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<manifest>") -> TokenManifest:
        d = cls.check_format(d, origin)
        return cls(shards=[TokenShard(**s) for s in d["shards"]], codec=CodecInfo(**card_named(d["codec"])),
                   source=d.get("source", {}))


def encode_codes(codes: torch.Tensor) -> bytes:
    """[K, F] integer codes -> ``.npy`` bytes (int16: every codebook here has at most 32768 entries)."""
    if codes.numel() and int(codes.max()) > np.iinfo(np.int16).max:
        raise ValueError("codes do not fit int16")
    buf = io.BytesIO()
    np.save(buf, codes.detach().cpu().numpy().astype(np.int16), allow_pickle=False)
    return buf.getvalue()


def decode_codes(data: bytes) -> torch.Tensor:
    """``.npy`` bytes -> [K, F] int64 codes."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.int64))


def iter_token_samples(url: str) -> Iterator[tuple[str, torch.Tensor, dict[str, Any]]]:
    """(key, codes [K, F] int64, meta) of one token shard, in order."""
    for raw in iter_raw_samples(url):
        yield raw["__key__"], decode_codes(raw["npy"]), json.loads(raw["json"])


# -- reading token shards for training ------------------------------------------------------------------------
@dataclass
class TokenSource:
    """Resolved token shard paths plus their codec and sample count (from the manifests)."""

    urls: list[str]
    codec: CodecInfo
    num_samples: int
    counts: dict[str, int] = field(default_factory=dict)  # samples per shard url, from the manifests


def resolve_token_shards(spec: str | Path | list[str | Path] | tuple[str | Path, ...]) -> TokenSource:
    """A token shard folder (or its ``manifest.json``), or a list of them, -> paths, codec and sample count.

    Token shards are always read through their manifests: the manifest is where the codec (frame rate, n_q,
    card) is written. Every part of a list must come from the same codec.
    """
    listed = resolve_listed(spec, TokenManifest)
    (_, first), *rest = listed.manifests
    for folder, manifest in rest:
        if manifest.codec.dims != first.codec.dims:
            raise ValueError(f"token shards in {folder} come from another codec ({manifest.codec.id}, "
                             f"{manifest.codec.dims}) than the others ({first.codec.id}, {first.codec.dims})")
    return TokenSource(listed.urls, first.codec, listed.total, listed.counts)


def decode_token_clip(sample: dict, *, frames: int, n_q: int | None = None,
                      rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """A raw token-shard sample -> ``(codes [K, frames] int64, valid_frames, meta)``.

    The crop starts at a random frame when ``rng`` is given, else at frame 0; shorter items are padded with 0
    past ``valid_frames``. Raises ``CorruptSample`` for undecodable codes or JSON, or a wrong ``n_q``.
    """
    key = sample.get("__key__", "?")
    try:
        codes = decode_codes(sample["npy"])
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except Exception as e:
        raise CorruptSample(f"token sample {key}: {type(e).__name__}: {e}") from e
    if codes.ndim != 2 or (n_q is not None and codes.shape[0] != n_q) or codes.shape[1] == 0:
        raise CorruptSample(f"token sample {key}: codes of shape {tuple(codes.shape)}, expected [{n_q}, F>0]")
    total = codes.shape[1]
    start = int(rng.integers(0, total - frames + 1)) if rng is not None and total > frames else 0
    clip = codes[:, start:start + frames]
    valid = clip.shape[1]
    if valid < frames:
        clip = torch.nn.functional.pad(clip, (0, frames - valid))
    return clip.contiguous(), valid, {**meta, "__key__": key, "offset_frames": start}
