"""The training engine end to end: XP folders and signatures, resume after SIGKILL, DDP, EMA export, guards,
config errors. Runs the real `ostinato train` CLI in subprocesses on small synthetic shards."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import ostinato
from ostinato.engine.weights import load_weights
from ostinato.families.debug import DebugFamily
from ostinato.models.debug import ConvAutoencoder
from tests.runner import cli_args, losses, train, xp_folder

def test_xp_folder_resume_and_signature(env):
    run = ["trainer.max_steps=20", "trainer.checkpoint_every_steps=5"]
    train(env, *run)
    folder = xp_folder(env, *run)
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    history = (folder / "history.json").read_text()
    assert '"valid"' in history and '"train"' in history

    mtime = (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = train(env, *run)
    assert "resuming" in again.stderr
    assert (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtime  # nothing trained, nothing written

    assert xp_folder(env, *run, "data.num_workers=1", "logger=tensorboard") == folder  # excluded keys
    assert xp_folder(env, *run, "optim.lr=1e-3") != folder  # a signature key


def test_a_checkpoint_copied_into_another_xp_resumes_and_is_overwritten(env):
    """Moving a run to a new XP (a changed config key) by copying its last.ckpt: the new XP resumes from it and
    then writes its own last.ckpt over it, never beside it (Lightning would write last-v1.ckpt, and every later
    resume would restart from the stale copy)."""
    first = ["trainer.max_steps=8", "trainer.checkpoint_every_steps=4"]
    train(env, *first)
    moved = ["trainer.max_steps=16", "trainer.checkpoint_every_steps=4"]  # an XP no other test uses
    target = xp_folder(env, *moved) / "checkpoints"
    target.mkdir(parents=True)
    (target / "last.ckpt").write_bytes((xp_folder(env, *first) / "checkpoints" / "last.ckpt").read_bytes())
    result = train(env, *moved)
    assert f"resuming {target / 'last.ckpt'}" in result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["last-previous.ckpt", "last.ckpt"]  # one before, kept
    assert torch.load(target / "last.ckpt", weights_only=True)["global_step"] == 16
    assert torch.load(target / "last-previous.ckpt", weights_only=True)["global_step"] == 12


def test_sigkill_resumes_from_last_checkpoint(env):
    run = ["trainer.max_steps=400", "trainer.checkpoint_every_steps=10", "ema.decay=0.9"]
    folder = xp_folder(env, *run)
    cmd = [sys.executable, "-m", "ostinato.cli", "train", *cli_args(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    saved = 0
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            saved = torch.load(last, weights_only=True)["global_step"]
            if saved >= 30:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 30 <= saved < 400, f"could not catch the run mid-way (step {saved})"
    saved = torch.load(last, weights_only=True)["global_step"]  # the file is whole after the kill
    before = losses(folder)
    result = train(env, *run)
    assert f"resuming {last}" in result.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 400
    steps = [step for step, _ in losses(folder)]  # the log keeps the rows before the kill, in step order
    assert steps[0] == before[0][0] and steps == sorted(steps) and steps[-1] >= 390
    new_rows = [row for row in losses(folder) if row[0] > saved]
    assert new_rows and new_rows[0][0] >= saved - 1, f"restarted from {new_rows[:1]}, checkpoint at {saved}"
    # the loss continues from where it was: nearer the loss at the checkpoint than the loss at the start
    start = before[0][1]
    at_ckpt = [loss for step, loss in before if step <= saved][-1]
    assert abs(new_rows[0][1] - at_ckpt) < abs(new_rows[0][1] - start)
    history = json.loads((folder / "history.json").read_text())
    epochs = [e["epoch"] for e in history]  # epochs finished before the checkpoint survive the resume, none twice
    assert epochs == sorted(set(epochs)) and epochs[-1] == 39
    assert set(range(saved // 10 - 1)) <= set(epochs)


def test_two_process_ddp_keeps_ranks_identical(env, tmp_path):
    dump = tmp_path / "dump"
    train({**env, "OSTINATO_DUMP": str(dump)}, "trainer.max_steps=8", "trainer.strategy=ddp",
          "trainer.accelerator=cpu", "family._target_=tests.engine_models.RankDumpFamily", ddp=2)
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 8
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key


def test_ema_export_load_samples_and_wandb(env, tmp_path):
    run = ["trainer.max_steps=20", "ema.decay=0.9", "seed=3", "logger=wandb", "samples.every_steps=10"]
    train(env, *run)
    folder = xp_folder(env, *run)
    assert list((folder / "wandb").glob("offline-run-*")), "wandb should log offline without a login"
    step = folder / "samples" / "step_00000010"
    assert sorted(p.name for p in step.iterdir()) == ["original_0.png", "original_0.wav", "original_1.png",
                                                     "original_1.wav", "reconstruction_0.png",
                                                     "reconstruction_0.wav", "reconstruction_1.png",
                                                     "reconstruction_1.wav"]
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    from ostinato.store.checkpoint import ema_weights_from_checkpoint

    ema = ema_weights_from_checkpoint(ckpt)
    raw = ckpt["state_dict"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)

    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "ostinato.cli", "export", folder.name, str(out)], env=env, check=True,
                   capture_output=True)
    model = ostinato.load(out)  # the inference model, not its training wrapper
    assert isinstance(model, ConvAutoencoder) and not isinstance(model, L.LightningModule)
    assert set(load_file(out / "model.safetensors")) == set(model.state_dict())  # the model's tensors alone
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[f"model.{key}"]), key
    x = torch.randn(2, 1, 4000)
    reloaded = ostinato.load(out)
    assert torch.equal(model(x), reloaded(x))
    assert torch.equal(ostinato.load(folder)(x), model(x))  # the XP's checkpoint: the same EMA model
    family = DebugFamily()  # continue_from an export loads the model's tensors into the wrapper's model
    report = load_weights(family, out)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(model.state_dict())
    assert torch.equal(family(x), model(x))


def test_nan_step_is_skipped_and_nan_run_stops(env):
    target = "family._target_=tests.engine_models.NaNFamily"
    ok = train(env, "trainer.max_steps=12", target, "+family.nan_steps=[4]")
    assert "non-finite" in ok.stderr.lower()
    folder = xp_folder(env, "trainer.max_steps=12", target, "+family.nan_steps=[4]")
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12

    bad = train(env, "trainer.max_steps=50", target, "+family.always=true", "trainer.nonfinite_max_in_row=3",
                check=False)
    assert bad.returncode != 0
    assert "3 non-finite" in bad.stderr or "3 in a row" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.parametrize("override, key", [
    ("trainer.bogus=1", "trainer.bogus"),
    ("data.train=/nonexistent/shards", "data.train"),
    ("trainer.max_steps=many", "trainer.max_steps"),
    ("family.hidden=wide", "family.hidden"),
    ("data.batch_size=5 trainer.devices=2", "data.batch_size"),
])
def test_bad_configs_fail_before_training_naming_the_key(env, override, key):
    proc = train(env, *override.split(), check=False)
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr[-1500:]
    assert "Epoch" not in proc.stderr and "global_step" not in proc.stderr


def test_eval_only_scores_a_trained_xp_without_training(env):
    trained = ["trainer.max_steps=10", "seed=5"]
    train(env, *trained)
    source = xp_folder(env, *trained)
    evaluation = [f"continue_from=//sig/{source.name}", "eval_only=true"]
    proc = train(env, *evaluation)
    folder = xp_folder(env, *evaluation)
    assert folder != source and not (folder / "checkpoints").exists()
    assert "loaded from" in proc.stderr and "(EMA)" in proc.stderr
    history = json.loads((folder / "history.json").read_text())
    assert history[-1]["valid"]["loss"] > 0 and history[-1]["test"]["loss"] > 0


def test_example_grids_expand_without_a_cluster(env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", "grid", "debug_sweep", "--dry_run",
                           "--no_monitoring"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if "opt.lr=" in line]
    sigs = {re.search(r"N/A\s+([0-9a-f]{8})", r).group(1) for r in rows}
    assert len(rows) == 4 and len(sigs) == 4  # four distinct experiments
