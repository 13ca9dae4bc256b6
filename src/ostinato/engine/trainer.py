"""A Lightning ``Trainer`` from the ``trainer`` config group, wired to the XP folder and dora."""
from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy

from ostinato.engine.callbacks import AudioSamples, DoraHistory, PreemptionCheckpoint, Throughput
from ostinato.engine.checkpoint_io import SafeCheckpointIO
from ostinato.engine.console import OneLineSummary, StepProgressBar
from ostinato.store.checkpoint import (LAST_NAME, checkpoint_damage, is_checkpoint,
                                        older_checkpoints, set_aside, sweep_temp_files)
from ostinato.engine.cluster import DoraEnvironment
from ostinato.engine.ema import EMA
from ostinato.families.base import FamilyModule
from ostinato.engine.fsdp import ShardedFSDPStrategy, remember_parameter_ndims
from ostinato.families.guard import NonFiniteGuard
from ostinato.errors import UserError
from ostinato.nn.transformer import prefer_cudnn_attention

log = logging.getLogger(__name__)


def checkpoint_dir(folder: Path) -> Path:
    return Path(folder) / "checkpoints"


def last_checkpoint(folder: Path, set_aside_damaged: bool = False) -> Path | None:
    """The checkpoint a run of this XP resumes from: ``checkpoints/last.ckpt`` (a file, or a directory of FSDP
    shards) when whole, else the most recent whole one before it (``last-previous.ckpt``, ``step*.ckpt``, a
    sharded ``last.ckpt.old``), else None.

    ``set_aside_damaged`` (rank 0, before training): rename each damaged one passed over to
    ``NAME.damaged-TIMESTAMP`` and say so in one log line. Other ranks pass over the same files without renaming:
    every rank resumes from the same checkpoint."""
    ckpt_dir = checkpoint_dir(folder)
    last = ckpt_dir / LAST_NAME
    candidates = ([last] if is_checkpoint(last) else []) + older_checkpoints(ckpt_dir, exclude=last)
    damaged: list[tuple[Path, str]] = []
    chosen = None
    for candidate in candidates:
        damage = checkpoint_damage(candidate)
        if damage is None:
            chosen = candidate
            break
        damaged.append((candidate, damage))
    if set_aside_damaged:
        then = (f"resuming from {chosen.name}" if chosen is not None else
                "no whole checkpoint is left, so training starts from scratch")
        for path, damage in damaged:
            log.warning("checkpoint %s is damaged (%s): set aside as %s; %s", path, damage, set_aside(path).name,
                        then)
    return chosen


def check_resume_fits(path: Path, family: torch.nn.Module) -> None:
    """Refuse, in one line naming its family, a checkpoint whose weights do not fit ``family`` (one copied in from
    another XP), before Lightning's strict load would fail with a page of keys. Reads names and shapes only
    (memory-mapped); a sharded checkpoint or one that needs trust is left to Lightning."""
    from ostinato.store.records import CONFIG_KEY

    if Path(path).is_dir():
        return
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        theirs, own = ckpt["state_dict"], family.state_dict()
        if hasattr(family, "checkpoint_state"):  # what its checkpoints hold (a LoRA run: the adapters)
            own = family.checkpoint_state(own)
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        shapes = sorted(k for k in set(own) & set(theirs) if tuple(own[k].shape) != tuple(theirs[k].shape))
    except Exception:  # noqa: BLE001 - anything unusual (lazy modules, odd files): Lightning's own load reports it
        return
    if not (missing or unexpected or shapes):
        return
    target = ((ckpt.get(CONFIG_KEY) or {}).get("family") or {}).get("_target_")
    which = f"a checkpoint of family {target.rsplit('.', 1)[-1]}" if target else "a checkpoint of another model"
    counts = ", ".join(f"{len(keys)} {what}, e.g. {keys[0]}" for what, keys in
                       (("tensors of another shape", shapes), ("missing", missing), ("unexpected", unexpected)) if keys)
    raise UserError(f"{path} does not fit this XP's model ({which}; {counts}): move it out of {Path(path).parent} "
                    "to start afresh, or give it as continue_from= to load what fits")


