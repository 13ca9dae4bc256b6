"""The debug family: a waveform autoencoder small enough to train in seconds on a CPU.

It exercises every part of the engine (data, DDP, EMA, checkpoints, export, samples) with nothing else in the
way: train it to smoke-test a new dataset, cluster or config before launching a real family.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ostinato.data.batch import AudioBatch
from ostinato.families.base import FamilyModule


class ConvAutoencoder(nn.Module):
    """[B, C, T] -> [B, C, T] through a [B, hidden, T / stride**2] bottleneck."""

    def __init__(self, channels: int = 1, hidden: int = 16, stride: int = 4):
        super().__init__()
        self.stride2 = stride * stride
        self.encoder = nn.Sequential(
            nn.Conv1d(channels, hidden, 2 * stride + 1, stride=stride, padding=stride), nn.ELU(),
            nn.Conv1d(hidden, hidden, 2 * stride + 1, stride=stride, padding=stride), nn.ELU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(hidden, hidden, 2 * stride, stride=stride, padding=stride // 2), nn.ELU(),
            nn.ConvTranspose1d(hidden, channels, 2 * stride, stride=stride, padding=stride // 2))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        t = wav.shape[-1]
        pad = (-t) % self.stride2
        y = self.decoder(self.encoder(nn.functional.pad(wav, (0, pad))))
        return y[..., :t]


class DebugFamily(FamilyModule):
    """Reconstruct the waveform; loss = masked L1."""

    def __init__(self, channels: int = 1, sample_rate: int = 24000, hidden: int = 16, stride: int = 4,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.model = ConvAutoencoder(channels, hidden, stride)
        self._sample_rate = sample_rate

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(wav)

    def _loss(self, batch: AudioBatch) -> torch.Tensor:
        mask = batch.mask[:, None, :].to(batch.audio.dtype)
        err = (self(batch.audio) - batch.audio).abs() * mask
        return err.sum() / (mask.sum() * batch.audio.shape[1]).clamp_min(1)

    def training_step(self, batch: AudioBatch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self.log("valid/loss", self._loss(batch), prog_bar=True, sync_dist=True, batch_size=len(batch))

    def test_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), sync_dist=True, batch_size=len(batch))

    def sample_audio(self, batch: AudioBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"original": batch.audio, "reconstruction": self(batch.audio)}
