"""The user-error contract of every verb: one line, exit code 2, the traceback only when asked for."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ostinato.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, did_you_mean, user_errors, user_message


def _exit_of(exc: BaseException, capsys, **kwargs) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        with user_errors("prog", **kwargs):
            raise exc
    return stop.value.code, capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("OSTINATO_DEBUG", raising=False)
    code, err = _exit_of(UserError("data.train: no such folder x;\nmake shards with ostinato prep shards"), capsys)
    assert code == EXIT_USER_ERROR
    assert err == "prog: error: data.train: no such folder x;; make shards with ostinato prep shards\n"
    assert "Traceback" not in err


def test_file_system_faults_name_the_path_and_the_fix(capsys, monkeypatch):
    monkeypatch.delenv("OSTINATO_DEBUG", raising=False)
    for number, fix in [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")]:
        code, err = _exit_of(OSError(number, os.strerror(number), "/out/000.wav"), capsys)
        assert code == 2 and err.startswith("prog: error: /out/000.wav: ") and fix in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(RuntimeError, match="a bug"):
        with user_errors("prog"):
            raise RuntimeError("a bug")
    assert user_message(KeyError("k")) is None and user_message(OSError(errno.EIO, "io")) is None


def test_training_does_not_count_a_plain_value_error_as_the_users(capsys):
    with pytest.raises(ValueError):
        with user_errors("prog", value_errors=False):
            raise ValueError("shape mismatch deep in a step")
    code, _ = _exit_of(UserError("x"), capsys, value_errors=False)
    assert code == 2


def test_debug_prints_the_traceback_too(capsys, monkeypatch):
    monkeypatch.setenv("OSTINATO_DEBUG", "1")
    code, err = _exit_of(FileNotFoundError("checkpoint not found: x.ckpt"), capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("prog: error: checkpoint not found: x.ckpt")


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    code, err = _exit_of(KeyboardInterrupt(), capsys)
    assert code == EXIT_INTERRUPTED and err == "prog: interrupted\n"


def test_did_you_mean_offers_the_closest_names():
    assert did_you_mean("max_stepz", ["max_steps", "devices", "num_nodes"]) == " (did you mean max_steps?)"
    assert did_you_mean("zzz", ["max_steps"]) == ""


@pytest.mark.parametrize("debug", [False, True])
def test_the_cli_in_a_process(tmp_path, debug):
    env = {k: v for k, v in os.environ.items() if k != "OSTINATO_DEBUG"}
    args = [sys.executable, "-m", "ostinato.cli", *(["--debug"] if debug else []),
            "export", str(tmp_path / "missing"), str(tmp_path / "out")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ostinato: error: ") and "missing" in last
    assert ("Traceback" in proc.stderr) == debug
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, flag", [(["export"], "the following arguments are required: ref, out"),
                                        (["nope"], "invalid choice: 'nope'"),
                                        (["tokenize", "a", "b"], "one of the arguments --semantic --codec"),
                                        (["encode", "a", "b", "--model", "m", "--batch-size", "0"], "--batch-size"),
                                        (["demo", "--quick", "--nope"], "unrecognized arguments: --nope"),
                                        (["bundle", "jukebox", "out"],
                                         "the following arguments are required: --top, --middle, --bottom")])
def test_argument_errors_of_every_verb_are_one_line(argv, flag, capsys):
    from ostinato.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and flag in err and err.count("\n") == 1 and "usage:" not in err
    assert err.rstrip().endswith("--help`")
