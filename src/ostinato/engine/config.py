"""Config checks that run before any training: every error names the key and says what fits.

Hydra already refuses overrides of unknown keys in the engine groups (struct mode); this module adds types
(dataclass schemas for the engine groups) and checks the ``family`` and ``data`` nodes against the signature
of their ``_target_``.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal, Optional

from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ostinato.families.optim import OPTIMIZERS, SCHEDULES
from ostinato.errors import UserError, did_you_mean


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message starts with the key."""


# The engine groups' schemas: names and types only. Their values live in conf/ alone (conf/trainer/default.yaml,
# conf/optim/*.yaml, the ema/samples/evaluate nodes of conf/config.yaml); every field is required there
# (tests/test_engine_units.py::test_engine_schemas_declare_types_and_conf_holds_every_value). A schema only
# checks the composed config: it is never merged into it.
@dataclass
class TrainerSchema:
    accelerator: str = MISSING
    devices: Any = MISSING
    num_nodes: int = MISSING
    strategy: str = MISSING
    precision: str = MISSING
    max_steps: int = MISSING
    max_time: Optional[float] = MISSING
    val_every_epochs: int = MISSING
    validate_first: bool = MISSING
    limit_val_batches: float = MISSING
    sanity_val_steps: int = MISSING
    gradient_clip_val: float = MISSING
    accumulate_grad_batches: int = MISSING
    log_every_n_steps: int = MISSING
    checkpoint_every_steps: int = MISSING
    keep_checkpoints: bool = MISSING
    nonfinite_max_in_row: int = MISSING
    compile: list[str] = MISSING
    activation_checkpointing: bool = MISSING
    find_unused_parameters: bool = MISSING
    fsdp_sharding: str = MISSING
    collective_timeout: float = MISSING
    deterministic: bool = MISSING
    progress_bar: bool = MISSING
    model_summary: bool = MISSING
    trust_checkpoints: bool = MISSING


@dataclass
class ScheduleSchema:
    name: str = MISSING
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING
    total_steps: Optional[int] = MISSING


@dataclass
class OptimSchema:
    name: str = MISSING
    lr: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    fused: Optional[bool] = MISSING
    no_decay: Optional[list[str]] = MISSING
    param_groups: list[Any] = MISSING
    schedule: ScheduleSchema = field(default_factory=ScheduleSchema)  # the node's shape, not a value


@dataclass
class EmaSchema:
    decay: float = MISSING
    modules: Optional[list[str]] = MISSING
    every_n_steps: int = MISSING
    start_step: int = MISSING


@dataclass
class SamplesSchema:
    every_steps: int = MISSING
    max_items: int = MISSING


@dataclass
class EvaluateSchema:
    suite: Optional[str] = MISSING
    every_steps: int = MISSING
    num_samples: int = MISSING


SCHEMAS = {"trainer": TrainerSchema, "optim": OptimSchema, "ema": EmaSchema, "samples": SamplesSchema,
           "evaluate": EvaluateSchema}
CHOICES = {"trainer.strategy": ("auto", "ddp", "fsdp"),
           "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
           "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
           "optim.name": OPTIMIZERS,
           "optim.schedule.name": SCHEDULES,
           "logger.kind": ("wandb", "csv", "tensorboard", "none")}
LENGTHS = {"optim.betas": 2}  # list values of a fixed length


@dataclass(frozen=True)
class Bound:
    """The range a number may take: ``Bound(gt=0)`` is > 0, ``Bound(ge=0, lt=1)`` is [0, 1)."""
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __contains__(self, value: float) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def __str__(self) -> str:
        low, high = (self.gt, self.ge), (self.lt, self.le)
        if any(v is not None for v in low) and any(v is not None for v in high):
            return (f"in {'(' if self.gt is not None else '['}{_num(self.gt if self.gt is not None else self.ge)}, "
                    f"{_num(self.lt if self.lt is not None else self.le)}{')' if self.lt is not None else ']'}")
        for sign, value in (("> ", self.gt), (">= ", self.ge), ("< ", self.lt), ("<= ", self.le)):
            if value is not None:
                return sign + _num(value)
        return "any number"


