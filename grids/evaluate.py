"""The evaluation-grid pattern: evaluate trained XPs (weights only) without training.

Each line names a trained XP by signature; `eval_only=true` validates and tests its EMA weights and pushes the
metrics to this evaluation XP's history, so the grid table compares them. Edit SIGS, then:

    ostinato grid evaluate
"""
from ._explorers import TrainExplorer

SIGS: list[str] = []  # e.g. ["3f2a9c1b", "77d01e4a"]


@TrainExplorer
def explorer(launcher):
    launcher.slurm_(gpus=0, cpus_per_task=1, mem_per_gpu=2, time=30)
    launcher.bind_({"eval_only": True, "logger": "csv", "data.num_workers": 0})
    for sig in SIGS:
        for seconds in [2.0, 8.0]:  # e.g. how the loss depends on the evaluation crop
            launcher({"continue_from": f"//sig/{sig}", "data.eval_segment_seconds": seconds})
