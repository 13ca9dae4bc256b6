"""``apply_model``: ``[B, C, T]`` -> stems ``[B, 4, C, T]``, the mix as ``vocals``, the rest silence."""
from __future__ import annotations

import torch


def apply_model(model, wav: torch.Tensor, device=None, **kwargs) -> torch.Tensor:
    stems = torch.zeros(wav.shape[0], len(model.sources), *wav.shape[1:], dtype=wav.dtype, device=wav.device)
    stems[:, model.sources.index("vocals")] = wav
    return stems
