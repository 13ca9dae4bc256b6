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
# they start real SLURM clusters: one at a time
SLURM_FILES = {"test_slurm", "test_journeys", "test_slurm_two_nodes", "test_slurm_two_nodes_failures"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``-n 2 --dist loadgroup`` a test file runs on one worker, so its module fixtures (trained models,
    the quick demo) are built once; the files that start SLURM share a worker. Without xdist (``-p no:xdist``)
    there are no groups to mark."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        stem = Path(str(item.fspath)).stem
        item.add_marker(pytest.mark.xdist_group("slurm" if stem in SLURM_FILES else stem))


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
