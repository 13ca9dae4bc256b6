"""A real single-node SLURM cluster: `ostinato grid` runs two XPs through submitit to completion, and a job
requeued mid-run (`scontrol requeue`) writes a checkpoint on the signal and resumes from it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.synth import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> None:
    proc = subprocess.run(["bash", str(ROOT / "tests" / "slurm" / "setup_slurm.sh")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"SLURM set-up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _step(folder: Path) -> int:
    ckpt = folder / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, weights_only=True)["global_step"] if ckpt.is_file() else -1


def _history(folder: Path) -> list[dict]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _failure(folders: list[Path]) -> str | None:
    for folder in folders:
        log = folder / "train.log"
        if log.is_file() and "ERROR" in log.read_text():
            return f"{folder.name}: {log.read_text()[-2000:]}"
    return None


def _job_id(folder: Path) -> str:
    return str(json.loads((folder / "job.json").read_text())["job_id"])


def test_grid_on_slurm_with_requeue(cluster, tmp_path):
    for split in ("train", "valid", "test"):
        write_shards(tmp_path / "data" / "demo" / "shards" / split, n_shards=2, per_shard=8, sample_rate=24000)
    env = {**os.environ, "OSTINATO_DATA": str(tmp_path / "data"), "OSTINATO_OUTPUTS": str(tmp_path / "out"),
           "OSTINATO_GRIDS": "tests.grids", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    grid = [sys.executable, "-m", "ostinato.cli", "grid", "slurm_smoke"]
    submit = subprocess.run(grid + ["--no_monitoring"], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    xps = tmp_path / "out" / "xps"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(xps.glob("*/job.json"))) < 2:
        time.sleep(0.5)
    folders = sorted(p.parent for p in xps.glob("*/job.json"))
    assert len(folders) == 2, f"expected two submitted XPs, found {folders}"
    target = folders[0]

    # requeue the first XP once it has a checkpoint and before it finishes
    requeued_at = -1
    while time.time() < deadline:
        assert not _failure(folders), _failure(folders)
        step = _step(target)
        if 20 <= step < 250:
            subprocess.run(["scontrol", "requeue", _job_id(target)], check=True, timeout=30)
            requeued_at = step
            break
        time.sleep(0.2)
    assert requeued_at >= 20, f"the job was not caught mid-run (step {_step(target)})"

    while time.time() < deadline and any(_step(f) < 300 for f in folders):
        assert not _failure(folders), _failure(folders)
        time.sleep(1)
    logs = {f: (f / "train.log").read_text() for f in folders}
    assert [_step(f) for f in folders] == [300, 300], {f.name: logs[f][-1500:] for f in folders}
    log = logs[target]
    assert "preemption checkpoint written" in log, log[-3000:]
    resumed = [line for line in log.splitlines() if "resuming" in line]
    assert len(resumed) == 1 and "last.ckpt" in resumed[0], log[-3000:]
    # the last checkpoint is written at step 300 before the last validation pushes its history entry: wait for it
    while time.time() < deadline and _history(target)[-1:] and _history(target)[-1]["step"] < 300:
        time.sleep(0.5)
    history = _history(target)
    assert history[-1]["step"] == 300 and "valid" in history[-1]

    table = subprocess.run(grid + ["--no_monitoring"], env=env, capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    rows = [line for line in table.stdout.splitlines() if "opt.lr=" in line]
    assert table.returncode == 0 and len(rows) == 2, table.stdout[-2000:]
    for row in rows:  # state COMpleted, step 300, train and valid losses from the pushed history
        assert " COM " in row and " 300 " in row and row.count("0.0") >= 3, row
