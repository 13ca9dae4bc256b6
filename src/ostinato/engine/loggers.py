"""Experiment loggers from the ``logger`` config group: wandb (offline unless logged in), CSV, TensorBoard."""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger


def wandb_mode(requested: str = "auto") -> str:
    """'auto' -> $WANDB_MODE if set, else 'online' once the user has logged in (API key), else 'offline'."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def build_loggers(cfg: Any, folder: Path, name: str) -> list[Logger]:
    """cfg.kind in {wandb, csv, tensorboard, none}; CSV is always added so metrics land in the XP folder."""
    kind = cfg.get("kind", "csv")
    loggers: list[Logger] = [CSVLogger(str(folder), name="csv", version="")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(cfg.get("mode", "auto"))
        loggers.insert(0, WandbLogger(project=cfg.get("project", "ostinato"), name=name, id=name,
                                      save_dir=str(folder), offline=mode == "offline", resume="allow",
                                      entity=cfg.get("entity"), group=cfg.get("group"),
                                      mode="disabled" if mode == "disabled" else None))
    elif kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.insert(0, TensorBoardLogger(str(folder), name="tensorboard", version=""))
    elif kind not in ("csv", "none"):
        raise ValueError(f"logger.kind={kind!r}: use wandb, csv, tensorboard or none")
    return loggers
