"""Callbacks every family gets: dora history, throughput, audio samples, preemption checkpoints."""
from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from ostinato.data.batch import AudioBatch
from ostinato.data.streams import DataError

log = logging.getLogger(__name__)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else v
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def grouped(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"train/loss": 1.0, "valid/loss": 2.0} -> {"train": {"loss": 1.0}, "valid": {"loss": 2.0}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        group, _, name = key.partition("/")
        out.setdefault(group if name else "other", {})[name or group] = value
    return out


class DoraHistory(L.Callback):
    """Push each epoch's train and valid metrics to dora's history, so `dora grid` tables show them live."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the checkpoint is restored (current_epoch is right): drop the epochs a resumed run will redo
        if trainer.is_global_zero:
            self.xp.link.load()
            kept = [e for e in self.xp.link.history if e.get("epoch", -1) < trainer.current_epoch]
            self.xp.link.update_history(kept)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        entry: dict[str, Any] = grouped(_floats(trainer.callback_metrics))
        entry["step"], entry["epoch"] = trainer.global_step, trainer.current_epoch
        self.xp.link.push_metrics(entry)


class Throughput(L.Callback):
    """Log samples/s and audio-seconds/s of training, the corrupt samples skipped per
    split, and stop an evaluation pass whose every sample was corrupt (``DataError``)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._blanks = _Blanks()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _log_skipped(pl_module, "data/corrupt_skipped", batch)
        if self._t0 is None or not isinstance(batch, AudioBatch):
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        n = len(batch) * trainer.world_size
        sr = getattr(pl_module, "sample_rate", None)
        pl_module.log("perf/samples_per_s", n / dt, batch_size=len(batch))
        if sr:
            pl_module.log("perf/audio_s_per_s", n * batch.audio.shape[-1] / sr / dt, batch_size=len(batch))

    # -- evaluation passes: count the blanks, stop when a pass read nothing else ------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._blanks = _Blanks()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._blanks = _Blanks()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        _log_skipped(pl_module, "data/valid_corrupt_skipped", batch)
        self._blanks.add(batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        _log_skipped(pl_module, "data/test_corrupt_skipped", batch)
        self._blanks.add(batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # a few batches: the rest of the split may be sound
            self._blanks.check(trainer, pl_module, "valid")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._blanks.check(trainer, pl_module, "test")


class _Blanks:
    """The samples of an evaluation pass and how many were corrupt (replaced by blanks), on this rank."""

    def __init__(self) -> None:
        self.items, self.skipped, self.first = 0, 0, ""

    def add(self, batch: Any) -> None:
        if getattr(batch, "skipped", None) is None:
            return
        self.items, self.skipped = self.items + len(batch), self.skipped + batch.skipped
        self.first = self.first or next((m["error"] for m in getattr(batch, "meta", []) if "error" in m), "")

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        """Stop with one line when every sample of the pass, over every rank, was a blank: its metrics would be
        those of silence. All ranks see the same sums, so all stop together; a fit keeps its training first."""
        totals = trainer.strategy.reduce(torch.tensor([self.items, self.skipped], dtype=torch.float32,
                                                      device=pl_module.device), reduce_op="sum")
        items, skipped = (int(v) for v in totals.tolist())
        if items == 0 or skipped < items:
            return
        loaders = trainer.val_dataloaders if split == "valid" else trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        where = getattr(getattr(loader, "dataset", None), "where", None) or f"data.{split}"
        kept = ""
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if trainer.state.fn == "fit" and folder:
            last = Path(folder) / "last.ckpt"
            trainer.save_checkpoint(last)
            kept = f" (training so far is kept in {last})"
        raise DataError(f"every one of the {items} {split} samples in {where} failed to decode (first: "
                        f"{self.first or 'unknown'}), so the {split} metrics would be those of silence{kept}; "
                        f"rebuild the shards with `ostinato prep shards` (see its report.json) or point data.{split} "
                        "at shards that decode")


def _log_skipped(pl_module: L.LightningModule, key: str, batch: Any) -> None:
    """Sum the corrupt samples each batch's worker skipped over the epoch and the ranks (logged every batch, 0
    included, so every rank joins the sum)."""
    skipped = getattr(batch, "skipped", None)
    if skipped is not None:
        pl_module.log(key, float(skipped), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True,
                      batch_size=len(batch))


class PreemptionCheckpoint(L.Callback):
    """Write ``last.ckpt`` when SLURM preempts or requeues the job, then let submitit requeue it.

    SIGUSR2 (submitit's timeout/preemption signal) and SIGTERM (sent by ``scontrol requeue`` and
    preemption) only raise a flag; at the next batch end all ranks agree through an all-reduce, save together,
    then chain to the previous handler (submitit requeues on SIGUSR2) or exit (SIGTERM). The handlers replace
    Lightning's at train start, so a signal during validation or between batches also waits for a batch end.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, last_path: str | Path) -> None:
        self.last_path = str(last_path)
        self._caught: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("caught %s: a checkpoint will be written at the end of this batch", signal.Signals(signum).name)
        self._caught = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (Trainer._run, past on_fit_start): its SIGTERM handler would
        # stop the fit at the next loop boundary (in validation, between batches) before any checkpoint is written
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _agreed_signal(self, device: torch.device) -> int:
        flag = torch.tensor([self._caught or 0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = self._agreed_signal(pl_module.device)
        if not signum:
            return
        trainer.save_checkpoint(self.last_path)
        log.warning("preemption checkpoint written to %s at step %d", self.last_path, trainer.global_step)
        previous = self._previous.get(signum)
        if signum != signal.SIGTERM and callable(previous):  # submitit requeues on SIGUSR2; SIGTERM's previous
            previous(signum, None)                            # is Lightning's, which would kill and broadcast
        raise SystemExit(0 if signum == signal.SIGTERM else 1)


class AudioSamples(L.Callback):
    """Every ``every_steps``, write the family's ``sample_audio`` waveforms (wav + mel PNG) and log them."""

    def __init__(self, folder: str | Path, every_steps: int = 1000, max_items: int = 2) -> None:
        self.folder, self.every_steps, self.max_items = Path(folder), every_steps, max_items
        self._last = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # every rank samples (FSDP needs all of them), rank 0 writes
        if self.every_steps <= 0 or step == self._last or step % self.every_steps or not isinstance(batch, AudioBatch):
            return
        self._last = step
        sr = pl_module.sample_rate
        items = AudioBatch(batch.audio[: self.max_items], batch.lengths[: self.max_items],
                           batch.captions[: self.max_items], batch.meta[: self.max_items])
        was_training = pl_module.training
        pl_module.eval()
        try:
            waves = pl_module.sample_audio(items)
        finally:
            pl_module.train(was_training)
        if waves and sr and trainer.is_global_zero:
            from ostinato.engine.media import log_audio

            log_audio(trainer.loggers, self.folder / f"step_{step:08d}", waves, sr, step, items.captions)
