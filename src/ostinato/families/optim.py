"""Optimizer and learning-rate schedule factories driven by the ``optim`` config group.

``build_optimizer(module, cfg)`` reads (plain dict or OmegaConf node):

  ``name``          ``adamw`` (default), ``adam`` or ``sgd``
  ``lr``            base learning rate (required)
  ``betas``         ``[beta1, beta2]`` for adam/adamw (default ``[0.9, 0.999]``)
  ``eps``           adam/adamw epsilon (default ``1e-8``)
  ``weight_decay``  decay of the "decay" group (default ``0.0``)
  ``momentum``, ``nesterov``  sgd only (defaults ``0.0``, ``false``)
  ``fused``         ``true``/``false``, or ``null``: fused kernels exactly when every parameter is on CUDA
  ``no_decay``      fnmatch patterns on parameter names that get ``weight_decay=0``; ``null`` means
                    ``["*embed*", "*emb*", "*norm*"]``. Parameters with ``ndim < 2`` (biases, norm scales)
                    are always in the no-decay group.
  ``param_groups``  ``[{"params": "<fnmatch pattern>", "lr": ..., "weight_decay": ...}, ...]``: matching
                    parameters take these options (first matching entry wins); an option an entry leaves out
                    keeps its default, so ``weight_decay`` stays 0 for no-decay parameters unless given.

Only parameters with ``requires_grad`` are optimized. Each param group carries a ``name`` key
(``decay``, ``no_decay``, ``group0``, ``group0/no_decay``, ...) for logging.

``build_scheduler(optimizer, cfg, total_steps)`` reads the ``schedule`` node (or an optim node holding one):

  ``name``          ``cosine`` | ``linear`` | ``inverse_sqrt`` | ``constant``
  ``warmup_steps``  linear warmup from 0 to ``lr`` over this many optimizer steps (default 0)
  ``min_lr_ratio``  cosine/linear floor as a fraction of ``lr`` (default 0)
  ``total_steps``   overrides the ``total_steps`` argument (the decay horizon of cosine/linear)

and returns a Lightning ``lr_scheduler`` config stepping every optimizer step, or ``None`` for a constant rate
without warmup. The multiplier is the pure function :func:`lr_factor`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from functools import partial
from typing import Any

import torch
from omegaconf import OmegaConf

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")
DEFAULT_NO_DECAY = ("*embed*", "*emb*", "*norm*")


def _plain(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a mapping for the optim config, got {type(cfg).__name__}")
    return dict(cfg)


_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def _is_no_decay(name: str, param: torch.Tensor, patterns: tuple[str, ...]) -> bool:
    ndim = getattr(param, "_ostinato_ndim", param.ndim)  # FSDP shards are 1-D views (engine.fsdp)
    return ndim < 2 or any(fnmatchcase(name, p) for p in patterns)


def _first_match(name: str, overrides: list[dict[str, Any]]) -> int | None:
    for i, group in enumerate(overrides):
        if fnmatchcase(name, group["params"]):
            return i
    return None


def param_groups(module: torch.nn.Module, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The optimizer's param groups (without defaults already given to the optimizer) for ``module``."""
    cfg = _plain(cfg)
    patterns = tuple(DEFAULT_NO_DECAY if cfg.get("no_decay") is None else cfg["no_decay"])
    overrides = [dict(g) for g in cfg.get("param_groups") or []]
    for i, group in enumerate(overrides):
        if not isinstance(group.get("params"), str):
            raise ValueError(f"optim.param_groups[{i}].params must be an fnmatch pattern string, got {group!r}")
    weight_decay = float(cfg.get("weight_decay", 0.0))

    buckets: dict[tuple[int | None, bool], list[torch.nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            name = _WRAPPERS.sub("", name)  # FSDP / activation-checkpoint wrappers are not part of the name
            key = (_first_match(name, overrides), _is_no_decay(name, param, patterns))
            buckets.setdefault(key, []).append(param)

    groups = []
    for (index, no_decay), params in buckets.items():
        options: dict[str, Any] = {"weight_decay": 0.0 if no_decay else weight_decay}
        label = "no_decay" if no_decay else "decay"
        if index is not None:
            options.update({k: v for k, v in overrides[index].items() if k != "params"})
            label = f"group{index}/no_decay" if no_decay else f"group{index}"
        groups.append({"params": params, "name": label, **options})
    return groups


def _use_fused(module: torch.nn.Module, fused: bool | None) -> bool:
    if fused is not None:
        return bool(fused)
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(p.is_cuda for p in params)


def build_optimizer(module: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg["name"]`` over ``module``'s trainable parameters."""
    cfg = _plain(cfg)
    name = str(cfg.get("name", "adamw")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.get('name')!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.get("lr") is None:
        raise ValueError("optim.lr is required")
    groups = param_groups(module, cfg)
    if not groups:
        raise ValueError(f"{type(module).__name__} has no parameters with requires_grad=True to optimize")
    lr = float(cfg["lr"])
    fused = _use_fused(module, cfg.get("fused"))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.0)),
                               nesterov=bool(cfg.get("nesterov", False)), fused=fused or None)
    betas = tuple(float(b) for b in cfg.get("betas", (0.9, 0.999)))
    if len(betas) != 2:
        raise ValueError(f"optim.betas must have 2 values, got {list(betas)}")
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=betas, eps=float(cfg.get("eps", 1e-8)), fused=fused or None)


def lr_factor(step: int, name: str, warmup_steps: int = 0, total_steps: int | None = None,
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if name == "constant":
        return 1.0
    if name == "inverse_sqrt":
        base = max(warmup_steps, 1)
        return math.sqrt(base / max(step, base))
    if total_steps is None:
        raise ValueError(f"schedule {name!r} needs total_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"optim.schedule.name={name!r} is not supported; choose one of {', '.join(SCHEDULES)}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None,
                    total_steps: int | None) -> dict[str, Any] | None:
    """A Lightning lr-scheduler config (``interval="step"``) or ``None`` for a constant rate."""
    cfg = _plain(cfg)
    if "schedule" in cfg:
        cfg = _plain(cfg["schedule"])
    if not cfg:
        return None
    name = str(cfg.get("name", "constant")).lower()
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule.name={cfg.get('name')!r} is not supported; "
                         f"choose one of {', '.join(SCHEDULES)}")
    warmup = int(cfg.get("warmup_steps") or 0)
    if name == "constant" and warmup == 0:
        return None
    total = cfg.get("total_steps") or total_steps
    if name in ("cosine", "linear") and (total is None or int(total) <= 0):
        raise ValueError(f"optim.schedule.name={name!r} needs a positive total_steps (got {total!r}); "
                         "set trainer.max_steps or optim.schedule.total_steps")
    factor = partial(lr_factor, name=name, warmup_steps=warmup, total_steps=None if total is None else int(total),
                     min_lr_ratio=float(cfg.get("min_lr_ratio") or 0.0))
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step", "frequency": 1}
