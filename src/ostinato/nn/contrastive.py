"""Contrastive losses of a joint audio-text embedding (MuLaN, CLIP, SigLIP) and retrieval metrics.

Losses, on ``N`` pairs ``(audio_i, text_i)`` of L2-normalised embeddings ``[N, D]``:

* ``softmax`` (CLIP / InfoNCE, MuLaN): ``logits = exp(s) * audio @ text.T``; the mean of the cross-entropies of
  the rows (audio -> text) and of the columns (text -> audio) with the diagonal as targets. ``s`` = log of the
  inverse temperature, initialised at ``log(1 / 0.07)`` as CLIP.
* ``sigmoid`` (SigLIP): ``logits = exp(s) * audio @ text.T + b``; ``-sum_ij log sigmoid(z_ij * logits_ij) / N``
  with ``z = +1`` on the diagonal and ``-1`` elsewhere. ``s`` starts at ``log 10``, ``b`` at ``-10`` (the paper).

Numerics (musiclm-pytorch's users saw the loss stuck at ``log N`` and NaNs under mixed precision): everything runs
in fp32 with autocast off; the embeddings are normalised again (a no-op for unit vectors, and a zero vector stays
zero instead of dividing by zero); ``s`` is clamped in place to ``[log(1 / max_temperature), log(1 /
min_temperature)]`` before every use (CLIP clamps at 100 = 1 / 0.01), so a runaway scale cannot overflow the
logits and the parameter can always move back. An all-equal batch gives the uniform loss ``log N`` and finite
gradients.

Distributed: every rank gathers the embeddings of all ranks **with gradients**
(``torch.distributed.nn.functional.all_gather``) and computes the loss of the global batch, so each rank's loss
equals the single-process loss on the concatenated batch. The gather's backward sums the ``R`` ranks' (identical)
gradients into each rank's own slice and DDP's gradient average divides by ``R``: the update equals the
single-process one.

Retrieval (``retrieval_metrics``, ``RetrievalMetrics``): rank of the true partner among all ``N`` candidates, both
ways (``t2a``: a text queries the audio clips; ``a2t``: the reverse); ties are broken uniformly at random in
expectation (exact), so a collapsed model scores chance, not a perfect 1.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["ContrastiveLoss", "softmax_contrastive_loss", "sigmoid_contrastive_loss", "gather_with_grad",
           "retrieval_ranks", "retrieval_metrics", "RetrievalMetrics"]

Kind = Literal["softmax", "sigmoid"]
INIT_TEMPERATURE = {"softmax": 0.07, "sigmoid": 0.1}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor) -> Tensor:
    """``[B, ...]`` on each of R ranks -> ``[R * B, ...]`` in rank order, differentiable w.r.t. every rank's slice.

    All ranks must pass the same shape (training batches are equal per rank by construction).
    """
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def softmax_contrastive_loss(audio: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE. ``audio, text: [N, D]`` (normalised), ``logit_scale: []`` (log inverse temperature)."""
    logits = logit_scale.exp() * audio @ text.t()  # [N, N]
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def sigmoid_contrastive_loss(audio: Tensor, text: Tensor, logit_scale: Tensor, bias: Tensor) -> Tensor:
    """SigLIP. ``audio, text: [N, D]`` (normalised); ``logit_scale, bias: []``. Normalised by N, as the paper."""
    logits = logit_scale.exp() * audio @ text.t() + bias  # [N, N]
    signs = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


class ContrastiveLoss(nn.Module):
    """``(audio [B, D], text [B, D]) -> loss []`` over the global batch of all ranks (see the module docstring).

    Args:
        kind: ``softmax`` (CLIP / MuLaN) or ``sigmoid`` (SigLIP).
        init_temperature: starting temperature (None: 0.07 for softmax, 0.1 for sigmoid).
        min_temperature, max_temperature: the clamp of the learnt temperature.
        learn_temperature: train the temperature (and the sigmoid bias) or keep them fixed.
        init_bias: the sigmoid loss' starting bias.
        gather: gather the negatives of all DDP ranks.
    """

    def __init__(self, kind: Kind = "softmax", init_temperature: float | None = None,
                 min_temperature: float = 0.01, max_temperature: float = 1.0, learn_temperature: bool = True,
                 init_bias: float = -10.0, gather: bool = True) -> None:
        super().__init__()
        if kind not in INIT_TEMPERATURE:
            raise ValueError(f"family.loss.kind={kind!r}: use softmax (CLIP/MuLaN) or sigmoid (SigLIP)")
        init = INIT_TEMPERATURE[kind] if init_temperature is None else float(init_temperature)
        if not 0 < min_temperature <= init <= max_temperature:
            raise ValueError(f"family.loss: need 0 < min_temperature ({min_temperature}) <= init_temperature "
                             f"({init}) <= max_temperature ({max_temperature})")
        self.kind, self.gather = kind, bool(gather)
        self.scale_range = (math.log(1 / max_temperature), math.log(1 / min_temperature))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init)), requires_grad=learn_temperature)
        self.bias = None
        if kind == "sigmoid":
            self.bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn_temperature)

    @property
    def temperature(self) -> Tensor:
        """The temperature in use, ``[]`` (detached)."""
        return torch.exp(-self.logit_scale.detach().clamp(*self.scale_range))

    def forward(self, audio: Tensor, text: Tensor, gather: bool | None = None) -> Tensor:
        """``audio, text: [B, D]`` (row i of both from pair i) -> the loss of the gathered batch, fp32 ``[]``."""
        if audio.dim() != 2 or audio.shape != text.shape:
            raise ValueError(f"expected audio and text embeddings [B, D] of equal shape, got {tuple(audio.shape)} "
                             f"and {tuple(text.shape)}")
        with torch.no_grad():
            self.logit_scale.clamp_(*self.scale_range)
        with torch.autocast(device_type=audio.device.type, enabled=False):
            a = F.normalize(audio.float(), dim=-1)
            t = F.normalize(text.float(), dim=-1)
            if self.gather if gather is None else gather:
                a, t = gather_with_grad(a), gather_with_grad(t)
            if self.kind == "softmax":
                return softmax_contrastive_loss(a, t, self.logit_scale.float())
            assert self.bias is not None
            return sigmoid_contrastive_loss(a, t, self.logit_scale.float(), self.bias.float())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, gather={self.gather}"


