"""Fréchet Audio Distance (FAD) and its variants, as torchmetrics ``Metric``s.

FAD (Kilgour et al. 2019) fits a Gaussian to each of two sets of embeddings (the "real" reference set and the
"fake" generated set) and returns their Fréchet distance
``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^1/2)``. The embedding model is the caller's business: these
metrics take ``[N, D]`` embeddings (frames or clips, as the caller decides).

* ``FrechetAudioDistance``: float64 sums per side (``n``, ``sum [D]``, ``outer [D, D]``), so the result does not
  depend on batch sizes or on the number of DDP ranks. The real side can instead be a fixed ``(mu, sigma, n)``
  (e.g. from a cache of reference statistics).
* ``FADInf`` (Gui et al. 2023, "Adapting Fréchet Audio Distance for Generative Music Evaluation"): FAD is biased
  upwards by roughly ``k / N`` for ``N`` fake samples; it is evaluated on seeded random subsets of ``N_i`` fake
  embeddings and extrapolated to ``N -> inf`` by a least-squares line in ``1 / N``.
* ``PerSongFAD`` (fadtk's per-song FAD): each generated song's frame embeddings form their own Gaussian, scored
  against the reference Gaussian; useful to find outliers.

The covariance square root is computed the symmetric way: ``tr((S1 S2)^1/2) = sum_i sqrt(eig_i(R S2 R))`` with
``R = S1^1/2`` from ``eigh`` (eigenvalues clamped at 0), all float64. Covariances come from running sums
(``(outer - n mu mu^T) / (n - 1)``), which in float64 keeps ~16 - 2 log10(|mu| / std) significant digits.

States stay float64 (float32 for stored embeddings) when the owning module is cast, e.g. by Lightning's
``bf16-true``. Under DDP, ``compute()`` gathers the states of all ranks; each rank must have called ``update``
with fake data at least once for the metrics that keep embeddings (``FADInf``, ``PerSongFAD``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["FAD_INF_MIN_ITEMS", "FAD_INF_MIN_R2", "FAD_INF_PROTOCOLS", "FADInf", "FrechetAudioDistance", "PerSongFAD",
           "bootstrap_fad", "fad_inf_fit", "fad_inf_refusal", "fad_inf_reliability", "frechet_distance",
           "gaussian_stats", "per_song_refusal", "shifted_percentile_interval"]

Stats = tuple[Tensor, Tensor, int]


def gaussian_stats(emb: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, D]`` embeddings -> ``(mu [D], sigma [D, D])``, float64, unbiased covariance (divides by ``N - 1``)."""
    if emb.dim() != 2:
        raise ValueError(f"expected embeddings [N, D], got {tuple(emb.shape)}")
    if len(emb) < 2:
        raise ValueError(f"a covariance needs >= 2 embeddings, got {len(emb)}")
    emb = emb.detach().double()
    mu = emb.mean(0)
    centred = emb - mu
    return mu, centred.mT @ centred / (len(emb) - 1)


