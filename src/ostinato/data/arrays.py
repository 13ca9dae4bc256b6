"""Array shards: what a model's encoder made of audio shards, for families that train on encoded audio.

Musika trains its latent GAN on continuous latents (float16 ``[D, F]``) of its autoencoder; the Jukebox-style
priors train on the codes of a hierarchical VQ-VAE (int16 ``[1, F_level]`` per level). Both are *streams* of
frames at known rates, written once by ``ostinato encode`` and read here.

Layout of an array shard folder::

  shard-000000.tar   samples ``<key>.<stream>.npy`` (one array ``[K, F]`` per stream) + ``<key>.json`` (the audio
                     sample's metadata plus ``frames`` per stream), one array shard per audio shard, same name
  shard-000000.json  done marker (samples, frames of the first stream, skipped)
  manifest.json      written last: shards, the streams (rate, channels, dtype) and the model that wrote them (id,
                     weights hash, kind, sample rate, channels, its own fields)

Training crops every stream at the same start time (``aligned_crop``), so a batch holds time-aligned windows of
the streams a family asks for.
"""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ostinato.data.batch import length_mask
from ostinato.data.datamodule import ShardDataModule, Spec
from ostinato.data.manifest import ShardManifest, StreamInfo, card_named
from ostinato.data.musiclm_tokens import aligned_crop
from ostinato.data.sources import resolve_listed
from ostinato.data.streams import CorruptSample, EvalSet, TrainStream

log = logging.getLogger(__name__)

__all__ = ["ARRAY_FORMAT", "StreamInfo", "ModelInfo", "ArrayShard", "ArrayManifest", "ArrayBatch",
           "ArrayDataModule", "encode_array", "decode_array", "resolve_array_shards"]

ARRAY_FORMAT = "ostinato.array-shards/1"


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
    FORMAT: ClassVar[str] = ARRAY_FORMAT
    KIND: ClassVar[str] = "array"
    HINT: ClassVar[str] = "write the arrays with `ostinato encode SHARDS OUT --model REF`"

    shards: list[ArrayShard]
    streams: dict[str, StreamInfo]
    model: ModelInfo
    source: dict[str, Any] = field(default_factory=dict)
    format: str = ARRAY_FORMAT

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<manifest>") -> ArrayManifest:
        if d.get("format") != ARRAY_FORMAT:
            raise ValueError(f"{origin}: format {d.get('format')!r} is not {ARRAY_FORMAT!r} (token shards from "
                             "`ostinato tokenize` are read by data=demo_tokens, not by this datamodule)")
        return cls(shards=[ArrayShard(**s) for s in d["shards"]],
                   streams={k: StreamInfo(**card_named(v)) for k, v in d["streams"].items()},
                   model=ModelInfo(**d["model"]), source=d.get("source", {}))


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


@dataclass
class ArraySource:
    """Resolved array shard paths with their manifest's streams and model (one split)."""

    urls: list[str]
    streams: dict[str, StreamInfo]
    model: ModelInfo
    num_samples: int
    counts: dict[str, int] = field(default_factory=dict)  # samples per shard url, from the manifests


def resolve_array_shards(spec: Spec) -> ArraySource:
    """An array shard folder (or its manifest), or a list of them written by one model -> paths and streams."""
    listed = resolve_listed(spec, ArrayManifest)
    (_, first), *rest = listed.manifests
    for folder, manifest in rest:
        if (first.model.hash, first.streams) != (manifest.model.hash, manifest.streams):
            raise ValueError(f"array shards in {folder} come from another model ({manifest.model.id}) than the "
                             f"others ({first.model.id}); encode every part with the same model")
    return ArraySource(listed.urls, first.streams, first.model, listed.total, listed.counts)


@dataclass
class ArrayBatch:
    """Time-aligned crops of the requested streams.

    arrays:   stream -> ``[B, K, F_stream]`` (float32 latents or int64 codes), zero past the item's length
    lengths:  stream -> ``[B]`` valid frames
    meta:     B dicts, the sample JSON (caption, genre, composer, ...) + ``__key__`` and ``offset_seconds``
    skipped:  corrupt samples the producing worker skipped since its previous batch
    """

    arrays: dict[str, Tensor]
    lengths: dict[str, Tensor]
    meta: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0

    def mask(self, stream: str) -> Tensor:
        """``[B, F]`` bool, True on the valid frames of ``stream``."""
        return length_mask(self.lengths[stream], self.arrays[stream].shape[-1])

    @property
    def captions(self) -> list[str]:
        return [str(m.get("caption", "")) for m in self.meta]

    def __len__(self) -> int:
        return len(self.meta)


def collate_arrays(items: list[tuple[dict[str, Tensor], int, dict[str, Any]]], skipped: int = 0) -> ArrayBatch:
    names = list(items[0][0])
    return ArrayBatch(arrays={n: torch.stack([x[n] for x, _, _ in items]) for n in names},
                      lengths={n: torch.tensor([m["lengths"][n] for _, _, m in items], dtype=torch.long)
                               for n in names},
                      meta=[m for _, _, m in items], skipped=skipped)


