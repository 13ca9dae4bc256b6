"""One debug-family XP with FSDP on the two-node test cluster (2 nodes x 1 process, gloo; see two_nodes.py):
sharded checkpoints every 10 steps; $OSTINATO_STOP_AT stops a run early, as a preempted one, for a resume."""
from ostinato.grids._explorers import TrainExplorer
from tests.grids.two_nodes import FAST, TWO_NODES


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(**TWO_NODES)
    launcher.bind_(FAST)
    launcher({"trainer.strategy": "fsdp", "trainer.max_steps": 40,
              "family._target_": "tests.engine_models.StopAtFamily"})