# ------------------------------------------------------------------------------------------------ retrieval


def retrieval_ranks(queries: Tensor, keys: Tensor, tol: float = 1e-9) -> tuple[Tensor, Tensor]:
    """For query i, how many keys score higher than key i, and how many others tie with it (within ``tol``).

    ``queries, keys: [N, D]`` -> ``(greater [N], ties [N])`` int64; scores are float64 dot products (cosines of
    unit vectors). The rank of key i under uniform random tie-breaking is ``1 + greater + U{0..ties}``. The
    tolerance matters: a blocked matmul rounds equal dot products differently in different output columns.
    """
    scores = queries.double() @ keys.double().t()  # [N, N]
    own = scores.diagonal()[:, None]
    greater = (scores > own + tol).sum(dim=1)
    ties = ((scores - own).abs() <= tol).sum(dim=1) - 1
    return greater, ties


def retrieval_metrics(audio: Tensor, text: Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, Tensor]:
    """Retrieval of N pairs ``audio, text: [N, D]`` (normalised), both ways -> float64 scalars.

    ``t2a_r{k}`` / ``a2t_r{k}``: recall at k (expected over random tie-breaking); ``t2a_median_rank`` /
    ``a2t_median_rank``: median of the expected ranks (1 = perfect); ``chance_r{k}`` = min(1, k / N) and
    ``chance_median_rank`` = (N + 1) / 2: a random model's values; ``n``: N.
    """
    if audio.dim() != 2 or audio.shape != text.shape or len(audio) == 0:
        raise ValueError(f"expected audio and text embeddings [N >= 1, D] of equal shape, got {tuple(audio.shape)} "
                         f"and {tuple(text.shape)}")
    a, t = F.normalize(audio.double(), dim=-1), F.normalize(text.double(), dim=-1)
    n = len(a)
    out: dict[str, Tensor] = {}
    for name, (queries, keys) in (("t2a", (t, a)), ("a2t", (a, t))):
        greater, ties = retrieval_ranks(queries, keys)
        greater, ties = greater.double(), ties.double()
        for k in ks:
            out[f"{name}_r{k}"] = ((k - greater) / (ties + 1)).clamp(0, 1).mean()
        out[f"{name}_median_rank"] = torch.quantile(1 + greater + ties / 2, 0.5)
    for k in ks:
        out[f"chance_r{k}"] = torch.tensor(min(1.0, k / n), dtype=torch.float64)
    out["chance_median_rank"] = torch.tensor((n + 1) / 2, dtype=torch.float64)
    out["n"] = torch.tensor(float(n), dtype=torch.float64)
    return out


class RetrievalMetrics(Metric):
    """Collects paired embeddings over batches and ranks (``cat`` states, uneven ranks allowed);
    ``compute()`` -> ``retrieval_metrics`` of all of them; ``embeddings()`` -> the gathered ``(audio, text)``."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    audio: list[Tensor]
    text: list[Tensor]

    def __init__(self, ks: tuple[int, ...] = (1, 10), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(int(k) for k in ks)
        self.add_state("audio", default=[], dist_reduce_fx="cat")
        self.add_state("text", default=[], dist_reduce_fx="cat")

    def update(self, audio: Tensor, text: Tensor) -> None:
        """``audio, text: [B, D]``, row i of both from the same pair."""
        if audio.dim() != 2 or audio.shape != text.shape:
            raise ValueError(f"expected audio and text embeddings [B, D] of equal shape, got {tuple(audio.shape)} "
                             f"and {tuple(text.shape)}")
        self.audio.append(audio.detach().float())
        self.text.append(text.detach().float())

    def compute(self) -> dict[str, Tensor]:
        return retrieval_metrics(dim_zero_cat(self.audio), dim_zero_cat(self.text), self.ks)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """``(audio [N, D], text [N, D])`` of every rank, in rank order (the same on every rank)."""
        with self.sync_context():
            return dim_zero_cat(self.audio), dim_zero_cat(self.text)
