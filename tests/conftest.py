"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.synth import write_shards

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards")
    return tmp_path / "shards"
