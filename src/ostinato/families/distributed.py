"""Gradient synchronisation for families that run several backward passes per step (GANs).

DDP's reducer expects one backward per forward; a GAN step has a discriminator and a generator backward, and
EnCodec's balancer adds gradient probes. Such families run their backward passes inside ``no_sync`` and
average the gradients themselves right before each optimizer step, as audiocraft does.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import lightning as L
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def no_sync(module: L.LightningModule) -> AbstractContextManager:
    """DDP's ``no_sync`` for the wrapped model when there is one, else a no-op context."""
    trainer = module._trainer
    wrapped = getattr(trainer.strategy, "model", None) if trainer is not None else None
    return wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) else nullcontext()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` over all ranks, flattened into one buffer per dtype."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:  # keep the set identical on every rank: a missing grad counts as zero
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
