"""A MusicGen family that reports on FSDP runs (selected with family._target_=tests.fsdp_models.FSDPProbeMusicGen).

``$OSTINATO_STOP_AT``: stop training after that global step (the run ends as if preempted, with its checkpoint).
``$OSTINATO_DUMP``: at train start (after a resume restored its checkpoint) rank 0 writes the full, gathered
state dict and the global step to ``$OSTINATO_DUMP/start.pt``; at train end, ``end.pt``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ostinato.families.musicgen import MusicGenFamily


class FSDPProbeMusicGen(MusicGenFamily):
    def _dump(self, name: str) -> None:
        folder = os.environ.get("OSTINATO_DUMP")
        if not folder:
            return
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        root = self.trainer.strategy.model
        assert isinstance(root, FullyShardedDataParallel), type(root)
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            state = root.state_dict()  # a collective: every rank calls it
        if self.global_rank == 0:
            Path(folder).mkdir(parents=True, exist_ok=True)
            shapes = {n.replace("_fsdp_wrapped_module.", ""): getattr(p, "_ostinato_ndim", None)
                      for n, p in self.named_parameters()}
            torch.save({"state": {k: v.clone() for k, v in state.items()}, "step": self.global_step,
                        "world": self.trainer.world_size, "ndims": shapes,
                        "groups": [(g["name"], g["weight_decay"], len(g["params"]))
                                   for g in self.trainer.optimizers[0].param_groups]},
                       Path(folder) / f"{name}.pt")

    def on_train_start(self) -> None:
        self._dump("start")

    def on_train_end(self) -> None:
        self._dump("end")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        stop = os.environ.get("OSTINATO_STOP_AT")
        if stop and self.global_step >= int(stop):
            self.trainer.should_stop = True
