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
import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ostinato.data.audio import convert_channels, resample
from ostinato.data.batch import AudioBatch, collate_audio
from ostinato.data.sources import iter_raw_samples
from ostinato.errors import UserError

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int, dict[str, Any]]
Decode = Callable[..., Item]            # decode(sample, rng=None) -> item; raises CorruptSample
Collate = Callable[..., Any]            # collate(items, skipped=0) -> batch
MAX_CONSECUTIVE_FAILURES = 1000
WARN_FIRST = 5  # corrupt samples logged one by one per dataset copy; the rest are only counted


class CorruptSample(ValueError):
    """A sample whose audio or metadata cannot be decoded."""


class DataError(UserError):
    """Data a run cannot go on with (every shard gone, every sample undecodable): one line naming the folder."""

    def __init__(self, message: str) -> None:
        # raised in a DataLoader worker, it comes back as DataError("Caught DataError in DataLoader worker ...
        # Original Traceback ... ostinato.data.streams.DataError: MESSAGE"): keep MESSAGE, the one line
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.partition(f"{type(self).__name__}: ")[2] or last
        super().__init__(message)


def shard_folders(urls: list[str]) -> str:
    """Where shards live, for messages: their folder, or the first one and how many others."""
    folders = list(dict.fromkeys(os.path.dirname(u) or "." for u in urls))
    if not folders:
        return "(no shards)"
    return folders[0] if len(folders) == 1 else f"{folders[0]} (and {len(folders) - 1} more folders)"


