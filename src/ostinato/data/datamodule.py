"""``ShardDataModule``: the base of every shard datamodule; ``AudioDataModule``: audio shards -> ``AudioBatch``."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ostinato.data.sources import ShardSource, resolve_shards
from ostinato.data.streams import EvalSet, TrainStream, count_samples

log = logging.getLogger(__name__)
Spec = str | os.PathLike | Sequence[str | os.PathLike]


class _EpochLoader(DataLoader):
    """A DataLoader that tells its dataset which epoch starts, before workers copy it."""

    def __init__(self, dataset: TrainStream, next_epoch, **kw: Any):
        super().__init__(dataset, batch_size=None, **kw)
        self._next_epoch = next_epoch

    def __iter__(self):
        self.dataset.epoch = self._next_epoch()
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """The base of every shard datamodule (audio, codec tokens, array shards, MusicLM token streams): the splits,
    crop lengths, a global batch size dealt over the ranks, fixed-length epochs of an endless resampled training
    stream, an evaluation set equal on every rank, loaders and resume state. A subclass says how a split resolves
    (``source``) and how its items decode (``train_dataset`` / ``eval_dataset``, built with ``train_stream_kw`` /
    ``eval_set_kw``); its ``__init__`` takes its own arguments and passes the rest (``**loading``) here.

    ``batch_size`` is global: each of the ``world_size`` ranks gets ``batch_size // world_size``. An epoch is
    ``batches_per_epoch`` optimizer steps' worth of batches on every rank. Items shorter than ``min_segment_ratio``
    of a segment are dropped in training; evaluation items are zero-padded with their lengths set.
    """

    needs_split = True  # at least one of train / valid / test (an audio datamodule may be built for its settings)
    init_kwargs_to_base = True  # a subclass's **loading are these arguments (the config checks read them here)

    def __init__(self, train: Spec | None = None, valid: Spec | None = None, test: Spec | None = None, *,
                 segment_seconds: float = 10.0, eval_segment_seconds: float | None = None,
                 min_segment_ratio: float = 0.5, batch_size: int = 16, eval_batch_size: int | None = None,
                 batches_per_epoch: int = 1000, num_workers: int = 2, shuffle_buffer: int = 256, seed: int = 0,
                 pin_memory: bool = False, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if self.needs_split and train is None and valid is None and test is None:
            raise ValueError(f"{type(self).__name__} needs at least one of data.train, data.valid, data.test")
        self.specs = {"train": train, "valid": valid, "test": test}
        self.segment_seconds = float(segment_seconds)
        self.eval_segment_seconds = float(eval_segment_seconds or segment_seconds)
        self.min_segment_ratio = min_segment_ratio
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.batches_per_epoch, self.num_workers = batches_per_epoch, num_workers
        self.shuffle_buffer, self.seed, self.pin_memory = shuffle_buffer, seed, pin_memory
        self._rank, self._world_size = rank, world_size
        self._sources: dict[str, Any] = {}
        self.train_epoch = 0

    # -- distributed layout -------------------------------------------------------------------------------
    @property
    def world(self) -> tuple[int, int]:
        """(rank, world_size): explicit values first, then the attached Trainer, then torch.distributed."""
        if self._world_size is not None:
            return int(self._rank or 0), int(self._world_size)
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def per_rank(self, global_batch: int, key: str) -> int:
        _, world = self.world
        if global_batch % world:
            raise ValueError(f"data.{key}={global_batch} does not divide over {world} ranks; "
                             f"use a multiple of {world}")
        return global_batch // world

    # -- sources --------------------------------------------------------------------------------------------
    def source(self, split: str) -> Any:
        """The resolved shards of ``split`` (cached in ``_sources``): urls, sample counts, what wrote them."""
        raise NotImplementedError

    def _first(self) -> Any:
        """The source of the first configured split (where the manifest's dimensions are read)."""
        return self.source(next(s for s in ("train", "valid", "test") if self.specs[s] is not None))

    def _agree(self, split: str, src: Any, key: Callable[[Any], Any], noun: str) -> None:
        """``key(src)`` must equal ``key`` of every split resolved before: one codec / model across the splits."""
        for other, known in self._sources.items():
            if key(known) != key(src):
                raise ValueError(f"data.{split} comes from the {noun} {key(src)} but data.{other} from {key(known)}: "
                                 f"every split must use the same {noun}")

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",)}.get(stage or "fit",
                                                                                            ())
        for split in splits:
            if self.specs[split] is not None:
                self.source(split)
        if stage in (None, "fit"):
            self.per_rank(self.batch_size, "batch_size")

    # -- loaders --------------------------------------------------------------------------------------------
    def _next_train_epoch(self) -> int:
        self.train_epoch += 1
        return self.train_epoch

    def train_stream_kw(self) -> dict[str, Any]:
        """The ``TrainStream`` settings every datamodule shares (this rank's batch, epochs, crops, seed)."""
        rank, world = self.world
        return dict(segment_seconds=self.segment_seconds, batch_size=self.per_rank(self.batch_size, "batch_size"),
                    batches_per_epoch=self.batches_per_epoch, min_segment_ratio=self.min_segment_ratio,
                    shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank, world_size=world)

    def eval_set_kw(self) -> dict[str, Any]:
        """The ``EvalSet`` settings every datamodule shares."""
        rank, world = self.world
        return dict(segment_seconds=self.eval_segment_seconds,
                    batch_size=self.per_rank(self.eval_batch_size, "eval_batch_size"), num_workers=self.num_workers,
                    rank=rank, world_size=world)

    def train_dataset(self) -> TrainStream:
        raise NotImplementedError

    def eval_dataset(self, split: str) -> EvalSet:
        raise NotImplementedError

    def _loader_kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kw["prefetch_factor"] = 4
        return kw

    def train_dataloader(self) -> DataLoader:
        return _EpochLoader(self.train_dataset(), self._next_train_epoch, **self._loader_kw())

    def val_dataloader(self) -> DataLoader | list:
        """The valid split's loader; none (Lightning skips validation) when ``data.valid`` is null."""
        if self.specs["valid"] is None:
            return []
        return DataLoader(self.eval_dataset("valid"), batch_size=None, **self._loader_kw())

    def test_dataloader(self) -> DataLoader | list:
        if self.specs["test"] is None:
            return []
        return DataLoader(self.eval_dataset("test"), batch_size=None, **self._loader_kw())

    # -- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"train_epoch": self.train_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_epoch = int(state.get("train_epoch", 0))


