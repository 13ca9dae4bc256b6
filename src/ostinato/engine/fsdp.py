"""FSDP for the engine (``trainer.strategy=fsdp``; preset ``trainer=fsdp``).

``ShardedFSDPStrategy`` is Lightning's ``FSDPStrategy`` with what training MusicGen-large needs from config alone:

* one FSDP unit per repeated block (the family's ``block_classes()``: ``_Block`` for MusicGen), parameters,
  gradients and optimizer states sharded (``trainer.fsdp_sharding``); with ``trainer.precision=bf16-mixed`` the
  blocks gather, compute and reduce in bf16 over fp32 master shards; ``trainer.activation_checkpointing``
  checkpoints each block;
* gradient clipping by norm (``trainer.gradient_clip_val``) through the root FSDP module's ``clip_grad_norm_``,
  which Lightning's FSDP precision plugin refuses;
* CPU processes (gloo): Lightning only lets FSDP run on CUDA, torch's FSDP runs on CPU with ``device_id=cpu``, which
  is what the engine's tests use;
* sharded checkpoints: ``last.ckpt`` is a directory (``torch.distributed.checkpoint`` shards plus ``meta.pt`` with
  the loop state, callbacks and config). It is written next to the old one and swapped in once every rank has
  written, so a run killed while saving still resumes from the previous checkpoint; the one it replaces stays as
  ``last-previous.ckpt``, the fallback when ``last.ckpt`` turns out damaged. Callback states are per rank (the EMA
  of a rank's shards): rank 0's in ``meta.pt``, each other rank's in ``callbacks.rankN.pt``, each restored to its
  own rank. The format itself (reading,
  consolidating on one process for export, ``continue_from`` and ``ostinato.load``) is in ``engine.checkpoint``.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy

from ostinato.store.checkpoint import LAST_NAME, PREVIOUS_NAME

log = logging.getLogger(__name__)
ORIGINAL_NDIM = "_ostinato_ndim"  # set on parameters before FSDP flattens them (weight decay grouping)
# A rank's callback states in a sharded checkpoint: the EMA shadows that rank's own shards, which Lightning's meta.pt
# (rank 0's states) would hand to every rank on resume (wrong values, or shapes that do not fit)
RANK_CALLBACKS = "callbacks.rank{rank}.pt"


def remember_parameter_ndims(module: torch.nn.Module) -> None:
    """Record every parameter's ``ndim`` on it: sharded FSDP parameters are 1-D views, and the optimizer's
    no-decay rule (``ndim < 2``) must see the original shapes."""
    for p in module.parameters():
        setattr(p, ORIGINAL_NDIM, p.ndim)


class _ClippingFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin, with norm clipping over all shards by the root FSDP module."""

    strategy: FSDPStrategy | None = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float | int) -> None:
        assert self.strategy is not None and self.strategy.model is not None
        self.strategy.model.clip_grad_norm_(float(clip_val))


class ShardedFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that also runs on CPU, clips by norm and swaps sharded checkpoints in atomically.

    Args:
        precision: the trainer's precision (``32-true``, ``bf16-mixed``, ...), for the FSDP precision plugin.
        Other arguments go to ``FSDPStrategy`` (``auto_wrap_policy``, ``activation_checkpointing_policy``,
        ``sharding_strategy``, ``state_dict_type``, ``process_group_backend``, ``cluster_environment``, ...).
    """

    def __init__(self, precision: str, **kwargs: Any) -> None:
        plugin = _ClippingFSDPPrecision(precision)  # type: ignore[arg-type]
        super().__init__(precision_plugin=plugin, **kwargs)
        plugin.strategy = self

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel)
                                                      for m in model.modules()):
            kwargs = dict(self.kwargs)
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                             mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy,
                                             device_id=torch.device("cpu"), **kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning would warn that it is unused
        return super()._setup_model(model)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        old = path.with_name(path.name + ".old")
        if self.global_rank == 0:
            _remove(partial)
        self.barrier("sharded_save_start")
        callbacks = checkpoint.get("callbacks")
        super().save_checkpoint(checkpoint, partial, storage_options)
        if self.global_rank > 0 and callbacks:  # rank 0's are in meta.pt
            torch.save(callbacks, partial / RANK_CALLBACKS.format(rank=self.global_rank))
        self.barrier("sharded_save_written")
        if self.global_rank == 0:
            keep = path.with_name(PREVIOUS_NAME) if path.name == LAST_NAME else old
            if path.exists():  # the one before is kept whole (last-previous.ckpt) for a damaged last.ckpt
                _remove(keep)
                path.rename(keep)
            partial.rename(path)
            _fsync_dir(path.parent)
            _remove(old)  # for last.ckpt: left by a version that swapped through last.ckpt.old
        self.barrier("sharded_save_done")


    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        own = Path(self.broadcast(str(checkpoint_path))) / RANK_CALLBACKS.format(rank=self.global_rank)
        if self.global_rank > 0 and own.is_file():
            checkpoint["callbacks"] = torch.load(own, map_location="cpu", weights_only=True)
        return checkpoint


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
