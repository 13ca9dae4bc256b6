"""Small helpers shared by tests: a free TCP port for gloo process groups, a cheap embedding backend."""
from __future__ import annotations

import socket

import torch

from ostinato.metrics.embeddings import EmbeddingBackend


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (a gloo rendezvous, a web server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BandBackend(EmbeddingBackend):
    """RMS of 4 bands of 10 ms frames: embeddings that follow the audio's loudness, computed in microseconds."""

    name, sample_rate, channels, dim, has_text = "bands", 16000, 1, 4, False
    window_seconds = hop_seconds = 0.01

    def __init__(self, path: str) -> None:
        self.path = path

    def _identity(self) -> dict:
        return {"path": self.path}

    def _embed(self, wav: torch.Tensor) -> list[torch.Tensor]:
        frames = wav[:, 0, : wav.shape[-1] // 160 * 160].reshape(len(wav), -1, 4, 40)
        return list(frames.square().mean(-1).sqrt())
