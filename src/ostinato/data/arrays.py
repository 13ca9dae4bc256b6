"""Array shards: what a model's encoder made of audio shards, for families that train on encoded audio.

The format (layout, manifest, encoding of one array) is ``data/array_shards.py``; this module reads it for
training. Training crops every stream at the same start time (``aligned_crop``), so a batch holds time-aligned
windows of the streams a family asks for.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ostinato.data.array_shards import (ARRAY_FORMAT, CODES, ArrayManifest, ArrayShard, ArraySource, ModelInfo,
                                        aligned_crop, decode_array, encode_array, resolve_array_shards, stream_data)
from ostinato.data.batch import length_mask
from ostinato.data.datamodule import ShardDataModule, Spec
from ostinato.data.manifest import StreamInfo
from ostinato.data.streams import CorruptSample, EvalSet, TrainStream

log = logging.getLogger(__name__)

__all__ = ["ARRAY_FORMAT", "CODES", "StreamInfo", "ModelInfo", "ArrayShard", "ArrayManifest", "ArraySource",
           "ArrayBatch", "ArrayDataModule", "encode_array", "decode_array", "resolve_array_shards", "stream_data",
           "aligned_crop"]


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
        streams = {name: decode_array(stream_data(sample, name)) for name in rates}
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
