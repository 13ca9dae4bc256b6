"""Checkpoint files: atomic writes, safe loading, and ``continue_from`` resolution.

A checkpoint is a file, or (FSDP, ``state_dict_type="sharded"``) a directory of shards with ``meta.pt``; loading
such a directory here consolidates it into the same dict on one process.

Loading never unpickles arbitrary objects unless the user says so: checkpoints are read with
``torch.load(weights_only=True)``; one that needs more is refused with a message naming the file and the
``trust_checkpoints=true`` flag.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from ostinato.errors import UserError
from ostinato.fileio import atomic_path

log = logging.getLogger(__name__)
SIG_PREFIX = "//sig/"


class UntrustedCheckpointError(UserError, RuntimeError):
    """A checkpoint that can only be read by unpickling arbitrary Python objects."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu", trust: bool = False) -> dict[str, Any]:
    """Read a ``.ckpt``/``.pt``/``.bin`` file or a sharded checkpoint directory; tensors and plain containers only
    unless ``trust``."""
    from ostinato.engine.fsdp import is_sharded_checkpoint, load_sharded_checkpoint

    path = Path(path)
    if is_sharded_checkpoint(path):
        try:
            return load_sharded_checkpoint(path, trust=trust)
        except pickle.UnpicklingError as e:
            raise UntrustedCheckpointError(
                f"{path} holds pickled Python objects that a weights-only load refuses ({str(e).splitlines()[0]}). "
                "If you trust its origin, pass trust_checkpoints=true (CLI: --trust).") from e
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"{path} holds pickled Python objects that a weights-only load refuses ({str(e).splitlines()[0]}). "
            "If you trust its origin, pass trust_checkpoints=true (CLI: --trust).") from e


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: write to a temp file, fsync, rename; read weights-only."""

    def __init__(self, trust: bool = False) -> None:
        self.trust = trust

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | Path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu", trust=self.trust)


def resolve_checkpoint(ref: str | Path, xps_dir: str | Path | None = None) -> Path:
    """``//sig/SIG`` (an XP of this project), an XP folder, or a checkpoint -> a checkpoint file (or sharded
    checkpoint directory)."""
    from ostinato.engine.fsdp import is_checkpoint, is_sharded_checkpoint

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
        raise FileNotFoundError(f"{path} holds no checkpoints/last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path
