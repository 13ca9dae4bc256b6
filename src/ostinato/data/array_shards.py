"""The array-shard format, without a datamodule (so models and writers read manifests without Lightning).

Musika trains its latent GAN on continuous latents (float16 ``[D, F]``) of its autoencoder; the Jukebox-style
priors train on the codes of a hierarchical VQ-VAE (int16 ``[1, F_level]`` per level); the LM families train on a
codec's (or semantic tokenizer's) tokens, one ``codes`` stream (int16 ``[n_q, F]``, ``data/tokens.py``). All are
*streams* of frames at known rates, written once by ``ostinato encode`` / ``ostinato tokenize`` and read here.

Layout of an array shard folder::

  shard-000000.tar   samples ``<key>.<stream>.npy`` (one array ``[K, F]`` per stream) + ``<key>.json`` (the audio
                     sample's metadata plus ``frames`` per stream), one array shard per audio shard, same name
  shard-000000.json  done marker (samples, frames of the first stream, skipped)
  manifest.json      written last: shards, the streams (rate, channels, dtype, card) and the model that wrote them
                     (id, weights hash, kind, sample rate, channels), plus ``codec`` for token shards (frame rate,
                     n_q, card: what an LM reads)

Token shards written before this format (``ostinato.token-shards/1``: ``<key>.npy`` and a ``codec`` entry) still
load: their manifest reads as one ``codes`` stream and their ``npy`` entry as that stream (``stream_data``).
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ostinato.data.manifest import CodecInfo, ShardManifest, StreamInfo, card_named
from ostinato.data.sources import resolve_listed

Spec = str | os.PathLike | Sequence[str | os.PathLike]  # a folder, a manifest.json, or a list of them

__all__ = ["ARRAY_FORMAT", "TOKEN_FORMAT", "CODES", "ModelInfo", "ArrayShard", "ArrayManifest", "ArraySource",
           "encode_array", "decode_array", "stream_data", "aligned_crop", "resolve_array_shards"]

ARRAY_FORMAT = "ostinato.array-shards/1"
TOKEN_FORMAT = "ostinato.token-shards/1"  # token shards written before they were array shards (read only)
CODES = "codes"  # the stream of a codec's tokens


@dataclass
class ModelInfo:
    """The model that wrote the arrays: ``id`` (the reference it was loaded from), ``hash`` of its weights,
    ``kind`` (``musika_autoencoder``, ``jukebox_vqvae``), its audio ``sample_rate`` / ``channels``."""

    id: str
    hash: str
    kind: str
    sample_rate: int
    channels: int


@dataclass
class ArrayShard:
    name: str
    samples: int
    frames: int


@dataclass
class ArrayManifest(ShardManifest):
    """``streams`` and ``model`` of array shards; token shards add the ``codec`` that wrote their ``codes`` (from
    which ``streams`` and ``model`` follow when not given)."""

    FORMAT: ClassVar[str] = ARRAY_FORMAT
    KIND: ClassVar[str] = "array"
    HINT: ClassVar[str] = "write the arrays with `ostinato encode SHARDS OUT --model REF`"

    shards: list[ArrayShard]
    streams: dict[str, StreamInfo] = field(default_factory=dict)
    model: ModelInfo | None = None
    source: dict[str, Any] = field(default_factory=dict)
    format: str = ARRAY_FORMAT
    codec: CodecInfo | None = None

    def __post_init__(self) -> None:
        c = self.codec
        if c is not None:
            self.streams = self.streams or {CODES: StreamInfo(float(c.frame_rate), int(c.n_q), "int16", int(c.card))}
            self.model = self.model or ModelInfo(c.id, c.hash, "codec", int(c.sample_rate), int(c.channels))
        if self.model is None:
            raise ValueError("an array manifest needs the model (or codec) that wrote it")

    @property
    def total_frames(self) -> int:
        return sum(s.frames for s in self.shards)

    def totals(self) -> dict[str, Any]:
        return {"total_samples": self.total_samples, "total_frames": self.total_frames}

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["codec"] is None:
            del d["codec"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<manifest>") -> ArrayManifest:
        if d.get("format") == TOKEN_FORMAT:
            d = {**d, "format": ARRAY_FORMAT, "streams": {}, "model": None}
        if d.get("format") != ARRAY_FORMAT:
            raise ValueError(f"{origin}: format {d.get('format')!r} is not {ARRAY_FORMAT!r}")
        codec = CodecInfo(**card_named(d["codec"])) if d.get("codec") else None
        return cls(shards=[ArrayShard(**s) for s in d["shards"]],
                   streams={k: StreamInfo(**card_named(v)) for k, v in d["streams"].items()},
                   model=ModelInfo(**d["model"]) if d.get("model") else None, source=d.get("source", {}),
                   codec=codec)


def encode_array(x: Tensor) -> bytes:
    """``[K, F]`` -> ``.npy`` bytes: floats as float16, integers as int16."""
    if x.is_floating_point():
        arr = x.detach().float().cpu().numpy().astype(np.float16)
    else:
        if x.numel() and int(x.max()) > np.iinfo(np.int16).max:
            raise ValueError("codes do not fit int16")
        arr = x.detach().cpu().numpy().astype(np.int16)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> Tensor:
    """``.npy`` bytes -> float32 (from float16) or int64 (from int16) ``[K, F]``."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    return torch.from_numpy(arr.astype(np.float32 if arr.dtype.kind == "f" else np.int64))


