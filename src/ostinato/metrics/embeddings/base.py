"""``EmbeddingBackend``: a frozen audio model that maps clips to frame embeddings, for FAD-like metrics.

A backend declares what its model expects (``sample_rate``, ``channels``) and what it gives (``dim``-sized frames,
one every ``hop_seconds``, each seeing ``window_seconds`` of audio). ``embed_audio`` takes audio at any rate and
channel count and converts it with the one resampler of ostinato (``ostinato.data.audio.resample``).

Backends are not ``nn.Module``s on purpose: assigned to a LightningModule they are not registered, hence never
trained, checkpointed, averaged by an EMA or cast by ``bf16-true``.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ostinato.data.audio import convert_channels, resample


class EmbeddingBackend(ABC):
    """Abstract frozen embedding model. Subclasses set the attributes below, ``model`` and implement
    ``_embed`` (and ``_identity``); ``embed`` wraps ``_embed`` with shape checks, no grad and fp32."""

    name: str = ""
    sample_rate: int
    channels: int
    window_seconds: float | None
    hop_seconds: float | None
    dim: int
    has_text: bool = False
    model: nn.Module | None = None
    device: torch.device = torch.device("cpu")

    # ----- identity -----

    @abstractmethod
    def _identity(self) -> dict[str, Any]:
        """Everything that changes the embeddings: source path, weights hash, preprocessing settings, code
        version. JSON-serialisable."""

    def id(self) -> str:
        """Stable identity string ``name:{json}``; equal ids give equal embeddings (the cache key relies on it)."""
        return f"{self.name}:" + json.dumps(self._identity(), sort_keys=True, separators=(",", ":"))

    # ----- embedding -----

    @abstractmethod
    def _embed(self, wav: Tensor) -> list[Tensor]:
        """wav [B, channels, T] at ``sample_rate`` on ``device`` -> per clip [F_i, dim]."""

    def embed(self, wav: Tensor) -> list[Tensor]:
        """wav [B, C, T] at ``sample_rate`` with C = ``channels`` -> per clip [F_i, dim] float32 frame embeddings.

        F_i may be 0 for a clip shorter than one analysis window.
        """
        if wav.dim() != 3 or wav.shape[1] != self.channels:
            raise ValueError(f"{self.name} backend expects wav [B, {self.channels}, T] at {self.sample_rate} Hz, "
                             f"got {tuple(wav.shape)}; use embed_audio(wav, sample_rate) to convert")
        wav = wav.detach().to(self.device, torch.float32)
        with torch.no_grad(), torch.autocast(device_type=wav.device.type, enabled=False):
            frames = self._embed(wav)
        return [f.float() for f in frames]

    def prepare(self, wav: Tensor, sample_rate: int) -> Tensor:
        """wav [B, C, T] at ``sample_rate`` -> [B, channels, T'] at ``self.sample_rate`` (mono = channel mean,
        stereo = duplicated mono or the first two channels; ``ostinato.data.audio.resample``)."""
        if wav.dim() != 3:
            raise ValueError(f"expected wav [B, C, T], got {tuple(wav.shape)}; add the batch dim with wav[None]")
        wav = wav.detach().float()
        if wav.shape[1] != self.channels:
            wav = torch.stack([convert_channels(w, self.channels) for w in wav])
        return resample(wav, int(sample_rate), self.sample_rate)

    def embed_audio(self, wav: Tensor, sample_rate: int) -> list[Tensor]:
        """wav [B, C, T] at any rate and channel count -> per clip [F_i, dim] (``prepare`` then ``embed``)."""
        return self.embed(self.prepare(wav.to(self.device), sample_rate))

    def embed_text(self, texts: list[str]) -> Tensor:
        """texts -> [B, dim] text embeddings in the audio embedding space (joint audio-text models only)."""
        raise NotImplementedError(f"the {self.name} backend has no text tower (has_text=False)")

    # ----- device -----

    def to(self, device: str | torch.device) -> EmbeddingBackend:
        """Move the model to ``device``; ``embed`` moves its input there. Returns self."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sample_rate={self.sample_rate}, channels={self.channels}, dim={self.dim}, "
                f"window_seconds={self.window_seconds}, hop_seconds={self.hop_seconds})")


def clip_embeddings(frames: list[Tensor]) -> Tensor:
    """Per clip frame embeddings [F_i, D] -> clip embeddings [B, D] (mean over frames)."""
    if not frames:
        raise ValueError("clip_embeddings got no clips")
    empty = [i for i, f in enumerate(frames) if f.dim() != 2 or f.shape[0] == 0]
    if empty:
        raise ValueError(f"clips {empty[:10]} have no frames (shorter than the analysis window) or are not [F, D]; "
                         "drop them before averaging")
    return torch.stack([f.float().mean(dim=0) for f in frames])


def as_bool(value: bool | int | str) -> bool:
    """A boolean option that may come from a spec string ("true"/"false"/"1"/"0"/"yes"/"no")."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean (true/false/1/0), got {value!r}")
    return bool(value)
