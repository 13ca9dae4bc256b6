"""Weights in and out: ``continue_from`` loading, safetensors export, and ``ostinato.load``."""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ostinato.engine.checkpoint import load_checkpoint, resolve_checkpoint
from ostinato.engine.ema import ema_weights_from_checkpoint
from ostinato.errors import UserError
from ostinato.fileio import atomic_write_json, atomic_write_text

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
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{ckpt_path} is not a checkpoint written by `ostinato train` ({_what_checkpoint(ckpt)}); "
                        "give an XP, its .ckpt or an export folder")
    weights, used_ema = checkpoint_weights(ckpt)
    return weights, ckpt.get(CONFIG_KEY), f"{ckpt_path}{' (EMA)' if used_ema else ''}"


def _what_checkpoint(ckpt: Any) -> str:
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}"
    if "best_state" in ckpt or "xp.cfg" in ckpt:
        return "an audiocraft file: bring it in with `ostinato import`"
    return f"no state_dict; its keys: {', '.join(map(str, list(ckpt)[:6]))}"


def _family_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def load_weights(module: torch.nn.Module, ref: str | Path, xps_dir: str | Path | None = None,
                 trust: bool = False) -> LoadReport:
    """Load what matches by name and shape; report loaded, missing, unexpected and mismatched keys. A source of
    which nothing fits (another family's checkpoint) is refused, naming its family."""
    weights, cfg, source = read_weights(ref, xps_dir, trust)
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
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    with staged_folder(out) as stage:
        from ostinato.interop.codecs import embed_codec

        cfg = embed_codec(cfg, stage, out, trust)  # a MusicGen's codec travels with it: it generates from anywhere
        save_file(tensors, str(stage / WEIGHTS_NAME))
        atomic_write_text(stage / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(cfg)))
        atomic_write_json(stage / INFO_NAME, {"source": source, "tensors": len(tensors),
                                              "family": cfg["family"]["_target_"]})
    return out


def _check_export_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder (new or empty) for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and holds files; pass --overwrite to replace it, or choose another folder")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temp folder on ``out``'s file system; when the block succeeds its content replaces
    ``out``'s (a new ``out``: one rename; an existing one, a mount point maybe: one rename per entry, then the
    old entries go), else it is removed and ``out`` is left as it was. A file-system error names ``out``."""
    out = Path(out).absolute()
    stage = None
    try:
        existing = out.is_dir()
        if not existing:
            out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out if existing else out.parent))
        yield stage
        if not existing:
            os.replace(stage, out)
            return
        new = {p.name for p in stage.iterdir()}
        for entry in stage.iterdir():
            if (out / entry.name).is_dir():
                shutil.rmtree(out / entry.name)
            os.replace(entry, out / entry.name)
        for entry in out.iterdir():  # what the export replaces (only with --overwrite: see _check_export_folder)
            if entry == stage or entry.name in new:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as e:
        if e.errno is not None:  # the temp paths mean nothing to the user: name the folder asked for
            raise OSError(e.errno, e.strerror or str(e), str(out)) from e
        raise
    except SafetensorError as e:  # safetensors' own I/O errors carry the errno in their text only
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(out)) from e
    finally:
        if stage is not None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


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
