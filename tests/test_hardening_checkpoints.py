"""Checkpoint faults (issue 16, item 2): a write killed mid-way, a truncated or empty ``last.ckpt``, a damaged
checkpoint given to export / load / continue_from / generate, and the export folder (exists, read-only, full disk).
Each ends in one line naming the file and the fix, exit code 2, and nothing the user had is lost."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ostinato.cli import main as cli_main
from ostinato.engine.checkpoint_io import SafeCheckpointIO
from ostinato.store.checkpoint import (PREVIOUS_NAME, DamagedCheckpointError, checkpoint_damage,
                                        load_checkpoint, set_aside)
from ostinato.engine.trainer import last_checkpoint
from ostinato.engine.weights import load_weights
from ostinato.models import load
from ostinato.store.records import CONFIG_KEY
from ostinato.errors import UserError, user_errors
from ostinato.families.debug import DebugFamily
from tests.disks import tmpfs
from tests.runner import cli_args, train, xp_folder

RUN = ["trainer.max_steps=12", "trainer.checkpoint_every_steps=4", "trainer.val_every_epochs=100"]
HANGING = "family._target_=tests.test_hardening_checkpoints.HangingSaveFamily"


class _Hang:
    """Pickled inside a checkpoint: tells the test the write has begun, then blocks it until the test kills it."""

    def __reduce__(self) -> tuple:
        Path(os.environ["OSTINATO_HANG_MARKER"]).touch()
        time.sleep(600)
        return int, (0,)


class HangingSaveFamily(DebugFamily):
    """DebugFamily whose checkpoint write from step ``$OSTINATO_HANG_SAVE_AT`` on blocks half-written."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        at = os.environ.get("OSTINATO_HANG_SAVE_AT")
        if at and self.global_step >= int(at):
            checkpoint["hang"] = _Hang()


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``ostinato ARGS`` through the real ``cli.main`` in this process: (exit code, stdout, stderr)."""
    try:
        cli_main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@dataclass
class KilledRun:
    ckpts: Path  # the XP's checkpoints folder after the re-run: last.ckpt (step 12), last-previous.ckpt (8)
    orphans: list[Path]  # temp files the killed write left
    step_after_kill: int  # the step of last.ckpt right after the kill
    rerun: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def killed_run(env: dict[str, str]) -> KilledRun:
    """A real run killed (SIGKILL) while writing its step-8 checkpoint, then run again to the end (step 12)."""
    run = [*RUN, HANGING]
    ckpts = xp_folder(env, *run) / "checkpoints"
    marker = ckpts.parent / "hang.marker"
    hang_env = {**env, "OSTINATO_HANG_SAVE_AT": "8", "OSTINATO_HANG_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "ostinato.cli", "train", *cli_args(run)], env=hang_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached its step-8 checkpoint write"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    orphans = [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    step = _step(ckpts / "last.ckpt")
    return KilledRun(ckpts, orphans, step, train(env, *run))


@pytest.fixture(scope="module")
def trained(killed_run: KilledRun) -> Path:
    return killed_run.ckpts


def _xp_with(env: dict[str, str], trained: Path, run: list[str], names: list[str]) -> Path:
    """The checkpoints folder of a fresh XP for ``run`` holding copies (mtimes kept) of ``trained``'s ``names``."""
    target = xp_folder(env, *run) / "checkpoints"
    target.mkdir(parents=True)
    for name in names:
        shutil.copy2(trained / name, target / name)
    return target


