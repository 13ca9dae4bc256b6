"""Inference models with LoRA adapters: what ``ostinato.load`` builds from a LoRA run's records.

A LoRA run (``family.lora``) saves its adapters and the model's buffers; the rest is its base, the record its
``continue_from`` names (an import, an export, an XP; adapted itself or not). Two records hold adapters:

* a checkpoint / XP of a LoRA run: its ``state_dict`` (adapters + buffers) over ``continue_from``;
* a kept-adapters export (``ostinato export --lora keep``): ``config.yaml``, ``export.json`` naming the base,
  ``adapter/`` in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``) and, when the model has
  buffers (data rates, windows), ``buffers.safetensors``.

A merged export (the default) is a plain model: the adapters are folded into its weights.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ostinato.errors import UserError
from ostinato.nn.lora import (LoRA, add_adapters, adapted_keys, has_adapters, is_adapter_folder, load_adapter_state,
                              lora_spec, merge_adapters, read_adapters)

__all__ = ["record_lora", "kept_export", "base_reference", "adapted_model", "merged", "read_kept", "ADAPTER_DIR",
           "BUFFERS_NAME"]

ADAPTER_DIR, BUFFERS_NAME = "adapter", "buffers.safetensors"
Loader = Callable[[str], nn.Module]


def record_lora(cfg: Mapping[str, Any] | None) -> LoRA | None:
    """The ``family.lora`` of a record's training config, or None."""
    return lora_spec(((cfg or {}).get("family") or {}).get("lora"))


def kept_export(ref: str | Path) -> Path | None:
    """``ref`` when it is a kept-adapters export folder, else None."""
    path = Path(str(ref))
    return path if path.is_dir() and is_adapter_folder(path / ADAPTER_DIR) else None


def base_reference(cfg: Mapping[str, Any] | None, source: str) -> str:
    """The base a LoRA record adapts: its ``continue_from``; one that has none is refused in one line."""
    ref = (cfg or {}).get("continue_from")
    if not ref:
        raise UserError(f"{source}: a LoRA record without continue_from: its base is unknown; give the record of "
                        "the model it adapts as continue_from")
    return str(ref)


def merged(model: nn.Module) -> nn.Module:
    """``model`` with its LM's adapters folded into its weights (in place): a plain model again."""
    if has_adapters(model):
        merge_adapters(model.lm)
    return model


def _base(ref: str, source: str, load: Loader) -> nn.Module:
    try:
        return merged(load(ref))
    except FileNotFoundError as e:
        raise UserError(f"{source}: its LoRA base {ref} (continue_from) is gone ({e}); it holds adapters only: put "
                        "the base back at that path") from None


def adapted_model(model: nn.Module, lora: LoRA, base_ref: str, state: Mapping[str, torch.Tensor], source: str,
                  load: Loader) -> nn.Module:
    """``model`` (built from the record's config, untrained) with ``base_ref``'s weights, adapters added and set,
    with the buffers, from ``state`` (a LoRA checkpoint's model tensors, or a kept export's adapters + buffers)."""
    base = _base(base_ref, source, load)
    add_adapters(model.lm, lora)
    own = model.state_dict()
    weights = adapted_keys(base.state_dict(), own)
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    weights.update({k: v for k, v in state.items() if ".lora_" not in k})
    model.load_state_dict({k: v for k, v in weights.items() if ".lora_" not in k}, strict=False)
    lm_adapters = {k.removeprefix("lm.").replace(".default.", "."): v for k, v in adapters.items()}
    load_adapter_state(model.lm, lm_adapters, source)
    missing = sorted(k for k in set(own) - set(weights) if ".lora_" not in k)
    if missing:
        raise UserError(f"{source}: its base {base_ref} lacks {len(missing)} of the model's tensors (e.g. "
                        f"{missing[0]}); give as continue_from the model these adapters were trained on")
    return model


def read_kept(folder: Path) -> tuple[dict[str, Any], LoRA, dict[str, torch.Tensor], str]:
    """``(training config, LoRA, adapters (keys ``lm.<layer>.lora_A.weight``) + buffers, base reference)`` of a
    kept-adapters export."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    if not (folder / "config.yaml").is_file():
        raise UserError(f"{folder}: no config.yaml beside {ADAPTER_DIR}/; give the whole folder `ostinato export "
                        "--lora keep` wrote")
    cfg = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))

    lora, adapters, base = read_adapters(folder / ADAPTER_DIR)
    info_path = folder / "export.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    base = info.get("base") or base
    if not base:
        raise UserError(f"{folder}: neither export.json nor {ADAPTER_DIR}/adapter_config.json names the base model "
                        "the adapters adapt; add \"base\": \"<its folder>\" to export.json")
    state = {f"lm.{k.removeprefix('base_model.model.')}": v for k, v in adapters.items()}
    if (folder / BUFFERS_NAME).is_file():
        state.update(load_file(str(folder / BUFFERS_NAME)))
    return cfg, lora, state, str(base)  # type: ignore[return-value]
