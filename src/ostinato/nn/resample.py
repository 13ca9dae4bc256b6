"""The one resampler of ostinato (data, models and building blocks all use it), and audiocraft's, which imports
that must reproduce its numbers use."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF


def resample(wav: torch.Tensor, from_sr: int, to_sr: int) -> torch.Tensor:
    """The one resampler of ostinato: torchaudio's windowed-sinc (Hann, 6 zero crossings). [..., T] -> [..., T']."""
    if from_sr == to_sr:
        return wav
    return AF.resample(wav, int(from_sr), int(to_sr))


def resample_audiocraft(wav: torch.Tensor, from_sr: int, to_sr: int, zeros: int = 24,
                        rolloff: float = 0.945) -> torch.Tensor:
    """What audiocraft's ``convert_audio`` does (julius' ``resample_frac``), for imports that must give its numbers:
    Hann-windowed sinc kernels (``zeros`` crossings, cutoff ``rolloff`` x the lower Nyquist), each normalised to
    sum 1, the ends padded by repeating the edge samples. ``[..., T] -> [..., floor(T * to_sr / from_sr)]``."""
    if from_sr == to_sr:
        return wav
    g = math.gcd(int(from_sr), int(to_sr))
    old, new = int(from_sr) // g, int(to_sr) // g
    cutoff = min(old, new) * rolloff
    width = math.ceil(zeros * old / cutoff)
    taps = torch.arange(-width, width + old, dtype=torch.float64)
    phases = torch.arange(new, dtype=torch.float64)
    t = ((taps[None] / old - phases[:, None] / new) * cutoff).clamp(-zeros, zeros)
    kernel = torch.special.sinc(t) * torch.cos(math.pi * t / zeros / 2) ** 2  # [new, taps]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(device=wav.device, dtype=wav.dtype)
    length = wav.shape[-1]
    x = F.pad(wav.reshape(-1, 1, length), (width, width + old), mode="replicate")
    y = F.conv1d(x, kernel[:, None], stride=old).transpose(1, 2).reshape(*wav.shape[:-1], -1)
    return y[..., :new * length // old]
