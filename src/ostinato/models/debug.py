"""``ConvAutoencoder``: the debug family's waveform autoencoder, small enough to train in seconds on a CPU."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class ConvAutoencoder(nn.Module):
    """wav [B, C, T] -> wav [B, C, T] through a [B, hidden, ceil(T / stride**2)] bottleneck."""

    def __init__(self, sample_rate: int, channels: int, hidden: int, stride: int):
        super().__init__()
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.stride2 = stride * stride
        self.encoder = nn.Sequential(
            nn.Conv1d(channels, hidden, 2 * stride + 1, stride=stride, padding=stride), nn.ELU(),
            nn.Conv1d(hidden, hidden, 2 * stride + 1, stride=stride, padding=stride), nn.ELU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(hidden, hidden, 2 * stride, stride=stride, padding=stride // 2), nn.ELU(),
            nn.ConvTranspose1d(hidden, channels, 2 * stride, stride=stride, padding=stride // 2))

    @classmethod
    def from_config(cls, cfg: dict[str, Any], folder: Path | None = None) -> ConvAutoencoder:
        """The model of a debug training config (``cfg["family"]``: sample_rate, channels, hidden, stride)."""
        family = cfg["family"]
        return cls(family["sample_rate"], family["channels"], family["hidden"], family["stride"])

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, C, T] -> reconstruction [B, C, T]."""
        t = wav.shape[-1]
        pad = (-t) % self.stride2
        y = self.decoder(self.encoder(nn.functional.pad(wav, (0, pad))))
        return y[..., :t]
