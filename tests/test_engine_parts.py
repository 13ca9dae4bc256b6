"""Optimizer/schedule factories, the EMA callback and the non-finite guard, on tiny real Lightning runs."""
from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterable
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ostinato.engine.callbacks import PreemptionCheckpoint
from ostinato.engine.ema import EMA
from ostinato.store.checkpoint import ema_weights_from_checkpoint
from ostinato.families.guard import NonFiniteError, NonFiniteGuard, grads_finite
from ostinato.families.optim import build_optimizer, build_scheduler, lr_factor

# ---------------------------------------------------------------- helpers


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _trainer(callbacks: list[L.Callback], max_steps: int, **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


class Regression(L.LightningModule):
    """``model`` is averaged by the EMA; ``disc`` trains too but is never averaged."""

    def __init__(self, nan_at: Iterable[int] = (), inf_grad_at: Iterable[int] = (),
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.disc = nn.Linear(4, 1)
        self.nan_at, self.inf_grad_at, self.weight_decay = set(nan_at), set(inf_grad_at), weight_decay
        self.val_records: list[tuple[int, Tensor]] = []

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y) + nn.functional.mse_loss(self.disc(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        return loss * float("nan") if self.global_step in self.nan_at else loss

    def on_after_backward(self) -> None:
        if self.global_step in self.inf_grad_at:
            self.model[0].weight.grad[0, 0] = float("inf")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_records.append((self.global_step, self.model[0].weight.detach().clone()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=self.weight_decay)


class TwoOptimizers(Regression):
    """Manual optimization, GAN-style: one optimizer for ``model``, one for ``disc``."""

    def __init__(self, nan_model_at_batches: Iterable[int] = ()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.nan_model_at_batches = set(nan_model_at_batches)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt_model, opt_disc = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        if batch_idx in self.nan_model_at_batches:
            loss = loss * float("nan")
        opt_model.zero_grad()
        self.manual_backward(loss)
        opt_model.step()
        opt_disc.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.disc(x), y))
        opt_disc.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(self.model.parameters(), lr=0.05, weight_decay=0.1),
                torch.optim.AdamW(self.disc.parameters(), lr=0.05)]


class Recorder(L.Callback):
    """Snapshots of every parameter before and after each training batch."""

    def __init__(self) -> None:
        self.before: list[dict[str, Tensor]] = []
        self.after: list[dict[str, Tensor]] = []
        self.steps: list[int] = []

    @staticmethod
    def _snapshot(pl_module: L.LightningModule) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.before.append(self._snapshot(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.after.append(self._snapshot(pl_module))
        self.steps.append(trainer.global_step)


def _manual_ema(start: Tensor, raw: list[Tensor], decay: float, first_update: int = 0) -> Tensor:
    shadow = start.clone()
    for n, weight in enumerate(raw, start=first_update):
        d = min(decay, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * weight
    return shadow


# ---------------------------------------------------------------- optim


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _options_by_name(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    names = {id(p): n for n, p in net.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in out, "a parameter is in two groups"
            out[names[id(p)]] = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
    return out


def test_no_decay_grouping_and_frozen_params() -> None:
    net = Net()
    opt = build_optimizer(net, OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}))
    assert isinstance(opt, torch.optim.AdamW)
    wd = {n: o["weight_decay"] for n, o in _options_by_name(net, opt).items()}
    assert wd == {"embed.weight": 0.0, "proj.weight": 0.1, "proj.bias": 0.0, "norm.weight": 0.0,
                  "norm.bias": 0.0, "head.weight": 0.1, "head.bias": 0.0}
    assert opt.defaults["fused"] in (None, False)  # CPU params: not fused


def test_no_decay_patterns_can_be_replaced() -> None:
    net = Net()
    opt = build_optimizer(net, {"lr": 1e-3, "weight_decay": 0.1, "no_decay": ["head.*"]})
    wd = {n: o["weight_decay"] for n, o in _options_by_name(net, opt).items()}
    assert wd["embed.weight"] == 0.1 and wd["head.weight"] == 0.0 and wd["proj.bias"] == 0.0


def test_param_group_overrides_first_match_wins() -> None:
    net = Net()
    cfg = {"lr": 1e-3, "weight_decay": 0.1, "param_groups": [
        {"params": "head.weight", "lr": 5e-3},
        {"params": "head.*", "lr": 1e-2},
        {"params": "embed.*", "weight_decay": 0.5},
    ]}
    options = _options_by_name(net, build_optimizer(net, cfg))
    assert options["head.weight"] == {"lr": 5e-3, "weight_decay": 0.1}
    assert options["head.bias"] == {"lr": 1e-2, "weight_decay": 0.0}
    assert options["embed.weight"] == {"lr": 1e-3, "weight_decay": 0.5}
    assert options["proj.weight"] == {"lr": 1e-3, "weight_decay": 0.1}
    assert "frozen.weight" not in options


def test_sgd_and_adam() -> None:
    sgd = build_optimizer(Net(), {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    adam = build_optimizer(Net(), {"name": "adam", "lr": 0.1, "betas": [0.8, 0.9], "eps": 1e-6})
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["eps"] == 1e-6


def test_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match=r"optim\.name='lion'.*adamw, adam, sgd"):
        build_optimizer(Net(), {"name": "lion", "lr": 1e-3})
    opt = build_optimizer(Net(), {"lr": 1e-3})
    with pytest.raises(ValueError, match=r"optim\.schedule\.name='step'.*cosine"):
        build_scheduler(opt, {"name": "step"}, 100)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, {"name": "cosine", "warmup_steps": 10}, None)


@pytest.mark.parametrize(("name", "step", "expected"), [
    ("cosine", 0, 0.0), ("cosine", 5, 0.5), ("cosine", 10, 1.0),
    ("cosine", 60, 0.1 + 0.9 * 0.5), ("cosine", 35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", 110, 0.1), ("cosine", 500, 0.1),
    ("linear", 60, 1 - 0.9 * 0.5), ("linear", 110, 0.1),
    ("inverse_sqrt", 0, 0.0), ("inverse_sqrt", 5, 0.5), ("inverse_sqrt", 10, 1.0),
    ("inverse_sqrt", 40, 0.5), ("inverse_sqrt", 1000, 0.1),
    ("constant", 0, 0.0), ("constant", 5, 0.5), ("constant", 10, 1.0), ("constant", 10_000, 1.0),
])
def test_lr_factor(name: str, step: int, expected: float) -> None:
    got = lr_factor(step, name, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert got == pytest.approx(expected, abs=1e-12)


def test_inverse_sqrt_without_warmup_starts_at_lr() -> None:
    assert [lr_factor(s, "inverse_sqrt") for s in (0, 1, 4, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.1])


def test_scheduler_steps_the_learning_rate() -> None:
    net = Net()
    opt = build_optimizer(net, {"lr": 0.2})
    assert build_scheduler(opt, {}, 100) is None
    assert build_scheduler(opt, {"name": "constant", "warmup_steps": 0}, 100) is None
    cfg = OmegaConf.create({"lr": 0.2, "schedule": {"name": "cosine", "warmup_steps": 2, "total_steps": 6}})
    config = build_scheduler(opt, cfg, total_steps=1000)  # the schedule's total_steps overrides
    assert config is not None and config["interval"] == "step"
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        config["scheduler"].step()
    cos = [0.2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert lrs == pytest.approx([0.0, 0.1, *cos])


# ---------------------------------------------------------------- EMA


@pytest.mark.parametrize(("every_n_steps", "start_step"), [(1, 0), (2, 3)])
def test_ema_matches_a_manual_average_of_the_chosen_submodule(every_n_steps: int, start_step: int) -> None:
    module, recorder = Regression(), Recorder()
    initial = module.model[0].weight.detach().clone()
    ema = EMA(modules=["model"], decay=0.9, every_n_steps=every_n_steps, start_step=start_step)
    _trainer([ema, recorder], max_steps=7).fit(module, _loader())

    assert set(ema.shadow) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    chosen = [snap["model.0.weight"] for snap, step in zip(recorder.after, recorder.steps)
              if step >= start_step and step % every_n_steps == 0]
    assert ema.updates == len(chosen) == (7 if every_n_steps == 1 else 2)
    expected = _manual_ema(initial, chosen, decay=0.9)
    torch.testing.assert_close(ema.shadow["model.0.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema.shadow["model.0.weight"], module.model[0].weight)
    torch.testing.assert_close(module.model[0].weight, recorder.after[-1]["model.0.weight"])


def test_validation_sees_ema_weights_and_training_continues_raw() -> None:
    module, recorder = Regression(), Recorder()
    initial = module.model[0].weight.detach().clone()
    ema = EMA(modules=["model"], decay=0.9)
    trainer = _trainer([ema, recorder], max_steps=6, val_check_interval=3, limit_val_batches=1,
                       num_sanity_val_steps=1)
    trainer.fit(module, _loader(n=32), _loader())

    assert [step for step, _ in module.val_records] == [0, 3, 6]
    raw = [snap["model.0.weight"] for snap in recorder.after]
    torch.testing.assert_close(module.val_records[0][1], initial)  # sanity check: EMA == initial weights
    for step, seen in module.val_records[1:]:
        torch.testing.assert_close(seen, _manual_ema(initial, raw[:step], decay=0.9), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(seen, raw[step - 1])
    for i in range(1, len(recorder.before)):  # each step starts from the previous step's raw weights
        torch.testing.assert_close(recorder.before[i]["model.0.weight"], recorder.after[i - 1]["model.0.weight"])
    torch.testing.assert_close(module.model[0].weight, raw[-1])


def test_ema_updates_once_per_batch_with_two_manual_optimizers() -> None:
    module = TwoOptimizers()
    ema = EMA(modules=["model"], decay=0.99)
    trainer = _trainer([ema], max_steps=8)
    trainer.fit(module, _loader())
    assert trainer.global_step == 8 and ema.updates == 4
    assert not any(name.startswith("disc.") for name in ema.shadow)


def test_ema_skips_batches_that_only_accumulate_gradients() -> None:
    ema = EMA(modules=["model"], decay=0.99)
    trainer = _trainer([ema], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(Regression(), _loader(n=32))
    assert trainer.global_step == 3 and ema.updates == 3


def test_missing_submodule_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no submodule 'generator'.*model, disc"):
        _trainer([EMA(modules=["generator"])], max_steps=1).fit(Regression(), _loader())


def test_frozen_params_and_integer_buffers_are_not_averaged() -> None:
    module = Regression()
    module.model.append(nn.BatchNorm1d(1))
    module.model[0].requires_grad_(False)
    ema = EMA(modules=["model"])
    ema._bind(module)
    assert set(ema.shadow) == {"model.2.weight", "model.2.bias", "model.3.weight", "model.3.bias",
                               "model.3.running_mean", "model.3.running_var"}


def test_tied_weights_share_one_shadow() -> None:
    module = Regression()
    module.model.append(nn.Linear(8, 1))
    module.model[3].weight = module.model[2].weight
    ema = EMA(modules=["model"], decay=0.5, warmup=False)
    ema._bind(module)
    assert ema.aliases == {"model.3.weight": "model.2.weight"} and "model.3.weight" not in ema.shadow
    with torch.no_grad():
        module.model[2].weight.add_(1.0)
    ema.update()
    state = ema.ema_state_dict(module)
    torch.testing.assert_close(state["model.3.weight"], state["model.2.weight"])
    torch.testing.assert_close(state["model.2.weight"], module.model[2].weight - 0.5)


def test_ema_checkpoint_round_trip_and_resume(tmp_path: Any) -> None:
    module, ema = Regression(), EMA(modules=["model"], decay=0.9)
    trainer = _trainer([ema, NonFiniteGuard()], max_steps=4)
    trainer.fit(module, _loader())
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=True)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("EMA")]
    state = ckpt["callbacks"][key]
    assert state["updates"] == 4 and state["modules"] == ["model"]
    weights = ema_weights_from_checkpoint(ckpt)
    assert weights is not None and set(weights) == set(ckpt["state_dict"])
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(weights[name], shadow)
        torch.testing.assert_close(ckpt["state_dict"][name], module.state_dict()[name])  # raw weights stay raw
    assert not torch.equal(weights["model.0.weight"], ckpt["state_dict"]["model.0.weight"])
    torch.testing.assert_close(weights["disc.weight"], ckpt["state_dict"]["disc.weight"])
    for name, value in ema.ema_state_dict(module).items():
        torch.testing.assert_close(value, weights[name])
    assert ema_weights_from_checkpoint({"state_dict": ckpt["state_dict"], "callbacks": {}}) is None

    resumed, ema2, recorder = Regression(), EMA(modules=["model"], decay=0.9), Recorder()
    _trainer([ema2, recorder], max_steps=6).fit(resumed, _loader(), ckpt_path=path)
    assert ema2.updates == 6
    raw = [snap["model.0.weight"] for snap in recorder.after]
    expected = _manual_ema(state["shadow"]["model.0.weight"], raw, decay=0.9, first_update=4)
    torch.testing.assert_close(ema2.shadow["model.0.weight"], expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_saved_during_validation_keeps_raw_weights(tmp_path: Any) -> None:
    saved: dict[str, dict[str, Any]] = {}

    class SaveInValidation(L.Callback):
        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.global_step == 4:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                saved["live"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    module, ema = Regression(), EMA(modules=["model"], decay=0.9)
    _trainer([ema, SaveInValidation()], max_steps=4, limit_val_batches=1).fit(module, _loader(), _loader())
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    torch.testing.assert_close(saved["live"]["model.0.weight"], ema.shadow["model.0.weight"])  # swapped in
    torch.testing.assert_close(ckpt["state_dict"]["model.0.weight"], module.model[0].weight)  # raw on disk


# ---------------------------------------------------------------- guard


def _changed(recorder: Recorder, i: int, prefix: str = "") -> bool:
    before, after = recorder.before[i], recorder.after[i]
    return any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix))


def test_guard_skips_a_nan_loss_update_and_training_goes_on() -> None:
    module, guard, recorder = Regression(nan_at={2}, weight_decay=0.1), NonFiniteGuard(max_in_row=3), Recorder()
    trainer = _trainer([guard, recorder], max_steps=5)
    trainer.fit(module, _loader(n=32))
    assert trainer.global_step == 5
    assert [_changed(recorder, i) for i in range(5)] == [True, True, False, True, True]
    assert guard.skipped_total == 1 and guard.in_row == 0
    adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {4}  # the skipped update touched no optimizer state either
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_guard_catches_inf_gradients_with_a_finite_loss() -> None:
    module, guard, recorder = Regression(inf_grad_at={1}), NonFiniteGuard(), Recorder()
    _trainer([guard, recorder], max_steps=3).fit(module, _loader())
    assert [_changed(recorder, i) for i in range(3)] == [True, False, True]
    assert guard.skipped_total == 1


def test_guard_stops_after_max_in_row() -> None:
    module, guard = Regression(nan_at=set(range(100))), NonFiniteGuard(max_in_row=3)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"3 optimizer updates in a row .*up to step 2.*learning rate"):
        _trainer([guard], max_steps=50).fit(module, _loader())
    assert guard.skipped_total == 3
    for name, value in module.state_dict().items():
        assert torch.equal(value, initial[name])


def test_guard_with_manual_optimization() -> None:
    module, guard, recorder = TwoOptimizers(nan_model_at_batches={1}), NonFiniteGuard(max_in_row=2), Recorder()
    _trainer([guard, recorder], max_steps=6).fit(module, _loader())
    assert [_changed(recorder, i, "model.") for i in range(3)] == [True, False, True]
    assert [_changed(recorder, i, "disc.") for i in range(3)] == [True, True, True]
    assert guard.skipped_total == 1 and guard.in_row_by_optimizer == {0: 0, 1: 0}

    always = TwoOptimizers(nan_model_at_batches=set(range(100)))
    with pytest.raises(NonFiniteError, match="optimizer 0"):  # the finite disc updates do not reset the streak
        _trainer([NonFiniteGuard(max_in_row=2)], max_steps=50).fit(always, _loader())


def test_guard_under_a_grad_scaler_tolerates_its_overflows() -> None:
    fp16 = MixedPrecision("16-mixed", "cpu")  # a real GradScaler, starting at 65536: early steps overflow
    module, guard, recorder = Regression(nan_at={2}), NonFiniteGuard(max_in_row=2), Recorder()
    trainer = _trainer([guard, recorder], max_steps=8, plugins=[fp16])
    trainer.fit(module, _loader(n=64))
    assert trainer.global_step == 8 and guard.in_row == 0
    assert guard.skipped_total >= 3 and not _changed(recorder, 2)
    assert fp16.scaler is not None and fp16.scaler.get_scale() < 65536

    module, guard = Regression(nan_at=set(range(1000))), NonFiniteGuard(max_in_row=2)
    with pytest.raises(NonFiniteError, match="2 optimizer updates in a row"):
        _trainer([guard], max_steps=100, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(module, _loader(n=64))
    assert guard.skipped_total > 16  # only once the scale fell to 1 did the streak count


def test_guard_state_round_trip_and_finite_check() -> None:
    guard = NonFiniteGuard()
    guard.skipped_total, guard.in_row_by_optimizer = 7, {0: 2, 1: 0}
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert other.skipped_total == 7 and other.in_row == 2
    ok = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), torch.full((2,), 60000.0, dtype=torch.float16)]
    assert bool(grads_finite(ok)) and bool(grads_finite([]))
    assert not bool(grads_finite([*ok, torch.tensor([0.0, float("nan")])]))
    assert not bool(grads_finite([*ok, torch.tensor([float("-inf")], dtype=torch.bfloat16)]))


# ---------------------------------------------------------------- preemption checkpoint


class _SigtermAt(L.Callback):
    """Sends SIGTERM to this process once: between two batches (after PreemptionCheckpoint looked at its flag) or
    at the first validation batch: where Lightning's own SIGTERM handling would end the fit before any save."""

    def __init__(self, where: str, step: int = 2) -> None:
        self.where, self.step, self.sent = where, step, False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.where == "between_batches" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.where == "validation":
            self._send()


@pytest.mark.parametrize(("where", "saved_at"), [("between_batches", 3), ("validation", 5)])
def test_sigterm_anywhere_writes_the_checkpoint_at_the_next_batch_end(tmp_path: Any, where: str,
                                                                      saved_at: int) -> None:
    last = tmp_path / "last.ckpt"
    trainer = _trainer([PreemptionCheckpoint(last), _SigtermAt(where)], max_steps=20, limit_val_batches=2)
    with pytest.raises(SystemExit) as exit_:  # SIGTERM (scontrol requeue, preemption): save, then exit 0
        trainer.fit(Regression(), _loader(), _loader())
    assert exit_.value.code == 0
    assert torch.load(last, weights_only=True)["global_step"] == saved_at


def test_sigusr2_saves_then_hands_over_to_the_previous_handler(tmp_path: Any) -> None:
    """submitit's SIGUSR2 handler (the one installed before the fit) requeues the job: it runs after the save."""
    last, calls = tmp_path / "last.ckpt", []

    class Usr2(_SigtermAt):
        def _send(self) -> None:
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGUSR2)

    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(last.is_file()))
    try:
        trainer = _trainer([PreemptionCheckpoint(last), Usr2("between_batches")], max_steps=20)
        with pytest.raises(SystemExit) as exit_:
            trainer.fit(Regression(), _loader())
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert exit_.value.code == 1 and calls == [True]  # called once, with the checkpoint already on disk
    assert torch.load(last, weights_only=True)["global_step"] == 3
