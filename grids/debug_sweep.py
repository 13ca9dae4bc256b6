"""A sweep example: learning rate x width of the debug family on the demo corpus.

    ostinato grid debug_sweep              # submit to SLURM (or show the table if already running)
    ostinato grid debug_sweep --dry_run    # print the experiments without submitting

Sizes: gpus=0 runs CPU-only jobs (1 task, `cpus_per_task` cores); on a GPU cluster set gpus=8 and
trainer=gpu: the global batch stays the same, dora puts 8 tasks on each node.
"""
from ._explorers import TrainExplorer


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(gpus=0, cpus_per_task=1, mem_per_gpu=2, time=30)
    launcher.bind_({"family": "debug", "logger": "csv", "trainer.max_steps": 200, "data.num_workers": 0})
    for lr in [1e-3, 3e-3]:
        for hidden in [8, 16]:
            launcher({"optim.lr": lr, "family.hidden": hidden})
