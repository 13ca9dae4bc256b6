"""Engine pieces in-process: checkpoint safety, continue_from resolution, config checks, loggers."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ostinato.engine.checkpoint_io import SafeCheckpointIO
from ostinato.store.checkpoint import (UntrustedCheckpointError, load_checkpoint,
                                        resolve_checkpoint)
from ostinato.engine.config import ConfigError, check_target, validate
from ostinato.engine.loggers import wandb_mode
from ostinato.engine.trainer import apply_compile_and_checkpointing
from ostinato.families.debug import DebugFamily
from ostinato.train import conf_dir


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


class Payload:
    """Any class: unpickling it runs its module's code, which a weights-only load refuses."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_pickled_objects_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "extra": Payload(7)}, path)
    with pytest.raises(UntrustedCheckpointError, match="trust_checkpoints=true"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)["extra"].value == 7


def test_continue_from_references(tmp_path):
    xps = tmp_path / "xps"
    ckpt = xps / "abc123" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert resolve_checkpoint("//sig/abc123", xps) == ckpt
    assert resolve_checkpoint(xps / "abc123") == ckpt
    assert resolve_checkpoint(ckpt) == ckpt
    with pytest.raises(FileNotFoundError, match="no experiment folder"):
        resolve_checkpoint("//sig/nope", xps)


def _cfg(**overrides):
    cfg = OmegaConf.load(f"{conf_dir()}/config.yaml")
    groups = {"family": "debug", "data": "demo", "trainer": "default", "optim": "adamw", "logger": "csv"}
    for group, name in groups.items():
        cfg[group] = OmegaConf.load(f"{conf_dir()}/{group}/{name}.yaml")
    cfg.trainer.pop("defaults", None)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.mark.parametrize("key, value, message", [
    ("trainer.max_steps", "lots", "trainer.max_steps"),
    ("trainer.strategy", "horovod", "trainer.strategy='horovod'"),
    ("optim.betas", "fast", "optim.betas"),
    ("family.hidden", "wide", "family.hidden='wide'"),
    ("family.depth", 3, "family.depth: unknown key for DebugFamily"),
    ("data.channels", "two", "data.channels"),
])
def test_config_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(**{key: value}))
    assert message in str(err.value)


def test_the_evaluate_suite_is_checked_by_the_hook_that_train_passes():
    """The engine sits below evaluation: ``ostinato.train`` hands it the ``evaluate`` check."""
    from ostinato.evaluation.hooks import check_evaluate, evaluation_callbacks

    no_period = _cfg(**{"evaluate.suite": "demo", "evaluate.every_steps": 0})
    validate(no_period)  # the engine alone does not know suites
    with pytest.raises(ConfigError, match=r"^evaluate.every_steps=0: set a period in steps"):
        validate(no_period, checks=[check_evaluate])
    with pytest.raises(ConfigError, match=r"^evaluate.suite=codec_demo: a reconstruction suite; .* text_to_music"):
        validate(_cfg(**{"evaluate.suite": "codec_demo", "evaluate.every_steps": 5}), checks=[check_evaluate])
    with pytest.raises(ConfigError, match=r"^evaluate.suite: "):
        validate(_cfg(**{"evaluate.suite": "no_such_suite", "evaluate.every_steps": 5}), checks=[check_evaluate])
    fine = _cfg(**{"evaluate.suite": "demo", "evaluate.every_steps": 5, "evaluate.num_samples": 2})
    validate(fine, checks=[check_evaluate])
    assert evaluation_callbacks(no_period) == []
    (callback,) = evaluation_callbacks(fine)
    assert (type(callback).__name__, callback.every_steps, callback.num_samples) == ("EvaluationCallback", 5, 2)


def _schema_keys(schema: type, prefix: str = "") -> set[str]:
    """The dotted keys a schema declares; each must hold no value (a nested node is only a shape)."""
    import dataclasses
    import typing

    from omegaconf import MISSING

    hints, keys = typing.get_type_hints(schema), set()
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _schema_keys(hints[f.name], f"{prefix}{f.name}.")
            continue
        assert f.default is MISSING and f.default_factory is dataclasses.MISSING, (
            f"{schema.__name__}.{f.name} holds a default value: it belongs in conf/ alone")
        keys.add(prefix + f.name)
    return keys


def _conf_keys(node, prefix: str = "") -> set[str]:
    return {k for name, value in node.items() if not str(name).startswith("_")
            for k in (_conf_keys(value, f"{prefix}{name}.") if OmegaConf.is_dict(value) else {prefix + str(name)})}