def sweep_checkpoint_temp_files(folder: Path) -> None:
    """Remove the temp files of checkpoint writes a killed run left (rank 0, before training), in one log line."""
    count, size = sweep_temp_files(checkpoint_dir(folder))
    if count:
        log.info("removed %d temp file%s (%.1f MB) left in %s by interrupted checkpoint writes", count,
                 "s" if count > 1 else "", size / 1e6, checkpoint_dir(folder))


class BF16MixedPrecision(MixedPrecision):
    """Lightning's ``bf16-mixed``, with gradient clipping also for optimizers that would unscale gradients
    themselves (fused AdamW): Lightning refuses those in any mixed precision, but bf16 has no grad scaler, so
    there is nothing to unscale and clipping is exact."""

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    def clip_gradients(self, optimizer: Any, clip_val: int | float = 0.0, gradient_clip_algorithm: Any = None) -> None:
        from lightning.pytorch.utilities import GradClipAlgorithmType

        algorithm = gradient_clip_algorithm or GradClipAlgorithmType.NORM
        Precision.clip_gradients(self, optimizer, clip_val, algorithm)


def _precision_plugin(cfg: Any, accelerator: str) -> Precision | None:
    if cfg.precision == "bf16-mixed" and cfg.strategy != "fsdp":
        return BF16MixedPrecision("cuda" if accelerator in ("gpu", "cuda") else "cpu")
    return None


def _strategy(cfg: Any, family: FamilyModule, env: DoraEnvironment | LightningEnvironment,
              accelerator: str) -> Strategy | str:
    name = cfg.strategy
    plugins: dict[str, Any] = {"cluster_environment": env}
    backend = "nccl" if accelerator == "gpu" else "gloo"
    # a rank whose peers' node is gone without closing its sockets waits this long in a collective (torch: 30 min)
    plugins["timeout"] = timedelta(seconds=float(cfg.collective_timeout))
    if name == "ddp":
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=cfg.find_unused_parameters,
                           checkpoint_io=SafeCheckpointIO(cfg.trust_checkpoints),
                           precision_plugin=_precision_plugin(cfg, accelerator), **plugins)
    if name == "fsdp":
        blocks = family.block_classes()
        remember_parameter_ndims(family)
        return ShardedFSDPStrategy(precision=cfg.precision, auto_wrap_policy=blocks or None,
                                   process_group_backend=backend,
                                   activation_checkpointing_policy=blocks if cfg.activation_checkpointing else None,
                                   sharding_strategy=cfg.fsdp_sharding, state_dict_type="sharded", **plugins)
    if name == "auto":
        return "auto"
    raise ValueError(f"trainer.strategy={name!r}: use auto, ddp or fsdp")


def apply_compile_and_checkpointing(cfg: Any, family: FamilyModule) -> None:
    """``trainer.compile``: submodules to ``torch.compile`` (a ``ModuleList`` such as ``lm.layers``: each of its
    blocks, which share one compiled graph); ``activation_checkpointing`` for DDP/single."""
    for name in cfg.compile or []:
        try:
            module = family.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in family.named_children()) or "none"
            raise UserError(f"trainer.compile: {name!r} is no submodule of this {type(family).__name__} (its "
                            f"children: {children}); name one, e.g. model.lm.layers for a MusicGen") from None
        targets = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        for target in targets:
            target.compile()
        log.info("torch.compile(%s)%s", name, f": {len(targets)} blocks" if len(targets) > 1 else "")
    if cfg.activation_checkpointing and cfg.strategy != "fsdp":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        blocks = tuple(family.block_classes())
        if not blocks:
            raise ValueError("trainer.activation_checkpointing=true but this family declares no block_classes()")
        apply_activation_checkpointing(family, check_fn=lambda m: isinstance(m, blocks))


class LastStepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, which also writes ``last.ckpt`` when training ends past the last one it wrote:
    Lightning writes it at the end only when it wrote none, so a run whose ``max_steps`` (or ``max_time`` stop) fell
    between two ``checkpoint_every_steps`` lost its last steps, and its rerun trained them again."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)


def _max_time(cfg: Any) -> timedelta | None:
    """``trainer.max_time`` (minutes, or null) as Lightning's ``max_time``: training stops at the first batch end
    past it (checkpointed as at any stop), so a run fits a wall-clock budget whatever its steps per second."""
    minutes = cfg.get("max_time") if hasattr(cfg, "get") else getattr(cfg, "max_time", None)
    return None if minutes is None else timedelta(minutes=float(minutes))


