"""Exponential moving average of chosen submodules' weights, as a Lightning callback.

Only the submodules named in ``modules`` are averaged (e.g. the generator of a GAN, never its discriminators
or frozen encoders). For each of them the callback keeps fp32 shadow copies of the trainable parameters and of
the floating-point persistent buffers, on the parameters' device, keyed by their ``pl_module.state_dict()``
names (``"model.conv.weight"``). Frozen parameters and integer buffers are not averaged.

After every optimizer step (``trainer.global_step`` advanced, which it may do twice per batch with two manual
optimizers: the shadow still moves once per batch), when ``global_step >= start_step`` and
``global_step % every_n_steps == 0``::

    d = min(decay, (1 + n) / (10 + n)) if warmup else decay      # n: EMA updates done so far
    shadow = d * shadow + (1 - d) * weight

The warmup keeps early averages from being dominated by the random initialisation.

Validation, test and predict run on the EMA weights when ``eval_with_ema`` (sanity check included); the raw
weights come back at the matching ``*_end`` hook, so training always continues from the raw weights and
checkpoints always hold raw weights under ``state_dict`` (the shadows go to the callback's state).

Distributed: under DDP every rank holds identical weights, so every rank computes identical shadows without
communication. Under FSDP the parameters are sharded and each rank only shadows its local shards; gathering a
full EMA state dict is not done here. A sharded checkpoint keeps each rank's shadows for that rank
(``engine.fsdp``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class EMA(L.Callback):
    """EMA of the submodules ``modules`` (dotted attribute names of the LightningModule)."""

    def __init__(self, modules: Sequence[str] = ("model",), decay: float = 0.999, every_n_steps: int = 1,
                 start_step: int = 0, warmup: bool = True, eval_with_ema: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"EMA every_n_steps must be >= 1, got {every_n_steps}")
        self.modules = [modules] if isinstance(modules, str) else [str(m) for m in modules]
        if not self.modules:
            raise ValueError("EMA needs at least one submodule name")
        self.decay = float(decay)
        self.every_n_steps = int(every_n_steps)
        self.start_step = int(start_step)
        self.warmup = bool(warmup)
        self.eval_with_ema = bool(eval_with_ema)
        self.updates = 0
        self.shadow: dict[str, Tensor] = {}
        self.aliases: dict[str, str] = {}  # tied weights: other state_dict name -> the shadowed name
        self._live: dict[str, Tensor] = {}
        self._backup: dict[str, Tensor] | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    # ----- binding to the LightningModule -----

    def _submodule(self, pl_module: L.LightningModule, name: str) -> torch.nn.Module:
        try:
            module = pl_module.get_submodule(name)
        except AttributeError:
            module = None
        if module is None:
            children = ", ".join(n for n, _ in pl_module.named_children()) or "(none)"
            raise ValueError(f"EMA: {type(pl_module).__name__} has no submodule {name!r}; "
                             f"its top-level submodules are: {children}")
        return module

    def _tracked(self, pl_module: L.LightningModule) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Averaged tensors by state_dict name, and aliases of tied ones."""
        in_state_dict = set(pl_module.state_dict(keep_vars=True))
        tracked: dict[str, Tensor] = {}
        aliases: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for prefix in self.modules:
            module = self._submodule(pl_module, prefix)
            params = module.named_parameters(prefix=prefix, remove_duplicate=False)
            buffers = module.named_buffers(prefix=prefix, remove_duplicate=False)
            candidates = [(n, p) for n, p in params if p.requires_grad]
            candidates += [(n, b) for n, b in buffers if b.is_floating_point()]
            for name, tensor in candidates:
                if name not in in_state_dict or name in tracked or name in aliases:
                    continue
                if id(tensor) in first_name:
                    aliases[name] = first_name[id(tensor)]
                else:
                    first_name[id(tensor)] = name
                    tracked[name] = tensor
        return tracked, aliases

    @torch.inference_mode(False)  # a bind during validate() must not create inference tensors
    @torch.no_grad()
    def _bind(self, pl_module: L.LightningModule) -> None:
        """(Re)attach to the module's tensors; create shadows on first use, apply a loaded state if pending."""
        self._live, self.aliases = self._tracked(pl_module)
        if not self._live:
            log.warning("EMA: %s have no trainable parameters or floating buffers; nothing is averaged",
                        self.modules)
        # Tensors unfrozen since the last bind start from their current value; frozen ones stop being averaged.
        self.shadow = {n: self.shadow[n] if n in self.shadow else t.detach().to(torch.float32, copy=True)
                       for n, t in self._live.items()}
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_state(pending)
        self._follow_devices()

    @torch.inference_mode(False)
    def _follow_devices(self) -> None:
        for name, tensor in self._live.items():
            if self.shadow[name].device != tensor.device:
                self.shadow[name] = self.shadow[name].to(tensor.device)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        missing = sorted(set(self._live) - set(shadow))
        unexpected = sorted(set(shadow) - set(self._live))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match modules {self.modules}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, tensor in self._live.items():
            value = shadow[name]
            if value.shape != tensor.shape:
                raise ValueError(f"EMA shadow {name!r} has shape {tuple(value.shape)}, "
                                 f"the module has {tuple(tensor.shape)}")
            self.shadow[name] = value.detach().to(device=tensor.device, dtype=torch.float32, copy=True)
        self.updates = int(state.get("updates", 0))

    # ----- averaging -----

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current weights."""
        names = list(self._live)
        if names:
            weights = [self._live[n].detach() for n in names]
            weights = [w if w.dtype == torch.float32 else w.float() for w in weights]
            torch._foreach_lerp_([self.shadow[n] for n in names], weights, 1.0 - self.current_decay())
        self.updates += 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bind(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step >= self.start_step and step % self.every_n_steps == 0:
            self.update()

    # ----- evaluating with the averaged weights -----

    @torch.no_grad()
    def swap_in(self, pl_module: L.LightningModule) -> None:
        """Load the EMA weights into the module, keeping the raw ones aside."""
        if self._backup is not None:
            return
        self._bind(pl_module)
        names = list(self._live)
        live = [self._live[n] for n in names]
        self._backup = {n: t.detach().clone() for n, t in zip(names, live)}
        if names:
            torch._foreach_copy_(live, [self.shadow[n] for n in names])

    @torch.no_grad()
    def swap_out(self) -> None:
        """Put the raw weights back (no-op when they are in place)."""
        if self._backup is None:
            return
        names = list(self._backup)
        if names:
            torch._foreach_copy_([self._live[n] for n in names], [self._backup[n] for n in names])
        self._backup = None

    def _eval_start(self, pl_module: L.LightningModule) -> None:
        if self.eval_with_ema:
            self.swap_in(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning has moved the module back to the CPU by now; the shadows follow to free accelerator memory.
        self._follow_devices()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.swap_out()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A checkpoint written while EMA weights are swapped in must still hold the raw weights.
        if self._backup is None or "state_dict" not in checkpoint:
            return
        state = checkpoint["state_dict"]
        for name, raw in self._named_with_aliases(self._backup).items():
            if name in state:
                state[name] = raw.to(device=state[name].device, dtype=state[name].dtype)

    # ----- state -----

    def _named_with_aliases(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(values)
        out.update({alias: values[name] for alias, name in self.aliases.items() if name in values})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {n: t.detach() for n, t in self.shadow.items()}, "updates": self.updates,
                "decay": self.decay, "modules": list(self.modules), "aliases": dict(self.aliases)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "shadow" not in state_dict:
            raise KeyError("EMA state has no 'shadow' entry")
        if not state_dict["shadow"]:  # saved before the shadows existed: nothing to restore
            self.updates = int(state_dict.get("updates", 0))
        elif self._live:
            self._apply_state(state_dict)
        else:
            self._pending = dict(state_dict)
            self.updates = int(state_dict.get("updates", 0))

    def ema_state_dict(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """``pl_module.state_dict()`` with the EMA values in place of the averaged entries."""
        if not self.shadow or self._pending is not None:
            self._bind(pl_module)
        state = pl_module.state_dict()
        for name, value in self._named_with_aliases(self.shadow).items():
            if name in state:
                state[name] = value.detach().to(device=state[name].device, dtype=state[name].dtype, copy=True)
        return state
