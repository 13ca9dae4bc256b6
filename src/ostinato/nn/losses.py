"""Reconstruction and adversarial losses for codec / vocoder training.

Spectral losses run in fp32 with autocast disabled, whatever the input dtype or the autocast state, and return fp32
scalars. Their STFT windows and mel filterbanks are kept out of the module's registered buffers, so
``module.to(torch.bfloat16)`` (Lightning's ``bf16-true``) cannot degrade them; they follow the input's device lazily.

Adversarial losses take the ``logits`` / ``features`` lists produced by ``ostinato.nn.discriminators`` and average
over sub-discriminators.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

__all__ = [
    "MultiScaleMelLoss",
    "MultiScaleSTFTLoss",
    "l1_waveform",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "feature_matching_loss",
]


def _as_3d(x: Tensor) -> Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"expected a waveform batch [B, C, T] or [B, T], got shape {tuple(x.shape)}")
    return x


def _matching_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Both as [B, C, T]; a shape mismatch is an error."""
    pred, target = _as_3d(pred), _as_3d(target)
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return pred, target


class _MelScale:
    """A torchaudio ``MelSpectrogram`` (power 2, ``center=False``) with audiocraft's framing: reflect-pad
    ``(n_fft - hop) // 2`` on both sides, then zero-pad on the right so every frame is full, giving
    ``ceil(T / hop)`` frames. Deliberately not an ``nn.Module`` attribute of the loss (see module docstring).
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float,
                 f_max: float | None, normalized: bool) -> None:
        self.n_fft = n_fft
        self.hop_length = hop_length
        # Built on the CPU even inside `with torch.device("meta")` (a family sized without memory): its filterbank
        # has no meta kernel, and __call__ moves it to the signal's device anyway.
        with warnings.catch_warnings(), torch.device("cpu"):
            # Small FFTs cannot resolve every mel band; the empty bands are zero for both signals, as in audiocraft.
            warnings.filterwarnings("ignore", message=".*mel filterbank has all zero values.*")
            self.transform = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=n_fft, win_length=n_fft, hop_length=hop_length, f_min=f_min,
                f_max=f_max, n_mels=n_mels, window_fn=torch.hann_window, power=2.0, normalized=normalized,
                center=False,
            )

    def __call__(self, x: Tensor) -> Tensor:
        """fp32 ``[B, C, T]`` -> ``[B, C, n_mels, ceil(T / hop)]``."""
        if self.transform.mel_scale.fb.device != x.device:
            self.transform.to(x.device)
        pad = (self.n_fft - self.hop_length) // 2
        x = F.pad(x, (pad, pad), mode="reflect")
        length = x.shape[-1]
        n_frames = math.ceil(max(length - self.n_fft, 0) / self.hop_length) + 1
        x = F.pad(x, (0, (n_frames - 1) * self.hop_length + self.n_fft - length))
        return self.transform(x)


class MultiScaleMelLoss(nn.Module):
    """Multi-scale mel-spectrogram loss (audiocraft's ``MultiScaleMelSpectrogramLoss``).

    For each window ``n_fft = 2**i``, ``i in range(range_start, range_end)`` (hop ``n_fft // 4``):
    ``L1(mel(x), mel(y)) + alpha_i * MSE(log10(floor + mel(x)), log10(floor + mel(y)))`` on power mel spectrograms;
    the terms are summed over scales. ``alpha_i = sqrt(n_fft / 2)`` when ``alphas`` else 1 (audiocraft uses
    ``sqrt(n_fft - 1)``). ``normalized=True`` normalises the STFTs (torchaudio ``normalized``) and divides the
    sum by ``sum_i (1 + alpha_i)``, as audiocraft does.

    Inputs ``pred, target: [B, C, T]`` (or ``[B, T]``) with ``T > n_fft_max // 2`` (reflect padding); channels are
    treated independently. Returns an fp32 scalar.
    """

    def __init__(
        self,
        sample_rate: int,
        n_mels: int = 64,
        range_start: int = 6,
        range_end: int = 11,
        normalized: bool = False,
        alphas: bool = True,
        floor: float = 1e-5,
        f_min: float = 0.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        if range_end <= range_start:
            raise ValueError(f"empty scale range [{range_start}, {range_end})")
        self.sample_rate = sample_rate
        self.normalized = normalized
        self.floor = floor
        self.scales = [
            _MelScale(sample_rate, 2**i, 2**i // 4, n_mels, f_min, f_max, normalized)
            for i in range(range_start, range_end)
        ]
        self.alphas = [math.sqrt(2**i / 2) if alphas else 1.0 for i in range(range_start, range_end)]
        self.total_weight = sum(1.0 + a for a in self.alphas)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``pred, target: [B, C, T]`` -> fp32 scalar."""
        pred, target = _matching_pair(pred, target)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            loss = pred.new_zeros(())
            for scale, alpha in zip(self.scales, self.alphas):
                mp, mt = scale(pred), scale(target)
                loss = loss + F.l1_loss(mp, mt)
                loss = loss + alpha * F.mse_loss(torch.log10(mp + self.floor), torch.log10(mt + self.floor))
            if self.normalized:
                loss = loss / self.total_weight
        return loss


class MultiScaleSTFTLoss(nn.Module):
    """Multi-resolution STFT loss (Parallel WaveGAN; audiocraft's ``MRSTFTLoss``).

    Per resolution, on magnitudes ``|STFT|`` (Hann window, ``center=True``, floored at ``sqrt(epsilon)``):
    spectral convergence ``||S_y - S_x||_F / ||S_y||_F`` (over the whole batch) and log-magnitude
    ``L1(log S_x, log S_y)``; each is averaged over resolutions and the result is
    ``factor_sc * sc + factor_mag * mag``. Inputs ``[B, C, T]`` or ``[B, T]``; returns an fp32 scalar.
    """

    def __init__(
        self,
        n_ffts: Sequence[int] = (1024, 2048, 512),
        hop_lengths: Sequence[int] = (120, 240, 50),
        win_lengths: Sequence[int] = (600, 1200, 240),
        factor_sc: float = 0.1,
        factor_mag: float = 0.1,
        epsilon: float = 1e-7,
    ) -> None:
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError("n_ffts, hop_lengths and win_lengths must have the same length")
        self.resolutions = list(zip(n_ffts, hop_lengths, win_lengths))
        self.factor_sc = factor_sc
        self.factor_mag = factor_mag
        self.epsilon = epsilon

    def _magnitude(self, x: Tensor, n_fft: int, hop: int, win: int) -> Tensor:
        window = torch.hann_window(win, device=x.device, dtype=torch.float32)
        spec = torch.stft(x.reshape(-1, x.shape[-1]), n_fft, hop_length=hop, win_length=win, window=window,
                          return_complex=True)
        return spec.abs().pow(2).clamp_min(self.epsilon).sqrt()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``pred, target: [B, C, T]`` -> fp32 scalar."""
        pred, target = _matching_pair(pred, target)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            sc = pred.new_zeros(())
            mag = pred.new_zeros(())
            for n_fft, hop, win in self.resolutions:
                sp, st = self._magnitude(pred, n_fft, hop, win), self._magnitude(target, n_fft, hop, win)
                sc = sc + torch.linalg.vector_norm(st - sp) / torch.linalg.vector_norm(st).clamp_min(self.epsilon)
                mag = mag + F.l1_loss(sp.log(), st.log())
            n = len(self.resolutions)
            return self.factor_sc * sc / n + self.factor_mag * mag / n


def l1_waveform(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error between waveforms ``[B, C, T]``.

    ``mask`` (bool or 0/1, broadcastable to ``pred``: ``[B, T]``, ``[B, 1, T]`` or ``[B, C, T]``) restricts the mean
    to valid samples (e.g. ``arange(T) < lengths[:, None]``); a ``[B, T]`` mask applies to every channel.
    """
    diff = (pred - target).abs()
    if mask is None:
        return diff.mean()
    if mask.dim() == 2 and diff.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(diff.dtype).expand_as(diff)
    return (diff * mask).sum() / mask.sum().clamp_min(1.0)


def _check_lists(a: Sequence[object], b: Sequence[object], what: str) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"expected two non-empty {what} lists of equal length, got {len(a)} and {len(b)}")


def hinge_discriminator_loss(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
    """``mean_d [mean(relu(1 - real_d)) + mean(relu(1 + fake_d))]`` over sub-discriminators ``d``.

    Pass logits computed on ``fake.detach()`` so the generator gets no gradient from this loss.
    """
    _check_lists(real_logits, fake_logits, "logits")
    total = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))
    return total / len(real_logits)  # type: ignore[return-value]


