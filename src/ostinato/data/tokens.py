"""Token shards: the discrete codes of a codec, the contract between the codec and every LM family.

Layout of a token shard folder::

  shard-000000.tar   samples ``<key>.npy`` (int16 codes [K, F]) + ``<key>.json`` (the audio sample's metadata
                     plus ``frames`` and ``frame_rate``), one token shard per audio shard, same name
  shard-000000.json  done marker (samples, frames)
  manifest.json      written last: shards, the codec (id, weights hash, sample rate, frame rate, n_q,
                     cardinality, channels) and the audio source

An LM family reads ``codec`` from the manifest, so the rate, frame rate and codebook sizes have one home.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ostinato.data.sources import iter_raw_samples
from ostinato.fileio import atomic_write_json, read_json

FORMAT = "ostinato.token-shards/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class CodecInfo:
    """What a token consumer needs to know about the codec that wrote the tokens."""

    id: str
    hash: str
    sample_rate: int
    channels: int
    frame_rate: float
    n_q: int
    cardinality: int


@dataclass
class TokenShard:
    name: str
    samples: int
    frames: int


@dataclass
class TokenManifest:
    shards: list[TokenShard]
    codec: CodecInfo
    source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_frames(self) -> int:
        return sum(s.frames for s in self.shards)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        d = asdict(self)
        d["total_samples"], d["total_frames"] = self.total_samples, self.total_frames
        atomic_write_json(path, d)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TokenManifest":
        path = Path(path)
        path = path / MANIFEST_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no token manifest at {path}; run `ostinato tokenize` to create it")
        d = read_json(path)
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: format {d.get('format')!r} is not {FORMAT!r}")
        return cls(shards=[TokenShard(**s) for s in d["shards"]], codec=CodecInfo(**d["codec"]),
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