@pytest.mark.slow
def test_a_truncated_last_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(env, trained) -> None:
    run = [*RUN, HANGING, "seed=11"]  # an XP of its own
    ckpts = _xp_with(env, trained, run, ["last.ckpt", PREVIOUS_NAME])
    _damage(ckpts / "last.ckpt", "truncated")
    damaged_bytes = (ckpts / "last.ckpt").read_bytes()
    result = train(env, *run)
    said = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(said) == 1, result.stderr[-3000:]
    assert f"checkpoint {ckpts / 'last.ckpt'} is damaged (truncated: {len(damaged_bytes)} bytes" in said[0]
    assert "set aside as last.ckpt.damaged-" in said[0] and "resuming from last-previous.ckpt" in said[0]
    assert f"resuming {ckpts / PREVIOUS_NAME}" in result.stderr
    aside = [p for p in ckpts.iterdir() if p.name.startswith("last.ckpt.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged_bytes  # kept, byte for byte
    assert _step(ckpts / "last.ckpt") == 12  # trained on from step 8 to the end


@pytest.mark.slow
def test_an_empty_last_checkpoint_without_a_previous_one_starts_from_scratch(env, trained) -> None:
    """Nothing whole is left to resume: starting over loses nothing (the damaged file is kept), while a run that
    stopped would only be started again by hand to do the same; the warning says which it did."""
    run = [*RUN, HANGING, "seed=13"]
    ckpts = _xp_with(env, trained, run, ["last.ckpt"])
    _damage(ckpts / "last.ckpt", "empty")
    result = train(env, *run)
    said = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(said) == 1, result.stderr[-3000:]
    assert f"checkpoint {ckpts / 'last.ckpt'} is damaged (empty (0 bytes)): set aside as last.ckpt.damaged-" in said[0]
    assert said[0].endswith("no whole checkpoint is left, so training starts from scratch")
    assert ", resuming" not in result.stderr
    assert _step(ckpts / "last.ckpt") == 12
    assert len([p for p in ckpts.iterdir() if ".damaged-" in p.name]) == 1


@pytest.mark.slow
def test_a_write_killed_mid_way_leaves_temp_files_the_next_run_removes(killed_run: KilledRun) -> None:
    """SIGKILL while ``last.ckpt`` is being written: its temp file stays behind; the next run removes it (one log
    line with the count and size), resumes from the last whole checkpoint and finishes."""
    orphans, ckpts, err = killed_run.orphans, killed_run.ckpts, killed_run.rerun.stderr
    assert len(orphans) == 1 and orphans[0].name.startswith(".last.ckpt.") and killed_run.step_after_kill == 4
    assert re.search(r"removed 1 temp file \(\d+\.\d MB\) left in .*checkpoints by interrupted checkpoint writes",
                     err), err[-3000:]
    assert f"resuming {ckpts / 'last.ckpt'}" in err
    assert not orphans[0].exists()
    assert _step(ckpts / "last.ckpt") == 12


def test_overwriting_last_keeps_the_previous_one(trained: Path) -> None:
    assert _step(trained / "last.ckpt") == 12 and _step(trained / PREVIOUS_NAME) == 8
    assert sorted(p.name for p in trained.iterdir()) == ["last-previous.ckpt", "last.ckpt"]


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_export_of_a_damaged_checkpoint_names_it_and_the_previous_one(capsys, tmp_path, trained, how) -> None:
    xp = tmp_path / "xp"
    (xp / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", PREVIOUS_NAME):
        shutil.copy2(trained / name, xp / "checkpoints" / name)
    _damage(xp / "checkpoints" / "last.ckpt", how)
    code, _, err = _cli(capsys, "export", str(xp), str(tmp_path / "out"))
    line = _one_line_error(err)
    assert code == 2
    what = "truncated: " if how == "truncated" else "empty (0 bytes)"
    assert line.startswith(f"ostinato: error: checkpoint {xp / 'checkpoints' / 'last.ckpt'} is damaged ({what}")
    assert line.endswith(f"use the previous checkpoint {xp / 'checkpoints' / PREVIOUS_NAME} instead")
    assert not (tmp_path / "out").exists()
    code, _, _ = _cli(capsys, "export", str(xp / "checkpoints" / PREVIOUS_NAME), str(tmp_path / "out"))
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()  # the advice works


def test_a_damaged_checkpoint_file_alone_says_no_whole_one_is_left(capsys, tmp_path, trained) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    code, _, err = _cli(capsys, "export", str(ckpt), str(tmp_path / "out"))
    assert code == 2 and _one_line_error(err) == (
        f"ostinato: error: checkpoint {ckpt} is damaged (empty (0 bytes)), e.g. by a run killed while writing it; "
        "no whole checkpoint is left beside it; use another one, or train again")


def test_every_loader_gets_the_damaged_checkpoint_error(tmp_path, trained) -> None:
    """load_checkpoint is where ostinato.load, continue_from, export and generate --model read a .ckpt."""
    ckpt = tmp_path / "last.ckpt"
    shutil.copy2(trained / "last.ckpt", ckpt)
    shutil.copy2(trained / PREVIOUS_NAME, tmp_path / PREVIOUS_NAME)
    _damage(ckpt, "truncated")
    for call in (lambda: load_checkpoint(ckpt), lambda: load(ckpt),
                 lambda: load_weights(DebugFamily(), ckpt)):
        with pytest.raises(DamagedCheckpointError, match=f"use the previous checkpoint .*{PREVIOUS_NAME} instead"):
            call()
    assert isinstance(DamagedCheckpointError("x"), UserError)


def test_generate_with_a_damaged_model_checkpoint_is_one_line(env, tmp_path, trained) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes((trained / "last.ckpt").read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", "generate", "--model", str(ckpt), "--prompt", "x",
                           "--seconds", "1", "--out", str(tmp_path / "gen")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    line = _one_line_error(proc.stderr)
    assert f"checkpoint {ckpt} is damaged (truncated: 1000 bytes" in line


def test_continue_from_a_damaged_checkpoint_stops_before_training(env, tmp_path, trained) -> None:
    ckpt = tmp_path / "init.ckpt"
    ckpt.write_bytes(b"")
    proc = train(env, *RUN, f"continue_from={ckpt}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ostinato train: error: checkpoint {ckpt} is damaged (empty (0 bytes)), e.g. by a run killed while "
        "writing it; no whole checkpoint is left beside it; use another one, or train again")
    assert "Traceback" not in proc.stderr


def _foreign_checkpoint(path: Path, family: str, **tensors: torch.Tensor) -> Path:
    """A checkpoint as `ostinato train` writes it (state_dict + the resolved config) of another family."""
    torch.save({"state_dict": tensors, "global_step": 3, CONFIG_KEY: {"family": {"_target_": family}}}, path)
    return path


def test_continue_from_a_checkpoint_of_another_family_names_its_family(tmp_path) -> None:
    codec_weights = {"generator.encoder.weight": torch.zeros(4, 4), "generator.decoder.bias": torch.zeros(4)}
    ckpt = _foreign_checkpoint(tmp_path / "codec.ckpt", "ostinato.families.codec.CodecFamily", **codec_weights)
    with pytest.raises(UserError) as error:
        load_weights(DebugFamily(), ckpt)
    assert str(error.value) == (
        f"continue_from={ckpt}: {ckpt} is a checkpoint of family CodecFamily (ostinato.families.codec.CodecFamily); "
        "none of its 2 tensors fit DebugFamily: give a checkpoint of the family being trained")


def test_a_codec_written_before_the_model_split_loads_and_a_foreign_one_is_one_line(tmp_path) -> None:
    """Before wrappers held their model as ``model``, a codec's tensors sat under ``codec.``: such a checkpoint
    loads as the same Codec; tensors of some other model are refused in one line naming the record."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "family" / "codec_tiny.yaml"
    family = OmegaConf.to_container(OmegaConf.load(conf))
    torch.manual_seed(0)
    codec = instantiate(family, _convert_="all").model
    old = {f"codec.{k}": v for k, v in codec.state_dict().items()}
    old["discriminator.conv.weight"] = torch.zeros(2)  # training-only parts beside it
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old, "global_step": 3, CONFIG_KEY: {"family": family}}, path)
    loaded = load(path)
    assert type(loaded) is type(codec)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), codec.state_dict().values()))
    torch.save({"state_dict": {"encoder.w": torch.zeros(2)}, CONFIG_KEY: {"family": family}}, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match=r"x.ckpt: its tensors do not fit a Codec \(\d+ missing"):
        load(tmp_path / "x.ckpt")


def test_an_import_written_before_its_wrapper_moved_still_names_a_known_family() -> None:
    from ostinato.registry import kind_of

    old = {"family": {"_target_": "ostinato.interop.musicgen_import.ImportedMusicGenFamily"}}
    assert kind_of(old).model == "ostinato.models.musicgen:MusicGen"


def test_export_of_an_audiocraft_file_says_to_import_it(capsys, tmp_path) -> None:
    """audiocraft's exporters write {'best_state': ..., 'xp.cfg': ...}: not an ostinato checkpoint."""
    path = tmp_path / "state_dict.bin"
    torch.save({"best_state": {"w": torch.zeros(2)}, "xp.cfg": "{}", "version": "1.0", "exported": True}, path)
    code, _, err = _cli(capsys, "export", str(path), str(tmp_path / "out"))
    assert code == 2 and _one_line_error(err) == (
        f"ostinato: error: {path} is not a checkpoint written by `ostinato train` (an audiocraft file: bring it in "
        "with `ostinato import`); give an XP, its .ckpt or an export folder")


def test_export_into_an_existing_folder_needs_overwrite(capsys, tmp_path, trained) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, "export", str(trained / "last.ckpt"), str(out))
    assert code == 2 and _one_line_error(err) == (
        f"ostinato: error: {out} exists and holds files; pass --overwrite to replace it, or choose another folder")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, _ = _cli(capsys, "export", str(trained / "last.ckpt"), str(out), "--overwrite")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folder left beside it
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(capsys, "export", str(trained / "last.ckpt"), str(tmp_path / "file"))
    assert code == 2 and "is a file; give a folder (new or empty) for the export" in _one_line_error(err)


@pytest.mark.parametrize("where", ["new folder", "mount point"])
def test_export_to_a_full_disk_leaves_nothing_half_written(capsys, tmp_path, where) -> None:
    ckpt = _foreign_checkpoint(tmp_path / "big.ckpt", "ostinato.families.debug.DebugFamily",
                               **{"model.w": torch.zeros(200_000)})  # 800 kB of model weights for a 256 kB disk
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        out = disk / "out" if where == "new folder" else disk
        code, _, err = _cli(capsys, "export", str(ckpt), str(out))
        left = list(disk.iterdir())
    assert code == 2 and _one_line_error(err) == (
        f"ostinato: error: {out}: no space left on device; free some space or write elsewhere")
    assert left == []


@pytest.mark.parametrize("where", ["new folder", "mount point"])
def test_export_to_a_read_only_folder_says_so(capsys, tmp_path, where) -> None:
    ckpt = _foreign_checkpoint(tmp_path / "small.ckpt", "ostinato.families.debug.DebugFamily",
                               **{"model.w": torch.zeros(4)})
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        out = ro / "out" if where == "new folder" else ro
        code, _, err = _cli(capsys, "export", str(ckpt), str(out))
        left = list(ro.iterdir())
    assert code == 2 and _one_line_error(err) == (
        f"ostinato: error: {out}: read-only file system; choose a writable output folder")
    assert left == []


def test_export_into_a_mount_point_replaces_its_content(capsys, tmp_path) -> None:
    """An existing OUT may be a mount point, which cannot be renamed: its entries are replaced one by one."""
    ckpt = _foreign_checkpoint(tmp_path / "small.ckpt", "ostinato.families.debug.DebugFamily",
                               **{"model.w": torch.zeros(4)})
    with tmpfs(tmp_path / "mnt", "size=1m") as mnt:
        (mnt / "stale.txt").write_text("old")
        code, _, _ = _cli(capsys, "export", str(ckpt), str(mnt), "--overwrite")
        names = sorted(p.name for p in mnt.iterdir())
    assert code == 0 and names == ["config.yaml", "export.json", "model.safetensors"]


def test_a_damaged_file_is_set_aside_never_deleted(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"PK\x03\x04half")
    first, second = set_aside(path), None
    path.write_bytes(b"again")
    second = set_aside(path)
    assert first != second and first.read_bytes() == b"PK\x03\x04half" and second.read_bytes() == b"again"
    assert not path.exists()


def test_resume_choice_passes_over_damaged_ones_on_every_rank(tmp_path) -> None:
    """Ranks other than 0 rename nothing but choose the same checkpoint as rank 0."""
    io = SafeCheckpointIO()
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        io.save_checkpoint({"global_step": step}, ckpts / "last.ckpt")
    _damage(ckpts / "last.ckpt", "truncated")
    assert last_checkpoint(tmp_path) == ckpts / PREVIOUS_NAME  # rank > 0: nothing renamed
    assert (ckpts / "last.ckpt").exists()
    assert last_checkpoint(tmp_path, set_aside_damaged=True) == ckpts / PREVIOUS_NAME  # rank 0
    assert not (ckpts / "last.ckpt").exists() and _step(ckpts / PREVIOUS_NAME) == 2


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_last_one(capsys, tmp_path) -> None:
    """torch's writer says only 'unexpected pos'; the user sees the checkpoint, the disk and the fix, and the
    last.ckpt already there stays whole."""
    io = SafeCheckpointIO()
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        io.save_checkpoint({"global_step": 1}, disk / "last.ckpt")
        with pytest.raises(SystemExit) as stop, user_errors("ostinato train", value_errors=False):
            io.save_checkpoint({"global_step": 2, "w": torch.zeros(200_000)}, disk / "last.ckpt")
        names, step = sorted(p.name for p in disk.iterdir()), _step(disk / "last.ckpt")
    assert stop.value.code == 2 and _one_line_error(capsys.readouterr().err) == (
        f"ostinato train: error: {disk / 'last.ckpt'}: no space left on device; free some space or write elsewhere")
    assert names == ["last.ckpt"] and step == 1


def _sharded(folder: Path, step: int) -> Path:
    """The layout of a sharded FSDP checkpoint (meta.pt + the shard index .metadata), without shards."""
    folder.mkdir(parents=True)
    torch.save({"global_step": step}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(b"index")
    return folder


def test_a_damaged_sharded_checkpoint_is_passed_over_for_the_previous_one(tmp_path) -> None:
    ckpts = tmp_path / "checkpoints"
    previous = _sharded(ckpts / PREVIOUS_NAME, 4)
    last = _sharded(ckpts / "last.ckpt", 8)
    _damage(last / "meta.pt", "truncated")
    assert checkpoint_damage(last).startswith("its meta.pt is truncated: ")
    assert last_checkpoint(tmp_path, set_aside_damaged=True) == previous
    assert [p.name.split("-")[0] for p in ckpts.iterdir() if ".damaged-" in p.name] == ["last.ckpt.damaged"]
    (previous / ".metadata").write_bytes(b"")
    assert checkpoint_damage(previous) == "its shard index .metadata is empty"
    with pytest.raises(DamagedCheckpointError, match="no whole checkpoint is left beside it"):
        load_checkpoint(previous)


def test_an_xp_whose_last_checkpoint_was_set_aside_names_its_newest_whole_one(capsys, tmp_path, trained) -> None:
    """A run set last.ckpt aside and died before writing a new one: export of the XP names what is left."""
    xp = tmp_path / "xp"
    (xp / "checkpoints").mkdir(parents=True)
    shutil.copy2(trained / PREVIOUS_NAME, xp / "checkpoints" / PREVIOUS_NAME)
    code, _, err = _cli(capsys, "export", str(xp), str(tmp_path / "out"))
    assert code == 2 and _one_line_error(err) == (
        f"ostinato: error: {xp} holds no checkpoints/last.ckpt; its newest whole checkpoint is "
        f"{xp / 'checkpoints' / PREVIOUS_NAME}: give that instead")
    assert not (tmp_path / "out").exists()


def test_resuming_a_checkpoint_that_does_not_fit_the_model_is_one_line(env, trained) -> None:
    """A last.ckpt copied in from an XP with another model (here: another width) cannot resume this one."""
    run = [*RUN, HANGING, "family.hidden=8"]
    ckpts = _xp_with(env, trained, run, ["last.ckpt"])
    proc = train(env, *run, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"ostinato train: error: {ckpts / 'last.ckpt'} does not fit this XP's model "
                           "(a checkpoint of family HangingSaveFamily; 7 tensors of another shape, e.g. model."), line
    assert line.endswith(f"move it out of {ckpts} to start afresh, or give it as continue_from= to load what fits")
    assert "Traceback" not in proc.stderr and (ckpts / "last.ckpt").is_file()


def test_a_file_that_is_no_checkpoint_says_so(capsys, tmp_path) -> None:
    """Before: a weights-only load of a text file raised a bare KeyError."""
    path = tmp_path / "notes.ckpt"
    path.write_text("these are my notes, not weights")
    code, _, err = _cli(capsys, "export", str(path), str(tmp_path / "out"))
    assert code == 2 and _one_line_error(err) == (
        f"ostinato: error: {path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); give a .ckpt "
        "written by `ostinato train`, an XP or an export folder")