def hinge_generator_loss(fake_logits: Sequence[Tensor], margin: bool = True) -> Tensor:
    """Generator adversarial loss, averaged over sub-discriminators.

    ``margin=True``: ``mean(relu(1 - fake))`` (audiocraft's ``hinge2``); the generator stops being pushed once a
    logit exceeds 1. ``margin=False``: ``-mean(fake)`` (audiocraft's ``hinge``, which EnCodec's config uses).
    """
    if not fake_logits:
        raise ValueError("expected a non-empty list of logits")
    if margin:
        total = sum(F.relu(1 - f).mean() for f in fake_logits)
    else:
        total = sum(-f.mean() for f in fake_logits)
    return total / len(fake_logits)  # type: ignore[return-value]


def feature_matching_loss(
    real_features: Sequence[Sequence[Tensor]], fake_features: Sequence[Sequence[Tensor]], eps: float = 1e-8
) -> Tensor:
    """Relative L1 feature matching, averaged over sub-discriminators and their layers.

    For each layer: ``mean|fake - real| / mean|real|``, so every layer counts the same whatever its activation
    scale. Real features are detached (the discriminator is not trained by this loss; gradients reach the
    generator through ``fake_features`` only). Returns a scalar in the features' dtype.
    """
    _check_lists(real_features, fake_features, "feature")
    per_disc = []
    for real, fake in zip(real_features, fake_features):
        _check_lists(real, fake, "feature-map")
        terms = []
        for r, f in zip(real, fake):
            if r.shape != f.shape:
                raise ValueError(f"feature shape mismatch: real {tuple(r.shape)} vs fake {tuple(f.shape)}")
            r = r.detach()
            terms.append(F.l1_loss(f, r) / (r.abs().mean() + eps))
        per_disc.append(torch.stack(terms).mean())
    return torch.stack(per_disc).mean()
