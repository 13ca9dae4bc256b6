"""Issue 16, config: a wrong key, group option, value or override ends in one line naming it (and the closest valid
names), exit code 2, before any model or data is built; for `train`, `launch`, `grid`, `info` and the dora and
python entry points alike."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ostinato.engine.config import ConfigError
from tests.runner import ROOT, cli_args

CHECKOUT = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # subprocesses run this checkout, not the installed one


@pytest.fixture
def xp_of(monkeypatch, tmp_path):
    """``main.get_xp`` in this process (what every dora verb does first), outputs in a private folder."""
    monkeypatch.setenv("OSTINATO_OUTPUTS", str(tmp_path / "out"))
    from ostinato.train import main

    return main.get_xp


def _config_error(get_xp, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        get_xp(list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def _one_line_exit_2(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.max_stepz=5"], "trainer.max_stepz: no such key (did you mean trainer.max_steps?)"),
    (["famly=codec_tiny"], "famly: no such key (did you mean family?)"),
    (["optim.schedule.nme=cosine"], "optim.schedule.nme: no such key (did you mean optim.schedule.name?)"),
    (["family.zzz=3"], "family.zzz: no such key; family takes sample_rate, channels, hidden, stride"),
    (["family=codec_tiny", "family.codec.cards=3"], "family.codec.cards: no such key (did you mean family.codec.card"),
    (["experiment=codec_tiny", "trainer.max_stepz=5"], "did you mean trainer.max_steps?"),
])
def test_an_unknown_key_names_the_closest_keys(xp_of, overrides, expected):
    assert expected in _config_error(xp_of, *overrides)


@pytest.mark.parametrize("override, expected", [
    ("family=nope", "family=nope: no such option; family takes codec_48k_stereo, codec_encodec24, "),
    ("family=codec_tin", "family=codec_tin: no such option (did you mean codec_tiny"),
    ("experiment=nope", "experiment=nope: no such option; experiment takes codec_tiny, debug_cpu, "),
    ("optim=adamw2", "optim=adamw2: no such option (did you mean adamw?); optim takes adam_gan, adamw"),
])
def test_an_unknown_group_option_lists_the_options(xp_of, override, expected):
    assert expected in _config_error(xp_of, override)


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_steps=[1", "trainer.max_steps=[1: not a valid override"),
    ("trainer.max_steps", "trainer.max_steps: an override is KEY=VALUE"),
    ("optim.lr=1,2", "optim.lr=1,2: "),
    ("trainer=5", "trainer=5: "),
])
def test_a_malformed_override_is_named(xp_of, override, expected):
    message = _config_error(xp_of, override)
    assert message.startswith(expected) and "override" in message


@pytest.mark.parametrize("override, expected", [
    ("data.batch_size=0", "data.batch_size=0: must be > 0"),
    ("data.batch_size=-4", "data.batch_size=-4: must be > 0"),
    ("optim.lr=-1", "optim.lr=-1: must be > 0"),
    ("optim.lr=0", "optim.lr=0: must be > 0"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be > 0"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5: must be > 0"),
    ("trainer.devices=0", "trainer.devices=0: must be > 0"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: each must be in [0, 1)"),
    ("optim.betas=[-0.1,0.9]", "optim.betas=[-0.1, 0.9]: each must be in [0, 1)"),
    ("ema.decay=1.5", "ema.decay=1.5: must be in [0, 1]"),
    ("ema.decay=-0.1", "ema.decay=-0.1: must be in [0, 1]"),
    ("trainer.checkpoint_every_steps=-1", "trainer.checkpoint_every_steps=-1: must be >= 0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be >= 0"),
    ("data.segment_seconds=0", "data.segment_seconds=0: must be > 0"),
    ("data.segment_seconds=-2", "data.segment_seconds=-2: must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be > 0"),
    ("family.sample_rate=0", "family.sample_rate=0: must be > 0"),
    ("family.hidden=-16", "family.hidden=-16: must be > 0"),
])
def test_an_out_of_range_value_names_the_key_and_the_range(xp_of, override, expected):
    assert _config_error(xp_of, override).startswith(expected)


@pytest.mark.parametrize("overrides, expected", [
    (["family=musicgen_tiny", "family.lm.num_heads=0"], "family.lm.num_heads=0: must be > 0"),
    (["family=musicgen_tiny", "family.cfg_dropout=1.5"], "family.cfg_dropout=1.5: must be in [0, 1]"),
    (["family=codec_tiny", "family.codec.ratios=[8,0,4,2]"], "family.codec.ratios=[8, 0, 4, 2]: each must be > 0"),
    (["family=codec_tiny", "family.codec.n_q=0"], "family.codec.n_q=0: must be > 0"),
])
def test_a_family_value_it_cannot_take_is_named(xp_of, overrides, expected):
    assert _config_error(xp_of, *overrides).startswith(expected)


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("+trainer.max_stepz=5", "trainer.max_stepz: no such key (did you mean trainer.max_steps?)"),
    ("optim.name=sgd2", "optim.name='sgd2': no such choice (did you mean sgd?); use one of adamw, adam, sgd"),
    ("optim.schedule.name=cosin", "optim.schedule.name='cosin': no such choice (did you mean cosine?)"),
    ("logger.kind=tensorbord", "logger.kind='tensorbord': no such choice (did you mean tensorboard?)"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: give 2 values"),
    ("seed.x=1", "seed.x: no such key; seed is a value, not a group of keys"),
])
def test_a_value_of_the_wrong_type_or_choice_is_named_before_the_run(xp_of, override, expected):
    assert _config_error(xp_of, override).startswith(expected)


def test_good_values_at_the_edges_pass(xp_of):
    xp = xp_of(["ema.decay=0", "ema.decay=1", "trainer.gradient_clip_val=0", "data.num_workers=0",
                "optim.betas=[0.0,0.999]", "trainer.devices=auto", "trainer.checkpoint_every_steps=0",
                "samples.every_steps=0"])
    assert xp.cfg.trainer.devices == "auto"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OSTINATO_OUTPUTS": str(tmp_path / "out"), "OSTINATO_DATA": str(tmp_path / "data"),
            "PYTHONPATH": CHECKOUT, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


OSTINATO = [sys.executable, "-m", "ostinato.cli"]


def test_train_with_an_unknown_key_is_one_line_exit_2_and_writes_nothing(tmp_path):
    line = _one_line_exit_2(OSTINATO + ["train", *cli_args(["trainer.max_stepz=5"])], _env(tmp_path))
    assert line == "ostinato train: error: trainer.max_stepz: no such key (did you mean trainer.max_steps?)"
    assert not (tmp_path / "out").exists()


def test_train_with_an_unknown_family_lists_the_families(tmp_path):
    line = _one_line_exit_2(OSTINATO + ["train", "family=nope"], _env(tmp_path))
    assert line.startswith("ostinato train: error: family=nope: no such option; family takes codec_48k_stereo, ")
    assert "musicgen_tiny" in line


def test_train_with_an_out_of_range_value_stops_before_building(tmp_path):
    line = _one_line_exit_2(OSTINATO + ["train", *cli_args(["data.batch_size=0"])], _env(tmp_path))
    assert line == "ostinato train: error: data.batch_size=0: must be > 0"
    assert not (tmp_path / "out").exists()


def test_dora_run_and_python_m_train_say_the_same(tmp_path):
    env = _env(tmp_path)
    dora = _one_line_exit_2([sys.executable, "-m", "dora", "-P", "ostinato", "run", "optim.lr=-1"], env)
    assert dora == "dora run: error: optim.lr=-1: must be > 0"
    module = _one_line_exit_2([sys.executable, "-m", "ostinato.train", "experiment=nope"], env)
    assert module.startswith("ostinato train: error: experiment=nope: no such option; experiment takes ")


def test_launch_and_info_with_bad_overrides(tmp_path):
    env = _env(tmp_path)
    line = _one_line_exit_2(OSTINATO + ["launch", "trainer.max_stepz=5"], env)
    assert line.startswith("ostinato launch: error: trainer.max_stepz: no such key (did you mean trainer.max_steps?)")
    line = _one_line_exit_2(OSTINATO + ["info", "ema.decay=2"], env)
    assert line == "ostinato info: error: ema.decay=2: must be in [0, 1]"


def test_info_of_an_unknown_signature(tmp_path):
    line = _one_line_exit_2(OSTINATO + ["info", "-f", "abcdef12"], _env(tmp_path))
    assert line.startswith("ostinato info: error: -f abcdef12: no XP with this signature in ")
    assert "run `ostinato train` first or check the signature" in line


def test_grid_that_does_not_exist_lists_the_grids(tmp_path):
    line = _one_line_exit_2(OSTINATO + ["grid", "debug_swep"], _env(tmp_path))
    assert line.startswith("ostinato grid: error: debug_swep: no such grid (did you mean debug_sweep")
    assert "eval_sweep" in line


def test_grid_with_a_bad_override_names_the_grid_and_the_key(tmp_path):
    grids = tmp_path / "mygrids"
    grids.mkdir()
    (grids / "__init__.py").write_text("")
    (grids / "typo.py").write_text(
        "from ostinato.grids._explorers import TrainExplorer\n\n\n@TrainExplorer\ndef explorer(launcher):\n"
        "    launcher.bind_({'family': 'debug', 'logger': 'csv'})\n"
        "    launcher({'optim.lr': 1e-3})\n    launcher({'trainer.max_stepz': 5})\n")
    env = _env(tmp_path, OSTINATO_GRIDS="mygrids", PYTHONPATH=f"{CHECKOUT}{os.pathsep}{tmp_path}")
    line = _one_line_exit_2(OSTINATO + ["grid", "typo", "--dry_run"], env)
    assert line == ("ostinato grid: error: grid typo: trainer.max_stepz: no such key (did you mean "
                    "trainer.max_steps?)")


def test_a_data_path_that_is_missing_or_a_file(env, tmp_path):
    missing = _one_line_exit_2(OSTINATO + ["train", *cli_args([f"data.train={tmp_path / 'nope'}"])], env)
    assert missing.startswith(f"ostinato train: error: data.train: no shards at {tmp_path / 'nope'}")
    (tmp_path / "file.txt").write_text("not shards")
    a_file = _one_line_exit_2(OSTINATO + ["train", *cli_args([f"data.valid={tmp_path / 'file.txt'}"])], env)
    assert a_file.startswith(f"ostinato train: error: data.valid={tmp_path / 'file.txt'}: a .txt file, not shards")
