"""Codebook usage: how many of a quantizer's codes a model really uses, as a perplexity.

The perplexity of a codebook over a set of frames is exp(entropy) of its code histogram: ``card`` when every code
is used equally often, 1 when one code takes every frame (a collapsed codebook). ``CodePerplexity`` accumulates the
histogram over batches (a torchmetrics ``Metric``: summed across DDP ranks), ``codebook_perplexities`` measures
every codebook of a ``Codec`` (its RVQ stages, ``perplexity_q{k}``) or of a Jukebox ``HierarchicalVQVAE`` (its
levels, bottom first: ``perplexity_level{k}``) over audio batches.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torchmetrics import Metric

from ostinato.models.codec import Codec
from ostinato.models.jukebox import HierarchicalVQVAE
from ostinato.nn.quantization import perplexity

__all__ = ["CodePerplexity", "codebook_perplexities"]


class CodePerplexity(Metric):
    """exp(entropy) of the histogram of codes ``update``d so far, over ``card`` codes; ``compute() -> []`` fp32."""

    full_state_update = False
    counts: Tensor

    def __init__(self, card: int) -> None:
        super().__init__()
        self.card = int(card)
        self.add_state("counts", default=torch.zeros(self.card, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        """codes: int64 of any shape, each in [0, card)."""
        self.counts += torch.bincount(codes.flatten().to(self.counts.device), minlength=self.card).to(self.counts)

    def compute(self) -> Tensor:
        return perplexity(self.counts).float()


def _codes(model: Codec | HierarchicalVQVAE, audio: Tensor) -> dict[str, Tensor]:
    """audio [B, C, T] -> {name: codes [B, F] of one codebook}."""
    if isinstance(model, HierarchicalVQVAE):
        return {f"perplexity_level{k}": codes[:, 0] for k, codes in enumerate(model.encode(audio).values())}
    codes = model.encode(audio).codes
    return {f"perplexity_q{k}": codes[:, k] for k in range(codes.shape[1])}


@torch.no_grad()
def codebook_perplexities(model: Codec | HierarchicalVQVAE, audio_batches: Iterable[Tensor]) -> dict[str, float]:
    """Every codebook's perplexity over all frames of ``audio_batches`` (each [B, C, T] at the model's rate).

    A ``Codec``: ``{"perplexity_q0": .., ..}``, one per RVQ stage; a ``HierarchicalVQVAE``:
    ``{"perplexity_level0": bottom, "perplexity_level1": middle, "perplexity_level2": top}``. Each is in
    [1, card]; near 1 means the codebook collapsed. The model is used as it is (call ``.eval()`` first: in
    training mode a codec's ``encode`` still leaves the codebooks alone, but dropout-like layers would not).
    """
    metrics: dict[str, CodePerplexity] = {}
    for audio in audio_batches:
        device = next(model.parameters()).device
        for name, codes in _codes(model, audio.to(device)).items():
            metrics.setdefault(name, CodePerplexity(model.card)).update(codes)
    if not metrics:
        raise ValueError("codebook_perplexities needs at least one audio batch")
    return {name: round(float(metric.compute()), 3) for name, metric in metrics.items()}
