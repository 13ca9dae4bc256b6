"""The batch every audio family receives."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``lengths [B]`` -> ``[B, size]`` bool, True before each item's length."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


@dataclass
class AudioBatch:
    """A batch of fixed-length waveforms with their valid lengths and metadata.

    audio:    [B, C, T] float32, zero-padded after ``lengths``
    lengths:  [B] int64, valid samples per item
    captions: B strings ("" when a sample has none)
    meta:     B dicts, the sample JSON (genre, instruments, bpm, key, source, ...)
    skipped:  corrupt samples the producing worker skipped since its previous batch (for logging)
    """

    audio: torch.Tensor
    lengths: torch.Tensor
    captions: list[str]
    meta: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] bool, True on valid samples."""
        return length_mask(self.lengths, self.audio.shape[-1])

    def __len__(self) -> int:
        return self.audio.shape[0]


def collate_audio(items: list[tuple[torch.Tensor, int, dict[str, Any]]], skipped: int = 0) -> AudioBatch:
    """Stack ``(wav [C, T], length, meta)`` items of equal shape into an ``AudioBatch``."""
    return AudioBatch(
        audio=torch.stack([w for w, _, _ in items]),
        lengths=torch.tensor([n for _, n, _ in items], dtype=torch.long),
        captions=[str(m.get("caption", "")) for _, _, m in items],
        meta=[m for _, _, m in items],
        skipped=skipped,
    )
