"""Checkpoint files: atomic writes, safe loading, and ``continue_from`` resolution.

A checkpoint is a file, or (FSDP, ``state_dict_type="sharded"``) a directory of shards with ``meta.pt``; loading
such a directory here consolidates it into the same dict on one process.

Loading never unpickles arbitrary objects unless the user says so: checkpoints are read with
``torch.load(weights_only=True)``; one that needs more is refused with a message naming the file and the
``trust_checkpoints=true`` flag.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torch import Tensor

from ostinato.errors import UserError

log = logging.getLogger(__name__)
SIG_PREFIX = "//sig/"
LAST_NAME = "last.ckpt"
PREVIOUS_NAME = "last-previous.ckpt"  # the last.ckpt before the current one, kept whole for a damaged last.ckpt
DAMAGED_TAG = ".damaged-"  # a damaged checkpoint set aside: ``last.ckpt.damaged-20260105-120000``
METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded (FSDP) checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory written by a sharded FSDP save."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint file or a sharded checkpoint directory."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


def load_sharded_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """A sharded checkpoint directory -> a Lightning checkpoint dict (``state_dict`` with full tensors,
    ``optimizer_states``, and everything ``meta.pt`` holds), read on one process without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    checkpoint = torch.load(path / METADATA, map_location="cpu", weights_only=not trust)
    checkpoint["state_dict"] = state.pop("model")
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [state.pop(k) for k in optimizers]
    return checkpoint


class UntrustedCheckpointError(UserError, RuntimeError):
    """A checkpoint that can only be read by unpickling arbitrary Python objects."""


class DamagedCheckpointError(UserError):
    """A checkpoint that cannot be read: empty, truncated (a write that was killed), or not a checkpoint."""


def checkpoint_damage(path: str | Path) -> str | None:
    """Why the checkpoint file or sharded folder at ``path`` cannot be read, or None when it looks whole.

    Cheap at any size: a file's zip directory (at its end, so lost by any truncation) is read, never a tensor."""
    path = Path(path)
    try:
        if path.is_dir():
            damage = checkpoint_damage(path / METADATA)
            if damage is not None:
                return f"its {METADATA} is {damage}"
            return None if (path / ".metadata").stat().st_size else "its shard index .metadata is empty"
        size = path.stat().st_size
        if size == 0:
            return "empty (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # torch.save's zip format
            with zipfile.ZipFile(path):
                return None
        if head[:1] == b"\x80":  # torch's legacy pickle format
            return None
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    except zipfile.BadZipFile:
        return f"truncated: {size} bytes, the end of the archive is missing"
    except FileNotFoundError as e:
        return f"missing {Path(e.filename).name}" if e.filename else "missing"


