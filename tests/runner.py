"""Run the real `ostinato train` CLI in subprocesses on small synthetic shards (shared by engine and family tests)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.synth import write_shards

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.segment_seconds=0.5", "data.batch_size=4", "data.batches_per_epoch=10",
        "data.num_workers=0", "trainer.progress_bar=false", "trainer.model_summary=false",
        "trainer.log_every_n_steps=1", "optim.schedule.warmup_steps=0", "optim.lr=3e-3"]


def make_env(root: Path) -> dict[str, str]:
    """Synthetic demo-layout shards under ``root/data`` and an environment pointing the CLI at them."""
    for split in ("train", "valid", "test"):
        write_shards(root / "data" / "demo" / "shards" / split, n_shards=2, per_shard=8, sample_rate=24000)
    return {**os.environ, "OSTINATO_DATA": str(root / "data"), "OSTINATO_OUTPUTS": str(root / "out"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),  # this checkout, not the installed one
            "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def cli_args(overrides) -> list[str]:
    logger = [] if any(o.startswith("logger=") for o in overrides) else ["logger=csv"]
    return FAST + logger + list(overrides)


def train(env: dict[str, str], *overrides: str, check: bool = True, ddp: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ostinato.cli", "train"] + (["-d", "--ddp_workers", str(ddp)] if ddp else [])
    proc = subprocess.run(cmd + cli_args(overrides), env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def xp_folder(env: dict[str, str], *overrides: str) -> Path:
    """The XP folder dora derives for these overrides (computed in-process, as dora does)."""
    code = ("import sys; from ostinato.train import main; "
            "print(main.get_xp(sys.argv[1:]).folder)")
    out = subprocess.run([sys.executable, "-c", code, *cli_args(overrides)], env=env, capture_output=True,
                         text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``ostinato ARGS`` in a subprocess; fails the test with the end of its stderr unless it exits 0."""
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def xp_folders(env: dict[str, str], *runs: list[str]) -> list[Path]:
    """The XP folders of several runs' overrides, computed in one process (``xp_folder`` for many)."""
    code = ("import json, sys; from ostinato.train import main; "
            "print(json.dumps([str(main.get_xp(r).folder) for r in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps([cli_args(r) for r in runs])], env=env,
                         capture_output=True, text=True, check=True)
    return [Path(p) for p in json.loads(out.stdout.strip().splitlines()[-1])]


def losses(folder: Path) -> list[tuple[int, float]]:
    """(step, train loss) rows of the XP's CSV log, in the order they were written."""
    with open(folder / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
