"""Melody adherence: chroma cosine similarity between generated audio and its melody reference, as a ``Metric``.

As audiocraft's ``ChromaCosineSimilarityMetric``: the chromagrams (``ostinato.nn.chroma.chromagram``, the features
MusicGen-melody is conditioned on) of the generated audio and of the reference are compared frame by frame with
the cosine similarity, and ``compute()`` is the mean over all valid frames of all items (float64 sums, exact over
batching and DDP ranks); in ``[0, 1]`` (chroma is non-negative), higher is better.

Valid frames of item ``b``: the first ``ceil(lengths[b] / hop)`` frames (generated padding is zeroed first, so
whatever it holds is ignored) whose *reference* chroma is not silent (below ``silence_db``): where the melody is
silent there is nothing to follow. A silent generated frame under a voiced reference frame scores 0: silence is
no way to follow a melody. (audiocraft counts every frame, silent ones as 0.)

The reference is looped (or cropped) to each generated item's length, as MusicGen-melody does with a short
melody prompt; with ``reference_lengths`` only ``reference[b, :, :reference_lengths[b]]`` is looped.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchaudio.functional as AF
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric

from ostinato.metrics.codec import _apply_keeping_float64
from ostinato.nn.chroma import chromagram, default_n_fft

__all__ = ["ChromaCosineSimilarity", "loop_to_length"]


def loop_to_length(wav: Tensor, length: int) -> Tensor:
    """``[C, T']`` -> ``[C, length]``: repeated end to end, then cropped."""
    if wav.shape[-1] < 1:
        raise ValueError("cannot loop an empty reference")
    repeats = -(-length // wav.shape[-1])
    return wav.repeat(1, repeats)[:, :length]


def _lengths(lengths: Tensor | None, batch: int, total: int, name: str) -> list[int]:
    if lengths is None:
        return [total] * batch
    if lengths.dim() != 1 or len(lengths) != batch:
        raise ValueError(f"{name} must have shape [{batch}], got {tuple(lengths.shape)}")
    out = [min(int(n), total) for n in lengths.tolist()]
    if min(out) < 1:
        raise ValueError(f"{name} must be positive")
    return out


class ChromaCosineSimilarity(Metric):
    """Mean frame-wise cosine similarity of generated and reference chroma; ``compute()`` -> float64 scalar.

    ``hop_seconds`` sets the chroma frame hop (``round(hop_seconds * sample_rate)`` samples; 0.128 s as
    MusicGen-melody), ``n_fft`` defaults to ``default_n_fft(hop)``; ``argmax`` compares one-hot chroma (as the
    model is conditioned) instead of the full 12-bin profile.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    total: Tensor
    count: Tensor

    def __init__(self, sample_rate: int, hop_seconds: float = 0.128, argmax: bool = False, n_fft: int | None = None,
                 silence_db: float = -60.0, eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_rate = int(sample_rate)
        self.hop_length = max(1, round(hop_seconds * sample_rate))
        self.n_fft = default_n_fft(self.hop_length) if n_fft is None else int(n_fft)
        self.argmax = argmax
        self.silence_db = silence_db
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _chroma(self, wav: Tensor) -> Tensor:
        return chromagram(wav, self.sample_rate, self.hop_length, self.n_fft, argmax=self.argmax,
                          silence_db=self.silence_db)

    def update(self, generated: Tensor, reference: Tensor, lengths: Tensor | None = None,
               sample_rate: int | None = None, reference_lengths: Tensor | None = None) -> None:
        """``generated: [B, C, T]``, ``reference: [B, C', T']`` at ``sample_rate`` (default: the metric's).

        ``lengths [B]``: valid generated samples per item; ``reference_lengths [B]``: valid reference samples.
        """
        if generated.dim() != 3 or reference.dim() != 3 or len(generated) != len(reference):
            raise ValueError(f"expected generated [B, C, T] and reference [B, C', T'], got "
                             f"{tuple(generated.shape)} and {tuple(reference.shape)}")
        batch = len(generated)
        with torch.no_grad(), torch.autocast(device_type=generated.device.type, enabled=False):
            generated, reference = generated.detach().float(), reference.detach().float()
            if sample_rate is not None and int(sample_rate) != self.sample_rate:
                ratio = self.sample_rate / int(sample_rate)
                lengths, reference_lengths = (None if n is None else torch.ceil(n.double() * ratio).long()
                                              for n in (lengths, reference_lengths))
                generated = AF.resample(generated, int(sample_rate), self.sample_rate)
                reference = AF.resample(reference, int(sample_rate), self.sample_rate)
            total = generated.shape[-1]
            gen_len = _lengths(lengths, batch, total, "lengths")
            ref_len = _lengths(reference_lengths, batch, reference.shape[-1], "reference_lengths")
            gen = torch.zeros_like(generated)
            ref = reference.new_zeros(batch, reference.shape[1], total)
            for b in range(batch):
                gen[b, :, :gen_len[b]] = generated[b, :, :gen_len[b]]
                ref[b, :, :gen_len[b]] = loop_to_length(reference[b, :, :ref_len[b]], gen_len[b])
            gen_chroma, ref_chroma = self._chroma(gen).double(), self._chroma(ref).double()  # [B, F, 12]

            frames = torch.arange(gen_chroma.shape[1], device=gen.device)
            n_frames = torch.tensor([-(-n // self.hop_length) for n in gen_len], device=gen.device)
            valid = (frames[None] < n_frames[:, None]) & (ref_chroma.abs().sum(-1) > 0)  # [B, F]
            norms = gen_chroma.norm(dim=-1).clamp_min(self.eps) * ref_chroma.norm(dim=-1).clamp_min(self.eps)
            cosine = (gen_chroma * ref_chroma).sum(-1) / norms
        self.total += cosine[valid].sum()
        self.count += valid.sum()

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("ChromaCosineSimilarity saw no voiced reference frame")
        return self.total / self.count

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        return _apply_keeping_float64(self, super()._apply, fn, exclude_state, ("total", "count"))