def _num(value: float | None) -> str:
    return f"{value:g}"


POSITIVE, NON_NEGATIVE, FRACTION = Bound(gt=0), Bound(ge=0), Bound(ge=0, le=1)
# The ranges of the engine's numbers; a key that is absent or null (a data module without it) is not checked.
# A list value (optim.betas) is checked element by element.
BOUNDS: dict[str, Bound] = {
    "seed": NON_NEGATIVE,
    "trainer.devices": POSITIVE,  # a number of devices; "auto" or a list of ids is not a number
    "trainer.num_nodes": POSITIVE,
    "trainer.max_steps": POSITIVE,
    "trainer.max_time": POSITIVE,  # minutes; null = no limit
    "trainer.collective_timeout": POSITIVE,  # seconds
    "trainer.val_every_epochs": POSITIVE,
    "trainer.limit_val_batches": NON_NEGATIVE,
    "trainer.sanity_val_steps": Bound(ge=-1),  # -1: all of them (Lightning)
    "trainer.gradient_clip_val": NON_NEGATIVE,  # 0 disables
    "trainer.accumulate_grad_batches": POSITIVE,
    "trainer.log_every_n_steps": POSITIVE,
    "trainer.checkpoint_every_steps": NON_NEGATIVE,  # 0: at epoch ends only (Lightning's every_n_train_steps)
    "trainer.nonfinite_max_in_row": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.betas": Bound(ge=0, lt=1),
    "optim.eps": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.schedule.warmup_steps": NON_NEGATIVE,
    "optim.schedule.min_lr_ratio": FRACTION,
    "optim.schedule.total_steps": POSITIVE,
    "ema.decay": FRACTION,  # 0 disables
    "ema.every_n_steps": POSITIVE,
    "ema.start_step": NON_NEGATIVE,
    "samples.every_steps": NON_NEGATIVE,  # 0: never
    "samples.max_items": POSITIVE,
    "evaluate.every_steps": NON_NEGATIVE,
    "evaluate.num_samples": POSITIVE,
    "data.batch_size": POSITIVE,
    "data.eval_batch_size": POSITIVE,
    "data.batches_per_epoch": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.shuffle_buffer": NON_NEGATIVE,
    "data.segment_seconds": POSITIVE,
    "data.eval_segment_seconds": POSITIVE,
    "data.min_segment_ratio": Bound(gt=0, le=1),
    "data.sample_rate": POSITIVE,
    "data.channels": POSITIVE,
}
# The family nodes differ per family: their numbers are bounded by the name of the key (at any depth), first match.
FAMILY_BOUNDS: dict[str, Bound] = {
    "*dropout": FRACTION,
    "*_prob": FRACTION,
    "*_steps": NON_NEGATIVE,
    "*weight": NON_NEGATIVE,
    "*weight_decay": NON_NEGATIVE,
    "*lr": POSITIVE,
    "*betas": Bound(ge=0, lt=1),
    "loss_weights.*": NON_NEGATIVE,
    "sample_rate": POSITIVE,
    "channels": POSITIVE,
    "n_q": POSITIVE,
    "card": POSITIVE,
    "*dim": POSITIVE,
    "dimension": POSITIVE,
    "num_heads": POSITIVE,
    "num_layers": POSITIVE,
    "n_filters": POSITIVE,
    "ratios": POSITIVE,
    "max_length": POSITIVE,
    "hidden": POSITIVE,
    "stride": POSITIVE,
    "*n_mels": POSITIVE,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bound(key: str, value: Any, bound: Bound) -> None:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        if any(_is_number(v) and v not in bound for v in value):
            raise ConfigError(f"{key}={list(value)}: each must be {bound}")
    elif _is_number(value) and value not in bound:
        raise ConfigError(f"{key}={value}: must be {bound}")


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-mapping value under ``node``."""
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _leaves(value, key + ".")
        else:
            yield key, value


def check_bounds(cfg: DictConfig) -> None:
    """Every number of ``BOUNDS`` and ``FAMILY_BOUNDS`` in its range; raises ConfigError naming key, value, range.
    The family first: data values interpolate it."""
    family = OmegaConf.to_container(cfg.family, resolve=True) if cfg.get("family") is not None else {}
    for key, value in _leaves(family):
        leaf = key.rsplit(".", 1)[-1]
        bound = next((b for pattern, b in FAMILY_BOUNDS.items() if fnmatch(leaf, pattern) or fnmatch(key, pattern)),
                     None)
        if bound is not None and not key.startswith("_"):
            _check_bound(f"family.{key}", value, bound)
    for key, bound in BOUNDS.items():
        _check_bound(key, OmegaConf.select(cfg, key, default=None), bound)


SHARD_FILES = (".tar", ".json")  # a split given as one file: a shard or a manifest


def check_data_paths(cfg: DictConfig) -> None:
    """``data.train/valid/test`` given as a local file must be a shard or a manifest (a folder or a pattern is
    resolved, and a missing one named, by ostinato.data.resolve_shards)."""
    for split in ("train", "valid", "test"):
        spec = cfg.data.get(split)
        if isinstance(spec, str) and "://" not in spec and "{" not in spec:
            path = Path(spec).expanduser()
            if path.is_file() and path.suffix not in SHARD_FILES:
                raise ConfigError(f"data.{split}={spec}: a {path.suffix or 'plain'} file, not shards; give a folder "
                                  "with manifest.json, a manifest .json, a .tar shard or a brace pattern")


def check_overrides(argv: Sequence[str], options: Mapping[str, Sequence[str]]) -> None:
    """Before hydra composes ``argv``: each is one KEY=VALUE override in hydra's grammar, and a group's value names
    one of its ``options`` (group -> option names)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"{arg}: an override is KEY=VALUE, e.g. trainer.max_steps=100")
        try:
            (override,) = parser.parse_overrides([arg])
        except HydraException as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(f"{arg}: not a valid override ({reason}); quote a value with spaces, commas or "
                              "brackets: key='a value'") from None
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"{arg}: a sweep is not an override of one XP; write a list as {key}=[...], quote a "
                              f"string as {key}='...', or sweep in a grid file (grids/)")
        if key in options and not override.is_delete():
            value = override.value()
            names = ", ".join(options[key])
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{arg}: a group override takes the name of an option; {key} takes {names}")
            if value is not None and value not in options[key]:
                raise ConfigError(f"{arg}: no such option{did_you_mean(value, options[key])}; {key} takes {names}")


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a container (``trainer``, ``trainer.max_steps``, ...); lists are leaves."""
    for name, value in node.items():
        yield f"{prefix}{name}"
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{name}.")


def unknown_key(key: str, base: DictConfig) -> ConfigError:
    """``key`` is not in ``base``: name it with its closest siblings, or all the keys of its deepest parent."""
    keys = set(_keys(OmegaConf.to_container(base, resolve=False)))
    parent, _, leaf = key.rpartition(".")
    while parent and parent not in keys:
        parent = parent.rpartition(".")[0]
    node = OmegaConf.select(base, parent, throw_on_resolution_failure=False) if parent else base
    if not isinstance(node, DictConfig):
        return ConfigError(f"{key}: no such key; {parent} is a value, not a group of keys")
    names = [str(k) for k in node.keys() if not str(k).startswith("_")]
    prefix = f"{parent}." if parent else ""
    if key.startswith(prefix) and "." not in key[len(prefix):]:  # a sibling's typo: compare the leaf names
        close = difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)
        hint = did_you_mean(key, [prefix + c for c in close])
        if hint:
            return ConfigError(f"{key}: no such key{hint}")
    return ConfigError(f"{key}: no such key; {parent or 'the top level'} takes {', '.join(names)}")


def composition_error(error: Exception, argv: Sequence[str], base: DictConfig,
                      groups: Collection[str] = ()) -> ConfigError:
    """The one-line ConfigError for hydra's failure to compose ``argv``: an unknown key named with its closest
    siblings (or all of them), else hydra's reason. ``base`` is the config of argv's ``groups`` choices alone."""
    keys = set(_keys(OmegaConf.to_container(base, resolve=False)))
    for arg in argv:
        key = arg.split("=", 1)[0]
        if not (key.startswith(("+", "~")) or key in keys or key in groups):
            return unknown_key(key, base)
    key = getattr(error, "full_key", None)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"{key}: {reason}" if key else f"overrides {' '.join(argv)}: {reason}")


def _check_schema(cfg: DictConfig, group: str) -> None:
    try:
        checked = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), cfg[group])
    except OmegaConfBaseException as e:
        key = f"{group}.{e.full_key}" if getattr(e, "full_key", None) else group
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)):  # a key the schema does not have (+trainer.x=1)
            raise unknown_key(key, OmegaConf.create({group: OmegaConf.structured(SCHEMAS[group])})) from None
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
    missing = sorted(OmegaConf.missing_keys(checked))
    if missing:  # the schema has no values to fall back on: conf/ gives every key
        raise ConfigError(f"{group}.{missing[0]} is missing: give it a value (the {group} settings of conf/ hold "
                          "every key)")


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


def _init_params(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """``cls.__init__``'s parameters and type hints, and whether it takes any keyword. A class that declares
    ``init_kwargs_to_base`` (the shard datamodules: ``**loading``) takes its bases' parameters too."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        own = dict(inspect.signature(init).parameters)
        own.pop("self", None)
        try:
            own_hints = typing.get_type_hints(init)
        except Exception:
            own_hints = {}
        rest = [n for n, p in own.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
        params.update({n: p for n, p in own.items() if n not in params and n not in rest})
        hints.update({n: h for n, h in own_hints.items() if n not in hints})
        if not rest or not getattr(cls, "init_kwargs_to_base", False):
            return params, hints, bool(rest)
    return params, hints, False


def check_target(node: Any, key: str, provided: Sequence[str] = ()) -> None:
    """``node._target_`` must import, and the node's keys must match its ``__init__``: names, required
    arguments, and simple types. ``provided`` names arguments the engine passes itself."""
    if node is None or "_target_" not in node:
        raise ConfigError(f"{key}._target_ is missing: the class to build")
    try:
        cls = get_class(node._target_)
    except Exception as e:
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported: {e}") from None
    params, hints, takes_any = _init_params(cls)
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


def validate(cfg: DictConfig, data_paths: bool = True, checks: Sequence[Callable[[DictConfig], None]] = ()) -> None:
    """All checks that need no data and no GPU; raises ConfigError naming the key. ``data_paths``: look at the
    data splits on this machine too (not where an XP is only named or submitted: ``main.get_xp``). ``checks``: more
    checks from the floors above the engine (``ostinato.train`` adds the ``evaluate`` suite's)."""
    for group in SCHEMAS:
        _check_schema(cfg, group)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and str(value) not in allowed:
            raise ConfigError(f"{key}={value!r}: no such choice{did_you_mean(str(value), allowed)}; use one of "
                              f"{', '.join(allowed)}")
    for key, length in LENGTHS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, ListConfig) and len(value) != length:
            raise ConfigError(f"{key}={list(value)}: give {length} values")
    check_bounds(cfg)
    check_lora(cfg)
    if data_paths:
        check_data_paths(cfg)
    for check in checks:
        check(cfg)
    check_target(cfg.data, "data")  # first: the family interpolates data values
    check_target(cfg.family, "family", provided=("optim",))
    world = int(cfg.trainer.devices if str(cfg.trainer.devices).isdigit() else 1) * int(cfg.trainer.num_nodes)
    check_global_batch(cfg, world)


def check_lora(cfg: DictConfig) -> None:
    """``family.lora`` trains adapters over a pretrained base: ``continue_from`` must name it (its checkpoints hold
    the adapters alone, so a resume loads the base from there again)."""
    family = cfg.get("family")
    if family is not None and family.get("lora") is not None and not cfg.get("continue_from"):
        raise ConfigError("family.lora trains adapters on a pretrained model: set continue_from= (an import "
                          "folder, an export or an XP) to the model they adapt")


def check_global_batch(cfg: DictConfig, world_size: int) -> None:
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.data.get(key)
        if value is not None and int(value) % world_size:
            raise ConfigError(f"data.{key}={value} does not divide over {world_size} ranks: the batch size is "
                              f"global, use a multiple of {world_size}")