def older_checkpoints(folder: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """The checkpoints in ``folder`` other than ``exclude`` (``last-previous.ckpt``, ``step*.ckpt``, a sharded
    ``last.ckpt.old``), most recently written first; set-aside damaged ones and temp files are not listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.name.endswith((".ckpt", ".ckpt.old")) and not p.name.startswith(".") and DAMAGED_TAG not in p.name
             and p.name != LAST_NAME and (exclude is None or p != Path(exclude)) and is_checkpoint(p)]
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # set aside by rank 0 meanwhile
        return 0


def previous_checkpoint(path: str | Path) -> Path | None:
    """The most recent whole checkpoint beside ``path`` (its fallback when ``path`` is damaged), or None."""
    return next((p for p in older_checkpoints(Path(path).parent, exclude=path) if checkpoint_damage(p) is None),
                None)


def damaged_message(path: str | Path, damage: str) -> str:
    """One line: which file, what is wrong, and which checkpoint to use instead."""
    previous = previous_checkpoint(path)
    fix = (f"use the previous checkpoint {previous} instead" if previous is not None else
           "no whole checkpoint is left beside it; use another one, or train again")
    if damage.startswith("not a PyTorch checkpoint"):
        return f"{path} is {damage}; give a .ckpt written by `ostinato train`, an XP or an export folder"
    return f"checkpoint {path} is damaged ({damage}), e.g. by a run killed while writing it; {fix}"


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.damaged-TIMESTAMP`` (kept, never deleted); returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}{DAMAGED_TAG}{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target, n = target.with_name(f"{path.name}{DAMAGED_TAG}{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    os.replace(path, target)
    return target


def _disk_full(error: RuntimeError, tmp: Path) -> OSError | None:
    """torch's zip writer reports a failed write as a RuntimeError without errno; a full disk is told apart by the
    free space left where it was writing (measured before the temp file is removed)."""
    if "inline_container" not in str(error) and "PytorchStreamWriter" not in str(error):
        return None
    if shutil.disk_usage(tmp.parent).free >= 2**20:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def keep_previous(path: Path, written: Path) -> None:
    """Before ``written`` replaces ``last.ckpt`` at ``path``: keep the current one as ``last-previous.ckpt`` when
    whole (set it aside when damaged). A hard link keeps ``last.ckpt`` in place until the new one is renamed onto
    it; where the file system has none, it is renamed, and a kill before the next rename leaves only
    ``last-previous.ckpt``, which a resumed run then takes."""
    with open(written, "rb+") as f:  # the new one is on disk before the old one moves
        os.fsync(f.fileno())
    damage = checkpoint_damage(path)
    if damage is not None:
        log.warning("%s is damaged (%s); set aside as %s", path, damage, set_aside(path).name)
        return
    previous = path.with_name(PREVIOUS_NAME)
    link = path.with_name(f".{PREVIOUS_NAME}.{os.getpid()}.tmp")  # swept at the next start if left behind
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        os.replace(path, previous)


def sweep_temp_files(folder: str | Path) -> tuple[int, int]:
    """Remove what interrupted checkpoint writes left in ``folder``: atomic-write temp files (``.NAME.*.tmp``) and
    sharded ``*.partial`` folders. Call it only before training starts, on rank 0, when no write can be in
    progress. Returns (count, bytes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    count = size = 0
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            size += p.stat().st_size
            p.unlink(missing_ok=True)
            count += 1
        elif p.name.endswith(".partial") and p.is_dir():
            size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            count += 1
    return count, size


def load_checkpoint(path: str | Path, map_location: Any = "cpu", trust: bool = False) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt``/``.bin`` file or a sharded checkpoint directory; tensors and plain containers only
    unless ``trust``. A damaged one (empty, truncated) raises ``DamagedCheckpointError`` naming a whole one
    beside it."""
    path = Path(path)
    sharded = is_sharded_checkpoint(path)
    if not sharded and not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise DamagedCheckpointError(damaged_message(path, damage))
    try:
        if sharded:
            return load_sharded_checkpoint(path, trust=trust)
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust:  # nothing was refused: the pickle itself is broken
            raise DamagedCheckpointError(damaged_message(path, f"unreadable: {_first_line(e)}")) from e
        raise UntrustedCheckpointError(
            f"{path} holds pickled Python objects that a weights-only load refuses ({_first_line(e)}). "
            "If you trust its origin, pass trust_checkpoints=true (CLI: --trust).") from e
    except (EOFError, zipfile.BadZipFile) as e:  # cut inside a pickle that the zip directory check let through
        raise DamagedCheckpointError(damaged_message(path, f"unreadable: {type(e).__name__} {e}".strip())) from e
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):  # torch's zip reader; any other RuntimeError is not about the file
            raise
        raise DamagedCheckpointError(damaged_message(path, f"unreadable: {_first_line(e)}")) from e


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def resolve_checkpoint(ref: str | Path, xps_dir: str | Path | None = None) -> Path:
    """``//sig/SIG`` (an XP of this project), an XP folder, or a checkpoint -> a checkpoint file (or sharded
    checkpoint directory)."""
    ref = str(ref)
    if ref.startswith(SIG_PREFIX):
        if xps_dir is None:
            raise ValueError(f"cannot resolve {ref}: no dora xps folder known")
        path = Path(xps_dir) / ref[len(SIG_PREFIX):]
        if not path.is_dir():
            raise FileNotFoundError(f"continue_from={ref}: no experiment folder {path}")
    else:
        path = Path(ref)
    if is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if is_checkpoint(candidate):
                return candidate
        previous = previous_checkpoint(path / "checkpoints" / LAST_NAME)
        raise FileNotFoundError(f"{path} holds no checkpoints/last.ckpt" + (
            f"; its newest whole checkpoint is {previous}: give that instead" if previous else
            "; train it first, or give a checkpoint file"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def ema_weights_from_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """A Lightning checkpoint's ``state_dict`` with its EMA shadows substituted, or None if it has no EMA state."""
    states = [s for s in (ckpt.get("callbacks") or {}).values() if isinstance(s, Mapping) and "shadow" in s]
    if not states:
        return None
    weights = dict(ckpt["state_dict"])
    for state in states:
        shadow = dict(state["shadow"])
        shadow.update({alias: shadow[name] for alias, name in (state.get("aliases") or {}).items()
                       if name in shadow})
        for name, value in shadow.items():
            reference = weights.get(name)
            weights[name] = value if reference is None else value.to(device=reference.device, dtype=reference.dtype)
    return weights
