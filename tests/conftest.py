"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.runner import make_env
from tests.synth import write_shards

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards")
    return tmp_path / "shards"


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment for `ostinato train` subprocesses: synthetic shards in the demo layout, a private outputs dir."""
    return make_env(tmp_path_factory.mktemp("engine"))