def decode_array_clip(sample: dict, *, seconds: float, rates: Mapping[str, float], channels: Mapping[str, int],
                      rng: np.random.Generator | None = None) -> tuple[dict[str, Tensor], int, dict[str, Any]]:
    """A raw array-shard sample -> ``(crops {stream: [K, round(seconds * rate)]}, valid frames of the first
    stream, meta)``; the crop starts at a random time with ``rng``, else at 0. Raises ``CorruptSample``."""
    key = sample.get("__key__", "?")
    try:
        streams = {name: decode_array(sample[f"{name}.npy"]) for name in rates}
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except Exception as e:
        raise CorruptSample(f"array sample {key}: {type(e).__name__}: {e}") from e
    for name, x in streams.items():
        if x.ndim != 2 or x.shape[0] != channels[name] or x.shape[-1] == 0:
            raise CorruptSample(f"array sample {key}: stream {name} of shape {tuple(x.shape)}, expected "
                                f"[{channels[name]}, F>0]")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise CorruptSample(f"array sample {key}: stream {name} holds NaN or inf")
    crops, valid, start = aligned_crop(streams, rates, seconds, rng)
    first = next(iter(rates))
    return crops, valid[first], {**meta, "__key__": key, "offset_seconds": start, "lengths": valid}


class ArrayDataModule(ShardDataModule):
    """Array shards (``ostinato encode``) -> ``ArrayBatch`` of time-aligned crops.

    Args:
        train, valid, test: array shard folders (or manifests, or lists of them) written by one model.
        streams: which streams to load, the first one setting the item's valid length and the minimum crop
            (default: all the manifest lists, in its order), e.g. ``[middle, top]`` for a Jukebox upsampler.
        segment_seconds: crop length in seconds (frames = ``round(segment_seconds * rate)`` per stream).
        The rest (``**loading``) is ``ShardDataModule``'s.
    """

    def __init__(self, train: Spec | None = None, valid: Spec | None = None, test: Spec | None = None, *,
                 streams: Sequence[str] | None = None, **loading: Any):
        super().__init__(train, valid, test, **loading)
        self.wanted = None if streams is None else [str(s) for s in streams]

    def source(self, split: str) -> ArraySource:
        if split not in self._sources:
            spec = self.specs[split]
            if spec is None:
                raise ValueError(f"no array shards configured for the {split} split (data.{split})")
            src = resolve_array_shards(spec)
            if self.wanted is not None:
                missing = [s for s in self.wanted if s not in src.streams]
                if missing:
                    raise ValueError(f"data.streams asks for {missing} but {spec} holds {list(src.streams)}")
            self._agree(split, src, lambda s: s.model.hash, "model")
            self._sources[split] = src
        return self._sources[split]

    @property
    def model(self) -> ModelInfo:
        """The model that wrote the arrays (id, hash, kind, sample rate), from the first split's manifest."""
        return self._first().model

    @property
    def streams(self) -> dict[str, StreamInfo]:
        """The loaded streams (``data.streams`` or all), in order."""
        all_streams = self._first().streams
        names = self.wanted if self.wanted is not None else list(all_streams)
        return {n: all_streams[n] for n in names}

    def _decode(self, seconds: float) -> partial:
        streams = self.streams
        return partial(decode_array_clip, seconds=seconds, rates={n: s.rate for n, s in streams.items()},
                       channels={n: s.channels for n, s in streams.items()})

    def train_dataset(self) -> TrainStream:
        first = next(iter(self.streams.values()))
        return TrainStream(self.source("train").urls, sample_rate=first.rate, channels=first.channels,
                           decode=self._decode(self.segment_seconds), collate=collate_arrays,
                           expected=self.source("train").counts, **self.train_stream_kw())

    def eval_dataset(self, split: str) -> EvalSet:
        src, streams = self.source(split), self.streams
        first = next(iter(streams.values()))
        seconds = self.eval_segment_seconds
        return EvalSet(src.urls, num_samples=src.num_samples, sample_rate=first.rate, channels=first.channels,
                       decode=self._decode(seconds), collate=_collate_eval(streams, seconds), blank=dict,
                       **self.eval_set_kw())


def _collate_eval(streams: Mapping[str, StreamInfo], seconds: float):
    """``collate_arrays`` where a corrupt evaluation sample (an empty dict at length 0) becomes zeros."""

    def zeros(info: StreamInfo) -> Tensor:
        n = round(seconds * info.rate)
        return torch.zeros(info.channels, n) if info.card == 0 else torch.zeros(info.channels, n,
                                                                                        dtype=torch.long)

    def collate(items: list, skipped: int = 0) -> ArrayBatch:
        fixed = []
        for x, n, meta in items:
            if not x:
                x = {name: zeros(info) for name, info in streams.items()}
                meta = {**meta, "lengths": {name: 0 for name in streams}}
            fixed.append((x, n, meta))
        return collate_arrays(fixed, skipped)

    return collate