def build_trainer(cfg: Any, folder: Path, family: FamilyModule, xp: Any | None = None,
                  loggers: list | None = None, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """``cfg`` is the whole resolved config; ``folder`` the XP folder (default_root_dir). ``extra_callbacks``: the
    floors above the engine's own (``ostinato.train`` adds the evaluation callback of ``evaluate.suite``)."""
    t = cfg.trainer
    # dora's processes (run -d, SLURM tasks) or Lightning's own; never Lightning's SLURM requeue (submitit's)
    dora_env = DoraEnvironment() if DoraEnvironment.detect() else None
    env = dora_env or LightningEnvironment()
    if dora_env is not None:  # where each rank runs and meets the others: the first thing to read when ranks hang
        log.info("rank %d of %d on host %s (node %d of %d); rendezvous at %s:%d", dora_env.global_rank(),
                 dora_env.world_size(), socket.gethostname(), dora_env.node_rank(), dora_env.num_nodes,
                 dora_env.main_address, dora_env.main_port)
    accelerator = t.accelerator if t.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    # cuDNN attention for the self-attention on Hopper GPUs, except under FSDP: there it spent ~19 ms of host time
    # per call on MusicGen-large (its execution plan rebuilt every call; torch 2.11, cuDNN 9.19), flash does not
    if prefer_cudnn_attention(accelerator in ("gpu", "cuda") and t.strategy != "fsdp"):
        log.info("attention: cuDNN SDPA first for the self-attention")
    devices, num_nodes = (dora_env.devices_per_node, dora_env.num_nodes) if dora_env else (t.devices, t.num_nodes)
    ckpt_dir = checkpoint_dir(folder)
    callbacks: list[L.Callback] = [
        LastStepCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                        every_n_train_steps=t.checkpoint_every_steps, save_last=True,
                        save_top_k=-1 if t.keep_checkpoints else 0, save_on_train_epoch_end=True,
                        enable_version_counter=False),  # a last.ckpt from elsewhere is overwritten, not kept beside
        NonFiniteGuard(max_in_row=t.nonfinite_max_in_row),
        Throughput(),
        PreemptionCheckpoint(ckpt_dir / "last.ckpt"),
    ]
    if cfg.ema.decay > 0:
        callbacks.append(EMA(modules=cfg.ema.modules or family.ema_modules, decay=cfg.ema.decay,
                             every_n_steps=cfg.ema.every_n_steps, start_step=cfg.ema.start_step))
    if cfg.samples.every_steps > 0:
        callbacks.append(AudioSamples(Path(folder) / "samples", cfg.samples.every_steps, cfg.samples.max_items))
    callbacks += list(extra_callbacks)
    if xp is not None:
        callbacks.append(DoraHistory(xp))
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if t.progress_bar:
        callbacks.append(StepProgressBar())
    if t.model_summary:
        callbacks.append(OneLineSummary())
    if not family.automatic_optimization:  # Lightning clips only automatic optimization; the family clips itself
        family.manual_gradient_clip = float(t.gradient_clip_val or 0)
    plugins: list[Any] = []
    strategy = _strategy(t, family, env, accelerator)
    precision: str | None = t.precision
    if strategy == "auto":
        plugins += [SafeCheckpointIO(t.trust_checkpoints), env]
        plugin = _precision_plugin(t, accelerator)
        if plugin is not None:
            plugins.append(plugin)
            precision = None  # given by the plugin
    return L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, plugins=plugins,
        precision=precision, max_steps=t.max_steps, max_epochs=-1, max_time=_max_time(t),
        check_val_every_n_epoch=t.val_every_epochs, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.sanity_val_steps,
        gradient_clip_val=(t.gradient_clip_val or None) if family.automatic_optimization else None,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(folder), logger=loggers or False, callbacks=callbacks,
        enable_progress_bar=t.progress_bar, enable_model_summary=t.model_summary,
        use_distributed_sampler=False, deterministic=t.deterministic, benchmark=None,
        inference_mode=False)  # no_grad evaluation: states created there (EMA, metrics) stay trainable tensors
