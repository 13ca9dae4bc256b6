"""Text-audio agreement of paired embeddings (CLAP score, MuLaN score), as a torchmetrics ``Metric``.

The joint embedding model (CLAP, MuLaN, ...) is the caller's business: ``update`` takes the audio and text
embeddings of the same ``N`` pairs. The score is the mean over pairs of their cosine similarity, in ``[-1, 1]``,
higher is better. As audiocraft's ``TextConsistencyMetric``, but with float64 sums (``dist_reduce_fx="sum"``) that
stay float64 when the owning module is cast, so the result is an exact mean over any batching and DDP ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric

from ostinato.metrics.codec import _apply_keeping_float64

__all__ = ["TextAudioScore"]


class TextAudioScore(Metric):
    """Mean cosine similarity of paired audio and text embeddings; ``compute()`` -> float64 scalar."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    total: Tensor
    count: Tensor

    def __init__(self, eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, audio_emb: Tensor, text_emb: Tensor) -> None:
        """``audio_emb, text_emb: [N, D]``, row ``i`` of both from the same pair (zero vectors score 0)."""
        if audio_emb.dim() != 2 or audio_emb.shape != text_emb.shape:
            raise ValueError(f"expected audio_emb and text_emb [N, D] of equal shape, got {tuple(audio_emb.shape)} "
                             f"and {tuple(text_emb.shape)}")
        cosine = F.cosine_similarity(audio_emb.detach().double(), text_emb.detach().double(), dim=1, eps=self.eps)
        self.total += cosine.sum()
        self.count += len(cosine)

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("TextAudioScore got no pairs")
        return self.total / self.count

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        return _apply_keeping_float64(self, super()._apply, fn, exclude_state, ("total", "count"))