def stream_data(sample: Mapping[str, Any], name: str) -> bytes:
    """The ``.npy`` bytes of stream ``name`` in a raw sample; a token shard written before the array format holds
    its codes as ``npy``. Raises ``KeyError`` when the sample lacks the stream."""
    if f"{name}.npy" in sample:
        return sample[f"{name}.npy"]
    if name == CODES and "npy" in sample:
        return sample["npy"]
    raise KeyError(f"{name}.npy")


def aligned_crop(streams: Mapping[str, Tensor], rates: Mapping[str, float], seconds: float,
                 rng: np.random.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, int], float]:
    """Crop ``streams`` (name -> ``[K, F]`` at ``rates[name]`` frames/s) at one start time.

    The start is drawn on the frame grid of the slowest stream (exact for 25 / 50 / 75 Hz), within the shortest
    stream's duration. Returns ``(crops [K, round(seconds * rate)] zero-padded, valid frames, start seconds)``.
    """
    slow = min(rates[n] for n in streams)
    duration = min(x.shape[-1] / rates[n] for n, x in streams.items())
    start = 0.0
    if rng is not None and duration > seconds:
        start = int(rng.integers(0, math.floor((duration - seconds) * slow + 1e-6) + 1)) / slow
    crops, valid = {}, {}
    for name, x in streams.items():
        rate = rates[name]
        first, n = round(start * rate), round(seconds * rate)
        total = min(x.shape[-1], math.floor(duration * rate + 1e-6))
        clip = x[:, first:min(first + n, total)]
        valid[name] = clip.shape[-1]
        crops[name] = torch.nn.functional.pad(clip, (0, n - clip.shape[-1])).contiguous()
    return crops, valid, start


@dataclass
class ArraySource:
    """Resolved array shard paths with their manifest's streams and model (one split)."""

    urls: list[str]
    streams: dict[str, StreamInfo]
    model: ModelInfo
    num_samples: int
    counts: dict[str, int] = field(default_factory=dict)  # samples per shard url, from the manifests
    codec: CodecInfo | None = None  # token shards: the codec of their ``codes``


def resolve_array_shards(spec: Spec, manifest: type[ArrayManifest] = ArrayManifest) -> ArraySource:
    """An array shard folder (or its manifest), or a list of them written by one model -> paths and streams."""
    listed = resolve_listed(spec, manifest)
    (_, first), *rest = listed.manifests
    for folder, other in rest:
        if first.codec is not None and other.codec is not None:
            if other.codec.dims != first.codec.dims:
                raise ValueError(f"token shards in {folder} come from another codec ({other.codec.id}, "
                                 f"{other.codec.dims}) than the others ({first.codec.id}, {first.codec.dims})")
        elif (first.model.hash, first.streams) != (other.model.hash, other.streams):
            raise ValueError(f"array shards in {folder} come from another model ({other.model.id}) than the "
                             f"others ({first.model.id}); encode every part with the same model")
    return ArraySource(listed.urls, first.streams, first.model, listed.total, listed.counts, first.codec)
