"""Do the Jukebox priors use their conditions? Numbers a run can print next to its losses.

* ``prior_condition_ce``: a prior's cross-entropy on code crops with the true conditions, with the metadata of
  another item of the batch, with no metadata, and (upsamplers) with the upper codes of another item. A prior that
  ignores a condition gives the same CE either way.
* ``prior_condition_report``: the same over the first batches of array shards (``ostinato encode`` of a Jukebox
  VQ-VAE), cropped to the prior's window.
* ``jukebox_diversity``: clips of one prompt over several seeds, and of several prompts at one seed, through
  ``metrics.diversity.diversity_report``, with per level the share of codes two clips have in common (1.0 = the
  level ignored what differed).

"Another item" is the batch rolled by one, so no item keeps its own condition (a batch needs two items).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ostinato.data.arrays import ArrayBatch, ArrayDataModule
from ostinato.families.codebook_lm import masked_lm_losses
from ostinato.metrics.diversity import diversity_report
from ostinato.models.jukebox import Jukebox, LevelPrior
from ostinato.nn.decoding import GenerationParams

__all__ = ["prior_condition_ce", "prior_condition_report", "jukebox_diversity"]


@torch.no_grad()
def _ce(prior: LevelPrior, codes: Tensor, lengths: Tensor, metas: Sequence[Mapping[str, Any]] | None,
        upper: Tensor | None, upper_lengths: Tensor | None) -> float:
    """Mean CE; ``metas`` None = the metadata's null condition (zeros, what CFG dropout trains)."""
    device = prior.codes_per_second.device
    if prior.window and codes.shape[-1] != prior.window:
        codes = F.pad(codes[..., :prior.window], (0, max(0, prior.window - codes.shape[-1])))
    step_cond = None if upper is None else prior.upper_condition(upper.to(device), upper_lengths)
    ce, _ = masked_lm_losses(prior.lm, prior.pattern, codes.to(device), lengths.clamp(max=codes.shape[-1]),
                             _metadata(prior, metas, codes.shape[0]), step_cond=step_cond)
    return float(ce.mean())


def _metadata(prior: LevelPrior, metas: Sequence[Mapping[str, Any]] | None, b: int) -> Tensor | None:
    if metas is None:
        meta = prior.metadata_prefix([{}] * b)
        return None if meta is None else torch.zeros_like(meta)
    return prior.metadata_prefix(metas)


@torch.no_grad()
def prior_condition_ce(prior: LevelPrior, codes: Tensor, metas: Sequence[Mapping[str, Any]],
                       upper: Tensor | None = None, lengths: Tensor | None = None,
                       upper_lengths: Tensor | None = None) -> dict[str, float]:
    """Cross-entropy (nats per code) of ``codes [B, 1, F]`` (valid frames ``lengths [B]``, default all) under
    ``prior``, B >= 2: ``ce`` with the true conditions, ``ce_wrong_metadata`` (each item given the next item's
    metadata), ``ce_no_metadata`` (the null condition of CFG: zeros), and for an upsampler ``ce_shuffled_upper``
    (each item given the next item's upper codes ``upper [B, 1, F / level_ratio]``)."""
    if codes.shape[0] < 2:
        raise ValueError(f"the condition checks swap conditions between items: give at least 2, got {codes.shape[0]}")
    if prior.upper is not None and upper is None:
        raise ValueError(f"the {prior.level} prior is conditioned on the {prior.upper} codes: pass upper")
    was = prior.training
    prior.eval()
    try:
        lengths = torch.full((codes.shape[0],), codes.shape[-1]) if lengths is None else lengths
        metas = list(metas)
        rolled = metas[1:] + metas[:1]
        out = {"ce": _ce(prior, codes, lengths, metas, upper, upper_lengths)}
        if prior.metadata_fields:
            out["ce_wrong_metadata"] = _ce(prior, codes, lengths, rolled, upper, upper_lengths)
            out["ce_no_metadata"] = _ce(prior, codes, lengths, None, upper, upper_lengths)
        if upper is not None:
            rolled_lengths = None if upper_lengths is None else upper_lengths.roll(-1, 0)
            out["ce_shuffled_upper"] = _ce(prior, codes, lengths, metas, upper.roll(-1, 0), rolled_lengths)
        return out
    finally:
        prior.train(was)


