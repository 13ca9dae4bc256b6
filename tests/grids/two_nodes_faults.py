"""A DDP XP on the two-node test cluster (2 nodes x 1 process, see two_nodes.py) long enough to be requeued or to
lose a node mid-run (60 steps of at least 0.3 s), checkpointed every 10 steps; a rank waits 90 s at most for the
other in a collective (trainer.collective_timeout), so a node lost without a word fails the job within that."""
from ostinato.grids._explorers import TrainExplorer
from tests.grids.two_nodes import FAST, TWO_NODES


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(**TWO_NODES)
    launcher.bind_(FAST)
    launcher({"trainer.strategy": "ddp", "trainer.max_steps": 60, "trainer.collective_timeout": 90,
              "family._target_": "tests.engine_models.PacedRankDumpFamily"})
