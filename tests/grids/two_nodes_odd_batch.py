"""One XP on the two-node test cluster whose global batch (3) does not divide over its 2 ranks: refused at start."""
from ostinato.grids._explorers import TrainExplorer
from tests.grids.two_nodes import FAST, TWO_NODES


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(**TWO_NODES)
    launcher.bind_(FAST)
    launcher({"data.batch_size": 3, "trainer.max_steps": 10})
