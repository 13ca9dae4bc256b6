"""What ``ostinato train`` prints: one progress bar over the run's steps with the metrics that matter, a one-line
model summary, and none of the third-party messages a user cannot act on.

``install()`` (called by the training entry before the Trainer exists) drops the messages of ``NOISE`` by category
and message; every other warning still shows. ``StepProgressBar`` and ``OneLineSummary`` are the Trainer's bar and
summary callbacks (``engine.trainer.build_trainer``).
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Noise:
    """A third-party message dropped from the console: ``category`` None for a log line, else the warning's class;
    ``message`` a regular expression matched at the start of the text; ``why`` the user has nothing to do."""

    category: type[Warning] | None
    message: str
    why: str


NOISE: tuple[Noise, ...] = (
    Noise(UserWarning, r"Using ModelCheckpoint with manual optimization",
          "the GAN families (codec, Musika) step their optimizers themselves: a checkpoint after the step is what "
          "resume expects"),
    Noise(PossibleUserWarning, r"The `srun` command is available on your system",
          "SLURM jobs are started by `ostinato launch`/`grid` (submitit), never by srun in front of `ostinato train`"),
    Noise(UserWarning, r"Your `IterableDataset` has `__len__` defined",
          "the shard datasets split their shards over the loader workers; the length is data.batches_per_epoch"),
    Noise(PossibleUserWarning, r"You defined a `validation_step` but have no `val_dataloader`",
          "data.valid=null is how a run trains without validation"),
    Noise(UserWarning, r"Total length of `list` across ranks is zero",
          "data.valid=null / data.test=null: the datamodule gives no loader (a DataLoader would be named instead)"),
    Noise(UserWarning, r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
          "a resumed run may leave out callbacks (evaluation, samples, EMA) that the run which wrote it had"),
    Noise(FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning"),
    Noise(UserWarning, r"torch\.meshgrid: in an upcoming release", "inside third-party model code"),
    Noise(DeprecationWarning, r"`torch\.jit\.\w+` is deprecated", "inside third-party model code"),
    Noise(None, r"(GPU|TPU|HPU) available: ", "the accelerator is trainer.accelerator, shown in the XP's config"),
    Noise(None, r"💡 Tip: ", "an advertisement"),
    Noise(None, r"`Trainer\(limit_(train|val|test)_batches=", "echoes trainer.limit_val_batches"),
    Noise(None, r"`Trainer\.fit` stopped: `max_steps=\d+` reached", "the progress bar ends at step N/N"),
    Noise(None, r"Trainer already configured with model summary callbacks", "the summary is the engine's one line"),
    Noise(None, r"Restor(ing|ed all) states from the checkpoint", "the run's own line says `resuming PATH`"),
    Noise(None, r"Initializing distributed: GLOBAL_RANK", "the engine logs each rank's host and rendezvous"),
    Noise(None, r"-{100}\ndistributed_backend=", "a banner: the ranks are in the engine's lines"),
)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.fabric.utilities.distributed")


class _DropNoise(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def install(noise: tuple[Noise, ...] = NOISE) -> None:
    """Drop ``noise`` from this process's console (idempotent): warning filters by category and message, a filter
    on Lightning's rank-zero info loggers for its log lines, and transformers' per-model "Loading weights" bars."""
    _no_local_loading_bars()
    for item in noise:
        if item.category is not None:
            warnings.filterwarnings("ignore", message=item.message, category=item.category)
    lines = [item.message for item in noise if item.category is None]
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(lines))


def _no_local_loading_bars() -> None:
    """ostinato reads every pretrained weight from a local path (a text encoder loads in a second): transformers'
    bars are off, through huggingface_hub's switch that transformers reads when it is imported, or directly when
    it already is."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def planned_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps the run plans: ``max_steps``, else epochs x steps per epoch; None when unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches, epochs = trainer.num_training_batches, trainer.max_epochs
    if epochs is None or epochs < 0 or not math.isfinite(batches):
        return None
    return int(epochs * math.ceil(batches / max(trainer.accumulate_grad_batches, 1)))


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"


