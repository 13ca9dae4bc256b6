"""Failures on the two-node SLURM cluster (tests/slurm/setup_two_nodes.sh, nodes on1 and on2), all through
`ostinato grid`: a job requeued mid-run checkpoints on both ranks and resumes on both nodes; a node killed mid-run
fails the job with one line naming that node, and a relaunch once it is back resumes from the last checkpoint;
a rank that stops answering fails the other after trainer.collective_timeout, naming its node; a grid of two
two-node XPs shows both in its live table until both completed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_slurm_two_nodes import SETUP, _env, _grid, _job_id, _logs, _state, _submitted, two_nodes

__all__ = ["two_nodes"]  # the cluster fixture, shared with test_slurm_two_nodes
TIMEOUT = 480  # seconds for one launch of an XP (queueing, two Python start-ups per node, 60 paced steps)
RUNNING = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN")
LOST = RUNNING + ("NODE_FAIL",)  # a job requeued after its node failed shows its failed attempt a while


def _step(folder: Path) -> int:
    last = folder / "checkpoints" / "last.ckpt"
    try:
        return int(torch.load(last, weights_only=True)["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):  # absent, or being replaced
        return -1


def _until(env: dict[str, str], folder: Path, done, what: str, allowed=RUNNING, timeout: float = TIMEOUT) -> None:
    """Poll ``done()`` every second; fail with the XP's logs when its job leaves ``allowed`` or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return
        state = _state(env, _job_id(folder))
        assert state in allowed + ("COMPLETED",), f"{what}: job {state}\n{_logs(folder)}"
        time.sleep(1)
    pytest.fail(f"no {what} after {timeout:.0f}s (job {_state(env, _job_id(folder))}):\n{_logs(folder)}")


def _completed(env: dict[str, str], folder: Path) -> None:
    _until(env, folder, lambda: _state(env, _job_id(folder)) == "COMPLETED", "completed job", timeout=120)


def _same_weights(dump: Path) -> dict:
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["host"], r["step"]) for r in ranks] == [("on1", 60), ("on2", 60)]
    different = [k for k in ranks[0]["state"] if not torch.equal(ranks[0]["state"][k], ranks[1]["state"][k])]
    assert ranks[0]["state"] and not different, different
    return ranks[0]


def _starts(dump: Path, restart: int) -> list[dict]:
    return [json.loads((dump / f"start.rank{r}.restart{restart}.json").read_text()) for r in (0, 1)]


def _rank_logs(folder: Path) -> list[str]:
    return [(folder / name).read_text() for name in ("train.log", "train.rank1.log")]


def _history_steps(folder: Path) -> list[int]:
    return [entry["step"] for entry in json.loads((folder / "history.json").read_text())]


def test_requeue_checkpoints_on_both_ranks_and_resumes_on_both_nodes(two_nodes, tmp_path):
    dump = tmp_path / "dump"
    env = _env(tmp_path, two_nodes, OSTINATO_DUMP=str(dump))
    _grid(env, tmp_path, "two_nodes_faults")
    folder = _submitted(tmp_path)
    job = _job_id(folder)
    _until(env, folder, lambda: 10 <= _step(folder) < 50, "checkpoint at step 10..49")
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=30)

    _until(env, folder, lambda: all((dump / f"rank{r}.pt").is_file() for r in (0, 1)), "end of the resumed run")
    _completed(env, folder)
    assert _job_id(folder) == job  # the same job, run again by SLURM
    logs = _rank_logs(folder)
    for text in logs:  # both ranks caught the signal and took part in the preemption checkpoint
        assert "caught SIGTERM" in text and "preemption checkpoint written" in text, text[-3000:]
    preempted = int(logs[0].split("preemption checkpoint written to ")[1].split(" at step ")[1].split()[0])
    assert 10 <= preempted < 60, logs[0][-3000:]
    # the second run: SLURM_RESTART_COUNT=1 on both nodes, each rank starting at the preempted step, not 0
    assert [(s["host"], s["restart"], s["step"]) for s in _starts(dump, 1)] == [
        ("on1", 1, preempted), ("on2", 1, preempted)], _logs(folder)
    resumed = [line for line in logs[0].splitlines() if "resuming" in line]
    assert len(resumed) == 1 and "last.ckpt" in resumed[0], logs[0][-3000:]
    _same_weights(dump)
    steps = _history_steps(folder)
    assert steps == sorted(set(steps)) and steps[-1] == 60, steps  # no step trained twice into the history


