"""One CLI vocabulary (docs/cli.md): every verb's help is walked in-process and its shared flags checked; the old
spellings still work and say their new name in one line; `ostinato config` and `ostinato train --help`."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from omegaconf import OmegaConf

from ostinato.cli import DEVICE_HELP, DEVICES_HELP, TRUST_HELP, build_parser, main
from ostinato.data import Manifest
from ostinato.errors import UserError
from ostinato.evaluation.suite import GENERATION_KEYS, LONG_FORM_KEYS
from tests.synth import tone

# Every leaf verb, by what it does; a new verb fails test_every_verb_is_classified until it is placed here.
WRITES = {"prep corpus", "prep shards", "prep semantic", "prep mulan", "encode", "export", "tokenize", "generate",
          "import", "bundle jukebox", "bundle musiclm", "bundle stereo-codec", "eval", "eval-sweep", "fad"}
LOADS_CHECKPOINTS = {"prep mulan", "encode", "export", "tokenize", "generate", "import", "bundle stereo-codec",
                     "eval", "eval-sweep", "app"}
RUNS_A_MODEL = {"prep semantic", "prep mulan", "encode", "tokenize", "generate", "eval", "eval-sweep", "fad", "app"}
# dora's verbs print ostinato's own help (tested below); demo writes under --outputs and resumes; config prints
OTHERS = {"train", "grid", "launch", "info", "demo", "config"}
OLD_SPELLINGS = {"--duration", "--segment", "--min-segment", "--clip-seconds", "--window", "--extend-stride",
                 "--long-form", "--overlap", "--cfg", "--num-candidates", "--devices", "--suite"}
OLD_ALLOWED = {("prep shards", "--overlap")}  # seconds shared by segments: not a long-form setting there


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*path, name))


@pytest.fixture(scope="module")
def verbs() -> dict[str, argparse.ArgumentParser]:
    return dict(_leaves(build_parser()))


def _visible(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in parser._actions if a.help != argparse.SUPPRESS for flag in a.option_strings}


def test_every_verb_is_classified(verbs) -> None:
    assert set(verbs) == WRITES | LOADS_CHECKPOINTS | RUNS_A_MODEL | OTHERS


def test_writing_verbs_take_overwrite_and_quiet(verbs) -> None:
    for verb in sorted(WRITES):
        flags = _visible(verbs[verb])
        assert "--overwrite" in flags and "--quiet" in flags, verb


def test_loading_verbs_take_trust_with_one_meaning(verbs) -> None:
    for verb in sorted(LOADS_CHECKPOINTS):
        assert _visible(verbs[verb])["--trust"].help == TRUST_HELP, verb


def test_model_verbs_take_device_auto(verbs) -> None:
    for verb in sorted(RUNS_A_MODEL):
        action = _visible(verbs[verb])["--device"]
        assert action.default == "auto", verb
        assert DEVICE_HELP in action.help or DEVICES_HELP in action.help, verb


def test_no_verb_shows_an_old_spelling(verbs) -> None:
    for verb, parser in verbs.items():
        shown = set(_visible(parser)) & OLD_SPELLINGS
        assert {(verb, flag) for flag in shown} <= OLD_ALLOWED, verb


def test_help_shows_every_default(verbs) -> None:
    for verb, parser in verbs.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            assert f"(default: {action.default})" in text, (verb, action.dest)


def test_generation_flags_are_the_suite_keys(verbs) -> None:
    flags = _visible(verbs["generate"])
    for key in GENERATION_KEYS:
        assert "--" + key.replace("_", "-") in flags, key
    for key in LONG_FORM_KEYS:
        assert "--long-form-" + key in flags, key
    assert "--seconds" in flags and "--rerank" in flags  # the suite's seconds and rerank
    assert "--num-samples" in _visible(verbs["eval"])


@pytest.mark.parametrize("old, new", [
    (["generate", "--out", "o", "--duration", "2"], ["generate", "--out", "o", "--seconds", "2"]),
    (["generate", "--out", "o", "--cfg", "1.5"], ["generate", "--out", "o", "--cfg-scale", "1.5"]),
    (["generate", "--out", "o", "--extend-stride", "1"], ["generate", "--out", "o", "--long-form-stride", "1"]),
    (["generate", "--out", "o", "--window", "4"], ["generate", "--out", "o", "--long-form-window", "4"]),
    (["generate", "--out", "o", "--long-form", "chain"], ["generate", "--out", "o", "--long-form-mode", "chain"]),
    (["generate", "--out", "o", "--overlap", "1"], ["generate", "--out", "o", "--long-form-overlap", "1"]),
    (["generate", "--out", "o", "--num-candidates", "3"], ["generate", "--out", "o", "--rerank", "3"]),
    (["prep", "corpus", "--clip-seconds", "5"], ["prep", "corpus", "--seconds", "5"]),
    (["prep", "shards", "a", "b", "--segment", "5"], ["prep", "shards", "a", "b", "--seconds", "5"]),
    (["prep", "shards", "a", "b", "--min-segment", "1"], ["prep", "shards", "a", "b", "--min-seconds", "1"]),
    (["prep", "mulan", "--mulan", "m", "--segment", "5"], ["prep", "mulan", "--mulan", "m", "--seconds", "5"]),
    (["tokenize", "a", "b", "--codec", "c", "--devices", "cpu"], ["tokenize", "a", "b", "--codec", "c", "--device",
                                                                   "cpu"]),
    (["encode", "a", "b", "--model", "m", "--devices", "cpu"], ["encode", "a", "b", "--model", "m", "--device", "cpu"]),
    (["app", "--model", "m", "--window", "4"], ["app", "--model", "m", "--long-form-window", "4"]),
])
def test_old_spellings_still_work_and_say_the_new_name(capsys, old, new) -> None:
    parser = build_parser()
    assert vars(parser.parse_args(old)) == vars(parser.parse_args(new))
    lines = capsys.readouterr().err.strip().splitlines()
    flag = next(a for a in old if a.startswith("--") and a not in new)
    assert lines == [f"ostinato {' '.join(old[:2] if old[0] == 'prep' else old[:1])}: {flag} is deprecated; use "
                     f"{next(a for a in new if a.startswith('--') and a not in old)}"]


def test_old_eval_sweep_suite_flag_still_works(capsys) -> None:
    args = build_parser().parse_args(["eval-sweep", "--model", "m", "--suite", "codec_demo"])
    assert args.old_suite == "codec_demo" and "--suite is deprecated; use SUITE" in capsys.readouterr().err


def test_an_old_spelling_runs_the_verb(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        sf.write(src / f"song{i}.wav", tone(220 + 50 * i, 1.5, 16000).T.numpy(), 16000)
    main(["prep", "shards", str(src), str(tmp_path / "out"), "--segment", "1.0"])
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "deprecated" in line] == [
        "ostinato prep shards: --segment is deprecated; use --seconds"]
    assert Manifest.load(tmp_path / "out").total_samples == 4  # two 1.5 s files -> 1 s segments and 0.5 s tails


def test_train_help_is_ostinatos(capsys) -> None:
    main(["train", "--help"])
    out = capsys.readouterr().out
    assert "usage: ostinato train" in out and "usage: dora" not in out
    groups = {line.split("=")[0].strip(): line.split("=", 1)[1] for line in out.splitlines()
              if re.match(r"^  \w+=", line)}
    assert {"experiment", "family", "data", "trainer", "optim", "logger"} <= set(groups)
    assert "musicgen_tiny" in groups["experiment"] and "adamw" in groups["optim"]
    assert "KEY=VALUE" in out and "ostinato config" in out and "--dora-help" in out and "xps/<signature>" in out


def test_grid_help_lists_the_grids_and_dora_help_passes_through(capsys) -> None:
    main(["grid", "-h"])
    out = capsys.readouterr().out
    assert "usage: ostinato grid NAME" in out and "eval_sweep" in out and "--dry_run" in out
    with pytest.raises(SystemExit) as e:
        main(["info", "--dora-help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "info [-h] [-f FROM_SIG]" in out and "Show entire log" in out  # dora's own


def test_config_prints_the_resolved_config_and_the_xp_folder(tmp_path, monkeypatch, capsys) -> None:
    from ostinato.train import main as train_main

    monkeypatch.setenv("OSTINATO_OUTPUTS", str(tmp_path / "outputs"))
    overrides = ["experiment=musicgen_tiny", "optim.lr=0.0003"]
    main(["config", *overrides])
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    cfg = yaml.safe_load("\n".join(out[:-1]))
    xp = train_main.get_xp(overrides)
    assert cfg["optim"]["lr"] == 0.0003 and cfg["family"] == OmegaConf.to_container(xp.cfg.family, resolve=True)
    assert out[-1] == f"# XP {xp.sig}: {xp.folder}"
    main(["config", *overrides, "--folder"])
    assert capsys.readouterr().out.strip() == str(xp.folder)
    assert not Path(xp.folder).exists()  # nothing trained, nothing written


def test_config_refuses_a_bad_override_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["config", "experiment=musicgen_tyni"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "musicgen_tiny" in err, err


def test_the_compile_example_of_the_trainer_config_names_a_real_submodule() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ostinato.data.dims import register_resolvers
    from ostinato.engine.trainer import apply_compile_and_checkpointing
    from ostinato.families.base import plain
    from ostinato.store.records import conf_dir

    register_resolvers()  # ${manifest:...}: its fallbacks, as before a run has its XP

    line = next(x for x in (Path(conf_dir()) / "trainer" / "default.yaml").read_text().splitlines()
                if x.startswith("compile:"))
    example = re.search(r"e\.g\. \[([\w.]+)\]", line)[1]
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=musicgen_tiny"])
    family = instantiate(cfg.family, optim=plain(cfg.optim), _convert_="all")
    trainer = OmegaConf.create({"compile": [example], "activation_checkpointing": False, "strategy": "auto"})
    apply_compile_and_checkpointing(trainer, family)
    assert all(block._compiled_call_impl is not None for block in family.get_submodule(example))
    trainer.compile = ["model.transformer"]
    with pytest.raises(UserError, match=r"^trainer.compile: 'model.transformer' is no submodule .*model.lm.layers"):
        apply_compile_and_checkpointing(trainer, family)


@pytest.mark.parametrize("verb, result", [
    (["eval", "demo"], "eval/metrics.json"),
    (["eval-sweep", "demo"], "eval/summary.json"),
    (["fad", "REF", "GEN", "--embedding", "codec:nope"], "eval/fad.json"),
])
def test_results_of_an_earlier_run_are_kept_without_overwrite(tmp_path, capsys, verb, result) -> None:
    path = tmp_path / result
    path.parent.mkdir()
    verb = [str(tmp_path / a) if a in ("REF", "GEN") else a for a in verb]
    path.write_text("{}")
    out = str(path if verb[0] == "fad" else path.parent)
    with pytest.raises(SystemExit) as e:
        main([*verb, "--model", str(tmp_path / "nope"), "--out", out] if verb[0] != "fad" else [*verb, "--out", out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "pass --overwrite to replace it" in err, err
    assert path.read_text() == "{}"
    with pytest.raises(SystemExit):  # with --overwrite the run goes on, to the model or embedding that is not there
        main([*verb, "--model", str(tmp_path / "nope"), "--out", out, "--overwrite"] if verb[0] != "fad" else
             [*verb, "--out", out, "--overwrite"])
    assert "--overwrite" not in capsys.readouterr().err


def test_quiet_silences_the_bars_of_that_run_only(tmp_path, capsys) -> None:
    import os

    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "song.wav", tone(220, 1.5, 16000).T.numpy(), 16000)
    main(["prep", "shards", str(src), str(tmp_path / "loud")])
    assert "%|" in capsys.readouterr().err  # a tqdm bar
    main(["prep", "shards", str(src), str(tmp_path / "quiet"), "--quiet"])
    captured = capsys.readouterr()
    assert captured.err == "" and "1 shards" in captured.out  # the result is still printed
    assert "TQDM_DISABLE" not in os.environ


def test_the_old_module_entries_point_to_their_verbs() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ostinato.generation.jukebox", "bundle"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "ostinato bundle jukebox OUT --top REF" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ostinato.grids.eval_sweep", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "is `ostinato eval-sweep` now" in proc.stderr
    assert "usage: ostinato eval-sweep" in proc.stdout
