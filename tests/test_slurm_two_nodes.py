"""A real two-node SLURM cluster on this machine (tests/slurm/setup_two_nodes.sh: nodes on1 and on2, each a slurmd in
its own network namespace): `ostinato grid` trains a dora XP on 2 nodes x 1 process, the ranks talking gloo over
TCP through the namespaces' veth pairs, with DDP (every rank ends with the same weights) and FSDP (a sharded
checkpoint written by both nodes, resumed by a second launch); a global batch that does not divide over the ranks
fails the job in one line. The multi-node failure modes (requeue, a node lost) have their own file."""
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
SETUP = ROOT / "tests" / "slurm" / "setup_two_nodes.sh"
NODES = {"on1": "10.77.0.11", "on2": "10.77.0.12"}
TIMEOUT = 420  # seconds for one XP (its queueing, two Python start-ups per node, training) on a busy machine


@pytest.fixture(scope="module")
def two_nodes() -> dict[str, str]:
    """The cluster, started (or found running) once; its client environment (SLURM_CONF)."""
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"two-node SLURM set-up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    line = subprocess.run(["bash", str(SETUP), "env"], capture_output=True, text=True, check=True).stdout.strip()
    key, _, value = line.partition("=")
    return {key: value}


def _env(tmp_path: Path, slurm: dict[str, str], **extra: str) -> dict[str, str]:
    for split in ("train", "valid", "test"):
        write_shards(tmp_path / "data" / "demo" / "shards" / split, n_shards=2, per_shard=8, sample_rate=24000)
    return {**os.environ, **slurm, "OSTINATO_DATA": str(tmp_path / "data"), "OSTINATO_OUTPUTS": str(tmp_path / "out"),
            "OSTINATO_GRIDS": "tests.grids", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}


def _grid(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", "grid", *args, "--no_monitoring"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _job_id(folder: Path) -> str:
    return str(json.loads((folder / "job.json").read_text())["job_id"])


def _state(env: dict[str, str], job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], env=env, capture_output=True,
                         text=True, timeout=30).stdout.split()
    return out[0] if out else "UNKNOWN"


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(folder.glob("train*.log")))


def _submitted(tmp_path: Path) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "out" / "xps").glob("*/job.json")):
        time.sleep(0.5)
    folders = [p.parent for p in (tmp_path / "out" / "xps").glob("*/job.json")]
    assert len(folders) == 1, f"expected one submitted XP, found {folders}"
    return folders[0]


