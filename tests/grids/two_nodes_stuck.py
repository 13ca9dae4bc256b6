"""The XP of two_nodes_faults.py with a 30 s collective timeout: a rank that stops answering (stopped, stuck)
fails the others' collective within 30 s, in one line naming its node."""
from ostinato.grids._explorers import TrainExplorer
from tests.grids.two_nodes import FAST, TWO_NODES


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(**TWO_NODES)
    launcher.bind_(FAST)
    launcher({"trainer.strategy": "ddp", "trainer.max_steps": 60, "trainer.collective_timeout": 30,
              "family._target_": "tests.engine_models.PacedRankDumpFamily"})