def test_engine_schemas_declare_types_and_conf_holds_every_value():
    """The engine's defaults have one home, conf/ (the schemas once said weight_decay 0.0 where
    conf/optim/adamw.yaml says 0.1): a schema names and types keys without values, and every option of the trainer
    and optim groups, and config.yaml's ema, samples and evaluate nodes, gives each key of its schema."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from ostinato.engine.config import SCHEMAS

    for group, schema in SCHEMAS.items():
        options = sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml")) or [None]
        for option in options:
            with initialize_config_dir(conf_dir(), version_base="1.3"):
                cfg = compose("config", overrides=[f"{group}={option}"] if option else [])
            assert _conf_keys(cfg[group]) == _schema_keys(schema), f"{group}={option} and {schema.__name__} differ"
    assert _cfg().optim.weight_decay == 0.1  # read from conf/optim/adamw.yaml, nowhere else
    cfg = _cfg()
    del cfg.optim["weight_decay"]
    with pytest.raises(ConfigError, match=r"^optim.weight_decay is missing: give it a value"):
        validate(cfg)


def test_required_family_argument_is_named():
    node = OmegaConf.create({"_target_": "torch.nn.Linear", "in_features": 3})
    with pytest.raises(ConfigError, match="family.out_features is required"):
        check_target(node, "family")


def test_compile_and_activation_checkpointing_from_config():
    family = DebugFamily()
    apply_compile_and_checkpointing(OmegaConf.create({"compile": ["model.encoder"], "activation_checkpointing":
                                                      False, "strategy": "auto"}), family)
    assert family.model.encoder._compiled_call_impl is not None
    with pytest.raises(ValueError, match="declares no block_classes"):
        apply_compile_and_checkpointing(OmegaConf.create({"compile": [], "activation_checkpointing": True,
                                                          "strategy": "ddp"}), DebugFamily())


def test_wandb_is_offline_until_logged_in(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_csv_log_survives_resume_up_to_the_checkpoint_step(tmp_path):
    import csv

    from ostinato.engine.loggers import ResumableCSVLogger

    (tmp_path / "csv").mkdir()
    with open(tmp_path / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train/loss"])
        w.writeheader()
        w.writerows({"step": s, "train/loss": 10 - s} for s in range(10))
    resumed = ResumableCSVLogger(str(tmp_path), resumed_step=5)
    resumed.log_metrics({"train/loss": 0.5, "valid/ce": 2.0}, step=6)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # steps 6..9 were trained again
    assert rows[0]["train/loss"] == "10" and rows[-1]["valid/ce"] == "2.0" and rows[0]["valid/ce"] == ""
    fresh = ResumableCSVLogger(str(tmp_path))  # a new run in the same folder starts a new file
    fresh.log_metrics({"train/loss": 1.0}, step=0)
    fresh.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == ["step,train/loss", "0,1.0"]


def test_training_samples_are_clamped_16_bit_wavs_written_atomically(tmp_path):
    import soundfile as sf

    from ostinato.engine.media import log_audio

    loud = torch.linspace(-3, 3, 800).reshape(1, 1, 800)  # [B, C, T], beyond [-1, 1]
    (path,) = log_audio([], tmp_path, {"gen": loud}, 8000, step=1)
    info = sf.info(str(path))
    assert (info.subtype, info.channels, info.frames) == ("PCM_16", 1, 800)
    back, _ = sf.read(str(path))
    assert abs(back.min() + 1) < 1e-3 and abs(back.max() - 1) < 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen_0.png", "gen_0.wav"]  # no temp file left


def test_max_time_stops_training_within_its_minutes(tmp_path):
    """trainer.max_time (minutes) bounds a run's wall clock whatever max_steps says: what a timed benchmark
    (bench/learning_run.py) needs; null leaves only max_steps."""
    import time

    from torch.utils.data import DataLoader, IterableDataset

    from ostinato.data.batch import AudioBatch
    from ostinato.engine.trainer import build_trainer

    class Noise(IterableDataset):
        def __iter__(self):
            while True:
                yield AudioBatch(torch.randn(2, 1, 64), torch.full((2,), 64), ["", ""], [{}, {}])

    cfg = _cfg(**{"trainer.max_steps": 10**7, "trainer.max_time": 0.02, "trainer.accelerator": "cpu",
                  "trainer.progress_bar": False, "trainer.model_summary": False, "ema.decay": 0.0,
                  "trainer.checkpoint_every_steps": 0})
    family = DebugFamily(hidden=4)
    trainer = build_trainer(cfg, tmp_path, family)
    start = time.time()
    trainer.fit(family, DataLoader(Noise(), batch_size=None))
    assert 0 < trainer.global_step < 10**7
    assert time.time() - start < 30  # 1.2 s of training, then the checkpoint at the stop
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    untimed = build_trainer(_cfg(**{"trainer.accelerator": "cpu", "ema.decay": 0.0}), tmp_path / "b", DebugFamily())
    assert untimed.max_steps == 1000 and all(type(c).__name__ != "Timer" for c in untimed.callbacks)
