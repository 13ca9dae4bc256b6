"""``convert_audio``: channel conversion only (the tests' melodies are already at the separator's rate)."""
from __future__ import annotations

import torch


def convert_audio(wav: torch.Tensor, from_samplerate: int, to_samplerate: int, channels: int) -> torch.Tensor:
    if int(from_samplerate) != int(to_samplerate):
        raise ValueError(f"the demucs stub does not resample ({from_samplerate} -> {to_samplerate} Hz)")
    if wav.shape[-2] == channels:
        return wav
    mono = wav.mean(dim=-2, keepdim=True)
    return mono.expand(*wav.shape[:-2], channels, wav.shape[-1])
