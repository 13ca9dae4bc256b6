"""Starting the ranks of a command that is not a training XP (``ostinato eval -d N``, ``ostinato eval --slurm``).

Training goes through dora (``ostinato train -d``, grids); an evaluation is not an XP, so it starts its ranks here,
with torchrun's contract: every rank sees ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` and joins the process group with ``init_process_group(init_method="env://")``.

- ``run_local_ranks``: N processes of one command on this machine (one per GPU, or gloo CPU processes).
- ``submit_ranks``: one submitit job of ``nodes x tasks`` tasks (SLURM, or ``cluster=local`` for this machine);
  inside a task ``rendezvous_from_job`` turns submitit's view of the job into those variables.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ostinato.errors import UserError

__all__ = ["SlurmOptions", "free_port", "python_command", "rendezvous_from_job", "run_local_ranks", "sbatch_script",
           "submit_ranks", "without_option"]


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_local_ranks(command: Sequence[str], nprocs: int, env: Mapping[str, str] | None = None,
                    poll_seconds: float = 0.2) -> int:
    """Run ``command`` as ``nprocs`` ranks on this machine and wait for them; their output goes to this terminal.

    When a rank fails, the others are terminated (they would wait for it at the next collective) and its exit
    code is returned; 0 when every rank succeeded.
    """
    base = {**(os.environ if env is None else env), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen(list(command), env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nprocs)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_seconds)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def rendezvous_from_job() -> bool:
    """Inside a submitit task (SLURM or local) without torchrun's variables: set them from the job (rank = the
    task's global rank, master = the job's first node, port derived from the job id so every task agrees).
    Returns whether this process is one of several ranks."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]) > 1
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:  # not a submitit task
        return False
    if job.num_tasks <= 1:
        return False
    hosts = list(job.hostnames)
    os.environ.update({
        "RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // max(1, job.num_nodes)),
        "MASTER_ADDR": "127.0.0.1" if job.num_nodes == 1 or not hosts else hosts[0],
        "MASTER_PORT": str(20000 + zlib.crc32(str(job.job_id).encode()) % 20000),
    })
    return True


@dataclass
class SlurmOptions:
    """What ``--slurm KEY=VALUE,...`` takes: ``nodes``; ``gpus`` per node (one task each); ``tasks`` per node
    (default: ``gpus``, or 1 on CPU); ``partition``; ``time`` (minutes); ``cpus`` per task; ``mem`` (GB per node);
    ``account``; ``qos``; ``cluster``: ``slurm`` (sbatch) or ``local`` (this machine, through submitit's local
    executor, waited for)."""

    nodes: int = 1
    gpus: int = 0
    tasks: int | None = None
    partition: str | None = None
    time: int = 60
    cpus: int = 8
    mem: int | None = None
    account: str | None = None
    qos: str | None = None
    cluster: str = "slurm"
    text: str = ""  # as given, for messages

    @classmethod
    def parse(cls, text: str, option: str = "--slurm") -> SlurmOptions:
        """``"nodes=2,gpus=8,partition=learn,time=120"`` -> options; one-line ValueError naming a bad key."""
        fields = [f for f in cls.__dataclass_fields__ if f != "text"]
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"{option} {text}: {part!r} is not KEY=VALUE with KEY one of {', '.join(fields)}")
            if key in ("partition", "account", "qos", "cluster"):
                values[key] = value
                continue
            try:
                values[key] = int(value)
            except ValueError:
                raise ValueError(f"{option} {text}: {key}={value} is not a whole number") from None
            if values[key] < (0 if key == "gpus" else 1):
                raise ValueError(f"{option} {text}: {key}={value} must be at least {0 if key == 'gpus' else 1}")
        options = cls(**values, text=text)
        if options.cluster not in ("slurm", "local"):
            raise ValueError(f"{option} {text}: cluster={options.cluster}: use slurm or local")
        if options.cluster == "local" and options.nodes != 1:
            raise ValueError(f"{option} {text}: cluster=local runs on this machine: nodes=1")
        return options

    @property
    def tasks_per_node(self) -> int:
        return self.tasks or self.gpus or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def executor_parameters(self) -> dict[str, Any]:
        """submitit ``AutoExecutor.update_parameters`` keywords."""
        params: dict[str, Any] = {"nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
                                  "gpus_per_node": self.gpus, "cpus_per_task": self.cpus, "timeout_min": self.time}
        if self.mem is not None:
            params["mem_gb"] = self.mem
        if self.cluster == "slurm":
            for key in ("partition", "account", "qos"):
                if getattr(self, key) is not None:
                    params[f"slurm_{key}"] = getattr(self, key)
        return params


def _executor(options: SlurmOptions, folder: Path, name: str) -> Any:
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster)
    executor.update_parameters(name=name, **options.executor_parameters())
    return executor


def sbatch_script(options: SlurmOptions, folder: str | os.PathLike, name: str = "ostinato-eval") -> str:
    """The sbatch file ``submit_ranks`` has submitit write for ``options`` (``cluster=slurm``): what SLURM runs."""
    import submitit

    executor = _executor(SlurmOptions(**{**options.__dict__, "cluster": "slurm"}), Path(folder), name)
    inner = executor._executor
    assert isinstance(inner, submitit.SlurmExecutor)
    return inner._make_submission_file_text("python -u -m submitit.core._submit %j", "0")


def submit_ranks(fn: Callable[[list[str]], Any], argv: list[str], options: SlurmOptions,
                 folder: str | os.PathLike, name: str = "ostinato-eval") -> Any:
    """Submit ``fn(argv)`` as one job of ``options.world_size`` tasks (logs and submitit's files in ``folder``).
    Every task runs ``fn(argv)``; ``rendezvous_from_job`` gives each its rank. Returns the submitit job; a
    ``cluster=local`` job is waited for (its failure raised with the log tail)."""
    from submitit.core.utils import FailedJobError

    try:
        job = _executor(options, Path(folder), name).submit(fn, argv)
    except (FailedJobError, FileNotFoundError) as e:  # sbatch refused it (partition, resources), or no sbatch here
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"--slurm {options.text}: the job was not submitted: {reason[-400:]}") from None
    if options.cluster == "local":
        try:
            job.results()
        except Exception as e:  # submitit's FailedJobError carries the task's traceback
            raise RuntimeError(f"{name}: job {job.job_id} failed; logs in {folder}: {str(e)[-1500:]}") from None
    return job


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` less ``option VALUE`` and ``option=VALUE`` (what a submitted job must not submit again)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == option:
            skip = True
        elif not token.startswith(option + "="):
            out.append(token)
    return out


def python_command(module: str, argv: Sequence[str]) -> list[str]:
    """``python -m MODULE ARGV...`` with this interpreter."""
    return [sys.executable, "-m", module, *argv]
