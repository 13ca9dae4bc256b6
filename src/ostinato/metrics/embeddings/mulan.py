"""MuLaN audio and text embeddings of a model trained by ostinato (``ostinato.models.mulan.MuLaN``).

One frame per tower window (``window_seconds``): windows start at 0, W, 2W, ... and the last one ends with the
clip (it overlaps the one before unless T is a multiple of W); a clip shorter than the window is one frame of what
there is. Frames and texts are L2-normalised, so the text-audio score is MuLaN's cosine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ostinato.metrics.embeddings.base import EmbeddingBackend
from ostinato.models.mulan import MuLaN, window_starts

VERSION = 1  # bump when what ``_embed`` / ``embed_text`` compute changes: invalidates cached statistics


class MuLaNBackend(EmbeddingBackend):
    """MuLaN joint audio-text embeddings: audio [B, 1, T] at the tower's rate -> per clip [F_i, dim], one frame per
    window (F_i = ceil(T / W) for T > W, 1 for 0 < T <= W, 0 for T = 0); texts -> [B, dim].

    Args:
        model: a ``MuLaN``, or any ``ostinato.load`` reference to one: an export folder, an XP
            folder or signature, ``//sig/SIG``, a ``.ckpt``.
        device: where the model runs.
        batch_size: windows (and texts) per forward pass.
        source: where an in-memory model came from (for ``id``).
    """

    name = "mulan"
    has_text = True
    channels = 1

    def __init__(self, model: Any, device: str | torch.device = "cpu", batch_size: int = 32,
                 source: str | None = None) -> None:
        from ostinato.interop.codecs import weights_hash
        from ostinato.models.mulan import as_mulan

        if isinstance(model, (str, Path)):
            path = Path(str(model)).expanduser()
            self.source = str(path.resolve()) if path.exists() else str(model)
        else:
            self.source = source or "<in-memory MuLaN>"
        mulan: MuLaN = as_mulan(str(model) if isinstance(model, Path) else model)
        self.model = self.mulan = mulan.eval().requires_grad_(False)
        self.sample_rate = mulan.sample_rate
        self.dim = mulan.dim
        self.window = mulan.audio.window
        self.window_seconds = self.hop_seconds = mulan.window_seconds
        self.batch_size = int(batch_size)
        self.weights = weights_hash(mulan)
        self.text_model = "scratch" if mulan.text.scratch else mulan.text.tokenizer_path
        self.to(device)

    def _identity(self) -> dict[str, Any]:
        return {"version": VERSION, "source": self.source, "weights": self.weights, "sample_rate": self.sample_rate,
                "window": self.window, "text_model": self.text_model, "long": "windows, last end-aligned"}

    def _embed(self, wav: Tensor) -> list[Tensor]:
        """wav [B, 1, T] at ``sample_rate`` -> per clip [F, dim] (F the same for every clip of the batch)."""
        x = wav[:, 0]
        starts = window_starts(x.shape[-1], self.window)
        if not starts:
            return [x.new_zeros(0, self.dim) for _ in range(x.shape[0])]
        windows = torch.stack([clip[s:s + self.window] for clip in x for s in starts])  # clip-major [B * F, <= W]
        out = [F.normalize(self.mulan.audio(windows[i:i + self.batch_size]).float(), dim=-1)
               for i in range(0, len(windows), self.batch_size)]
        return list(torch.cat(out).view(x.shape[0], len(starts), self.dim).unbind(0))

    def embed_text(self, texts: list[str]) -> Tensor:
        """texts (B,) -> [B, dim] L2-normalised text embeddings."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of strings, got one string: wrap it in a list")
        with torch.no_grad():
            out = [self.mulan.embed_text(list(texts[i:i + self.batch_size]))
                   for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out).float() if out else torch.zeros(0, self.dim, device=self.device)
