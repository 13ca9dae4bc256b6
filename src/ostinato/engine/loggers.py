"""Experiment loggers from the ``logger`` config group: wandb (offline unless logged in), CSV, TensorBoard."""
from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ostinato.fileio import atomic_path


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


class _ResumedWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run keeps the rows logged up to its
    checkpoint's step (later rows were trained again) and appends to them."""

    def __init__(self, log_dir: str, resumed_step: int | None) -> None:
        self.resumed_step = resumed_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        if self.resumed_step is None:  # a fresh run in a folder that has logs: Lightning's behaviour
            os.remove(self.metrics_file_path)
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") in (None, "") or float(r["step"]) <= self.resumed_step]
        with atomic_path(Path(self.metrics_file_path)) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<folder>/csv/metrics.csv`` that survives resuming (see ``_ResumedWriter``)."""

    def __init__(self, folder: str, resumed_step: int | None = None) -> None:
        super().__init__(folder, name="csv", version="")
        self.resumed_step = resumed_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(self.log_dir, self.resumed_step)
        return self._experiment


def build_loggers(cfg: Any, folder: Path, name: str, resumed_step: int | None = None) -> list[Logger]:
    """cfg.kind in {wandb, csv, tensorboard, none}; CSV is always added so metrics land in the XP folder.
    ``resumed_step``: the step of the checkpoint a resumed run starts from (its CSV rows up to it are kept)."""
    kind = cfg.get("kind", "csv")
    loggers: list[Logger] = [ResumableCSVLogger(str(folder), resumed_step)]
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
