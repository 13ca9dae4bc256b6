"""Kernel Audio Distance (KAD; Chung et al. 2025, arXiv 2502.15602) as a torchmetrics ``Metric``.

KAD is the unbiased estimate of the squared maximum mean discrepancy between the reference ("real") embeddings
``X [M, D]`` and the generated ("fake") ones ``Y [N, D]`` under a Gaussian kernel ``k(a, b) = exp(-g |a - b|^2)``:

    KAD = scale * ( sum_{i != j} k(x_i, x_j) / (M (M - 1)) + sum_{i != j} k(y_i, y_j) / (N (N - 1))
                    - 2 sum_{i, j} k(x_i, y_j) / (M N) )

with ``g = 1 / (2 h^2 + 1e-8)``. Unlike FAD it assumes no distribution and has no ``1 / N`` bias; being unbiased it
can be slightly negative when the two sets come from one distribution.

Conventions, those of kadtk 1.1.0 (the authors' toolkit) so that numbers compare:

* ``scale`` = ``KADTK_SCALE`` = 100 (kadtk's ``SCALE_FACTOR``): the printed KAD is MMD^2 x 100.
* the bandwidth ``h`` is the median of the pairwise Euclidean distances of one set (for an even count, the lower of
  the two middle values, as ``torch.median``); the ``1e-8`` is kadtk's ``eps``.
* ``bandwidth_from="reference"`` (default) takes that median over the reference set, as the paper and kadtk's README
  state: the kernel then stays the same whichever model is scored against one reference, so scores compare.
  kadtk 1.1.0's code (``calc_kernel_audio_distance``) takes it from its second argument, the evaluated set;
  ``bandwidth_from="generated"`` reproduces that. A fixed ``bandwidth=h`` overrides both.

Everything is computed in float64, in row blocks of the kernel matrices (``chunk_size`` rows, by default as many as
keep a block near 128 MB), so 5,000 x 5,000 x D=512 needs no more than a block plus the embeddings. The median takes
all ``M (M - 1) / 2`` distances while they are at most ``max_median_pairs``; beyond that it takes that many random
pairs (``seed``), as kadtk's ``subsample`` option does.

Under DDP the embeddings are list states gathered across ranks (``dist_reduce_fx="cat"``), so ``compute()`` sees
every embedding of every rank: the value equals the one-process value up to float64 summation order. Every rank must
have called ``update`` with generated embeddings (and reference ones unless ``reference=`` was given).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ostinato.metrics.fad import _move_keeping_dtype, check_bootstrap, shifted_percentile_interval

__all__ = ["KADTK_EPS", "KADTK_SCALE", "KernelAudioDistance", "bootstrap_kad", "kernel_audio_distance",
           "median_pairwise_distance"]

KADTK_SCALE = 100.0  # kadtk 1.1.0 kad.py SCALE_FACTOR
KADTK_EPS = 1e-8  # kadtk's eps in gamma = 1 / (2 h^2 + eps)
MAX_MEDIAN_PAIRS = 2 ** 25  # 33.5M distances (268 MB float64): every pair of up to ~8,190 embeddings
_BLOCK_ELEMENTS = 2 ** 24  # float64 elements per kernel block (128 MB)
_REPLICATES_AT_ONCE = 64

BandwidthFrom = Literal["reference", "generated"]


def _check_embeddings(emb: Tensor, what: str, dim: int | None = None) -> Tensor:
    if emb.dim() != 2 or (dim is not None and emb.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise ValueError(f"KAD: expected {what} embeddings {want}, got {tuple(emb.shape)}")
    return emb.detach().double()


def _rows(n_cols: int, chunk_size: int | None) -> int:
    return max(1, int(chunk_size) if chunk_size else _BLOCK_ELEMENTS // max(1, n_cols))


def _sq_dist(a: Tensor, a_sq: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """``[A, B]`` squared distances from the expansion ``|a|^2 + |b|^2 - 2 a.b`` (clamped at 0 against round-off)."""
    return (a @ b.mT).mul_(-2).add_(a_sq[:, None]).add_(b_sq[None, :]).clamp_min_(0)  # one block allocated


def median_pairwise_distance(emb: Tensor, *, max_pairs: int = MAX_MEDIAN_PAIRS, seed: int = 0,
                             chunk_size: int | None = None) -> Tensor:
    """Median Euclidean distance over the pairs ``i < j`` of ``emb [N, D]`` (N >= 2); float64 scalar.

    For an even number of pairs the lower middle value (``torch.median``'s rule, which kadtk uses). Above
    ``max_pairs`` pairs, the median of ``max_pairs`` random pairs ``i != j`` drawn with ``torch.Generator(seed)``.
    """
    x = _check_embeddings(emb, "bandwidth")
    n = len(x)
    if n < 2:
        raise ValueError(f"KAD: the bandwidth (median pairwise distance) needs >= 2 embeddings, got {n}")
    pairs = n * (n - 1) // 2
    if pairs > max_pairs:
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (max_pairs,), generator=g)
        j = torch.randint(0, n - 1, (max_pairs,), generator=g)
        j = j + (j >= i).long()  # uniform over j != i
        i, j = i.to(x.device), j.to(x.device)
        d = torch.cat([(x[i[s:s + 2 ** 20]] - x[j[s:s + 2 ** 20]]).norm(dim=1)
                       for s in range(0, max_pairs, 2 ** 20)])
    else:
        sq = (x * x).sum(1)
        parts = []
        for s in range(0, n - 1, _rows(n, chunk_size)):
            e = min(n, s + _rows(n, chunk_size))
            block = _sq_dist(x[s:e], sq[s:e], x, sq)
            upper = torch.arange(n, device=x.device)[None, :] > torch.arange(s, e, device=x.device)[:, None]
            parts.append(block[upper].sqrt_())
        d = torch.cat(parts)
    return d.kthvalue((len(d) + 1) // 2).values


def _kernel_sum(a: Tensor, b: Tensor, gamma: Tensor, same: bool, chunk_size: int | None) -> Tensor:
    """``sum_{i, j} exp(-gamma |a_i - b_j|^2)`` over ``a [A, D]``, ``b [B, D]`` (``i != j`` when ``same``), in row
    blocks; float64."""
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    step = _rows(len(b), chunk_size)
    for s in range(0, len(a), step):
        k = _sq_dist(a[s:s + step], a_sq[s:s + step], b, b_sq).mul_(-gamma).exp_()
        total = total + k.sum()
        if same:
            total = total - k[:, s:s + step].diagonal().sum()
    return total


def _bandwidth(x: Tensor, y: Tensor, bandwidth: float | Tensor | None, bandwidth_from: str, max_pairs: int,
               seed: int, chunk_size: int | None) -> Tensor:
    """The given ``bandwidth``, else the median pairwise distance of ``x`` (reference) or ``y`` (generated)."""
    if bandwidth is None:
        if bandwidth_from not in ("reference", "generated"):
            raise ValueError(f"KAD: bandwidth_from={bandwidth_from!r}; use 'reference' or 'generated'")
        return median_pairwise_distance(x if bandwidth_from == "reference" else y, max_pairs=max_pairs, seed=seed,
                                        chunk_size=chunk_size)
    h = torch.as_tensor(bandwidth, dtype=torch.float64, device=x.device)
    if not h > 0:
        raise ValueError(f"KAD: bandwidth must be > 0, got {float(h)}")
    return h


def kernel_audio_distance(reference: Tensor, generated: Tensor, *, bandwidth: float | Tensor | None = None,
                          bandwidth_from: BandwidthFrom = "reference", scale: float = KADTK_SCALE,
                          chunk_size: int | None = None, max_median_pairs: int = MAX_MEDIAN_PAIRS,
                          seed: int = 0) -> tuple[Tensor, Tensor]:
    """KAD between ``reference [M, D]`` and ``generated [N, D]`` (M, N >= 2) -> ``(kad, bandwidth)``, float64
    scalars; ``kad`` is ``scale`` x the unbiased MMD^2 (see the module docstring for the bandwidth rule)."""
    x = _check_embeddings(reference, "reference")
    y = _check_embeddings(generated, "generated", x.shape[1]).to(x.device)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"KAD needs >= 2 embeddings on each side, got reference={m}, generated={n}")
    h = _bandwidth(x, y, bandwidth, bandwidth_from, max_median_pairs, seed, chunk_size)
    gamma = 1.0 / (2 * h * h + KADTK_EPS)
    xx = _kernel_sum(x, x, gamma, True, chunk_size) / (m * (m - 1))
    yy = _kernel_sum(y, y, gamma, True, chunk_size) / (n * (n - 1))
    xy = _kernel_sum(x, y, gamma, False, chunk_size) / (m * n)
    return (xx + yy - 2 * xy) * scale, h


class _ClipKernels:
    """KAD as a function of per-clip multiplicities ``w [C]`` of the generated clips (a bootstrap replicate pools
    clip ``a``'s rows ``w_a`` times), from kernel sums computed once: ``B [C, C]`` (sums of k over the rows of two
    clips), the self-kernel of each clip's rows, and each clip's kernel sum against the reference. With the pooled
    rows counted as distinct positions (duplicates included), the generated term is ``(w^T B w - w.diag) /
    (N_w (N_w - 1))`` with ``N_w = w.F``, exactly what ``kernel_audio_distance`` gives on the pooled rows."""

    def __init__(self, reference: Tensor, clips: Sequence[Tensor], gamma: Tensor, scale: float,
                 chunk_size: int | None) -> None:
        x = reference.detach().double()
        y = torch.cat([c.detach().double() for c in clips]).to(x.device)
        c = len(clips)
        owner = torch.repeat_interleave(torch.arange(c, device=x.device),
                                        torch.tensor([len(clip) for clip in clips], device=x.device))
        f64 = dict(dtype=torch.float64, device=x.device)
        self.frames = torch.bincount(owner, minlength=c).double()
        self.between, self.diag, self.cross = torch.zeros(c, c, **f64), torch.zeros(c, **f64), torch.zeros(c, **f64)
        y_sq, x_sq = (y * y).sum(1), (x * x).sum(1)
        step = _rows(max(len(y), len(x), c), chunk_size)
        for s in range(0, len(y), step):
            rows = slice(s, s + step)
            k = _sq_dist(y[rows], y_sq[rows], y, y_sq).mul_(-gamma).exp_()
            per_clip = torch.zeros(len(k), c, **f64).index_add_(1, owner, k)  # [rows, C]: summed over each clip
            self.between.index_add_(0, owner[rows], per_clip)
            self.diag.index_add_(0, owner[rows], k[:, rows].diagonal())
            kx = _sq_dist(y[rows], y_sq[rows], x, x_sq).mul_(-gamma).exp_()
            self.cross.index_add_(0, owner[rows], kx.sum(1))
        m = len(x)
        self.xx = _kernel_sum(x, x, gamma, True, chunk_size) / (m * (m - 1))
        self.m, self.scale = m, scale

    def kad(self, weights: Tensor) -> Tensor:
        """``weights [C]`` or ``[R, C]`` (R replicates at once) -> KAD, ``[]`` or ``[R]`` float64."""
        w = weights.to(self.between)
        n = w @ self.frames
        yy = (((w @ self.between) * w).sum(-1) - w @ self.diag) / (n * (n - 1))
        return (self.xx + yy - 2 * (w @ self.cross) / (self.m * n)) * self.scale


def bootstrap_kad(reference: Tensor, clips: Sequence[Tensor], resamples: int, seed: int = 0, level: float = 0.95,
                  *, bandwidth: float | Tensor | None = None, bandwidth_from: BandwidthFrom = "reference",
                  scale: float = KADTK_SCALE, chunk_size: int | None = None) -> dict[str, Any]:
    """Bootstrap confidence interval of KAD over the generated clips, the mechanism of ``fad.bootstrap_fad``.

    ``reference [M, D]``; ``clips``: per clip ``[F_i, D]`` embeddings (frames, or ``[1, D]`` clip embeddings).
    Each of ``resamples`` replicates draws the clips with replacement (seeded ``torch.Generator``) and pools their
    rows; the kernel (bandwidth of the full sets) stays fixed. Drawn twice, a clip adds ``k(y, y) = 1`` terms to the
    generated sum, which biases replicates upwards as repeated draws bias FAD: the percentile interval is taken of
    the replicates shifted by their mean bias, centring it on the point estimate (not clamped: KAD may be < 0).
    Costs one pass over the kernel matrices; each replicate is then ``O(C^2)`` for ``C`` clips.

    Returns ``fad.shifted_percentile_interval``'s ``{"point", "low", "high", "level", "std", "bias", "method"}`` and
    ``"resamples", "seed", "bandwidth"``. ``ostinato fad --kad --bootstrap N`` calls it on clip embeddings.
    """
    check_bootstrap(resamples, level, len(clips))
    x = _check_embeddings(reference, "reference")
    if len(x) < 2:
        raise ValueError(f"KAD needs >= 2 reference embeddings, got {len(x)}")
    clips = [_check_embeddings(c, "generated", x.shape[1]).to(x.device) for c in clips]
    h = _bandwidth(x, torch.cat(clips), bandwidth, bandwidth_from, MAX_MEDIAN_PAIRS, 0, chunk_size)
    kernels = _ClipKernels(x, clips, 1.0 / (2 * h * h + KADTK_EPS), scale, chunk_size)
    point = kernels.kad(torch.ones(len(clips)))
    gen = torch.Generator().manual_seed(int(seed))
    draws = [torch.bincount(torch.randint(len(clips), (len(clips),), generator=gen), minlength=len(clips))
             for _ in range(int(resamples))]
    reps = torch.cat([kernels.kad(torch.stack(draws[s:s + _REPLICATES_AT_ONCE]))
                      for s in range(0, len(draws), _REPLICATES_AT_ONCE)]).cpu()
    return {**shifted_percentile_interval(float(point), reps, level), "resamples": int(resamples), "seed": int(seed),
            "bandwidth": float(h)}


class KernelAudioDistance(Metric):
    """KAD between all reference and all generated embeddings seen (over all ranks); lower is better.

    ``update(embeddings [N, D], real=False)`` adds generated embeddings, ``real=True`` reference ones (refused when
    ``reference [M, D]`` was given: precomputed reference embeddings). ``compute()`` returns ``scale`` x the
    unbiased MMD^2, a float64 scalar, and leaves the bandwidth it used in ``self.bandwidth_used``; ``protocol()``
    says what was computed. ``bandwidth``, ``bandwidth_from``, ``scale``, ``chunk_size``, ``max_median_pairs`` and
    ``seed`` are ``kernel_audio_distance``'s.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, dim: int, reference: Tensor | None = None, *, bandwidth: float | None = None,
                 bandwidth_from: BandwidthFrom = "reference", scale: float = KADTK_SCALE,
                 chunk_size: int | None = None, max_median_pairs: int = MAX_MEDIAN_PAIRS, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if bandwidth_from not in ("reference", "generated"):
            raise ValueError(f"KAD: bandwidth_from={bandwidth_from!r}; use 'reference' or 'generated'")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"KAD: bandwidth must be > 0, got {bandwidth}")
        self.dim = int(dim)
        self.bandwidth, self.bandwidth_from, self.scale = bandwidth, bandwidth_from, float(scale)
        self.chunk_size, self.max_median_pairs, self.seed = chunk_size, int(max_median_pairs), int(seed)
        self._reference: Tensor | None = None
        if reference is not None:
            ref = _check_embeddings(reference, "reference", self.dim)
            if len(ref) < 2:
                raise ValueError(f"KAD: reference needs >= 2 embeddings, got {len(ref)}")
            self._reference = ref.cpu().clone()
        self._reference_bandwidth: Tensor | None = None  # the reference's median, computed once
        self.bandwidth_used: float | None = None
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, real: bool = False) -> None:
        """``embeddings: [N, D]``."""
        emb = _check_embeddings(embeddings, "reference" if real else "generated", self.dim)
        if real and self._reference is not None:
            raise ValueError("this KAD was given reference embeddings; it takes no real embeddings")
        (self.real if real else self.fake).append(emb)

    def _side(self, side: str) -> Tensor:
        values = getattr(self, side)
        return dim_zero_cat(values) if len(values) > 0 else torch.zeros(0, self.dim, dtype=torch.float64)

    def compute(self) -> Tensor:
        fake = self._side("fake")
        real = self._side("real") if self._reference is None else self._reference.to(fake.device)
        bandwidth: float | Tensor | None = self.bandwidth
        if bandwidth is None and self.bandwidth_from == "reference" and self._reference is not None and len(fake):
            if self._reference_bandwidth is None:
                self._reference_bandwidth = median_pairwise_distance(
                    real, max_pairs=self.max_median_pairs, seed=self.seed, chunk_size=self.chunk_size)
            bandwidth = self._reference_bandwidth
        kad, h = kernel_audio_distance(real, fake, bandwidth=bandwidth, bandwidth_from=self.bandwidth_from,
                                       scale=self.scale, chunk_size=self.chunk_size,
                                       max_median_pairs=self.max_median_pairs, seed=self.seed)
        self.bandwidth_used = float(h)
        self._counts = (len(real), len(fake))
        return kad

    def protocol(self) -> dict[str, Any]:
        """What ``compute()`` computed, for reports: estimator, kernel, bandwidth rule and value, scale, counts."""
        counts = getattr(self, "_counts", (None, None))
        rule = "fixed" if self.bandwidth is not None else f"median pairwise distance of the {self.bandwidth_from} set"
        return {"metric": "kad", "estimator": "unbiased MMD^2", "kernel": "gaussian exp(-|a-b|^2 / (2 h^2 + 1e-8))",
                "bandwidth_rule": rule, "bandwidth": self.bandwidth_used, "scale": self.scale,
                "n_reference": counts[0], "n_generated": counts[1], "dtype": "float64"}

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        return _move_keeping_dtype(self, super()._apply, fn, exclude_state)
