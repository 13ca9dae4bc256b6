"""Inference models: plain ``nn.Module``s that ``ostinato.load`` returns and ``export`` writes.

Every model class has ``from_config(cfg, folder)``: the training config that built it (``cfg["family"]`` holds its
kwargs) and the export folder it was read from (None for a checkpoint), against which relative paths resolve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ostinato.errors import UserError
from ostinato.registry import kind_of, resolve
from ostinato.store import records
from ostinato.store.records import MODEL_PREFIX, export_folder, read_weights, resolve_ref
from ostinato.models import dac as _dac  # noqa: F401, E402  (registers Codec architecture "dac")


def model_weights(weights: dict[str, torch.Tensor], folder: Path | None) -> dict[str, torch.Tensor]:
    """The model's own tensors: an export holds just them; a checkpoint holds the wrapper's, the model's under
    ``model.`` beside training-only parts (discriminators, EMA shadows are already substituted)."""
    if folder is not None or not any(k.startswith(MODEL_PREFIX) for k in weights):
        return weights  # an export; or a checkpoint from before its wrapper held the model (its keys are the model's)
    return {k[len(MODEL_PREFIX):]: v for k, v in weights.items() if k.startswith(MODEL_PREFIX)}


def fitting(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``weights`` as ``model``'s state dict. A record written before its wrapper held the model as ``model`` kept
    the networks under a name of its own (``codec.``, ``mulan.``, ``autoencoder.``, ``vqvae.``...): that name is
    dropped. Tensors that fit neither way are refused in one line."""
    own = set(model.state_dict())
    if set(weights) == own:
        return weights
    for head in sorted({k.split(".", 1)[0] for k in weights}):
        inner = {k[len(head) + 1:]: v for k, v in weights.items() if k.startswith(f"{head}.")}
        if set(inner) == own:
            return inner
    missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
    raise UserError(f"{source}: its tensors do not fit a {type(model).__name__} ({len(missing)} missing, e.g. "
                    f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}); it was "
                    "written by another model or version: give a record of this model, written by this ostinato")


def build(cfg: dict[str, Any], folder: Path | None = None, source: str = "this record") -> torch.nn.Module:
    """The (untrained) model of a training config."""
    return resolve(kind_of(cfg, source).model).from_config(cfg, folder)


def load(ref: str | Path, map_location: str | torch.device = "cpu", xps_dir: str | Path | None = None,
         trust: bool = False) -> torch.nn.Module:
    """An export folder, an XP (folder or signature) or a checkpoint -> its inference model, in eval mode; the
    family is read from the record's config. A LoRA run's record (or kept-adapters export) is its base with the
    adapters on (``ostinato.models.lora``)."""
    from functools import partial

    from ostinato.models import lora

    resolved = resolve_ref(str(ref))
    xps = xps_dir if xps_dir is not None else records.xps_dir()
    load_base = partial(load, xps_dir=xps, trust=trust)
    kept = lora.kept_export(resolved)
    if kept is not None:
        cfg, spec, state, base = lora.read_kept(kept)
        model = lora.adapted_model(build(cfg, kept, str(kept)), spec, base, state, str(kept), load_base)
        return model.to(map_location).eval()
    weights, cfg, source = read_weights(resolved, xps, trust)
    if cfg is None:
        raise ValueError(f"{source}: no config.yaml beside the weights; cannot tell which family to build")
    folder = export_folder(resolved)
    model = build(cfg, folder, source)
    spec = lora.record_lora(cfg) if folder is None else None  # an export's adapters are merged into its weights
    if spec is not None:
        state = model_weights(weights, folder)
        model = lora.adapted_model(model, spec, lora.base_reference(cfg, source), state, source, load_base)
        return model.to(map_location).eval()
    model.load_state_dict(fitting(model, model_weights(weights, folder), source), strict=True)
    return model.to(map_location).eval()
