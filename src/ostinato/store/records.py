"""What ostinato writes and reads back: export folders, training checkpoints, XP folders and signatures.

An export folder holds ``model.safetensors`` (the inference model's weights), ``config.yaml`` (the training
config) and ``export.json`` (where it came from and its family); a Lightning checkpoint stores the resolved config
under ``CONFIG_KEY``. Nothing here builds a model: ``ostinato.models.load`` does, from what ``read_weights`` returns.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from ostinato.errors import UserError
from ostinato.store.checkpoint import ema_weights_from_checkpoint, load_checkpoint, resolve_checkpoint

WEIGHTS_NAME, CONFIG_NAME, INFO_NAME = "model.safetensors", "config.yaml", "export.json"
CONFIG_KEY = "ostinato_config"  # where the engine stores the resolved config inside Lightning checkpoints
MODEL_PREFIX = "model."  # a training wrapper holds its inference model as ``self.model``
KEPT_ADAPTERS = "adapter/adapter_config.json"  # what marks an export whose LoRA adapters were kept apart


def export_folder(ref: str | Path) -> Path | None:
    """``ref`` when it is an export folder (``model.safetensors`` in it), else None."""
    path = Path(str(ref))
    return path if path.is_dir() and (path / WEIGHTS_NAME).is_file() else None


def conf_dir() -> str:
    """``$OSTINATO_CONF``, else the repository's ``conf/`` (the package is installed from a checkout)."""
    env = os.environ.get("OSTINATO_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"no config.yaml in {path}; set OSTINATO_CONF to your conf/ folder")
    return str(path)


def xps_dir() -> Path:
    """The dora experiments folder of this project's config (``$OSTINATO_OUTPUTS/xps``)."""
    train = sys.modules.get("ostinato.train")  # once dora's main is built it is the truth (its folder is fixed then)
    if train is not None:
        return Path(train.main.dora.dir) / train.main.dora.xps
    dora = OmegaConf.load(Path(conf_dir()) / "config.yaml").dora
    return Path(str(dora.dir)) / str(dora.get("xps", "xps"))


def resolve_ref(ref: str) -> str:
    """A bare XP signature becomes ``//sig/SIG``; anything else is returned as is."""
    if not ref.startswith("//") and not Path(ref).exists() and (xps_dir() / ref).is_dir():
        return f"//sig/{ref}"
    return ref


def require_ref(ref: str, option: str, what: str) -> str:
    """``resolve_ref``, refusing in one line (``option``, ``what`` it takes) a ref that is nothing here."""
    resolved = resolve_ref(ref)
    if resolved.startswith("//sig/"):
        if not (xps_dir() / resolved[len("//sig/"):]).is_dir():
            raise UserError(f"{option} {ref}: no experiment {resolved[len('//sig/'):]} in {xps_dir()}; give an XP "
                            f"signature listed there, or {what}")
    elif not Path(resolved).expanduser().exists():
        raise UserError(f"{option} {ref}: no such file, folder or XP signature (in {xps_dir()}); give {what}")
    return resolved


def codec_id(ref: str | Path) -> str:
    """How token shards record their codec: a local file or folder by absolute path (so that what trains on them
    finds it from any working directory), anything else (an XP signature) as given."""
    path = Path(str(ref)).expanduser()
    return str(path.resolve()) if not str(ref).startswith("//") and path.exists() else str(ref)


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
    if path.is_dir() and (path / KEPT_ADAPTERS).is_file() and (path / CONFIG_NAME).is_file():
        # an export of LoRA adapters kept apart: no weights of its own (ostinato.models.lora builds it)
        return {}, OmegaConf.to_container(OmegaConf.load(path / CONFIG_NAME)), str(path / KEPT_ADAPTERS)
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


def read_config(ref: str | Path, xps_dir_: str | Path | None = None, trust: bool = False) -> dict[str, Any] | None:
    """The training config a record carries (an export's config.yaml without reading its weights; a checkpoint's
    stored config), or None."""
    folder = export_folder(ref)
    if folder is not None:
        path = folder / CONFIG_NAME
        return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None
    path = Path(str(ref))
    if (path / KEPT_ADAPTERS).is_file() and (path / CONFIG_NAME).is_file():
        return OmegaConf.to_container(OmegaConf.load(path / CONFIG_NAME))
    return read_weights(ref, xps_dir_ if xps_dir_ is not None else xps_dir(), trust)[1]
