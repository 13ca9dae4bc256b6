"""``TokenDataModule``: token shards (``ostinato tokenize``) -> ``TokenBatch`` for LM families.

It is the array-shard datamodule reading one stream, ``codes``. The sampling is the audio loader's
(``data/streams.py``): an endless training stream resampled per (seed, epoch, rank, worker) with fixed-length
epochs, and an evaluation set dealt over the ranks; only the decoding differs (random crops of
``round(segment_seconds * frame_rate)`` frames of codes instead of audio). The codec's frame rate, ``n_q`` and
codebook size (``card``) come from the token manifests (``codec``), their single home.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ostinato.data.arrays import ArrayDataModule
from ostinato.data.batch import length_mask
from ostinato.data.datamodule import Spec
from ostinato.data.streams import EvalSet, TrainStream
from ostinato.data.tokens import CODES, CodecInfo, TokenSource, decode_token_clip, resolve_token_shards

log = logging.getLogger(__name__)


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


class TokenDataModule(ArrayDataModule):
    """Token shards for training (random crops, endless, resampled) and evaluation (crops from frame 0): the
    ``codes`` stream of array shards that record their codec.

    Crops are ``round(segment_seconds * frame_rate)`` frames; the codec (frame rate, ``n_q``, codebook size) is
    read from the token manifests. The rest (``**loading``) is ``ShardDataModule``'s.
    """

    def __init__(self, train: Spec | None = None, valid: Spec | None = None, test: Spec | None = None,
                 **loading: Any):
        super().__init__(train, valid, test, streams=[CODES], **loading)

    # -- sources --------------------------------------------------------------------------------------------
    def source(self, split: str) -> TokenSource:
        if split not in self._sources:
            spec = self.specs[split]
            if spec is None:
                raise ValueError(f"no token shards configured for the {split} split (data.{split})")
            src = resolve_token_shards(spec)
            self._agree(split, src, lambda s: s.codec.dims, "codec")
            self._sources[split] = src
        return self._sources[split]

    @property
    def codec(self) -> CodecInfo:
        """The codec that wrote the tokens (frame_rate, n_q, card, ...), from the first split's manifest."""
        return self._first().codec

    def frames(self, seconds: float) -> int:
        return round(seconds * self.codec.frame_rate)

    # -- datasets -------------------------------------------------------------------------------------------
    def train_dataset(self) -> TrainStream:
        codec = self.codec
        decode = partial(decode_token_clip, frames=self.frames(self.segment_seconds), n_q=codec.n_q)
        return TrainStream(self.source("train").urls, sample_rate=codec.frame_rate, channels=codec.n_q,
                           decode=decode, collate=collate_tokens, expected=self.source("train").counts,
                           **self.train_stream_kw())

    def eval_dataset(self, split: str) -> EvalSet:
        codec, src = self.codec, self.source(split)
        frames = self.frames(self.eval_segment_seconds)
        return EvalSet(src.urls, num_samples=src.num_samples, sample_rate=codec.frame_rate, channels=codec.n_q,
                       decode=partial(decode_token_clip, frames=frames, n_q=codec.n_q), collate=collate_tokens,
                       blank=partial(torch.zeros, codec.n_q, frames, dtype=torch.long), **self.eval_set_kw())