def prior_condition_report(prior: LevelPrior, shards: str | Path, batches: int = 4,
                           batch_size: int = 16) -> dict[str, float]:
    """``prior_condition_ce`` averaged over the first ``batches`` batches of the array shards ``shards`` (crops of
    the prior's window from the start of each item), with ``items``, the number of items read."""
    streams = [prior.level] + ([prior.upper] if prior.upper else [])
    if not prior.window or not prior.frame_rate:
        raise ValueError(f"the {prior.level} prior has no window or frame rate yet: give a trained one")
    dm = ArrayDataModule(valid=str(shards), streams=streams, segment_seconds=prior.window / prior.frame_rate,
                         batch_size=batch_size, eval_batch_size=batch_size, num_workers=0)
    totals: dict[str, float] = {}
    items = 0
    for i, batch in enumerate(dm.val_dataloader()):
        if i >= batches:
            break
        batch: ArrayBatch
        ok = batch.lengths[prior.level] > 0
        if int(ok.sum()) < 2:
            continue
        n = int(ok.sum())
        upper = batch.arrays[prior.upper][ok] if prior.upper else None
        upper_lengths = batch.lengths[prior.upper][ok] if prior.upper else None
        result = prior_condition_ce(prior, batch.arrays[prior.level][ok], [m for m, k in zip(batch.meta, ok) if k],
                                    upper, batch.lengths[prior.level][ok], upper_lengths)
        for key, value in result.items():
            totals[key] = totals.get(key, 0.0) + value * n
        items += n
    if not items:
        raise ValueError(f"{shards}: no batch of at least 2 valid items to check the {prior.level} prior on")
    return {**{k: v / items for k, v in totals.items()}, "items": float(items)}


def _shared_codes(codes: Tensor) -> float:
    """codes [N, 1, F] -> the mean over pairs of the share of frames where two items hold the same code."""
    n = codes.shape[0]
    same = (codes[:, None] == codes[None]).float().mean(dim=(-1, -2))  # [N, N]
    pairs = torch.triu_indices(n, n, offset=1)
    return float(same[pairs[0], pairs[1]].mean())


@torch.no_grad()
def jukebox_diversity(jukebox: Jukebox, prompts: Sequence[str | Mapping[str, Any]], seeds: Sequence[int],
                      duration: float, params: GenerationParams | None = None) -> dict[str, dict[str, float]]:
    """Clips of ``prompts[0]`` at each of ``seeds`` (``across_seeds``) and of every prompt at ``seeds[0]``
    (``across_prompts``): ``diversity_report`` of each set, plus ``shared_codes_<level>``, the mean share of a
    level's codes two clips of the set have in common. Needs two prompts and two seeds."""
    if len(prompts) < 2 or len(seeds) < 2:
        raise ValueError(f"give at least 2 prompts and 2 seeds, got {len(prompts)} and {len(seeds)}")
    params = params or GenerationParams(cfg_scale=3.0)
    metas = jukebox.metadata(list(prompts))
    sets = {"across_seeds": [(metas[0], s) for s in seeds], "across_prompts": [(m, seeds[0]) for m in metas]}
    out: dict[str, dict[str, float]] = {}
    for name, runs in sets.items():
        codes = [jukebox.generate_codes([m], duration, replace(params, seed=int(s))) for m, s in runs]
        device = next(jukebox.vqvae.parameters()).device
        clips = torch.cat([jukebox.vqvae.decode(c["bottom"].to(device), "bottom") for c in codes])
        clips = clips[..., :round(duration * jukebox.sample_rate)].cpu()
        report = diversity_report(clips, jukebox.sample_rate)
        for level in codes[0]:
            report[f"shared_codes_{level}"] = _shared_codes(torch.cat([c[level].cpu() for c in codes]))
        out[name] = report
    return out
