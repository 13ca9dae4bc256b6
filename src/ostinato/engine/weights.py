"""Weights in and out: ``continue_from`` loading, safetensors export, and ``ostinato.load``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ostinato.engine.checkpoint import load_checkpoint, resolve_checkpoint
from ostinato.engine.ema import ema_weights_from_checkpoint
from ostinato.fileio import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
WEIGHTS_NAME, CONFIG_NAME, INFO_NAME = "model.safetensors", "config.yaml", "export.json"
CONFIG_KEY = "ostinato_config"  # where the engine stores the resolved config inside Lightning checkpoints


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded from {self.source}"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts)


def checkpoint_weights(ckpt: dict[str, Any], prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """(state_dict, used_ema) of a Lightning checkpoint dict: the EMA weights when it has them."""
    if prefer_ema:
        ema = ema_weights_from_checkpoint(ckpt)
        if ema is not None:
            return ema, True
    return ckpt["state_dict"], False


def read_weights(ref: str | Path, xps_dir: str | Path | None = None,
                 trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """Weights (EMA when present), the config stored with them (or None), and a description of the source.

    ``ref``: an export folder, a ``.safetensors`` file, ``//sig/SIG``, an XP folder or a ``.ckpt``.
    """
    path = Path(str(ref))
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(path / CONFIG_NAME)) if (path / CONFIG_NAME).is_file() else None
        return load_file(path / WEIGHTS_NAME), cfg, str(path / WEIGHTS_NAME)
    if path.suffix == ".safetensors":
        return load_file(path), None, str(path)
    ckpt_path = resolve_checkpoint(ref, xps_dir)
    ckpt = load_checkpoint(ckpt_path, trust=trust)
    weights, used_ema = checkpoint_weights(ckpt)
    return weights, ckpt.get(CONFIG_KEY), f"{ckpt_path}{' (EMA)' if used_ema else ''}"


def load_weights(module: torch.nn.Module, ref: str | Path, xps_dir: str | Path | None = None,
                 trust: bool = False) -> LoadReport:
    """Load what matches by name and shape; report loaded, missing, unexpected and mismatched keys."""
    weights, _, source = read_weights(ref, xps_dir, trust)
    own = module.state_dict()
    report = LoadReport(source=source)
    usable = {}
    for key, value in weights.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    report.loaded = sorted(usable)
    report.missing = sorted(set(own) - set(usable) - {m.split(" ")[0] for m in report.mismatched})
    module.load_state_dict(usable, strict=False)
    log.info("continue_from: %s", report.summary())
    return report


def export(ref: str | Path, out: str | Path, xps_dir: str | Path | None = None, trust: bool = False) -> Path:
    """Write ``model.safetensors`` (EMA weights when present), ``config.yaml`` and ``export.json`` to ``out``."""
    weights, cfg, source = read_weights(ref, xps_dir, trust)
    if cfg is None:
        raise ValueError(f"{source} carries no config; export needs a checkpoint written by `ostinato train`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(out / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    atomic_write_json(out / INFO_NAME, {"source": source, "tensors": len(tensors),
                                        "family": cfg["family"]["_target_"]})
    return out


def load(path: str | Path, map_location: str | torch.device = "cpu", xps_dir: str | Path | None = None,
         trust: bool = False) -> torch.nn.Module:
    """An exported folder (or any ``ref`` that ``read_weights`` takes) -> the family module, in eval mode."""
    weights, cfg, source = read_weights(path, xps_dir, trust)
    if cfg is None:
        raise ValueError(f"{source}: no config.yaml beside the weights; cannot tell which family to build")
    conf = OmegaConf.create(cfg)
    optim = conf.get("optim")
    optim = OmegaConf.to_container(optim) if OmegaConf.is_config(optim) else dict(optim or {})
    module = instantiate(conf.family, optim=optim or None, _convert_="all")
    module.load_state_dict(weights, strict=True)
    return module.to(map_location).eval()
