"""``TokenDataModule``: token shards (``ostinato tokenize``) -> ``TokenBatch`` for LM families.

The sampling is the audio loader's (``data/streams.py``): an endless training stream resampled per (seed, epoch,
rank, worker) with fixed-length epochs, and an evaluation set dealt over the ranks; only the decoding differs
(random crops of ``round(segment_seconds * frame_rate)`` frames of codes instead of audio). The codec's frame
rate, ``n_q`` and cardinality come from the token manifests (``codec``), their single home.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning as L
import torch

from ostinato.data.batch import length_mask
from ostinato.data.datamodule import AudioDataModule
from ostinato.data.streams import EvalSet, TrainStream
from ostinato.data.tokens import CodecInfo, TokenSource, decode_token_clip, resolve_token_shards

log = logging.getLogger(__name__)
Spec = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass
class TokenBatch:
    """A batch of fixed-length code crops.

    codes:    [B, K, T] int64, 0 past ``lengths``
    lengths:  [B] int64, valid frames per item
    captions: B strings ("" when a sample has none)
    meta:     B dicts, the sample JSON (caption, genre, instruments, bpm, key, ...)
    skipped:  corrupt samples the producing worker skipped since its previous batch
    """

    codes: torch.Tensor
    lengths: torch.Tensor
    captions: list[str]
    meta: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] bool, True on valid frames."""
        return length_mask(self.lengths, self.codes.shape[-1])

    def __len__(self) -> int:
        return self.codes.shape[0]


def collate_tokens(items: list[tuple[torch.Tensor, int, dict[str, Any]]], skipped: int = 0) -> TokenBatch:
    """Stack ``(codes [K, T], length, meta)`` items into a ``TokenBatch``."""
    return TokenBatch(codes=torch.stack([c for c, _, _ in items]),
                      lengths=torch.tensor([n for _, n, _ in items], dtype=torch.long),
                      captions=[str(m.get("caption", "")) for _, _, m in items],
                      meta=[m for _, _, m in items], skipped=skipped)


class TokenDataModule(AudioDataModule):
    """Token shards for training (random crops, endless, resampled) and evaluation (crops from frame 0).

    ``batch_size`` is global (divided over the ranks); an epoch is ``batches_per_epoch`` batches on every rank.
    Items shorter than half a segment are dropped in training; shorter ones are zero-padded with ``lengths`` set.
    Rank/world layout, loaders and resume state are ``AudioDataModule``'s.
    """

    def __init__(self, train: Spec | None = None, valid: Spec | None = None, test: Spec | None = None, *,
                 segment_seconds: float, batch_size: int, eval_batch_size: int | None = None,
                 eval_segment_seconds: float | None = None, min_segment_ratio: float = 0.5,
                 batches_per_epoch: int = 1000, num_workers: int = 2, shuffle_buffer: int = 256, seed: int = 0,
                 pin_memory: bool = False, rank: int | None = None, world_size: int | None = None):
        L.LightningDataModule.__init__(self)  # AudioDataModule's __init__ wants a sample rate and channels
        if train is None and valid is None and test is None:
            raise ValueError("TokenDataModule needs at least one of data.train, data.valid, data.test")
        self._init_loading(train, valid, test, segment_seconds=segment_seconds,
                           eval_segment_seconds=eval_segment_seconds, min_segment_ratio=min_segment_ratio,
                           batch_size=batch_size, eval_batch_size=eval_batch_size,
                           batches_per_epoch=batches_per_epoch, num_workers=num_workers,
                           shuffle_buffer=shuffle_buffer, seed=seed, pin_memory=pin_memory, rank=rank,
                           world_size=world_size)

    # -- sources --------------------------------------------------------------------------------------------
    def source(self, split: str) -> TokenSource:  # type: ignore[override]
        if split not in self._sources:
            spec = self.specs[split]
            if spec is None:
                raise ValueError(f"no token shards configured for the {split} split (data.{split})")
            src = resolve_token_shards(spec)
            for other, known in self._sources.items():
                if (known.codec.frame_rate, known.codec.n_q, known.codec.cardinality) != (
                        src.codec.frame_rate, src.codec.n_q, src.codec.cardinality):
                    raise ValueError(f"data.{split} tokens come from codec {src.codec} but data.{other} from "
                                     f"{known.codec}: every split must use the same codec")
            self._sources[split] = src
        return self._sources[split]

    @property
    def codec(self) -> CodecInfo:
        """The codec that wrote the tokens (frame_rate, n_q, cardinality, ...), from the first split's manifest."""
        split = next(s for s in ("train", "valid", "test") if self.specs[s] is not None)
        return self.source(split).codec

    def frames(self, seconds: float) -> int:
        return round(seconds * self.codec.frame_rate)

    # -- datasets -------------------------------------------------------------------------------------------
    def train_dataset(self) -> TrainStream:
        rank, world = self.world
        codec = self.codec
        decode = partial(decode_token_clip, frames=self.frames(self.segment_seconds), n_q=codec.n_q)
        return TrainStream(self.source("train").urls, sample_rate=codec.frame_rate, channels=codec.n_q,
                           segment_seconds=self.segment_seconds,
                           batch_size=self.per_rank(self.batch_size, "batch_size"),
                           batches_per_epoch=self.batches_per_epoch, min_segment_ratio=self.min_segment_ratio,
                           shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank, world_size=world,
                           decode=decode, collate=collate_tokens, expected=self.source("train").counts)

    def eval_dataset(self, split: str) -> EvalSet:
        rank, world = self.world
        codec, src = self.codec, self.source(split)
        frames = self.frames(self.eval_segment_seconds)
        return EvalSet(src.urls, num_samples=src.num_samples, sample_rate=codec.frame_rate, channels=codec.n_q,
                       segment_seconds=self.eval_segment_seconds,
                       batch_size=self.per_rank(self.eval_batch_size, "eval_batch_size"),
                       num_workers=self.num_workers, rank=rank, world_size=world,
                       decode=partial(decode_token_clip, frames=frames, n_q=codec.n_q), collate=collate_tokens,
                       blank=partial(torch.zeros, codec.n_q, frames, dtype=torch.long))