def _kill_node(node: str) -> list[int]:
    """Kill every process in the node's network namespace: its slurmd, slurmstepd and the job's ranks."""
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", f"ostinato-{node}"], capture_output=True,
                                           text=True, check=True, timeout=10).stdout.split()]
    for pid in pids:
        subprocess.run(["kill", "-KILL", str(pid)], capture_output=True, timeout=10)
    return pids


def _restarts(env: dict[str, str], job: str) -> int:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return int(out.split("Restarts=")[1].split()[0]) if "Restarts=" in out else 0


def _steps(node: str) -> list[int]:
    """The slurmstepd processes in the node's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", f"ostinato-{node}"], capture_output=True, text=True, check=True,
                          timeout=10).stdout.split()
    return [int(p) for p in pids if _comm(p) == "slurmstepd"]


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # gone meanwhile
        return ""


def _lost_line(folder: Path) -> list[str]:
    return [line for line in (folder / "train.log").read_text().splitlines() if "lost node on2 (10.77.0.12)" in line]


@pytest.mark.parametrize("after", ["slurm_requeues", "user_relaunches"])
def test_a_lost_node_fails_the_job_naming_it_and_a_relaunch_resumes(two_nodes, tmp_path, after):
    """``slurm_requeues``: SLURM requeues a batch job whose node failed (JobRequeue=1, its default), and the job
    runs again once the node is back. ``user_relaunches``: the job is not requeueable (a cluster with
    JobRequeue=0), ends NODE_FAIL, and `ostinato grid NAME --retry` submits it again. Both resume from the
    checkpoint the lost run left."""
    dump = tmp_path / "dump"
    env = _env(tmp_path, two_nodes, OSTINATO_DUMP=str(dump))
    _grid(env, tmp_path, "two_nodes_faults")
    folder = _submitted(tmp_path)
    first = _job_id(folder)
    if after == "user_relaunches":
        subprocess.run(["scontrol", "update", f"JobId={first}", "Requeue=0"], env=env, check=True, timeout=30)
    _until(env, folder, lambda: 20 <= _step(folder) < 50, "checkpoint at step 20..49")
    restarts = _restarts(env, first)
    killed_at = time.time()
    assert _kill_node("on2"), "no process in on2's namespace"
    try:
        # rank 0 on on1 sees rank 1's sockets close: one line naming on2, at once, not after a collective timeout
        _until(env, folder, lambda: bool(_lost_line(folder)), "line naming on2 in rank 0's log", LOST, timeout=120)
        said_after = time.time() - killed_at
        lines = _lost_line(folder)
        assert len(lines) == 1 and "rank 0 on on1" in lines[0] and "relaunch the XP" in lines[0], lines
        kept = _step(folder)
        assert kept >= 20 and str(folder / "checkpoints" / "last.ckpt") in lines[0], (kept, lines[0])
        assert said_after < 60, said_after
        # rank 0's stderr (the XP's submitit log): the same line, as `ostinato train: error:`, and no traceback
        out = folder / "submitit" / f"{first}_0_log.out"
        said = "ostinato train: error: rank 0 on on1 lost node on2 (10.77.0.12)"
        _until(env, folder, lambda: said in out.read_text(), "the line on rank 0's stderr", LOST, timeout=30)
        assert "Traceback" not in out.read_text(), out.read_text()
        # SLURM declares on2 down (SlurmdTimeout=30 here): the job is requeued, or ends NODE_FAIL
        if after == "slurm_requeues":
            _until(env, folder, lambda: _restarts(env, first) > restarts, "requeue of the job", LOST, timeout=240)
            # The requeued job (same id) may start 6 s later here (cred_expire=5; 121 s by default), while the
            # killed incarnation's batch step on on1 still waits out KillWait (30 s) and then signals job 'first'
            # everywhere: the new run would take that SIGTERM for a preemption. Bring on2 back once it is gone.
            _until(env, folder, lambda: not _steps("on1"), "end of the lost run's steps on on1", LOST, timeout=90)
        else:
            _until(env, folder, lambda: _state(env, first) not in RUNNING, "end of the job", timeout=240)
            assert _state(env, first) == "NODE_FAIL", _state(env, first)
        print(f"{after}: rank 0 named on2 {said_after:.0f}s after it was killed, job {first} "
              f"{_state(env, first)} after {time.time() - killed_at:.0f}s: {lines[0]}")
    finally:  # on2 back for every later test: its slurmd restarted, the node resumed
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    if after == "user_relaunches":
        _grid(env, tmp_path, "two_nodes_faults", "--retry")  # dora submits a failed XP again with --retry
        deadline = time.time() + 60
        while time.time() < deadline and _job_id(folder) == first:
            time.sleep(0.5)
        assert _job_id(folder) != first, "the relaunch submitted no job"
    _until(env, folder, lambda: all((dump / f"rank{r}.pt").is_file() for r in (0, 1)), "end of the resumed run", LOST)
    _completed(env, folder)
    # both ranks of the new run, one on each node, started from the checkpoint the lost run left
    restart = restarts + 1 if after == "slurm_requeues" else 0
    assert [(s["host"], s["step"]) for s in _starts(dump, restart)] == [("on1", kept), ("on2", kept)], _logs(folder)
    resumed = [line for line in (folder / "train.log").read_text().splitlines() if "resuming" in line]
    assert len(resumed) == 1 and "last.ckpt" in resumed[0], _logs(folder)
    _same_weights(dump)


def _rank_pid(node: str) -> int:
    """The pid of the job's rank (submitit's Python) in the node's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", f"ostinato-{node}"], capture_output=True, text=True, check=True,
                          timeout=10).stdout.split()
    ranks = [int(p) for p in pids if b"submitit.core._submit" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(ranks) == 1, ranks
    return ranks[0]


def test_a_stuck_rank_fails_the_others_after_the_collective_timeout(two_nodes, tmp_path):
    """The hang guard: rank 1 stops answering without closing its connections (SIGSTOP: a rank stuck, a node whose
    network went); rank 0 waits trainer.collective_timeout (30 s here), not torch's 30 minutes, and fails in one
    line naming on2. Once rank 1 runs again, its own next collective finds rank 0 gone: the job ends FAILED."""
    env = _env(tmp_path, two_nodes, OSTINATO_DUMP=str(tmp_path / "dump"))
    _grid(env, tmp_path, "two_nodes_stuck")
    folder = _submitted(tmp_path)
    _until(env, folder, lambda: 10 <= _step(folder) < 50, "checkpoint at step 10..49")
    pid = _rank_pid("on2")
    stopped_at = time.time()
    subprocess.run(["kill", "-STOP", str(pid)], check=True, timeout=10)
    try:
        _until(env, folder, lambda: any("waited 30 s" in line for line in _lost_lines(folder, "on1")),
               "rank 0's timeout", timeout=150)
        waited = time.time() - stopped_at
    finally:
        subprocess.run(["kill", "-CONT", str(pid)], timeout=10)
    line = next(line for line in _lost_lines(folder, "on1") if "waited 30 s" in line)
    assert "rank 0 on on1 waited 30 s (trainer.collective_timeout) for node on2 in a collective" in line, line
    assert 30 <= waited < 120, waited
    _until(env, folder, lambda: _state(env, _job_id(folder)) not in RUNNING, "end of the job", timeout=180)
    assert _state(env, _job_id(folder)) == "FAILED"
    # rank 1, running again, finds rank 0 gone (or its own wait past the timeout) and names rank 0's node
    rank1 = [line for line in (folder / "train.rank1.log").read_text().splitlines() if "rank 1 on on2 " in line]
    assert len(rank1) == 1 and "node on1" in rank1[0], _logs(folder)
    print(f"rank 0 gave up on the stopped rank 1 after {waited:.0f}s: {line}")


def _lost_lines(folder: Path, host: str) -> list[str]:
    return [line for line in (folder / "train.log").read_text().splitlines() if f"on {host} " in line
            and "collective" in line]


def test_a_grid_of_two_multi_node_xps_shows_both_in_the_live_table(two_nodes, tmp_path):
    env = _env(tmp_path, two_nodes)
    # monitoring (no --no_monitoring): the table every 3 s until both XPs are done
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", "grid", "two_nodes_pair", "--interval", "0.05"],
                          env=env, capture_output=True, text=True, timeout=2 * TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = [[line for line in chunk.splitlines() if "opt.lr=" in line]
              for chunk in proc.stdout.split("Next update in")]
    tables = [rows for rows in tables if rows]
    assert tables and all(len(rows) == 2 for rows in tables), proc.stdout[-3000:]
    seen = {state for rows in tables for row in rows for state in ("PEN", "RUN", "COM") if f" {state} " in row}
    assert {"COM"} <= seen and seen & {"PEN", "RUN"}, (seen, proc.stdout[-3000:])
    assert all(" COM " in row for row in tables[-1]), tables[-1]  # the last table: both completed
    xps = sorted((tmp_path / "out" / "xps").glob("*/job.json"))
    assert len(xps) == 2 and {_state(env, _job_id(p.parent)) for p in xps} == {"COMPLETED"}
