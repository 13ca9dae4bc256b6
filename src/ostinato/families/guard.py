"""Skip optimizer updates whose loss or gradients are not finite; stop after too many in a row.

``NonFiniteGuard`` runs in ``on_before_optimizer_step``, i.e. after backward (and after AMP unscaling) and
before gradient clipping and ``optimizer.step()``, with automatic and manual optimization alike. A NaN/inf
loss shows up as non-finite gradients, so the gradients are what is checked (a non-finite loss term that
does not depend on any parameter leaves finite gradients and a harmless update). On a bad update it sets
``p.grad = None`` for every parameter of that optimizer: torch optimizers then leave those parameters alone
entirely (no step, no momentum update, no weight decay). Under a GradScaler (``16-mixed``) the grads are left
untouched because the scaler already skips a step with non-finite grads (and halves its scale); such a step
counts in ``skipped_total`` but extends the streak only once the scale is down to 1 or less, since overflows
at a large scale are the scaler's normal way of finding its scale (about 16 halvings from the default 65536).

The check is one fused ``torch._foreach_norm`` (L2, in fp32) per device and dtype: the sum of the norms is
finite exactly when every gradient is, except that an fp32 overflow of a norm (gradients around 1e19) also
counts as non-finite. It costs one host sync per step. In distributed runs the verdict is all-reduced (MIN),
so every rank skips the same updates (FSDP ranks see different gradient shards).

Counters: ``skipped_total`` (all optimizers) and ``in_row`` (the longest current streak of any one optimizer);
both are saved in the checkpoint. ``max_in_row`` bad updates in a row of one optimizer raise ``NonFiniteError``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many optimizer updates in a row had a non-finite loss or gradients."""


def grads_finite(grads: Iterable[Tensor], device: torch.device | str = "cpu") -> Tensor:
    """A 0-dim bool tensor: True when every element of every gradient is finite (True for no gradients)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        g = g.coalesce().values() if g.is_sparse else g
        groups.setdefault((g.device, g.dtype), []).append(g)
    if not groups:
        return torch.ones((), dtype=torch.bool, device=device)
    sums = [torch.stack(torch._foreach_norm(gs, 2.0, dtype=torch.float32)).sum() for gs in groups.values()]
    first = sums[0].device
    return torch.stack([s.to(first) for s in sums]).sum().isfinite()


def _all_ranks_agree(finite: Tensor) -> bool:
    if dist.is_available() and dist.is_initialized():
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(finite.item())


def _grad_scale(trainer: L.Trainer) -> float | None:
    """The loss scale of an enabled GradScaler (``16-mixed``), else None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


class NonFiniteGuard(L.Callback):
    """Skip non-finite optimizer updates; raise ``NonFiniteError`` after ``max_in_row`` in a row."""

    def __init__(self, max_in_row: int = 10) -> None:
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be >= 1, got {max_in_row}")
        self.max_in_row = int(max_in_row)
        self.skipped_total = 0
        self.in_row_by_optimizer: dict[int, int] = {}

    @property
    def in_row(self) -> int:
        return max(self.in_row_by_optimizer.values(), default=0)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = grads_finite((p.grad for p in params if p.grad is not None), device=pl_module.device)
        index = _optimizer_index(trainer, optimizer)
        if _all_ranks_agree(finite):
            self.in_row_by_optimizer[index] = 0
            return
        scale = _grad_scale(trainer)
        if scale is None:
            for p in params:
                p.grad = None
        self.skipped_total += 1
        streak = self.in_row_by_optimizer.get(index, 0)
        if scale is None or scale <= 1.0:  # above 1, the overflow may be the scaler's own doing
            streak = self.in_row_by_optimizer[index] = streak + 1
        step = trainer.global_step
        if trainer.is_global_zero:
            log.warning("non-finite loss or gradients at step %d (optimizer %d%s): update skipped "
                        "(%d in a row, %d skipped in total)", step, index,
                        "" if scale is None else f", loss scale {scale:g}", streak, self.skipped_total)
        if streak >= self.max_in_row:
            raise NonFiniteError(
                f"{streak} optimizer updates in a row (optimizer {index}, up to step {step}) had a non-finite "
                f"loss or gradients; {self.skipped_total} updates were skipped in total. Try a lower learning "
                "rate, check the data for NaN/inf or degenerate items, enable gradient clipping "
                "(trainer.gradient_clip_val), or train in full precision (trainer.precision=32-true). "
                "The last good checkpoint is kept.")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.skipped_total:
            pl_module.log("train/nonfinite_skipped", float(self.skipped_total), reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "in_row_by_optimizer": dict(self.in_row_by_optimizer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.in_row_by_optimizer = {int(k): int(v) for k, v in state_dict.get("in_row_by_optimizer", {}).items()}


def _optimizer_index(trainer: L.Trainer, optimizer: Any) -> int:
    raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    for i, candidate in enumerate(trainer.optimizers):
        if candidate is raw:
            return i
    return 0
