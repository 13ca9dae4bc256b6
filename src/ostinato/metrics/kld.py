"""Label-distribution KL divergence between generated and reference audio (audiocraft's KLD), as a ``Metric``.

An audio classifier (PaSST on AudioSet in audiocraft; the caller's business here) labels each generated clip and
its paired reference clip. Per pair the score is ``KL(p_reference || p_generated)``: how badly the generated
clip's label distribution covers the reference's. ``compute()`` is the mean over pairs; lower is better.

* ``multilabel=False``: ``p`` are softmax distributions over the ``L`` labels, ``KL = sum_l p_l log(p_l / q_l)``.
* ``multilabel=True``: each label is an independent Bernoulli (sigmoid outputs) and the score is the mean over
  labels of ``p log(p / q) + (1 - p) log((1 - p) / (1 - q))``.

Both sides are clamped to ``[eps, 1]`` (``[eps, 1 - eps]`` for Bernoullis) and, for softmax, renormalized, so
the divergence is finite, exactly 0 for identical inputs and never negative. audiocraft instead adds ``eps`` to the
generated side only, which can go ``O(eps)`` below 0; the two agree to ``O(eps)``. Float64 sums, as in
``ostinato.metrics.codec``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric

from ostinato.metrics.codec import _apply_keeping_float64

__all__ = ["LabelKLD", "label_kl_divergence"]


def _probabilities(x: Tensor, multilabel: bool, logits: bool, eps: float) -> Tensor:
    """``[N, L]`` logits or probabilities -> clamped float64 probabilities."""
    x = x.detach().double()
    if logits:
        p = torch.sigmoid(x) if multilabel else torch.softmax(x, dim=-1)
    else:
        if x.min() < 0 or x.max() > 1:
            raise ValueError("probabilities must lie in [0, 1] (pass logits=True for logits)")
        if not multilabel and not torch.allclose(x.sum(-1), torch.ones_like(x[:, 0]), atol=1e-3):
            raise ValueError("softmax probabilities must sum to 1 over labels (pass multilabel=True for "
                             "independent per-label probabilities)")
        p = x
    if multilabel:
        return p.clamp(eps, 1 - eps)
    p = p.clamp_min(eps)
    return p / p.sum(-1, keepdim=True)


def label_kl_divergence(generated: Tensor, reference: Tensor, multilabel: bool = False, logits: bool = True,
                        eps: float = 1e-6) -> Tensor:
    """Per-pair ``KL(p_reference || p_generated)`` for ``[N, L]`` inputs -> ``[N]`` float64 (nats)."""
    if generated.dim() != 2 or generated.shape != reference.shape:
        raise ValueError(f"expected generated and reference [N, L] of equal shape, got {tuple(generated.shape)} "
                         f"and {tuple(reference.shape)}")
    q = _probabilities(generated, multilabel, logits, eps)
    p = _probabilities(reference, multilabel, logits, eps)
    kl = p * (p.log() - q.log())
    if multilabel:
        return (kl + (1 - p) * ((1 - p).log() - (1 - q).log())).mean(-1)
    return kl.sum(-1)


class LabelKLD(Metric):
    """Mean over pairs of ``KL(p_reference || p_generated)``; ``compute()`` -> float64 scalar (nats)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False
    total: Tensor
    count: Tensor

    def __init__(self, multilabel: bool = False, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.multilabel = multilabel
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated: Tensor, reference: Tensor, logits: bool = True) -> None:
        """``generated, reference: [N, L]`` classifier logits (or probabilities with ``logits=False``)."""
        kl = label_kl_divergence(generated, reference, self.multilabel, logits, self.eps)
        self.total += kl.sum()
        self.count += len(kl)

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("LabelKLD got no pairs")
        return self.total / self.count

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        return _apply_keeping_float64(self, super()._apply, fn, exclude_state, ("total", "count"))
