"""One debug-family XP on the two-node test cluster (tests/slurm/setup_two_nodes.sh): 2 nodes x 1 process, DDP
over gloo. dora sizes nodes of 8 GPUs: gpus=16 is 2 nodes, one_task_per_node one process on each (the nodes'
8 GPUs are counted only; the ranks train on CPU). Each rank writes its final weights to $OSTINATO_DUMP."""
from ostinato.grids._explorers import TrainExplorer

TWO_NODES = dict(gpus=16, one_task_per_node=True, cpus_per_task=1, mem_per_gpu=0, time=10, partition="two")
FAST = {"logger": "csv", "data.segment_seconds": 0.5, "data.batch_size": 4, "data.batches_per_epoch": 10,
        "data.num_workers": 0, "trainer.accelerator": "cpu", "trainer.checkpoint_every_steps": 10,
        "trainer.progress_bar": False, "trainer.model_summary": False, "optim.schedule.warmup_steps": 0}


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(**TWO_NODES)
    launcher.bind_(FAST)
    launcher({"trainer.strategy": "ddp", "trainer.max_steps": 30,
              "family._target_": "tests.engine_models.RankDumpFamily"})