class StepProgressBar(ProgressBar):
    """One bar over the whole run: ``step N/TOTAL``, steps/s, the metrics the family logs with ``prog_bar=True``
    (its loss and main validation metric) and the learning rate. Validation inside training shows on the same bar;
    a stand-alone validation or test pass gets a bar on a terminal, cleared when done. Off a terminal (a SLURM log) it
    redraws at most every ``log_interval`` seconds."""

    def __init__(self, log_interval: float = 30.0) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None
        self._pass: tqdm | None = None
        self._tty = tty = sys.stderr.isatty()
        self._interval = 0.1 if tty else log_interval
        # a terminal that reports no width (a pty nobody sized) would make tqdm draw nothing at all
        self._width: dict[str, Any] = ({"ncols": 120, "nrows": 50} if tty and _columns() == 0 else
                                       {"dynamic_ncols": True})

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _metrics(self, trainer: L.Trainer) -> str:
        shown = {k: float(v) for k, v in trainer.progress_bar_metrics.items() if isinstance(v, (int, float))}
        if trainer.optimizers:
            shown["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        return " ".join(f"{k} {_number(v)}" for k, v in shown.items())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = planned_steps(trainer)
        self._bar = tqdm(total=total, initial=trainer.global_step, unit=" steps", file=sys.stderr, leave=True,
                         mininterval=self._interval, disable=not self._enabled, **self._width,
                         bar_format="step {n}/{total} {bar:20} {elapsed}<{remaining} {rate_fmt}{postfix}"
                         if total else "step {n} {elapsed} {rate_fmt}{postfix}")  # tqdm puts ", " before a postfix

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._metrics(trainer), refresh=False)
            self._bar.update(trainer.global_step - self._bar.n)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._metrics(trainer), refresh=False)
            self._bar.close()
            self._bar = None

    # -- evaluation passes --------------------------------------------------------------------------------------
    def _pass_start(self, trainer: L.Trainer, what: str, total: float) -> None:
        if self._bar is None and not trainer.sanity_checking:  # a pass of its own: trainer.validate / test
            self._pass = tqdm(total=total if math.isfinite(total) else None, desc=what, file=sys.stderr,
                              leave=False, mininterval=self._interval, **self._width,
                              disable=not (self._enabled and self._tty))  # a log file keeps no cleared bar

    def _pass_step(self, trainer: L.Trainer, what: str, done: int, total: float) -> None:
        if self._pass is not None:
            self._pass.update(1)
        elif self._bar is not None:
            of = f"/{int(total)}" if math.isfinite(total) else ""
            self._bar.set_postfix_str(f"{what} {done}{of}")

    def _pass_end(self, trainer: L.Trainer) -> None:
        if self._pass is not None:
            self._pass.close()
            self._pass = None
        elif self._bar is not None:
            self._bar.set_postfix_str(self._metrics(trainer))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pass_start(trainer, "validate", self.total_val_batches)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._pass_step(trainer, "validating", batch_idx + 1, self.total_val_batches)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pass_end(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pass_start(trainer, "test", sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._pass_step(trainer, "testing", batch_idx + 1, sum(trainer.num_test_batches))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pass_end(trainer)

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        tqdm.write(sep.join(map(str, args)), file=sys.stderr)  # above the bar, which is redrawn below


class OneLineSummary(ModelSummary):
    """Lightning's model summary as one log line: the parameters of each top-level submodule that has any."""

    def __init__(self) -> None:
        super().__init__(max_depth=1)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = dict(summary_data)
        parts = [f"{name} {kind} {params}" for name, kind, params in
                 zip(columns.get("Name", []), columns.get("Type", []), columns.get("Params", []))
                 if params.strip() not in ("0", "")]
        log.info("model: %s parameters (%s trainable, %.1f MB)%s", _count(total_parameters),
                 _count(trainable_parameters), model_size, f": {', '.join(parts)}" if parts else "")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