class AudioDataModule(ShardDataModule):
    """Audio shards (``ostinato prep shards``) -> ``AudioBatch``: random crops for training, fixed ones for
    evaluation. Shards whose rate or channel count differ from ``sample_rate`` / ``channels`` are converted on the
    fly. The rest (``**loading``) is ``ShardDataModule``'s."""

    needs_split = False

    def __init__(self, train: Spec | None = None, valid: Spec | None = None, test: Spec | None = None, *,
                 sample_rate: int, channels: int = 1, **loading: Any):
        if channels not in (1, 2):
            raise ValueError(f"data.channels must be 1 or 2, got {channels}")
        if sample_rate is None or channels is None:
            raise ValueError("data.sample_rate and data.channels are unset: this family has no sample_rate / "
                             "channels of its own (e.g. MusicGen); give the codec's, e.g. data.sample_rate=24000 "
                             "data.channels=1")
        super().__init__(train, valid, test, **loading)
        self.sample_rate, self.channels = int(sample_rate), int(channels)

    def source(self, split: str) -> ShardSource:
        if split not in self._sources:
            spec = self.specs[split]
            if spec is None:
                raise ValueError(f"no shards configured for the {split} split (data.{split})")
            src = resolve_shards(spec)
            if src.sample_rate and src.sample_rate != self.sample_rate:
                log.info("%s shards are at %d Hz; resampling to %d Hz on the fly", split, src.sample_rate,
                         self.sample_rate)
            self._sources[split] = src
        return self._sources[split]

    def train_dataset(self) -> TrainStream:
        return TrainStream(self.source("train").urls, sample_rate=self.sample_rate, channels=self.channels,
                           expected=self.source("train").counts, **self.train_stream_kw())

    def eval_dataset(self, split: str) -> EvalSet:
        src = self.source(split)
        n = src.num_samples if src.num_samples is not None else count_samples(src.urls)
        return EvalSet(src.urls, num_samples=n, sample_rate=self.sample_rate, channels=self.channels,
                       **self.eval_set_kw())
