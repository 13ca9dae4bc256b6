"""Weights in and out of training: ``continue_from`` loading and ``export`` (``ostinato.load`` is in models/)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ostinato.errors import UserError
from ostinato.fileio import atomic_write_json, atomic_write_text
from ostinato.models import model_weights
from ostinato.registry import kind_of
from ostinato.store.records import (CONFIG_NAME, INFO_NAME, MODEL_PREFIX, WEIGHTS_NAME, export_folder, read_weights,
                                   staged_folder)

log = logging.getLogger(__name__)


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


def _family_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def load_weights(module: torch.nn.Module, ref: str | Path, xps_dir: str | Path | None = None,
                 trust: bool = False) -> LoadReport:
    """Load what matches by name and shape; report loaded, missing, unexpected and mismatched keys. A source of
    which nothing fits (another family's checkpoint) is refused, naming its family."""
    weights, cfg, source = read_weights(ref, xps_dir, trust)
    if _holds_model_alone(ref, cfg, source):  # an export of a split family: the wrapper holds it as ``model``
        weights = {f"{MODEL_PREFIX}{k}": v for k, v in weights.items()}
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
    if weights and not usable:
        theirs = ((cfg or {}).get("family") or {}).get("_target_")
        which = f"a checkpoint of family {_family_name(theirs)} ({theirs})" if theirs else "weights of another model"
        raise UserError(f"continue_from={ref}: {source} is {which}; none of its {len(weights)} tensors fit "
                        f"{type(module).__name__}: give a checkpoint of the family being trained")
    module.load_state_dict(usable, strict=False)
    log.info("continue_from: %s", report.summary())
    return report


def _holds_model_alone(ref: str | Path, cfg: dict | None, source: str) -> bool:
    try:
        return export_folder(ref) is not None and kind_of(cfg, source).model is not None
    except UserError:  # weights of no family ostinato knows: loaded by name as they are
        return False


def export(ref: str | Path, out: str | Path, xps_dir: str | Path | None = None, trust: bool = False,
           overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` (EMA weights when present), ``config.yaml`` and ``export.json`` to ``out``.

    All or nothing: the files are written to a temp folder beside ``out`` that is renamed onto it at the end; an
    ``out`` that holds files is replaced only with ``overwrite``."""
    out = Path(out)
    _check_export_folder(out, overwrite)
    weights, cfg, source = read_weights(ref, xps_dir, trust)
    if cfg is None:
        raise ValueError(f"{source} carries no config; export needs a checkpoint written by `ostinato train`")
    kind = kind_of(cfg, source)
    if kind.model is not None and export_folder(ref) is None:  # a checkpoint: its model's tensors only
        weights = model_weights(weights, None)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    with staged_folder(out) as stage:
        from ostinato.interop.codecs import embed_codec

        cfg = embed_codec(cfg, stage, out, trust, export)  # a MusicGen's codec travels with it
        save_file(tensors, str(stage / WEIGHTS_NAME))
        atomic_write_text(stage / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(cfg)))
        atomic_write_json(stage / INFO_NAME, {"source": source, "tensors": len(tensors),
                                              "family": kind.family, "wrapper": kind.wrapper,
                                              "model": kind.model})
    return out


def _check_export_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder (new or empty) for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and holds files; pass --overwrite to replace it, or choose another folder")
