"""Inference models: plain ``nn.Module``s that ``ostinato.load`` returns and ``export`` writes.

Every model class has ``from_config(cfg, folder)``: the training config that built it (``cfg["family"]`` holds its
kwargs) and the export folder it was read from (None for a checkpoint), against which relative paths resolve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ostinato.registry import kind_of, resolve
from ostinato.store import records
from ostinato.store.records import MODEL_PREFIX, export_folder, read_weights, resolve_ref


def model_weights(weights: dict[str, torch.Tensor], folder: Path | None) -> dict[str, torch.Tensor]:
    """The model's own tensors: an export holds just them; a checkpoint holds the wrapper's, the model's under
    ``model.`` beside training-only parts (discriminators, EMA shadows are already substituted)."""
    if folder is not None or not any(k.startswith(MODEL_PREFIX) for k in weights):
        return weights  # an export; or a checkpoint from before its wrapper held the model (its keys are the model's)
    return {k[len(MODEL_PREFIX):]: v for k, v in weights.items() if k.startswith(MODEL_PREFIX)}


def build(cfg: dict[str, Any], folder: Path | None = None, source: str = "this record") -> torch.nn.Module:
    """The (untrained) model of a training config."""
    return resolve(kind_of(cfg, source).model).from_config(cfg, folder)


def load(ref: str | Path, map_location: str | torch.device = "cpu", xps_dir: str | Path | None = None,
         trust: bool = False) -> torch.nn.Module:
    """An export folder, an XP (folder or signature) or a checkpoint -> its inference model, in eval mode; the
    family is read from the record's config."""
    resolved = resolve_ref(str(ref))
    weights, cfg, source = read_weights(resolved, xps_dir if xps_dir is not None else records.xps_dir(), trust)
    if cfg is None:
        raise ValueError(f"{source}: no config.yaml beside the weights; cannot tell which family to build")
    folder = export_folder(resolved)
    model = build(cfg, folder, source)
    model.load_state_dict(model_weights(weights, folder), strict=True)
    return model.to(map_location).eval()
