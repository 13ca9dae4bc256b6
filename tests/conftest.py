"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.runner import make_env
from tests.synth import write_shards

os.environ.setdefault("WANDB_MODE", "offline")
# `make test` runs two xdist workers on the two cores: one thread each (2 x 2 threads spin-wait each other)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# the files that start the one-node SLURM cluster, and those that start the two-node one: one file of each at a time
SLURM_GROUPS = {"test_slurm": "slurm", "test_journeys": "slurm", "test_slurm_two_nodes": "slurm2n",
                "test_slurm_two_nodes_failures": "slurm2n"}


def scheduling_unit(nodeid: str) -> str:
    """The scheduling unit of a test under xdist: its file, or its SLURM cluster's group of files."""
    stem = Path(nodeid.split("::", 1)[0]).stem
    return SLURM_GROUPS.get(stem, stem)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The SLURM groups first (stable: a file's tests keep their order), so that the longest units start first."""
    items.sort(key=lambda item: scheduling_unit(item.nodeid) not in SLURM_GROUPS.values())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> object:
    """Under ``make test``'s ``-n 2`` a test file runs on one worker, so its module fixtures (trained models, the
    quick demo) are built once, and the files of one SLURM cluster run one after the other. Scopes, not xdist's
    ``xdist_group`` marks: pytest-xdist 3.8 renames ``item._nodeid`` for those, which pytest 9 no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_unit(nodeid)

    return FileGroups(config, log)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards")
    return tmp_path / "shards"


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment for `ostinato train` subprocesses: synthetic shards in the demo layout, a private outputs dir."""
    return make_env(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and two OpenMP threads on a busy 2-core machine spin-wait each other
    (5-100x slower); a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
