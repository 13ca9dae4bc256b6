"""Families with fault injection and introspection, for engine tests (selected with family._target_=...)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

from ostinato.data.batch import AudioBatch
from ostinato.families.codec import CodecFamily
from ostinato.families.debug import DebugFamily


class NaNFamily(DebugFamily):
    """DebugFamily whose loss is NaN at the given global steps (every step when ``always``)."""

    def __init__(self, nan_steps: list[int] | None = None, always: bool = False, **kw):
        super().__init__(**kw)
        self.nan_steps, self.always = set(nan_steps or []), always

    def training_step(self, batch: AudioBatch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.always or self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss


class RankDumpMixin:
    """Writes each rank's final state (weights and buffers) to ``$OSTINATO_DUMP/rank{r}.pt``, with where the rank
    ran: its host name, that name's address and its network namespace."""

    def on_train_end(self) -> None:
        folder = Path(os.environ["OSTINATO_DUMP"])
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        host = socket.gethostname()
        torch.save({"state": state, "world": self.trainer.world_size, "step": self.global_step, "host": host,
                    "addr": socket.gethostbyname(host), "netns": os.readlink("/proc/self/ns/net")},
                   folder / f"rank{self.global_rank}.pt")


class RankDumpFamily(RankDumpMixin, DebugFamily):
    pass


class RankDumpCodec(RankDumpMixin, CodecFamily):
    pass


class StopAtFamily(DebugFamily):
    """DebugFamily that stops training after global step ``$OSTINATO_STOP_AT`` (when set), as a preempted run would:
    its checkpoint written, the rest of ``max_steps`` left to a resume."""

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        stop = os.environ.get("OSTINATO_STOP_AT")
        if stop and self.global_step >= int(stop):
            self.trainer.should_stop = True


class PacedRankDumpFamily(RankDumpFamily):
    """RankDumpFamily whose steps take at least ``STEP_SECONDS`` (a run long enough to be requeued or lose a node
    mid-way, whatever the machine's speed), and whose every rank writes, at train start (after a resume restored
    its checkpoint), ``$OSTINATO_DUMP/start.rank{r}.restart{n}.json``: the global step, host and
    ``SLURM_RESTART_COUNT`` (n) it started with."""

    STEP_SECONDS = 0.3

    def training_step(self, batch: AudioBatch, batch_idx: int) -> torch.Tensor:
        time.sleep(self.STEP_SECONDS)
        return super().training_step(batch, batch_idx)

    def on_train_start(self) -> None:
        folder = Path(os.environ["OSTINATO_DUMP"])
        folder.mkdir(parents=True, exist_ok=True)
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        (folder / f"start.rank{self.global_rank}.restart{restart}.json").write_text(json.dumps(
            {"step": self.global_step, "host": socket.gethostname(), "restart": restart}))
