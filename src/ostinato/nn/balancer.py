"""EnCodec's gradient-norm loss balancer.

With several losses on the same decoder output ``y`` (mel, waveform L1, adversarial, feature matching...), plain
weights mix gradients whose scales differ by orders of magnitude and drift during training. The balancer instead
fixes each loss's *share of the gradient norm* at ``y``: with ``g_i = d loss_i / d y`` and ``n_i`` an EMA of
``||g_i||``, the gradient sent back through the network is

    ``sum_i total_norm * (w_i / sum_j w_j) * g_i / (n_i + epsilon)``

so ``w_i`` says what fraction of the update comes from loss ``i``, whatever the loss's own scale.

Caveats:

- ``input`` must require grad and every balanced loss must depend on it. Losses that do not pass through ``input``
  (e.g. the VQ commitment penalty, which only reaches the encoder) are not balanced: give them to ``backward`` as
  ``extra_loss`` (backpropagated in the same backward call), or backpropagate them yourself afterwards, in which
  case pass ``retain_graph=True`` if they share graph with ``input`` (the encoder does): the final backward frees it.
- The EMA is bias-corrected (the first call uses the current norms exactly) and, when ``torch.distributed`` is
  initialised with more than one rank, the current norms are averaged over ranks (weighted by batch size) before
  the EMA update, so every rank applies the same scales and keeps the same state. Every rank must then call
  ``backward`` with the same loss names, in step.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Balancer"]


class Balancer:
    """Gradient-norm balancer over losses that all depend on one tensor (the decoder output).

    Args:
        weights: loss name -> weight. A weight of 0 skips the loss (no gradient computed); losses given to
            ``backward`` must all be named here.
        balance_grads: rescale gradients to the weight ratios (True) or backprop ``sum_i w_i * loss_i`` (False).
        total_norm: norm of the summed balanced gradient, per batch item when ``per_batch_item``.
        ema_decay: decay of the norm EMA (1.0 gives a running mean over all calls).
        per_batch_item: measure norms per batch item (``grad[b]``) and average them, instead of over the batch.
        epsilon: added to the EMA norm before dividing.
        monitor: fill ``metrics`` with ``norm_{name}`` (EMA of the raw gradient norm at ``input``) and
            ``ratio_{name}`` (its share of the sum of those norms, i.e. how the losses would mix without balancing).

    Use ``state_dict()`` / ``load_state_dict()`` to checkpoint the EMA (it is not an ``nn.Module``, so it is
    neither moved nor cast by Lightning; its state follows ``input``'s device).
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        balance_grads: bool = True,
        total_norm: float = 1.0,
        ema_decay: float = 0.999,
        per_batch_item: bool = True,
        epsilon: float = 1e-12,
        monitor: bool = False,
    ) -> None:
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {dict(weights)}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"at least one loss weight must be > 0, got {dict(weights)}")
        if not 0.0 < ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in (0, 1], got {ema_decay}")
        self.weights = dict(weights)
        self.balance_grads = balance_grads
        self.total_norm = total_norm
        self.ema_decay = ema_decay
        self.per_batch_item = per_batch_item
        self.epsilon = epsilon
        self.monitor = monitor
        self._ema_sum: dict[str, Tensor] = {}
        self._ema_weight: dict[str, float] = {}
        self._metrics: dict[str, Tensor] = {}

    @property
    def metrics(self) -> dict[str, Tensor]:
        """Detached 0-dim tensors from the last ``backward`` when ``monitor`` (else empty)."""
        return dict(self._metrics)

    @property
    def ema_norms(self) -> dict[str, Tensor]:
        """Current bias-corrected EMA of each loss's gradient norm (0-dim fp32 tensors)."""
        return {k: self._ema_sum[k] / self._ema_weight[k] for k in self._ema_sum}

    def _update_ema(self, norms: dict[str, Tensor], count: int) -> dict[str, Tensor]:
        names = sorted(norms)  # the same order on every rank for the packed all_reduce
        current = torch.stack([norms[k] for k in names])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([current * count, current.new_tensor([float(count)])])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            current = packed[:-1] / packed[-1]
        for name, value in zip(names, current):
            prev = self._ema_sum.get(name)
            self._ema_sum[name] = value if prev is None else prev.to(value.device) * self.ema_decay + value
            self._ema_weight[name] = self._ema_weight.get(name, 0.0) * self.ema_decay + 1.0
        return {k: self._ema_sum[k] / self._ema_weight[k] for k in names}

    def backward(
        self,
        losses: Mapping[str, Tensor],
        input: Tensor,
        extra_loss: Tensor | None = None,
        backward_fn: Callable[..., Any] | None = None,
        retain_graph: bool = False,
    ) -> Tensor:
        """Backpropagate the balanced combination of ``losses`` through ``input``.

        Args:
            losses: name -> scalar loss, each a function of ``input`` (names must be in ``weights``).
            input: the tensor the losses share, e.g. the decoder output ``[B, C, T]``; must require grad. Its
                graph is kept (``retain_graph``) while the per-loss gradients are taken and freed by the final
                backward.
            extra_loss: an optional scalar added unweighted to the final backward (e.g. ``commit_weight *
                commitment_loss``), so that the whole generator update is a single backward call.
            backward_fn: how to run the final backward on a scalar; defaults to ``Tensor.backward``. Under Lightning
                manual optimization pass ``self.manual_backward`` (loss scaling for ``16-mixed``, strategy hooks).
            retain_graph: keep the graph after the final backward (passed as ``retain_graph=True`` to
                ``backward_fn``), needed when the caller backpropagates another loss sharing part of the graph
                afterwards, e.g. a commitment penalty through the encoder; ``extra_loss`` avoids that.

        Returns:
            Detached fp32 scalar ``sum_i scale_i * loss_i`` (the "effective loss", for logging), where ``scale_i``
            is the factor applied to ``g_i`` (``w_i`` when not balancing).

        The final backward is run on the surrogate scalar ``sum(input * out_grad) (+ extra_loss)``, whose gradient
        at ``input`` is exactly ``out_grad``; parameters behind ``input`` receive ``out_grad`` backpropagated.
        """
        if not input.requires_grad:
            raise ValueError("Balancer.backward: `input` must require grad (pass the decoder output, not a copy)")
        unknown = sorted(set(losses) - set(self.weights))
        if unknown:
            raise KeyError(f"losses {unknown} have no weight; known: {sorted(self.weights)}")
        active = {k: v for k, v in losses.items() if self.weights[k] > 0}
        if not active:
            raise ValueError("Balancer.backward: every given loss has weight 0")

        # bf16 / fp16 gradients are accumulated in fp32; fp32 / fp64 ones in their own dtype.
        acc_dtype = torch.promote_types(input.dtype, torch.float32)
        grads: dict[str, Tensor] = {}
        norms: dict[str, Tensor] = {}
        for name, loss in active.items():
            (grad,) = torch.autograd.grad(loss, [input], retain_graph=True, allow_unused=True)
            if grad is None:
                raise ValueError(f"loss {name!r} does not depend on `input`; backpropagate it separately")
            grad = grad.to(acc_dtype)
            if self.per_batch_item:
                norm = torch.linalg.vector_norm(grad.reshape(len(grad), -1), dim=1).mean()
            else:
                norm = torch.linalg.vector_norm(grad)
            grads[name], norms[name] = grad, norm.detach().float()

        count = len(input) if self.per_batch_item and input.dim() > 0 else 1
        ema = self._update_ema(norms, count)
        total_weight = sum(self.weights[k] for k in active)

        out_grad = torch.zeros_like(input, dtype=acc_dtype)
        effective = torch.zeros((), device=input.device, dtype=torch.float32)
        for name, grad in grads.items():
            if self.balance_grads:
                scale = self.total_norm * (self.weights[name] / total_weight) / (ema[name] + self.epsilon)
                out_grad.add_(grad * scale.to(acc_dtype))
            else:
                scale = torch.tensor(self.weights[name], device=input.device)
                out_grad.add_(grad, alpha=self.weights[name])
            effective = effective + scale * active[name].detach().float()

        self._metrics = {}
        if self.monitor:
            ema_total = sum(ema.values())
            for name in active:
                self._metrics[f"ratio_{name}"] = ema[name] / ema_total
                self._metrics[f"norm_{name}"] = ema[name]

        surrogate = (input.to(acc_dtype) * out_grad).sum()
        if extra_loss is not None:
            surrogate = surrogate + extra_loss
        kwargs = {"retain_graph": True} if retain_graph else {}
        if backward_fn is None:
            surrogate.backward(**kwargs)
        else:
            backward_fn(surrogate, **kwargs)
        return effective.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema_sum": {k: v.detach().cpu() for k, v in self._ema_sum.items()},
            "ema_weight": dict(self._ema_weight),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._ema_sum = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in state["ema_sum"].items()}
        self._ema_weight = {k: float(v) for k, v in state["ema_weight"].items()}
