"""Two short DDP XPs on the two-node test cluster (2 nodes x 1 process each, see two_nodes.py): each takes every
GPU slot of both nodes, so SLURM runs them one after the other; `ostinato grid` shows both in its live table."""
from ostinato.grids._explorers import TrainExplorer
from tests.grids.two_nodes import FAST, TWO_NODES


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(**TWO_NODES)
    launcher.bind_(FAST)
    launcher.bind_({"trainer.strategy": "ddp", "trainer.max_steps": 10})
    for lr in [1e-3, 3e-3]:
        launcher({"optim.lr": lr})
