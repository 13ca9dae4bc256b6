"""Lightning's view of a dora/submitit process layout.

dora starts the processes itself (`dora run -d`, or one SLURM task per GPU through submitit), so Lightning must
not spawn any: this environment reports the rank and world size that dora's distributed spec gives, and makes
Lightning leave SLURM requeueing to submitit (Lightning only requeues under its own ``SLURMEnvironment``).
"""
from __future__ import annotations

import os

from dora.distrib import get_distrib_spec, set_distrib_env
from lightning.fabric.plugins.environments import ClusterEnvironment


class DoraEnvironment(ClusterEnvironment):
    """Rank, world size and rendezvous from ``dora.distrib`` (env vars from `dora run -d`, or submitit)."""

    def __init__(self) -> None:
        super().__init__()
        # the spec first: once set_distrib_env has exported RANK/WORLD_SIZE, dora reads those and no longer
        # submitit's job, whose node count and node rank they lack (every node would be node 0 of 1)
        spec = get_distrib_spec()
        set_distrib_env()  # MASTER_ADDR/PORT, RANK, WORLD_SIZE for torch.distributed
        self._rank, self._world_size = spec.rank, spec.world_size
        self._local_rank, self._node_rank, self.num_nodes = spec.local_rank, spec.node_rank, spec.num_nodes

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", 29500))

    @staticmethod
    def detect() -> bool:
        return get_distrib_spec().world_size > 1

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:
        self._world_size = size

    def global_rank(self) -> int:
        return self._rank

    def set_global_rank(self, rank: int) -> None:
        self._rank = rank

    def local_rank(self) -> int:
        return self._local_rank

    def node_rank(self) -> int:
        return self._node_rank

    @property
    def devices_per_node(self) -> int:
        return max(1, self._world_size // max(1, self.num_nodes))
