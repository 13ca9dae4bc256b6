"""Token shards: the discrete codes of a codec, the contract between the codec and every LM family.

Token shards are array shards (``data/arrays.py``) of one stream, ``codes`` (int16 ``[n_q, F]``), whose manifest
also records the ``codec`` that wrote them (id, weights hash, sample rate, channels, frame rate, n_q, card)::

  shard-000000.tar   samples ``<key>.codes.npy`` + ``<key>.json`` (the audio sample's metadata plus ``frames``
                     per stream and ``frame_rate``), one token shard per audio shard, same name
  shard-000000.json  done marker (samples, frames)
  manifest.json      written last: shards, streams, model, codec and the audio source

An LM family reads ``codec`` from the manifest, so the rate, frame rate and codebook sizes have one home. Token
shards of the earlier format (``<key>.npy``, ``ostinato.token-shards/1``) read the same.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ostinato.data.array_shards import (CODES, ArrayManifest, ArrayShard, ArraySource, decode_array, encode_array,
                                        resolve_array_shards, stream_data)
from ostinato.data.manifest import CodecInfo
from ostinato.data.sources import iter_raw_samples
from ostinato.data.streams import CorruptSample

__all__ = ["CODES", "CodecInfo", "TokenManifest", "TokenShard", "TokenSource", "encode_codes", "decode_codes",
           "iter_token_samples", "resolve_token_shards", "decode_token_clip"]

TokenShard = ArrayShard
TokenSource = ArraySource  # with its ``codec`` set


@dataclass
class TokenManifest(ArrayManifest):
    """An array manifest with a ``codec`` (its ``codes`` stream and ``model`` follow from it)."""

    KIND: ClassVar[str] = "token"
    HINT: ClassVar[str] = "run `ostinato tokenize` to create it"

    def __post_init__(self) -> None:
        if self.codec is None:
            raise ValueError("token shards need the codec that wrote them (manifest `codec`)")
        super().__post_init__()

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<manifest>") -> TokenManifest:
        if not d.get("codec"):
            raise ValueError(f"{origin}: these array shards hold no codec tokens (no `codec` entry); write token "
                             "shards with `ostinato tokenize`")
        return super().from_dict(d, origin)  # type: ignore[return-value]


def encode_codes(codes: torch.Tensor) -> bytes:
    """[K, F] integer codes -> ``.npy`` bytes (int16: every codebook here has at most 32768 entries)."""
    if codes.is_floating_point():
        raise TypeError("codes must be integers")
    return encode_array(codes)


def decode_codes(data: bytes) -> torch.Tensor:
    """``.npy`` bytes -> [K, F] int64 codes."""
    return decode_array(data).long()


def iter_token_samples(url: str) -> Iterator[tuple[str, torch.Tensor, dict[str, Any]]]:
    """(key, codes [K, F] int64, meta) of one token shard, in order."""
    for raw in iter_raw_samples(url):
        yield raw["__key__"], decode_codes(stream_data(raw, CODES)), json.loads(raw["json"])


def resolve_token_shards(spec: str | Path | list[str | Path] | tuple[str | Path, ...]) -> TokenSource:
    """A token shard folder (or its ``manifest.json``), or a list of them, -> paths, codec and sample count.

    Token shards are always read through their manifests: the manifest is where the codec (frame rate, n_q,
    card) is written. Every part of a list must come from the same codec.
    """
    return resolve_array_shards(spec, TokenManifest)


def decode_token_clip(sample: dict, *, frames: int, n_q: int | None = None,
                      rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """A raw token-shard sample -> ``(codes [K, frames] int64, valid_frames, meta)``.

    The crop starts at a random frame when ``rng`` is given, else at frame 0; shorter items are padded with 0
    past ``valid_frames``. Raises ``CorruptSample`` for undecodable codes or JSON, or a wrong ``n_q``.
    """
    key = sample.get("__key__", "?")
    try:
        codes = decode_codes(stream_data(sample, CODES))
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
