"""Residual vector quantization with EMA codebooks (SoundStream / EnCodec).

Shapes: latents ``z`` [B, D, F] (D = dimension, F = frames), codes [B, K, F] int64 with K <= n_q codebooks,
each code in [0, card).

Training behaviour of every codebook (``EuclideanCodebook``), all under ``torch.no_grad`` and in fp32:

* k-means initialisation from the first training batch it sees (``inited`` flips to True),
* EMA of the per-code counts (``cluster_size``) and vector sums (``embed_avg``), ``embed`` being their
  Laplace-smoothed ratio,
* dead-code replacement: codes whose EMA count falls below ``threshold_ema_dead_code`` are reset to random
  vectors of the current batch (their EMA statistics too, so the next update does not undo the reset).

Distributed (checked at call time, so a process group created later by Lightning is picked up): the per-batch
counts and sums are all-reduced (SUM) before the EMA update, and the k-means result and the replacement vectors
come from rank 0 (broadcast), so the codebooks stay identical on all ranks. With ``q_dropout`` the number of
codebooks of a training batch is drawn from a generator seeded by the ``steps`` buffer, hence the same on all
ranks; every rank must therefore run the same number of training forwards (as DDP does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

_DROPOUT_SEED = 0x5EED


@dataclass
class QuantizedResult:
    """Output of ``ResidualVectorQuantizer.forward``.

    quantized: [B, D, F], same dtype as the input; straight-through gradient to the input when it requires grad.
    codes: [B, K, F] int64, K the number of codebooks used.
    penalty: scalar commitment loss, ``commitment_weight * mean_k mse(q_k.detach(), residual_k)``.
    metrics: detached scalars: ``n_q``, ``perplexity_q{k}`` (code usage of this batch, all ranks together in
    training), in training also ``replaced_q{k}`` (dead codes reset at this step).
    """

    quantized: Tensor
    codes: Tensor
    penalty: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _is_rank0() -> bool:
    return _world_size() == 1 or dist.get_rank() == 0


def sample_vectors(samples: Tensor, num: int) -> Tensor:
    """``num`` rows of ``samples`` [N, D] -> [num, D]: without replacement when N >= num, else with."""
    n = samples.shape[0]
    if n == 0:
        raise ValueError("cannot sample vectors from an empty batch")
    if n >= num:
        index = torch.randperm(n, device=samples.device)[:num]
    else:
        index = torch.randint(0, n, (num,), device=samples.device)
    return samples[index]


def nearest_code(x: Tensor, embed: Tensor) -> Tensor:
    """Index of the nearest (Euclidean) row of ``embed`` [K, D] for each row of ``x`` [N, D] -> [N] int64.

    The distance is expanded as |x|^2 - 2 x.e + |e|^2 in this order, like EnCodec's reference implementations,
    so that imported codebooks give bit-identical codes.
    """
    e = embed.t()
    dist_ = x.pow(2).sum(1, keepdim=True) - 2 * x @ e + e.pow(2).sum(0, keepdim=True)
    return dist_.argmin(dim=-1)


def kmeans(samples: Tensor, num_clusters: int, num_iters: int = 10) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on ``samples`` [N, D] -> (means [num_clusters, D], counts [num_clusters] float).

    Means start from random samples; a cluster left empty keeps its previous mean.
    """
    means = sample_vectors(samples, num_clusters)
    counts = torch.zeros(num_clusters, device=samples.device, dtype=samples.dtype)
    for _ in range(num_iters):
        buckets = nearest_code(samples, means)
        counts = torch.bincount(buckets, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        empty = counts == 0
        means = torch.where(empty[:, None], means, sums / counts.clamp(min=1)[:, None])
    return means, counts


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code distribution given by ``counts`` [K]; K when uniform, 1 when one code is used."""
    probs = counts / counts.sum().clamp(min=1e-12)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())


class EuclideanCodebook(nn.Module):
    """``card`` code vectors of size ``dim`` with EMA updates.

    Buffers (all in ``state_dict``): ``inited`` bool [], ``cluster_size`` [card], ``embed`` [card, dim],
    ``embed_avg`` [card, dim]. With ``kmeans_init`` the codebook starts at zero and un-inited; otherwise
    Kaiming-uniform random and inited.
    """

    inited: Tensor
    cluster_size: Tensor
    embed: Tensor
    embed_avg: Tensor

    def __init__(self, dim: int, card: int, decay: float = 0.99, epsilon: float = 1e-5, kmeans_init: bool = True,
                 kmeans_iters: int = 10, threshold_ema_dead_code: float = 2.0) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.dim = dim
        self.card = card
        self.decay = decay
        self.epsilon = epsilon
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        embed = torch.zeros(card, dim)
        if not kmeans_init:
            nn.init.kaiming_uniform_(embed)
        self.register_buffer("inited", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.zeros(card))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())

    def quantize(self, x: Tensor) -> Tensor:
        """x [N, dim] -> codes [N] int64."""
        return nearest_code(x, self.embed.to(x.dtype))

    def dequantize(self, codes: Tensor) -> Tensor:
        """codes [...] int64 -> vectors [..., dim]."""
        return F.embedding(codes, self.embed)

    @torch.no_grad()
    def init_(self, x: Tensor) -> None:
        """k-means initialisation from x [N, dim] (rank 0's batch under DDP) unless already inited."""
        if bool(self.inited):
            return
        x = x.float()
        if _is_rank0():
            means, counts = kmeans(x, self.card, self.kmeans_iters)
            packed = torch.cat([means, counts[:, None]], dim=1)
        else:
            packed = x.new_empty(self.card, self.dim + 1)
        if _world_size() > 1:
            dist.broadcast(packed, src=0)
        means, counts = packed[:, :-1], packed[:, -1]
        self.embed.copy_(means)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(means * counts[:, None])
        self.inited.fill_(True)

    @torch.no_grad()
    def update_(self, x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """EMA update from x [N, dim] and its codes [N]; -> (batch counts [card] over all ranks, replaced [])."""
        x = x.float()
        stats = torch.zeros(self.card, self.dim + 1, device=x.device, dtype=torch.float32)
        stats[:, :-1].index_add_(0, codes, x)
        stats[:, -1] = torch.bincount(codes, minlength=self.card).float()
        if _world_size() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        embed_sum, counts = stats[:, :-1], stats[:, -1]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.card * self.epsilon) * total
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        return counts, self._expire_(x)

    def _expire_(self, x: Tensor) -> Tensor:
        """Reset codes whose EMA count is below the threshold to vectors of x [N, dim]; -> how many []."""
        if self.threshold_ema_dead_code <= 0:
            return torch.zeros((), device=x.device)
        expired = self.cluster_size < self.threshold_ema_dead_code
        n = int(expired.sum())
        if n:
            samples = sample_vectors(x, n) if x.shape[0] else x.new_zeros(n, self.dim)
            if _world_size() > 1:
                dist.broadcast(samples, src=0)
            self.embed[expired] = samples.to(self.embed.dtype)
            self.embed_avg[expired] = (samples * self.threshold_ema_dead_code).to(self.embed_avg.dtype)
            self.cluster_size[expired] = self.threshold_ema_dead_code
        return torch.tensor(float(n), device=x.device)


class VectorQuantizer(nn.Module):
    """One quantization stage in conv layout: x [B, D, F] -> (quantized [B, D, F], codes [B, F]).

    ``forward`` returns the codebook vectors themselves (no gradient); in training it first k-means-initialises
    the codebook if needed and afterwards updates it (EMA, dead codes) with this batch.
    """

    def __init__(self, dimension: int, card: int, decay: float = 0.99, epsilon: float = 1e-5,
                 kmeans_init: bool = True, kmeans_iters: int = 10, threshold_ema_dead_code: float = 2.0) -> None:
        super().__init__()
        self.codebook = EuclideanCodebook(dimension, card, decay=decay, epsilon=epsilon, kmeans_init=kmeans_init,
                                          kmeans_iters=kmeans_iters,
                                          threshold_ema_dead_code=threshold_ema_dead_code)

    @staticmethod
    def _flat(x: Tensor) -> Tensor:
        return x.permute(0, 2, 1).reshape(-1, x.shape[1])

    def encode(self, x: Tensor) -> Tensor:
        """x [B, D, F] -> codes [B, F] int64."""
        return self.codebook.quantize(self._flat(x)).view(x.shape[0], x.shape[2])

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, F] -> [B, D, F]."""
        return self.codebook.dequantize(codes).permute(0, 2, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """x [B, D, F] -> (quantized [B, D, F] detached, codes [B, F], metrics {"perplexity", ["replaced"]})."""
        flat = self._flat(x.detach())
        if self.training:
            self.codebook.init_(flat)
        codes = self.codebook.quantize(flat)
        quantized = self.codebook.dequantize(codes)
        metrics: dict[str, Tensor] = {}
        if self.training:
            counts, metrics["replaced"] = self.codebook.update_(flat, codes)
        else:
            counts = torch.bincount(codes, minlength=self.codebook.card).float()
        metrics["perplexity"] = perplexity(counts)
        b, _, f = x.shape
        return quantized.view(b, f, -1).permute(0, 2, 1), codes.view(b, f), metrics


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ: ``n_q`` stages, each quantizing what the previous ones left.

    ``forward(z [B, D, F], n_q=None) -> QuantizedResult``; ``encode(z, n_q=None) -> codes [B, K, F]``;
    ``decode(codes [B, K, F]) -> [B, D, F]``. All VQ math runs in fp32 with autocast disabled.
    ``q_dropout``: in training, each batch uses ``randint(1, n_q)`` stages (bandwidth sampling), drawn from a
    generator seeded with the ``steps`` buffer (training forwards so far), hence reproducible and equal on all
    ranks. An explicit ``n_q`` argument caps the draw. ``config`` holds the constructor arguments.
    """

    steps: Tensor

    def __init__(self, dimension: int = 128, n_q: int = 8, card: int = 1024, decay: float = 0.99,
                 kmeans_init: bool = True, kmeans_iters: int = 10, threshold_ema_dead_code: float = 2.0,
                 commitment_weight: float = 1.0, q_dropout: bool = False, epsilon: float = 1e-5) -> None:
        super().__init__()
        if n_q < 1 or card < 2:
            raise ValueError(f"need n_q >= 1 and card >= 2, got n_q={n_q}, card={card}")
        self.config: dict[str, Any] = dict(
            dimension=dimension, n_q=n_q, card=card, decay=decay, kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=commitment_weight, q_dropout=q_dropout, epsilon=epsilon)
        self.dimension = dimension
        self.n_q = n_q
        self.card = card
        self.commitment_weight = commitment_weight
        self.q_dropout = q_dropout
        self.layers = nn.ModuleList([
            VectorQuantizer(dimension, card, decay=decay, epsilon=epsilon, kmeans_init=kmeans_init,
                            kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code)
            for _ in range(n_q)])
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def bits_per_frame(self, n_q: int | None = None) -> float:
        """log2(card) * n_q: bits per frame of ``n_q`` codebooks (all by default)."""
        return math.log2(self.card) * (self.n_q if n_q is None else n_q)

    def _check_n_q(self, n_q: int | None) -> int:
        if n_q is None:
            return self.n_q
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q must be in [1, {self.n_q}], got {n_q}")
        return int(n_q)

    def sampled_n_q(self, step: int, n_max: int | None = None) -> int:
        """The number of stages q_dropout uses at training step ``step`` (uniform in [1, n_max])."""
        generator = torch.Generator().manual_seed(_DROPOUT_SEED + int(step))
        return int(torch.randint(1, self._check_n_q(n_max) + 1, (1,), generator=generator))

    def forward(self, z: Tensor, n_q: int | None = None) -> QuantizedResult:
        """z [B, D, F] -> QuantizedResult(quantized [B, D, F], codes [B, K, F], penalty [], metrics)."""
        self._check_input(z)
        n = self._check_n_q(n_q)
        if self.training:
            if self.q_dropout:
                n = self.sampled_n_q(int(self.steps), n)
            self.steps += 1
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = z.float()
            residual = x
            total = torch.zeros_like(x)
            codes, losses = [], []
            metrics: dict[str, Tensor] = {"n_q": torch.tensor(float(n), device=z.device)}
            for k, layer in enumerate(self.layers[:n]):
                quantized, stage_codes, stage_metrics = layer(residual)
                losses.append(F.mse_loss(quantized, residual))
                residual = residual - quantized
                total = total + quantized
                codes.append(stage_codes)
                metrics.update({f"{name}_q{k}": value for name, value in stage_metrics.items()})
            out = x + (total - x).detach() if torch.is_grad_enabled() and x.requires_grad else total
            penalty = self.commitment_weight * torch.stack(losses).mean()
        return QuantizedResult(out.to(z.dtype), torch.stack(codes, dim=1), penalty, metrics)

    def encode(self, z: Tensor, n_q: int | None = None) -> Tensor:
        """z [B, D, F] -> codes [B, K, F] int64 with K = n_q (default: all). No codebook update."""
        self._check_input(z)
        n = self._check_n_q(n_q)
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.float()
            codes = []
            for layer in self.layers[:n]:
                stage_codes = layer.encode(residual)
                residual = residual - layer.decode(stage_codes)
                codes.append(stage_codes)
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, F] int64 (K <= n_q, the first K stages) -> quantized latents [B, D, F] fp32."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_q:
            raise ValueError(f"expected codes [B, K <= {self.n_q}, F], got {tuple(codes.shape)}")
        with torch.autocast(device_type=codes.device.type, enabled=False):
            out = torch.zeros(codes.shape[0], self.dimension, codes.shape[2], device=codes.device)
            for k in range(codes.shape[1]):
                out = out + self.layers[k].decode(codes[:, k]).float()
        return out

    def _check_input(self, z: Tensor) -> None:
        if z.dim() != 3 or z.shape[1] != self.dimension:
            raise ValueError(f"expected latents [B, {self.dimension}, F], got {tuple(z.shape)}")

    def ema_excluded(self, prefix: str = "") -> list[str]:
        """State-dict names of the codebook buffers and step counter, which a weight EMA must not average."""
        return [f"{prefix}{name}" for name, _ in self.named_buffers()]
