"""Config checks that run before any training: every error names the key and says what fits.

Hydra already refuses overrides of unknown keys in the engine groups (struct mode); this module adds types
(dataclass schemas for the engine groups) and checks the ``family`` and ``data`` nodes against the signature
of their ``_target_``.
"""
from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ostinato.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message starts with the key."""


@dataclass
class TrainerSchema:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = 1000
    val_every_epochs: int = 1
    validate_first: bool = False
    limit_val_batches: float = 1.0
    sanity_val_steps: int = 0
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 25
    checkpoint_every_steps: int = 100
    keep_checkpoints: bool = False
    nonfinite_max_in_row: int = 10
    compile: list[str] = field(default_factory=list)
    activation_checkpointing: bool = False
    find_unused_parameters: bool = False
    fsdp_sharding: str = "FULL_SHARD"
    deterministic: bool = False
    progress_bar: bool = True
    model_summary: bool = True
    trust_checkpoints: bool = False


@dataclass
class ScheduleSchema:
    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: Optional[int] = None


@dataclass
class OptimSchema:
    name: str = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: Optional[bool] = None
    no_decay: Optional[list[str]] = None
    param_groups: list[Any] = field(default_factory=list)
    schedule: ScheduleSchema = field(default_factory=ScheduleSchema)


@dataclass
class EmaSchema:
    decay: float = 0.999
    modules: Optional[list[str]] = None
    every_n_steps: int = 1
    start_step: int = 0


@dataclass
class SamplesSchema:
    every_steps: int = 0
    max_items: int = 2


@dataclass
class EvaluateSchema:
    suite: Optional[str] = None
    every_steps: int = 0
    num_samples: int = 8


SCHEMAS = {"trainer": TrainerSchema, "optim": OptimSchema, "ema": EmaSchema, "samples": SamplesSchema,
           "evaluate": EvaluateSchema}
CHOICES = {"trainer.strategy": ("auto", "ddp", "fsdp"),
           "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
           "trainer.accelerator": ("auto", "cpu", "gpu", "cuda")}


def _check_schema(cfg: DictConfig, group: str) -> None:
    try:
        OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), cfg[group])
    except OmegaConfBaseException as e:
        key = f"{group}.{e.full_key}" if getattr(e, "full_key", None) else group
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None


def _accepts(value: Any, hint: Any) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    base = origin or hint
    if base in (list, tuple, Sequence, typing.Sequence) or base is Sequence:
        return isinstance(value, (list, tuple))
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    return True  # types we cannot judge from config values (paths, modules, ...)


def check_target(node: Any, key: str, provided: Sequence[str] = ()) -> None:
    """``node._target_`` must import, and the node's keys must match its ``__init__``: names, required
    arguments, and simple types. ``provided`` names arguments the engine passes itself."""
    if node is None or "_target_" not in node:
        raise ConfigError(f"{key}._target_ is missing: the class to build")
    try:
        cls = get_class(node._target_)
    except Exception as e:
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported: {e}") from None
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    values = OmegaConf.to_container(node, resolve=True)
    for name, value in values.items():
        if name.startswith("_"):
            continue
        if name not in params and not takes_any:
            allowed = ", ".join(n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
            raise ConfigError(f"{key}.{name}: unknown key for {cls.__name__}; it accepts: {allowed}")
        hint = hints.get(name, inspect.Parameter.empty)
        if name in params and not _accepts(value, hint):
            raise ConfigError(f"{key}.{name}={value!r}: expected {getattr(hint, '__name__', hint)} "
                              f"(for {cls.__name__})")
    for name, p in params.items():
        required = p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if required and name not in values and name not in provided:
            raise ConfigError(f"{key}.{name} is required by {cls.__name__}")


def validate(cfg: DictConfig) -> None:
    """All checks that need no data and no GPU; raises ConfigError naming the key."""
    for group in SCHEMAS:
        _check_schema(cfg, group)
    for key, allowed in CHOICES.items():
        group, name = key.split(".")
        value = str(cfg[group][name])
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: use one of {', '.join(allowed)}")
    _check_evaluate(cfg)
    check_target(cfg.data, "data")  # first: the family interpolates data values
    check_target(cfg.family, "family", provided=("optim",))
    world = int(cfg.trainer.devices if str(cfg.trainer.devices).isdigit() else 1) * int(cfg.trainer.num_nodes)
    check_global_batch(cfg, world)


def _check_evaluate(cfg: DictConfig) -> None:
    ev = cfg.evaluate
    if ev.suite is None:
        return
    if ev.every_steps <= 0:
        raise ConfigError(f"evaluate.every_steps={ev.every_steps}: set a period in steps (> 0) with evaluate.suite")
    from ostinato.evaluation.suite import load_suite

    try:
        suite = load_suite(ev.suite)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"evaluate.suite: {e}") from None
    if suite.kind != "text_to_music":
        raise ConfigError(f"evaluate.suite={ev.suite}: a {suite.kind} suite; the training evaluation generates "
                          "music, use a text_to_music suite")


def check_global_batch(cfg: DictConfig, world_size: int) -> None:
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.data.get(key)
        if value is not None and int(value) % world_size:
            raise ConfigError(f"data.{key}={value} does not divide over {world_size} ranks: the batch size is "
                              f"global, use a multiple of {world_size}")
