"""How much a set of generated clips differ from each other: the check that generation depends on its seed, noise
and conditions (a collapsed GAN or a prior that ignores its prompt gives near-identical clips).

Two views of every pair of clips (each in ``[-1, 1]``, 1 = identical):

* ``waveform_correlation``: the Pearson correlation of the samples, as a listener's "the same waveform";
* ``spectral_similarity``: the cosine of the log-mel spectrograms (mean removed per clip), which also finds two
  clips identical when their phase differs: a steady buzz is a steady buzz at any offset.

``diversity_report`` gives the mean and maximum of each over all pairs; ``ClipDiversity`` is the same over an
evaluation's first clips as a torchmetrics ``Metric`` (the suites' ``diversity``). Written here (no library
computes it) as a few lines of torch.
"""
from __future__ import annotations

import torch
import torchaudio
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["ClipDiversity", "waveform_correlation", "spectral_similarity", "diversity_report"]


def _pairwise_cosine(x: Tensor) -> Tensor:
    """x [N, D] (rows centred) -> [N, N] cosine similarities."""
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x @ x.T


def _flat(clips: Tensor) -> Tensor:
    """clips [N, T] or [N, C, T] -> [N, C * T] float64."""
    if clips.dim() == 2:
        clips = clips[:, None]
    return clips.reshape(clips.shape[0], -1).double()


def waveform_correlation(clips: Tensor) -> Tensor:
    """clips [N, T] or [N, C, T] -> [N, N] Pearson correlation of the samples of each pair."""
    x = _flat(clips)
    return _pairwise_cosine(x - x.mean(1, keepdim=True))


def spectral_similarity(clips: Tensor, sample_rate: int, n_mels: int = 64) -> Tensor:
    """clips [N, T] or [N, C, T] -> [N, N] cosine of the centred log-mel spectrograms of each pair."""
    x = clips if clips.dim() == 2 else clips.mean(1)
    n_fft = max(256, 1 << (int(0.046 * sample_rate) - 1).bit_length())
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels)
    spec = torch.log(mel(x.float().cpu()) + 1e-5).flatten(1).double()
    return _pairwise_cosine(spec - spec.mean(1, keepdim=True))


def diversity_report(clips: Tensor, sample_rate: int) -> dict[str, float]:
    """clips [N, T] or [N, C, T], N >= 2 -> mean and max over the N(N-1)/2 pairs of both similarities:
    ``{"waveform_corr_mean", "waveform_corr_max", "spectral_sim_mean", "spectral_sim_max", "pairs"}``."""
    if clips.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 clips, got {clips.shape[0]}")
    n = clips.shape[0]
    pairs = torch.triu_indices(n, n, offset=1)
    out: dict[str, float] = {"pairs": float(pairs.shape[1])}
    for name, sim in (("waveform_corr", waveform_correlation(clips)),
                      ("spectral_sim", spectral_similarity(clips, sample_rate))):
        values = sim[pairs[0], pairs[1]]
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_max"] = float(values.max())
    return out


class ClipDiversity(Metric):
    """``diversity_report`` of the first ``max_clips`` clips of an evaluation (by item index), as a torchmetrics
    ``Metric``: under DDP every rank keeps its own clips among the first ``max_clips`` and ``compute`` gathers them,
    so any number of ranks compares the same pairs. Clips are cropped or zero-padded to ``num_samples``.

    ``update(wav [B, C, T], index [B])``; ``compute()`` -> ``diversity_report`` of the kept clips, or every value
    NaN with fewer than two.
    """

    full_state_update = False

    def __init__(self, sample_rate: int, num_samples: int, max_clips: int = 32) -> None:
        super().__init__()
        self.sample_rate, self.num_samples, self.max_clips = int(sample_rate), int(num_samples), int(max_clips)
        self.add_state("clips", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, wav: Tensor, index: Tensor) -> None:
        # rows of 0 clips too: every rank then gathers tensors of one rank (DDP), whatever its items
        keep = (index < self.max_clips).nonzero().squeeze(1).tolist()
        clips = wav[keep].float()[..., : self.num_samples]
        clips = torch.nn.functional.pad(clips, (0, self.num_samples - clips.shape[-1]))
        self.clips.append(clips)
        self.index.append(index[keep].to(clips.device).long())

    def compute(self) -> dict[str, float]:
        empty = isinstance(self.clips, list) and not self.clips  # a list before a DDP sync, one tensor after
        clips = torch.zeros(0) if empty else dim_zero_cat(self.clips)
        if clips.shape[0] < 2:
            return {k: float("nan") for k in ("waveform_corr_mean", "waveform_corr_max", "spectral_sim_mean",
                                              "spectral_sim_max", "pairs")}
        order = dim_zero_cat(self.index).argsort()
        return diversity_report(clips[order].cpu(), self.sample_rate)
