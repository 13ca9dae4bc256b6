"""A collective that failed because another node of a multi-node job went away, said in one line naming the node.

Without this the user sees gloo's ``Connection closed by peer [10.77.0.12]:41235`` (or, when the node's network
vanished without closing its sockets, ``Timed out waiting 1800000ms for recv``) deep in a Lightning traceback,
and has to work out which machine that address is."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator

from ostinato.errors import UserError

__all__ = ["LostNodeError", "job_nodes", "lost_node_message"]

# gloo's and NCCL's words for a peer that closed its sockets, reset them, or never answered
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "no route to host", "socket closed", "remote process exited", "connection timed out")
_TIMED_OUT = ("timed out waiting", "timeout", "watchdog caught collective operation timeout")
_ADDRESS = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+")


class LostNodeError(UserError, RuntimeError):
    """A rank lost the ranks of another node in a collective (the node, its network or its processes died)."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__  # type: ignore[assignment]


def _is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    text = str(error).lower()
    return (isinstance(error, getattr(dist, "DistError", ())) or "gloo" in text or "nccl" in text
            or any(m in text for m in _PEER_GONE))


def job_nodes() -> list[str]:
    """The host names of this SLURM job's nodes (``SLURM_JOB_NODELIST`` expanded by ``scontrol show hostnames``,
    the one tool that knows every form of Slurm's host lists); [] outside a job."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return []
    if "[" not in nodelist:
        return [n for n in nodelist.split(",") if n]
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return [nodelist]


def _address(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def lost_node_message(error: BaseException, rank: int, timeout_s: float | None = None,
                      host: str | None = None, nodes: list[str] | None = None) -> str | None:
    """One line naming the node whose ranks ``rank`` lost in a collective, or None when ``error`` is no collective
    failure. The node is the job node whose address the error names (a closed or reset connection); when it names
    none (a timeout) the job's other nodes are named. ``nodes``: the job's host names (default: ``job_nodes()``)."""
    failure = next((e for e in _chain(error) if _is_collective_failure(e)), None)
    if failure is None:
        return None
    host = host or socket.gethostname()
    nodes = job_nodes() if nodes is None else nodes
    text = str(failure)
    named = _ADDRESS.findall(text)
    by_address = {a: n for n in nodes if (a := _address(n)) is not None}
    lost = [f"{by_address[a]} ({a})" for a in dict.fromkeys(named) if a in by_address]
    if not lost and named:  # an address outside the job's list (a node known by another name): still say it
        lost = [a for a in dict.fromkeys(named) if a != _address(host)]
    timed_out = any(m in text.lower() for m in _TIMED_OUT)
    if not lost:
        others = [n for n in nodes if n != host]
        lost = [" or ".join(others)] if others else []
    where = f"node {', '.join(lost)}" if lost else "another rank"
    if timed_out:
        waited = f"{timeout_s:g} s (trainer.collective_timeout)" if timeout_s else "trainer.collective_timeout"
        what = (f"waited {waited} for {where} in a collective, which never answered: its ranks hung, or it or its "
                "network died")
    else:
        what = f"lost {where} in a collective: that node, its network or its job processes died"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(failure).__name__)
    return (f"rank {rank} on {host} {what} ({first[-160:]}); once the node is back (sinfo), relaunch the XP: it "
            "resumes from its last checkpoint")