def _sqrtm_psd(sigma: Tensor) -> Tensor:
    """Square root of a symmetric PSD ``[D, D]`` matrix by ``eigh``; tiny negative eigenvalues (round-off) -> 0."""
    w, v = torch.linalg.eigh((sigma + sigma.mT) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.mT


def _frechet_from_root(mu1: Tensor, root1: Tensor, trace1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Fréchet distance with ``root1 = sigma1^1/2`` precomputed (reused when one side is fixed)."""
    m = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.mT) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return diff @ diff + trace1 + torch.trace(sigma2) - 2 * tr_covmean


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Fréchet distance between ``N(mu1 [D], sigma1 [D, D])`` and ``N(mu2, sigma2)``; float64 scalar."""
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"expected mu [D] and sigma [D, D] on both sides, got {tuple(mu1.shape)}, "
                         f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    mu1, sigma1, mu2, sigma2 = (t.detach().double() for t in (mu1, sigma1, mu2, sigma2))
    return _frechet_from_root(mu1, _sqrtm_psd(sigma1), torch.trace(sigma1), mu2, sigma2)


def fad_inf_fit(n: Tensor, fad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares line ``fad = intercept + slope / n`` over points ``n [P]``, ``fad [P]`` (``P >= 2``).

    Returns float64 ``(intercept, slope, r2)``; ``intercept`` is FAD-inf. ``r2`` is 1 when all FADs are equal.
    """
    x = 1.0 / n.detach().double()
    y = fad.detach().double().to(x.device)
    if x.dim() != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"expected n and fad of equal shape [P], P >= 2, got {tuple(n.shape)}, {tuple(fad.shape)}")
    xc, yc = x - x.mean(), y - y.mean()
    slope = (xc @ yc) / (xc @ xc)
    intercept = y.mean() - slope * x.mean()
    ss_res = (y - intercept - slope * x).square().sum()
    ss_tot = yc @ yc
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else torch.ones_like(ss_res)
    return intercept, slope, r2


# Below these, the line FAD_i = fad_inf + slope / N_i is fitted to noise: Gui et al. extrapolate from thousands of
# clips, and an R^2 near 0 means FAD did not fall as 1 / N over the subsets, so the intercept means nothing.
FAD_INF_MIN_ITEMS = 100
FAD_INF_MIN_R2 = 0.8
FAD_INF_PROTOCOLS = ("ostinato", "fadtk")
FADTK_MIN_N, FADTK_STEPS = 500, 25  # fadtk's score_inf defaults
_BOOTSTRAP_BLOCK_BYTES = 1 << 28  # float64 [block, D, D] outer products held at once by bootstrap_fad


def fad_inf_reliability(r2: float | None, num_items: int) -> dict[str, Any]:
    """Whether a FAD-inf value can be trusted: ``{"reliable": bool, "note": str, "min_items", "min_r2"}``.

    ``r2``: the fit's R^2 (``FADInf.compute()["r2"]``; None when it was not finite); ``num_items``: the generated
    clips scored. ``note`` is "" when reliable, else why not (shown next to the number in reports).
    """
    reasons = []
    if r2 is None or not r2 >= FAD_INF_MIN_R2:
        reasons.append(f"fit R^2 {'n/a' if r2 is None else f'{r2:.3g}'} < {FAD_INF_MIN_R2:g}")
    if num_items < FAD_INF_MIN_ITEMS:
        reasons.append(f"{num_items} clips < {FAD_INF_MIN_ITEMS}")
    note = f"unreliable ({', '.join(reasons)}): the extrapolation means nothing; read FAD" if reasons else ""
    return {"reliable": not reasons, "note": note, "min_items": FAD_INF_MIN_ITEMS, "min_r2": FAD_INF_MIN_R2}


def fad_inf_refusal(r2: float | None, num_items: int) -> str | None:
    """Why FAD-inf is not given (one line), or None when it may be: fewer than ``FAD_INF_MIN_ITEMS`` clips or a fit
    R^2 below ``FAD_INF_MIN_R2`` (``r2=None``: the fit was not made or not finite)."""
    fit = fad_inf_reliability(r2, num_items)
    if fit["reliable"]:
        return None
    reasons = []
    if num_items < FAD_INF_MIN_ITEMS:
        reasons.append(f"{num_items} clips < {FAD_INF_MIN_ITEMS}")
    if r2 is not None and not r2 >= FAD_INF_MIN_R2:
        reasons.append(f"fit R^2 {r2:.3g} < {FAD_INF_MIN_R2:g}")
    elif r2 is None and num_items >= FAD_INF_MIN_ITEMS:
        reasons.append("no finite fit")
    return (f"FAD-inf refused ({', '.join(reasons)}): a line through FAD against 1/N would be fitted to noise; "
            f"read FAD, or score >= {FAD_INF_MIN_ITEMS} clips")


def per_song_refusal(frames: Sequence[int], dim: int) -> str | None:
    """Why per-song FAD is not given (one line), or None. The rule: every song needs >= ``dim + 1`` frames, so
    that its covariance has full rank; with fewer, a song's FAD measures its length more than its sound."""
    if not len(frames):
        return "per-song FAD refused: no generated songs"
    shortest = min(int(f) for f in frames)
    if shortest < dim + 1:
        return (f"per-song FAD refused: the shortest song has {shortest} frames of {dim}-dim embeddings, and a "
                f"full-rank covariance needs >= {dim + 1}; give longer clips or a lower-dimensional embedding")
    return None


def check_bootstrap(resamples: int, level: float, n_clips: int) -> None:
    """The arguments every bootstrap interval takes (FAD's, KAD's), or a ValueError naming the one that is off."""
    if resamples < 2:
        raise ValueError(f"bootstrap needs >= 2 resamples, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_clips < 2:
        raise ValueError(f"bootstrap needs >= 2 generated clips, got {n_clips}")


def bootstrap_fad(reference: Stats, clips: Sequence[Tensor], resamples: int, seed: int = 0,
                  level: float = 0.95) -> dict[str, Any]:
    """Bootstrap confidence interval of FAD over the generated clips.

    ``reference``: ``(mu [D], sigma [D, D], n)``; ``clips``: per clip ``[F_i, D]`` embeddings (frames, or one clip
    embedding ``[1, D]`` each). Each of ``resamples`` replicates draws the clips with replacement (seeded
    ``torch.Generator``) and pools their rows. FAD is biased upwards by repeated draws (the duplicates shrink the
    covariance's effective sample), so the percentile interval is taken of the replicates shifted by their mean bias
    (``mean(replicates) - point``), which centres it on the point estimate; the lower end is clamped at 0.

    Returns ``{"point", "low", "high", "level", "resamples", "seed", "std", "bias", "method"}`` (floats, ints).
    """
    check_bootstrap(resamples, level, len(clips))
    mu_r, sigma_r, _ = (t.double() if isinstance(t, Tensor) else t for t in reference)
    root_r, trace_r = _sqrtm_psd(sigma_r), torch.trace(sigma_r)
    clips = [c.detach().double().cpu() for c in clips]
    n_clips, dim = len(clips), clips[0].shape[1]
    gen = torch.Generator().manual_seed(int(seed))
    draws = [torch.bincount(torch.randint(n_clips, (n_clips,), generator=gen), minlength=n_clips)
             for _ in range(int(resamples))]
    # Row 0 weighs every clip once (the point estimate); a replicate's moments are its clip counts times the
    # per-clip moments, so the frames are read once per block of replicates, not once per replicate.
    counts = torch.stack([torch.ones(n_clips, dtype=torch.long)] + draws).double()  # [R + 1, N]
    n = counts @ torch.tensor([len(c) for c in clips], dtype=torch.float64)  # [R + 1]
    mu = counts @ torch.stack([c.sum(0) for c in clips]) / n[:, None]  # [R + 1, D]
    block = max(1, _BOOTSTRAP_BLOCK_BYTES // (8 * dim * dim))
    fads = []
    for r0 in range(0, len(counts), block):
        outer = torch.zeros(min(block, len(counts) - r0), dim, dim, dtype=torch.float64)
        for c0 in range(0, n_clips, block):
            per_clip = torch.stack([c.mT @ c for c in clips[c0:c0 + block]])  # [c, D, D]
            outer += torch.einsum("rc,cij->rij", counts[r0:r0 + len(outer), c0:c0 + block], per_clip)
        for i, o in enumerate(outer):
            r = r0 + i
            sigma = (o - n[r] * torch.outer(mu[r], mu[r])) / (n[r] - 1)
            fads.append(_frechet_from_root(mu_r, root_r, trace_r, mu[r], (sigma + sigma.mT) / 2))
    point, reps = float(fads[0]), torch.stack(fads[1:])
    return {**shifted_percentile_interval(point, reps, level, floor=0.0), "resamples": int(resamples),
            "seed": int(seed)}


def shifted_percentile_interval(point: float, replicates: Tensor, level: float = 0.95,
                                floor: float | None = None) -> dict[str, Any]:
    """Percentile interval of bootstrap ``replicates [R]`` shifted by their mean bias (``mean - point``), so that
    a statistic that resampling with replacement biases (FAD, KAD) gets an interval around its point estimate.
    ``floor``: the lower end is clamped there (0 for FAD). Returns ``{"point", "low", "high", "level", "std",
    "bias", "method"}``."""
    reps = replicates.detach().double().cpu()
    bias = float(reps.mean()) - point
    tail = (1 - level) / 2
    low, high = torch.quantile(reps - bias, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    clamp = f"; low clamped at {floor:g}" if floor is not None else ""
    return {"point": point, "low": low if floor is None else max(low, floor), "high": high, "level": level,
            "std": float(reps.std()), "bias": bias,
            "method": f"percentile of clip-resampled replicates shifted by their mean bias{clamp}"}


def _move_keeping_dtype(metric: Metric, parent_apply: Callable[..., Module], fn: Callable,
                        exclude_state: Sequence[str]) -> Module:
    """``Metric._apply`` that moves every state (tensor or list of tensors) across devices without casting it."""
    device = fn(torch.zeros(1, device=metric.device)).device  # fn may also cast; only its device is taken
    this = parent_apply(fn, tuple(exclude_state) + tuple(metric._defaults))

    def move(value: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        return value.to(device) if isinstance(value, Tensor) else [v.to(device) for v in value]

    for key in (k for k in this._defaults if k not in exclude_state):
        this._defaults[key] = move(this._defaults[key])
        setattr(this, key, move(getattr(this, key)))
    return this


class _RealSide(Metric):
    """Real-side Gaussian: float64 sums (``real_n``, ``real_sum``, ``real_outer``) or a fixed reference."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, dim: int, reference: Stats | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self._add_sums("real")
        self._reference: Stats | None = None
        if reference is not None:
            mu, sigma, n = reference
            if tuple(mu.shape) != (dim,) or tuple(sigma.shape) != (dim, dim):
                raise ValueError(f"reference must be (mu [{dim}], sigma [{dim}, {dim}], n), got "
                                 f"{tuple(mu.shape)}, {tuple(sigma.shape)}")
            if int(n) < 2:
                raise ValueError(f"reference statistics need n >= 2, got {n}")
            self._reference = (mu.detach().double().cpu().clone(), sigma.detach().double().cpu().clone(), int(n))

    def _add_sums(self, side: str) -> None:
        f64 = torch.float64
        self.add_state(f"{side}_n", default=torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        self.add_state(f"{side}_sum", default=torch.zeros(self.dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state(f"{side}_outer", default=torch.zeros(self.dim, self.dim, dtype=f64), dist_reduce_fx="sum")

    def _check(self, emb: Tensor) -> Tensor:
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"expected embeddings [N, {self.dim}], got {tuple(emb.shape)}")
        return emb.detach()

    def _accumulate(self, side: str, emb: Tensor) -> None:
        emb = emb.double()
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + len(emb))
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + emb.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + emb.mT @ emb)

    def _update_real(self, emb: Tensor) -> None:
        if self._reference is not None:
            raise ValueError("this metric was given reference statistics; it takes no real embeddings")
        self._accumulate("real", emb)

    def _sum_stats(self, side: str) -> Stats:
        n = int(getattr(self, f"{side}_n").item())
        if n < 2:
            raise ValueError(f"FAD needs >= 2 {side} embeddings, got {n}")
        mu = getattr(self, f"{side}_sum") / n
        sigma = (getattr(self, f"{side}_outer") - n * torch.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.mT) / 2, n

    def _real(self) -> Stats:
        if self._reference is None:
            return self._sum_stats("real")
        mu, sigma, n = self._reference
        return mu.to(self.real_sum.device), sigma.to(self.real_sum.device), n

    def _synced(self, fn: Callable[[], Stats]) -> Stats:
        """Run ``fn`` on the states of all ranks (compute() syncs by itself; other methods do not)."""
        if self._is_synced:
            return fn()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group):
            return fn()

    def real_stats(self) -> Stats:
        """``(mu [D], sigma [D, D], n)`` of the real side (the reference if given), over all ranks."""
        return self._synced(self._real)

    def _warn_if_singular(self, n: int, side: str) -> None:
        if n < self.dim:
            warnings.warn(f"FAD with N={n} {side} embeddings of dimension D={self.dim} is unreliable (singular "
                          f"covariance); use >= D samples", UserWarning, stacklevel=3)

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        return _move_keeping_dtype(self, super()._apply, fn, exclude_state)


class FrechetAudioDistance(_RealSide):
    """FAD between all real and all fake embeddings seen (over all ranks); lower is better.

    ``update(embeddings [N, D], real=False)`` adds to the fake side, ``real=True`` to the real side (refused when
    ``reference=(mu, sigma, n)`` was given). ``compute()`` returns a float64 scalar. It raises ``ValueError`` when a
    side has fewer than 2 embeddings, and warns (``UserWarning``) when a side has fewer than ``D`` (the covariance is
    then singular and the estimate strongly biased); it still returns the value, as small test runs need one.
    """

    def __init__(self, dim: int, reference: Stats | None = None, **kwargs: Any) -> None:
        super().__init__(dim, reference, **kwargs)
        self._add_sums("fake")

    def update(self, embeddings: Tensor, real: bool = False) -> None:
        """``embeddings: [N, D]``."""
        emb = self._check(embeddings)
        if real:
            self._update_real(emb)
        else:
            self._accumulate("fake", emb)

    def fake_stats(self) -> Stats:
        """``(mu [D], sigma [D, D], n)`` of the fake side over all ranks, e.g. to cache a reference set."""
        return self._synced(lambda: self._sum_stats("fake"))

    def compute(self) -> Tensor:
        counts = {side: int(getattr(self, f"{side}_n").item()) for side in ("real", "fake")}
        if self._reference is not None:
            counts["real"] = self._reference[2]
        if min(counts.values()) < 2:
            raise ValueError(f"FAD needs >= 2 embeddings on each side, got real={counts['real']}, "
                             f"fake={counts['fake']}")
        for side, n in counts.items():
            self._warn_if_singular(n, side)
        mu_r, sigma_r, _ = self._real()
        mu_f, sigma_f, _ = self._sum_stats("fake")
        return frechet_distance(mu_r, sigma_r, mu_f, sigma_f)


class FADInf(_RealSide):
    """FAD-inf (Gui et al. 2023): FAD extrapolated to infinitely many fake samples; lower is better.

    Fake embeddings are kept (float32, gathered over ranks in rank order); the real side is float64 sums or a
    reference. ``compute()`` evaluates FAD on random subsets (``torch.Generator`` seeded with ``seed``, so every
    rank draws the same) of ``num_points`` sizes ``N_i`` evenly spaced from ``min_n`` to all ``N`` fake embeddings
    and fits ``FAD_i = fad_inf + slope / N_i`` by least squares. ``protocol``:

    * ``"ostinato"``: subsets drawn without replacement, sizes rounded and deduplicated; ``min_n`` defaults to
      ``max(D + 1, N // 10)`` (every subset covariance full rank).
    * ``"fadtk"``: fadtk's ``score_inf``: subsets drawn WITH replacement, sizes ``int(linspace(min_n, N, steps))``
      (truncated, kept even when repeated); ``min_n`` defaults to fadtk's 500 (pass ``num_points=25`` for its steps).

    Returns ``{"fad_inf", "slope", "r2": float64 scalars, "n": [P] int64 N_i, "fad": [P] float64 FAD_i}``.
    """

    def __init__(self, dim: int, reference: Stats | None = None, num_points: int = 15, min_n: int | None = None,
                 seed: int = 0, protocol: str = "ostinato", **kwargs: Any) -> None:
        super().__init__(dim, reference, **kwargs)
        if protocol not in FAD_INF_PROTOCOLS:
            raise ValueError(f"FAD-inf protocol must be one of {list(FAD_INF_PROTOCOLS)}, got {protocol!r}")
        self.protocol = protocol
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {num_points}")
        self.num_points = int(num_points)
        self.min_n = None if min_n is None else int(min_n)
        self.seed = int(seed)
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def default_min_n(self, total: int) -> int:
        """The smallest subset when ``min_n`` is not given, for ``total`` fake embeddings."""
        return FADTK_MIN_N if self.protocol == "fadtk" else max(self.dim + 1, total // 10)

    def update(self, embeddings: Tensor, real: bool = False) -> None:
        """``embeddings: [N, D]``."""
        emb = self._check(embeddings)
        if real:
            self._update_real(emb)
        else:
            self.fake.append(emb.float())

    def compute(self) -> dict[str, Tensor]:
        fake = dim_zero_cat(self.fake) if len(self.fake) > 0 else torch.zeros(0, self.dim)
        total = len(fake)
        min_n = self.default_min_n(total) if self.min_n is None else self.min_n
        if min_n < 2 or total <= min_n:
            raise ValueError(f"FAD-inf needs more than min_n={min_n} fake embeddings (and min_n >= 2), got "
                             f"{total}; the default min_n is max(D + 1, N // 10) with D={self.dim}")
        mu_r, sigma_r, n_r = self._real()
        self._warn_if_singular(n_r, "real")
        root_r, trace_r = _sqrtm_psd(sigma_r), torch.trace(sigma_r)
        sizes = torch.linspace(min_n, total, self.num_points, dtype=torch.float64)
        fadtk = self.protocol == "fadtk"
        sizes = sizes.long() if fadtk else sizes.round().long().unique()
        gen = torch.Generator().manual_seed(self.seed)
        fads = []
        for n in sizes.tolist():
            idx = (torch.randint(total, (n,), generator=gen) if fadtk
                   else torch.randperm(total, generator=gen)[:n]).to(fake.device)
            mu_f, sigma_f = gaussian_stats(fake[idx])
            fads.append(_frechet_from_root(mu_r, root_r, trace_r, mu_f, sigma_f))
        fad = torch.stack(fads)
        intercept, slope, r2 = fad_inf_fit(sizes, fad)
        return {"fad_inf": intercept, "slope": slope, "r2": r2, "n": sizes, "fad": fad}


class PerSongFAD(_RealSide):
    """Per-song FAD (fadtk): each fake song's frame embeddings -> its own Gaussian, scored against the real one.

    ``update(song_frames, real=False, ids=None)`` takes a list of ``[F_s, D]`` tensors (one per song) or a tensor
    ``[S, F, D]``, plus optional ids (one ``str`` per song). ``real=True`` pools all frames into the real side
    (ids are then ignored). Frames are kept (float32) and gathered over ranks in rank order, ids with them.

    ``compute()`` returns ``{"fad": [S] float64, "frames": [S] int64 frame counts, "ids": list[str | None]}`` in
    update order (rank by rank under DDP). A song with fewer than 2 frames has no covariance: its FAD is ``nan``.
    Songs usually have fewer frames than ``D``; their covariance is then singular but the Fréchet distance is still
    defined, so no warning is given (compare songs of similar length).
    """

    def __init__(self, dim: int, reference: Stats | None = None, **kwargs: Any) -> None:
        super().__init__(dim, reference, **kwargs)
        self.add_state("frames", default=[], dist_reduce_fx="cat")  # [sum F_s, D] float32
        self.add_state("counts", default=[], dist_reduce_fx="cat")  # [S] int64
        self.add_state("id_bytes", default=[], dist_reduce_fx="cat")  # utf-8 of all ids, uint8
        self.add_state("id_lengths", default=[], dist_reduce_fx="cat")  # [S] int64, -1 for no id

    def update(self, song_frames: list[Tensor] | Tensor, real: bool = False, ids: list[str] | None = None) -> None:
        songs = [self._check(s) for s in song_frames]
        if not songs:
            return
        if real:
            self._update_real(torch.cat(songs))
            return
        if ids is not None and len(ids) != len(songs):
            raise ValueError(f"got {len(ids)} ids for {len(songs)} songs")
        device = songs[0].device
        self.frames.append(torch.cat(songs).float())
        self.counts.append(torch.tensor([len(s) for s in songs], dtype=torch.long, device=device))
        encoded = [None if i is None else str(i).encode() for i in (ids or [None] * len(songs))]
        self.id_lengths.append(torch.tensor([-1 if e is None else len(e) for e in encoded], device=device))
        self.id_bytes.append(torch.tensor(list(b"".join(e for e in encoded if e)), dtype=torch.uint8, device=device))

    def compute(self) -> dict[str, Tensor | list]:
        if len(self.counts) == 0:
            raise ValueError("PerSongFAD got no fake songs")
        frames, counts = dim_zero_cat(self.frames), dim_zero_cat(self.counts).long()
        mu_r, sigma_r, _ = self._real()
        root_r, trace_r = _sqrtm_psd(sigma_r), torch.trace(sigma_r)
        fad = torch.full((len(counts),), float("nan"), dtype=torch.float64, device=mu_r.device)
        for i, song in enumerate(torch.split(frames, counts.tolist())):
            if len(song) >= 2:
                mu_f, sigma_f = gaussian_stats(song)
                fad[i] = _frechet_from_root(mu_r, root_r, trace_r, mu_f.to(mu_r.device), sigma_f.to(mu_r.device))
        raw = bytes(dim_zero_cat(self.id_bytes).to(torch.uint8).tolist())
        ids: list[str | None] = []
        pos = 0
        for length in dim_zero_cat(self.id_lengths).long().tolist():
            ids.append(None if length < 0 else raw[pos:pos + length].decode())
            pos += max(length, 0)
        return {"fad": fad, "frames": counts, "ids": ids}
