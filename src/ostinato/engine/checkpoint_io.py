"""Lightning's checkpoint I/O with ostinato's guarantees: atomic writes, the previous checkpoint kept, damaged files
set aside, and refusal of files that need full unpickling (the file format itself is in ``store.checkpoint``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from ostinato.fileio import atomic_path
from ostinato.store.checkpoint import LAST_NAME, _disk_full, keep_previous, load_checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: write to a temp file, fsync, rename; read weights-only. Overwriting
    ``last.ckpt`` keeps the one before as ``last-previous.ckpt``, the fallback when ``last.ckpt`` is damaged."""

    def __init__(self, trust: bool = False) -> None:
        self.trust = trust

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                try:
                    torch.save(checkpoint, tmp)
                except RuntimeError as e:
                    full = _disk_full(e, tmp)
                    if full is None:
                        raise
                    raise full from e
                if path.name == LAST_NAME and path.is_file():
                    keep_previous(path, tmp)
        except OSError as e:
            if e.errno is None or e.filename == str(path):
                raise
            raise OSError(e.errno, e.strerror, str(path)) from e  # the checkpoint, not its (removed) temp file

    def load_checkpoint(self, path: str | Path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu", trust=self.trust)
