"""LoRA adapters (peft) on a ``CodebookLM``: add, read, write in peft's adapter format, merge.

``LoRA(rank, alpha, dropout, targets)``: each ``nn.Linear`` of the LM whose name ends with one of ``targets``
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` of self- and cross-attention, ``fc1`` / ``fc2`` of the FFN;
``self_attn.q_proj`` narrows to one kind) becomes ``W x + (alpha / rank) B A x`` with ``A [rank, in]`` random and
``B [out, rank]`` zero, so a freshly adapted LM computes exactly what its base did. The base ``W`` is then held
under ``<name>.base_layer.weight``; the adapter under ``<name>.lora_A.default.weight`` / ``lora_B``.

On disk (``save_adapters``): a folder with ``adapter_config.json`` (peft's ``LoraConfig``) and
``adapter_model.safetensors`` (keys ``base_model.model.<name>.lora_A.weight``, as ``PeftModel.save_pretrained``
writes them), which ``peft.PeftModel.from_pretrained(lm, folder)`` also reads.

peft is imported on use: it takes seconds, and most users of this floor never adapt a model.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LoRA", "lora_spec", "add_adapters", "has_adapters", "adapter_state", "load_adapter_state",
           "merge_adapters", "save_adapters", "read_adapters", "adapted_keys", "is_adapter_folder",
           "spec_dict", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the adapted model's names on disk
_NAME = "default"  # peft's adapter name; one adapter per model here


@dataclass(frozen=True)
class LoRA:
    """``family.lora``: ``rank`` of the update, its scale ``alpha / rank``, ``dropout`` on the adapter's input,
    ``targets`` (module name endings of the LM's ``nn.Linear`` layers; default the attention projections)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if int(self.rank) < 1:
            raise ValueError(f"family.lora.rank={self.rank}: give a rank >= 1 (e.g. 16)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"family.lora.dropout={self.dropout}: give a probability in [0, 1)")
        if not self.targets:
            raise ValueError(f"family.lora.targets is empty: name LM layers, e.g. {list(DEFAULT_TARGETS)}")

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                          target_modules=list(self.targets), bias="none")


def lora_spec(spec: Mapping[str, Any] | LoRA | None) -> LoRA | None:
    """``family.lora`` (a mapping, null = off) -> ``LoRA`` or None; an unknown key is refused in one line."""
    if spec is None or isinstance(spec, LoRA):
        return spec
    known = {"rank", "alpha", "dropout", "targets"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"family.lora.{unknown[0]} is not a LoRA setting; use {', '.join(sorted(known))}")
    kw = {k: v for k, v in spec.items() if v is not None}
    if isinstance(kw.get("targets"), str):
        kw["targets"] = [kw["targets"]]
    return LoRA(**kw)


def _linear_names(lm: nn.Module) -> list[str]:
    return [name for name, module in lm.named_modules() if isinstance(module, nn.Linear)]


def add_adapters(lm: nn.Module, lora: LoRA) -> nn.Module:
    """Put LoRA adapters on ``lm``'s target layers in place (outputs unchanged until they train); returns ``lm``.

    Every target must name at least one ``nn.Linear``: a misspelt one is refused, listing what there is."""
    from peft import inject_adapter_in_model

    names = _linear_names(lm)
    for target in lora.targets:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names if n.startswith("layers.")})
            raise ValueError(f"family.lora.targets: {target!r} names no linear layer of the LM; "
                             f"choose among {', '.join(kinds)}")
    inject_adapter_in_model(lora.peft_config(), lm)
    return lm


def has_adapters(module: nn.Module) -> bool:
    """Whether ``module`` holds LoRA adapters (anywhere inside)."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def adapter_state(lm: nn.Module) -> dict[str, Tensor]:
    """``{<name>.lora_A.weight: [rank, in], <name>.lora_B.weight: [out, rank]}`` of an adapted ``lm``."""
    return {k.replace(f".{_NAME}.", "."): v for k, v in lm.state_dict().items() if ".lora_" in k}


def load_adapter_state(lm: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Set an adapted ``lm``'s adapters from ``state`` (``adapter_state``'s keys, with or without peft's
    ``base_model.model.`` prefix); adapters that are missing or left over are refused in one line."""
    own = adapter_state(lm)
    state = {k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k: v for k, v in state.items()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: its adapters do not fit this model ({len(missing)} missing, e.g. "
                         f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}); "
                         "give the adapters trained on this base")
    full = {k.replace(".lora_A.", f".lora_A.{_NAME}.").replace(".lora_B.", f".lora_B.{_NAME}."): v
            for k, v in state.items()}
    result = lm.load_state_dict(full, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


@torch.no_grad()
def merge_adapters(lm: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W + (alpha / rank) B A``) and put the plain ``nn.Linear`` back:
    ``lm`` then has its base's structure and state-dict names. In place; returns ``lm``."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, module.get_base_layer())
    lm.__dict__.pop("peft_config", None)
    return lm


def save_adapters(lm: nn.Module, lora: LoRA, folder: str | Path, base: str | None = None) -> Path:
    """Write ``lm``'s adapters to ``folder`` in peft's format; ``base`` (the model they adapt) goes into
    ``adapter_config.json`` as ``base_model_name_or_path``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = lora.peft_config()
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    tensors = {f"{_PEFT_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in adapter_state(lm).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    return folder


def is_adapter_folder(folder: str | Path) -> bool:
    """A folder ``save_adapters`` (or peft's ``save_pretrained``) wrote."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def read_adapters(folder: str | Path) -> tuple[LoRA, dict[str, Tensor], str | None]:
    """``(LoRA, adapter tensors, base reference)`` of a peft LoRA adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_adapter_folder(folder):
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} there; give the adapter folder "
                                "`ostinato export --lora keep` wrote")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets = cfg.get("target_modules") or list(DEFAULT_TARGETS)
    lora = LoRA(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                targets=tuple(sorted([targets] if isinstance(targets, str) else targets)))
    return lora, load_file(str(folder / ADAPTER_WEIGHTS)), cfg.get("base_model_name_or_path")


def adapted_keys(weights: Mapping[str, Tensor], own: Iterable[str]) -> dict[str, Tensor]:
    """A base model's ``weights`` under the names its adapted copy gives them: ``<layer>.weight`` becomes
    ``<layer>.base_layer.weight`` where only the latter is in ``own``."""
    own = set(own)
    out = {}
    for key, value in weights.items():
        head, _, leaf = key.rpartition(".")
        moved = f"{head}.base_layer.{leaf}"
        out[moved if key not in own and moved in own else key] = value
    return out


def spec_dict(lora: LoRA) -> dict[str, Any]:
    """``LoRA`` -> the plain mapping ``family.lora`` holds."""
    return {**asdict(lora), "targets": list(lora.targets)}