def _warn_skip(before: int, after: int, rank: int, reason: str) -> None:
    """Log the skips of a dataset copy that bring its count from ``before`` to ``after`` while fewer than
    ``WARN_FIRST`` were logged, then say once that the rest are only counted."""
    if before >= WARN_FIRST:
        return
    log.warning("skipped corrupt data (%d so far in rank %d worker %d): %s", after, rank, _worker()[0], reason)
    if after >= WARN_FIRST:
        log.warning("further corrupt samples in rank %d worker %d are counted (data/corrupt_skipped), not logged",
                    rank, _worker()[0])


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
        have = sorted(k for k in sample if not k.startswith("__"))
        raise CorruptSample(f"sample {key}: no audio entry (have {have})")
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
                 decode: Decode | None = None, collate: Collate = collate_audio,
                 expected: Mapping[str, int] | None = None):
        super().__init__()
        if not urls:
            raise ValueError("TrainStream needs at least one shard")
        if batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(f"data.batch_size (per rank: {batch_size}) and data.batches_per_epoch "
                             f"({batches_per_epoch}) must be at least 1")
        self.urls = list(urls)
        self.sample_rate, self.channels, self.segment_seconds = sample_rate, channels, segment_seconds
        self.decode = decode or partial(decode_clip, sample_rate=sample_rate, channels=channels,
                                        seconds=segment_seconds)
        self.collate = collate
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.min_segment_ratio, self.shuffle_buffer = min_segment_ratio, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.expected = dict(expected or {})  # samples per shard (from manifests): what a truncated tar lost
        self.epoch = 0
        self.skipped = 0  # corrupt samples seen by this copy of the dataset
        self._where = shard_folders(self.urls)
        # until the first usable sample: every url read to its end, every (url, key) read / undecodable / short
        self._usable = False
        self._visited: set[str] = set()
        self._seen: set[tuple[str, str]] = set()
        self._failed: set[tuple[str, str]] = set()
        self._short: set[tuple[str, str]] = set()
        self._first_error = ""

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _read(self, url: str) -> Iterator[dict]:
        """The raw samples of one shard (joined streams override this)."""
        return iter_raw_samples(url)

    def _raw_samples(self, rng: np.random.Generator) -> Iterator[dict]:
        while True:
            url = self.urls[int(rng.integers(len(self.urls)))]
            read = 0
            try:
                for sample in self._read(url):
                    read += 1
                    if not self._usable:
                        self._seen.add((url, str(sample.get("__key__"))))
                    yield {**sample, "__shard__": url}
            except FileNotFoundError:
                self._drop(url)
                continue
            except Exception as e:  # a truncated or unreadable tar: keep what was read, move on
                lost = max(1, self.expected.get(url, 0) - read)
                self._count_skip(f"shard {url}: {type(e).__name__}: {e} ({lost} samples lost)", lost)
            else:
                if read < self.expected.get(url, 0):  # a tar cut at a member boundary ends without an error
                    lost = self.expected[url] - read
                    self._count_skip(f"shard {url}: ends after {read} of its {read + lost} samples", lost)
            self._visited.add(url)
            if not self._usable and not self._seen and self._visited >= set(self.urls):
                raise DataError(f"no sample could be read from the {len(self.urls)} shards in {self._where} "
                                f"({self._first_error}); rebuild them with `ostinato prep shards`")

    def _drop(self, url: str) -> None:
        """A shard deleted while the run reads: go on without it, or stop when none is left."""
        self.urls.remove(url)
        if not self.urls:
            raise DataError(f"every shard in {self._where} is gone (deleted while the run read them); restore "
                            "them or point data.train at shards that exist, then resume")
        log.warning("shard %s is gone (deleted while the run reads it?); going on with the other %d shards",
                    url, len(self.urls))

    def _shuffled(self, rng: np.random.Generator) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in self._raw_samples(rng):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample

    def _count_skip(self, reason: str, n: int = 1) -> None:
        before, self.skipped = self.skipped, self.skipped + n
        self._first_error = self._first_error or reason
        _warn_skip(before, self.skipped, self.rank, reason)

    def _check_any_usable(self, sample: dict, short: bool) -> None:
        """Stop once every sample of every shard was read and none can be used (instead of looping forever)."""
        if self._usable:
            return
        (self._short if short else self._failed).add((sample["__shard__"], str(sample.get("__key__"))))
        if self._visited < set(self.urls) or len(self._failed) + len(self._short) < len(self._seen):
            return
        if not self._short:
            raise DataError(f"every sample of the {len(self.urls)} shards in {self._where} failed to decode (first: "
                            f"{self._first_error}); rebuild them with `ostinato prep shards` (see its report.json)")
        raise DataError(f"no sample of the shards in {self._where} lasts min_segment_ratio x segment_seconds = "
                        f"{self.min_segment_ratio * self.segment_seconds:g} s; lower data.segment_seconds or "
                        "data.min_segment_ratio")

    def _items(self, rng: np.random.Generator) -> Iterator[Item]:
        failures = 0
        min_len = self.min_segment_ratio * self.segment_seconds * self.sample_rate
        for sample in self._shuffled(rng):
            try:
                wav, n, meta = self.decode(sample, rng=rng)
            except CorruptSample as e:
                self._count_skip(str(e))
                self._check_any_usable(sample, short=False)
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise DataError(f"{failures} corrupt samples in a row from the shards in {self._where} (last: "
                                    f"{e}); rebuild them with `ostinato prep shards` (see its report.json)") from e
                continue
            failures = 0
            if n >= min_len:
                if not self._usable:
                    self._usable = True
                    self._seen, self._failed, self._short = set(), set(), set()
                yield wav, n, meta
            else:
                self._check_any_usable(sample, short=True)

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
        self.where = shard_folders(self.urls)  # for messages
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

    def _read(self, url: str) -> Iterator[dict]:
        """The raw samples of one shard (joined streams override this)."""
        return iter_raw_samples(url)

    def _all_samples(self) -> Iterator[dict]:
        """Every sample in shard order; a truncated, unreadable or deleted shard gives what it holds, and the
        samples lost are given at the end as ``__lost__`` markers up to ``per_rank * world_size`` (every rank
        reads the same shards, so every rank gets the same count)."""
        wanted, index, problems = self.per_rank * self.world_size, 0, []
        for url in self.urls:
            try:
                for sample in self._read(url):
                    index += 1
                    yield sample
                    if index >= wanted:
                        return
            except Exception as e:  # noqa: BLE001 - a damaged or missing shard: counted below, never a crash
                problems.append(f"shard {url}: {type(e).__name__}: {e}")
        reason = "; ".join(problems) or "the shards hold fewer samples than their manifest says"
        for i in range(index, wanted):
            yield {"__key__": f"lost-{i:06d}", "__lost__": reason}

    def _mine(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        for index, sample in enumerate(self._all_samples()):
            local, owner = divmod(index, self.world_size)
            if owner == self.rank and local % num_workers == worker:
                yield sample

    def _decode(self, sample: dict) -> Item:
        try:
            if "__lost__" in sample:
                raise CorruptSample(f"sample {sample['__key__']} lost: {sample['__lost__']}")
            return self.decode(sample)
        except CorruptSample as e:
            before, self.skipped = self.skipped, self.skipped + 1
            _warn_skip(before, self.skipped, self.rank, f"evaluation sample replaced by a blank of length 0: {e}")
            return self.blank(), 0, {"__key__": sample.get("__key__"), "corrupt": True, "error": str(e)}

    def __iter__(self) -> Iterator[AudioBatch]:
        batch: list[Item] = []
        reported = self.skipped
        for sample in self._mine():
            batch.append(self._decode(sample))
            if len(batch) == self.batch_size:
                yield self.collate(batch, skipped=self.skipped - reported)
                batch, reported = [], self.skipped
        if batch:
            yield self.collate(batch, skipped=self.skipped - reported)


def count_samples(urls: list[str]) -> int:
    """Count samples by reading the tar headers (used when no manifest gives the count); a truncated shard
    counts the samples before the damage."""
    total = 0
    for url in urls:
        try:
            for _ in iter_raw_samples(url):
                total += 1
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - what a damaged tar holds is what the evaluation reads
            log.warning("shard %s is damaged (%s: %s); counting the samples before the damage", url,
                        type(e).__name__, e)
    return total
