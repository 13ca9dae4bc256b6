"""The one resampler of ostinato (data, models and building blocks all use it)."""
from __future__ import annotations

import torch
import torchaudio.functional as AF


def resample(wav: torch.Tensor, from_sr: int, to_sr: int) -> torch.Tensor:
    """The one resampler of ostinato: torchaudio's windowed-sinc (Hann, 6 zero crossings). [..., T] -> [..., T']."""
    if from_sr == to_sr:
        return wav
    return AF.resample(wav, int(from_sr), int(to_sr))
