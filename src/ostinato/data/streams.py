"""Iterable datasets over WebDataset shards: an endless, resampled training stream and a fixed evaluation set.

Both batch inside the dataset (the DataLoader runs with ``batch_size=None``) so each worker's batch count is
known up front: every rank yields exactly the same number of batches, which is what keeps DDP from hanging.

The sampling machinery does not depend on what a sample holds: ``decode`` turns a raw shard sample into an
item ``(tensor [C, N], valid_length, meta)`` and ``collate`` stacks items into a batch. Audio (``decode_clip`` +
``collate_audio``) is the default; token shards plug in their own pair (``ostinato.data.tokens``). Lengths are
counted along the item's last axis, whose rate is ``sample_rate`` (samples or frames per second).
"""
from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ostinato.data.audio import convert_channels, resample
from ostinato.data.batch import AudioBatch, collate_audio
from ostinato.data.sources import iter_raw_samples

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int, dict[str, Any]]
Decode = Callable[..., Item]            # decode(sample, rng=None) -> item; raises CorruptSample
Collate = Callable[..., Any]            # collate(items, skipped=0) -> batch
MAX_CONSECUTIVE_FAILURES = 1000


class CorruptSample(ValueError):
    """A sample whose audio or metadata cannot be decoded."""


def decode_clip(sample: dict, *, sample_rate: int, channels: int, seconds: float,
                rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Decode a raw shard sample into a clip of exactly ``seconds`` at ``sample_rate``.

    Only the needed frames are decoded (FLAC seeks in memory). The crop start is random when ``rng`` is given,
    else 0. Returns ``(wav [channels, T], valid_length, meta)``; the clip is zero-padded past ``valid_length``.
    Raises ``CorruptSample`` on undecodable audio or JSON.
    """
    key = sample.get("__key__", "?")
    audio_key = next((k for k in ("flac", "wav", "ogg", "mp3") if k in sample), None)
    if audio_key is None:
        raise CorruptSample(f"sample {key}: no audio entry (have {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        with sf.SoundFile(io.BytesIO(sample[audio_key])) as f:
            src_sr, total = f.samplerate, f.frames
            need = math.ceil(seconds * src_sr)
            start = 0
            if rng is not None and total > need:
                start = int(rng.integers(0, total - need + 1))
            if start:
                f.seek(start)
            data = f.read(min(need, total - start), dtype="float32", always_2d=True)
    except Exception as e:
        raise CorruptSample(f"sample {key}: {type(e).__name__}: {e}") from e
    if data.shape[0] == 0 or not np.isfinite(data).all():
        raise CorruptSample(f"sample {key}: empty or non-finite audio")
    wav = convert_channels(torch.from_numpy(np.ascontiguousarray(data.T)), channels)
    wav = resample(wav, src_sr, sample_rate)
    target = round(seconds * sample_rate)
    valid = min(wav.shape[-1], target)
    if wav.shape[-1] < target:
        wav = torch.nn.functional.pad(wav, (0, target - wav.shape[-1]))
    meta = {**meta, "__key__": key, "offset_in_sample": start / src_sr}
    return wav[:, :target].contiguous(), valid, meta


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _split_count(total: int, parts: int, index: int) -> int:
    """How many of ``total`` items part ``index`` of ``parts`` gets when dealt round-robin."""
    return total // parts + (1 if index < total % parts else 0)


class TrainStream(IterableDataset):
    """Endless resampled stream -> ``batches_per_epoch`` batches of random crops per rank and epoch.

    Shards are drawn with replacement by an RNG seeded from (seed, epoch, rank, worker), so ranks and workers
    see different samples and a resumed run does not replay its first epoch.
    """

    def __init__(self, urls: list[str], *, sample_rate: float, channels: int, segment_seconds: float,
                 batch_size: int, batches_per_epoch: int, min_segment_ratio: float = 0.5,
                 shuffle_buffer: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1,
                 decode: Decode | None = None, collate: Collate = collate_audio):
        super().__init__()
        if not urls:
            raise ValueError("TrainStream needs at least one shard")
        self.urls = list(urls)
        self.sample_rate, self.channels, self.segment_seconds = sample_rate, channels, segment_seconds
        self.decode = decode or partial(decode_clip, sample_rate=sample_rate, channels=channels,
                                        seconds=segment_seconds)
        self.collate = collate
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.min_segment_ratio, self.shuffle_buffer = min_segment_ratio, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.skipped = 0  # corrupt samples seen by this copy of the dataset

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _raw_samples(self, rng: np.random.Generator) -> Iterator[dict]:
        while True:
            url = self.urls[int(rng.integers(len(self.urls)))]
            try:
                yield from iter_raw_samples(url)
            except FileNotFoundError:
                raise
            except Exception as e:  # a truncated or unreadable tar: keep what was read, move on
                self._count_skip(f"shard {url}: {type(e).__name__}: {e}")

    def _shuffled(self, rng: np.random.Generator) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in self._raw_samples(rng):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample

    def _count_skip(self, reason: str) -> None:
        self.skipped += 1
        log.warning("skipped corrupt data (%d so far in rank %d worker %d): %s",
                    self.skipped, self.rank, _worker()[0], reason)

    def _items(self, rng: np.random.Generator) -> Iterator[Item]:
        failures = 0
        min_len = self.min_segment_ratio * self.segment_seconds * self.sample_rate
        for sample in self._shuffled(rng):
            try:
                wav, n, meta = self.decode(sample, rng=rng)
            except CorruptSample as e:
                self._count_skip(str(e))
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(f"{failures} corrupt samples in a row from {self.urls[:3]}...; "
                                       "check the shards (`ostinato prep shards` report)") from e
                continue
            failures = 0
            if n >= min_len:
                yield wav, n, meta

    def __iter__(self) -> Iterator[AudioBatch]:
        worker, num_workers = _worker()
        n_batches = _split_count(self.batches_per_epoch, num_workers, worker)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        items = self._items(rng)
        reported = self.skipped
        for _ in range(n_batches):
            batch = [next(items) for _ in range(self.batch_size)]
            yield self.collate(batch, skipped=self.skipped - reported)
            reported = self.skipped


class EvalSet(IterableDataset):
    """The first ``num_samples // world_size * world_size`` samples in shard order, dealt round-robin to ranks.

    Every rank gets the same number of samples and batches. Clips start at the beginning of each sample. A corrupt
    sample is counted and replaced by silence of length 0, so counts stay equal across ranks.
    """

    def __init__(self, urls: list[str], *, num_samples: int, sample_rate: float, channels: int,
                 segment_seconds: float, batch_size: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, decode: Decode | None = None, collate: Collate = collate_audio,
                 blank: Callable[[], torch.Tensor] | None = None):
        super().__init__()
        self.per_rank = num_samples // world_size
        if self.per_rank == 0:
            raise ValueError(f"evaluation set has {num_samples} samples, fewer than the {world_size} ranks")
        self.urls = list(urls)
        self.sample_rate, self.channels, self.segment_seconds = sample_rate, channels, segment_seconds
        self.batch_size, self.num_workers = batch_size, max(1, num_workers)
        self.rank, self.world_size = rank, world_size
        self.skipped = 0
        self.decode = decode or partial(decode_clip, sample_rate=sample_rate, channels=channels,
                                        seconds=segment_seconds)
        self.collate = collate
        # what replaces a corrupt sample (at length 0): silence by default
        self.blank = blank or partial(torch.zeros, channels, round(segment_seconds * sample_rate))

    def __len__(self) -> int:
        return sum(math.ceil(_split_count(self.per_rank, self.num_workers, w) / self.batch_size)
                   for w in range(self.num_workers))

    def _mine(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        index = 0
        for url in self.urls:
            for sample in iter_raw_samples(url):
                local, owner = divmod(index, self.world_size)
                index += 1
                if local >= self.per_rank:
                    return
                if owner == self.rank and local % num_workers == worker:
                    yield sample
        if index < self.per_rank * self.world_size:
            raise RuntimeError(f"evaluation shards hold {index} samples, expected {self.per_rank * self.world_size}")

    def _decode(self, sample: dict) -> Item:
        try:
            return self.decode(sample)
        except CorruptSample as e:
            self.skipped += 1
            log.warning("evaluation sample replaced by a blank of length 0 (%d so far): %s", self.skipped, e)
            return self.blank(), 0, {"__key__": sample.get("__key__"), "corrupt": True}

    def __iter__(self) -> Iterator[AudioBatch]:
        batch: list[Item] = []
        for sample in self._mine():
            batch.append(self._decode(sample))
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)


def count_samples(urls: list[str]) -> int:
    """Count samples by reading the tar headers (used when no manifest gives the count)."""
    return sum(1 for url in urls for _ in iter_raw_samples(url))
