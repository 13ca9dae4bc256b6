"""engine.lost_node: a real gloo collective over TCP between two processes whose peer is killed (its sockets
close) or stops answering (it never joins): the survivor's error becomes one line naming the peer's node, and a
collective timeout bounds the wait. The two-node SLURM test (test_slurm_two_nodes_failures) does the same across
two nodes through `ostinato grid`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

# rank 0 prints the line lost_node_message makes of its failed second all-reduce; rank 1 dies or sleeps through it
RANK = textwrap.dedent("""
    import os, signal, sys, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    from ostinato.engine.lost_node import lost_node_message
    rank, fault, timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout))
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 1:
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    try:
        dist.all_reduce(t)
    except Exception as e:
        print("LINE", lost_node_message(e, 0, timeout, host="on1", nodes=["on1", "localhost"]), flush=True)
""")


def _pair(fault: str, timeout: float) -> tuple[str, float]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), fault, str(timeout)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=180)
        ended = time.time()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    line = next((x[5:] for x in out.splitlines() if x.startswith("LINE ")), None)
    assert line, out[-3000:]
    return line, ended


def test_a_killed_peer_is_named_by_its_node():
    line, _ = _pair("kill", 120)
    # gloo names the peer's address; the job's node at that address is named (localhost here, on2 on the cluster)
    assert line.startswith("rank 0 on on1 lost node localhost (127.0.0.1) in a collective"), line
    assert "relaunch the XP" in line and "\n" not in line


def test_a_silent_peer_fails_the_collective_after_the_timeout_naming_the_other_nodes():
    start = time.time()
    line, ended = _pair("sleep", 5)
    # no address in gloo's timeout: the job's other nodes are named, and the wait is bounded by the timeout
    assert line.startswith("rank 0 on on1 waited 5 s (trainer.collective_timeout) for node localhost"), line
    assert ended - start < 50  # start-up of two Pythons + 5 s, far below the sleeping rank's 60 s


def test_other_errors_are_not_a_lost_node():
    from ostinato.engine.lost_node import lost_node_message

    assert lost_node_message(ValueError("shapes do not match"), 0, nodes=["on1", "on2"]) is None
