"""The debug family: trains ``ConvAutoencoder`` (``ostinato.models.debug``) to reconstruct the waveform.

It exercises every part of the engine (data, DDP, EMA, checkpoints, export, samples) with nothing else in the
way: train it to smoke-test a new dataset, cluster or config before launching a real family.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ostinato.data.batch import AudioBatch
from ostinato.families.base import FamilyModule
from ostinato.models.debug import ConvAutoencoder


class DebugFamily(FamilyModule):
    """Reconstruct the waveform; loss = masked L1. Rate and channels are the model's."""

    def __init__(self, channels: int = 1, sample_rate: int = 24000, hidden: int = 16, stride: int = 4,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.model = ConvAutoencoder(sample_rate, channels, hidden, stride)

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