def _wait(env: dict[str, str], folder: Path, done, what: str) -> None:
    """Poll until ``done()``; fail with the XP's logs when its job ends otherwise or time runs out."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if done():
            return
        state = _state(env, _job_id(folder))
        assert state in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED", "UNKNOWN"), f"job {state}:\n{_logs(folder)}"
        time.sleep(1)
    pytest.fail(f"no {what} after {TIMEOUT}s (job {_state(env, _job_id(folder))}):\n{_logs(folder)}")


def _veth_bytes(node: str) -> int:
    stats = Path("/sys/class/net") / f"ost2n-{node}" / "statistics"
    return sum(int((stats / f"{d}_bytes").read_text()) for d in ("rx", "tx"))


def test_dora_environment_sees_the_nodes_of_a_submitit_job(monkeypatch):
    """Rank 1 of a 2-node x 1-task job is node 1 of 2 with one device: Lightning then waits for 2 processes, not 2
    per node (the engine once read the layout after exporting RANK/WORLD_SIZE, saw node 0 of 1, and the job hung)."""
    from ostinato.engine.cluster import DoraEnvironment

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):  # set by the environment: restored after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASTER_PORT", "29999")  # else dora derives it from the XP
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "on[1-2]",
                       "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    env = DoraEnvironment()
    assert (env.global_rank(), env.world_size(), env.node_rank(), env.num_nodes) == (1, 2, 1, 2)
    assert (env.local_rank(), env.devices_per_node, env.main_address) == (0, 1, "on1")


def test_ddp_on_two_nodes_ends_with_the_same_weights_on_every_rank(two_nodes, tmp_path):
    dump = tmp_path / "dump"
    env = _env(tmp_path, two_nodes, OSTINATO_DUMP=str(dump))
    before = _veth_bytes("on2")
    _grid(env, tmp_path, "two_nodes")
    folder = _submitted(tmp_path)
    _wait(env, folder, lambda: all((dump / f"rank{r}.pt").is_file() for r in (0, 1)), "weights of both ranks")
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # one rank on each node, each in its node's network namespace, at its node's address
    assert [(r["host"], r["addr"]) for r in ranks] == list(NODES.items()), [(r["host"], r["addr"]) for r in ranks]
    assert ranks[0]["netns"] != ranks[1]["netns"]
    assert [(r["world"], r["step"]) for r in ranks] == [(2, 30), (2, 30)]
    logs = _logs(folder)
    assert "rank 0 of 2 on host on1 (node 0 of 2); rendezvous at on1:" in logs, logs
    assert "rank 1 of 2 on host on2 (node 1 of 2); rendezvous at on1:" in logs, logs
    # every rank's weights and buffers are the same, to the bit
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys() and state0
    different = [k for k in state0 if not torch.equal(state0[k], state1[k])]
    assert not different, different
    # the gradients' all-reduce crossed on2's veth: at least one copy of the weights per step
    weight_bytes = sum(v.numel() * v.element_size() for v in state0.values())
    assert _veth_bytes("on2") - before > 30 * weight_bytes
    deadline = time.time() + 60  # sacct follows squeue by a few seconds
    while time.time() < deadline and _state(env, _job_id(folder)) != "COMPLETED":
        time.sleep(1)
    assert _state(env, _job_id(folder)) == "COMPLETED"
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 30


def test_fsdp_on_two_nodes_writes_sharded_checkpoints_and_resumes(two_nodes, tmp_path):
    env = _env(tmp_path, two_nodes)
    _grid({**env, "OSTINATO_STOP_AT": "20"}, tmp_path, "two_nodes_fsdp")  # the first launch stops at step 20
    folder = _submitted(tmp_path)
    first = _job_id(folder)
    _wait(env, folder, lambda: _state(env, first) == "COMPLETED", "completed first launch")
    last = folder / "checkpoints" / "last.ckpt"
    # a sharded checkpoint (a directory): one shard file per rank, so one from each node
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert _meta_step(last) == 20, _logs(folder)
    # each rank's EMA shadows its own shards: rank 0's in meta.pt, rank 1's beside them (a copy of rank 0's was what
    # every rank resumed with, which does not fit rank 1's shards)
    ema0 = _ema_shadow(torch.load(last / "meta.pt", weights_only=True)["callbacks"])
    ema1 = _ema_shadow(torch.load(last / "callbacks.rank1.pt", weights_only=True))
    assert ema0.keys() == ema1.keys() and any(ema0[k].shape != ema1[k].shape for k in ema0)

    _grid(env, tmp_path, "two_nodes_fsdp", "--replace_done")  # the second launch: a new job, the same XP
    deadline = time.time() + 60
    while time.time() < deadline and _job_id(folder) == first:
        time.sleep(0.5)
    assert _job_id(folder) != first, "the second launch submitted no job"
    _wait(env, folder, lambda: _state(env, _job_id(folder)) == "COMPLETED", "completed second launch")
    logs = _logs(folder)
    assert _meta_step(last) == 40, logs
    resumed = [line for line in (folder / "train.log").read_text().splitlines() if "resuming" in line]
    assert len(resumed) == 1 and str(last) in resumed[0], logs
    for rank, host in enumerate(NODES):  # both launches ran a rank on each node
        text = (folder / ("train.log" if rank == 0 else f"train.rank{rank}.log")).read_text()
        assert text.count(f"rank {rank} of 2 on host {host} (node {rank} of 2)") == 2, text[-3000:]
    history = json.loads((folder / "history.json").read_text())
    assert [entry["step"] for entry in history] == [10, 20, 30, 40], history  # steps go on from the checkpoint


def _ema_shadow(callbacks: dict) -> dict[str, torch.Tensor]:
    (state,) = [v for k, v in callbacks.items() if k.startswith("EMA")]
    return state["shadow"]


def _meta_step(sharded: Path) -> int:
    return int(torch.load(sharded / "meta.pt", weights_only=True)["global_step"])


def test_a_global_batch_that_does_not_divide_over_the_ranks_fails_the_job_in_one_line(two_nodes, tmp_path):
    env = _env(tmp_path, two_nodes)
    _grid(env, tmp_path, "two_nodes_odd_batch")  # one rank on each node: 3 items do not divide over 2 ranks
    folder = _submitted(tmp_path)
    job = _job_id(folder)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and _state(env, job) in ("PENDING", "RUNNING", "COMPLETING", "UNKNOWN"):
        time.sleep(1)
    assert _state(env, job) == "FAILED"
    log = (folder / "submitit" / f"{job}_0_log.out").read_text()
    line = "ostinato train: error: data.batch_size=3 does not divide over 2 ranks: the batch size is global, use a " \
           "multiple of 2"
    assert line in log.splitlines(), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
