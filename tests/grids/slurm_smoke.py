"""Two debug-family XPs on the local test SLURM cluster (one CPU each), long enough to be requeued mid-run."""
from ostinato.grids._explorers import TrainExplorer


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(gpus=0, cpus_per_task=1, mem_per_gpu=1, time=10, partition="debug")
    launcher.bind_({"logger": "csv", "data.segment_seconds": 0.5, "data.batch_size": 4,
                    "data.batches_per_epoch": 10, "data.num_workers": 0, "trainer.max_steps": 300,
                    "trainer.checkpoint_every_steps": 10, "trainer.progress_bar": False,
                    "optim.schedule.warmup_steps": 0})
    for lr in [1e-3, 3e-3]:
        launcher({"optim.lr": lr})
