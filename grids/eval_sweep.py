"""The evaluation sweep: cfg_scale x top_k of one trained MusicGen, scored by a suite.

dora grids launch training XPs (``ostinato.train``) and an evaluation is not one, so this grid runs the sweep itself
through ``ostinato.evaluation.sweep`` (one ``run_suite`` per combination, then one summary table):

    python -m ostinato.grids.eval_sweep --model outputs/xps/<SIG> [--suite demo] [--out DIR] [--set key=value]
    python -m ostinato.grids.eval_sweep --model <SIG> --device cuda -d 8                   # clips shared by 8 GPUs
    python -m ostinato.grids.eval_sweep --model <SIG> --slurm nodes=2,gpus=8,partition=P   # one SLURM job, 16 ranks
    python -m ostinato.grids.eval_sweep --model <SIG> --grid generation.top_p=0.9,0.95     # another grid

``-d`` and ``--slurm`` start the ranks as ``ostinato eval`` does (``ostinato.engine.launch``); every combination is
run by all of them, each rank taking its batches of the suite.

``ostinato grid eval_sweep`` launches nothing and prints this usage. Edit SUITE and GRID for other sweeps (any suite
key: ``generation.top_p``, ``generation.temperature``, ``long_form.window``, ...).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from ._explorers import TrainExplorer

SUITE = "demo"
GRID: dict[str, list] = {"generation.cfg_scale": [1.0, 3.0, 5.0], "generation.top_k": [50, 250]}


def main(argv: list[str] | None = None) -> Path:
    from ostinato.engine.launch import (SlurmOptions, python_command, run_local_ranks, submit_ranks,
                                        without_option)
    from ostinato.evaluation.runner import setup_distributed
    from ostinato.evaluation.sweep import sweep

    parser = argparse.ArgumentParser(prog="python -m ostinato.grids.eval_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the trained MusicGen (XP signature, folder, export)")
    parser.add_argument("--codec", default=None)
    parser.add_argument("--suite", default=SUITE)
    parser.add_argument("--out", default=None, help="default: $OSTINATO_OUTPUTS/eval/sweeps/<suite>/<model>")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed suite overrides")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a suite key and its values (repeatable; replaces GRID)")
    parser.add_argument("-d", "--distributed", type=int, default=1, metavar="N", help="N ranks on this machine")
    parser.add_argument("--slurm", default=None, metavar="KEY=VALUE,...",
                        help="one SLURM job whose tasks are the ranks (the keys of `ostinato eval --slurm`)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    grid = _grid(args.grid) if args.grid else GRID
    model = Path(args.model.rstrip("/")).name
    out = Path(args.out) if args.out else (
        Path(os.environ.get("OSTINATO_OUTPUTS", "outputs")) / "eval" / "sweeps" / Path(args.suite).stem / model)
    if args.slurm is not None:
        entry = importlib.import_module(__spec__.name).main  # by module name: `python -m` makes this __main__

        if args.distributed > 1:
            raise SystemExit("--slurm and -d: the job's tasks are the ranks; drop -d")
        options = SlurmOptions.parse(args.slurm)
        job_argv = without_option(argv, "--slurm") + ["--out", str(out.absolute())]
        if options.gpus and not any(t == "--device" or t.startswith("--device=") for t in job_argv):
            job_argv += ["--device", "cuda"]
        job = submit_ranks(entry, job_argv, options, out.absolute() / "slurm", name="eval-sweep")
        print(f"job {job.job_id} ({options.world_size} ranks): summary {out / 'summary.md'}; logs {out / 'slurm'}")
        return out / "summary.md"
    if args.distributed > 1 and "WORLD_SIZE" not in os.environ:
        code = run_local_ranks(python_command("ostinato.grids.eval_sweep", argv), args.distributed)
        if code:
            raise SystemExit(code)
        return out / "summary.md"
    device = setup_distributed(args.device)
    summary = sweep(args.suite, args.model, grid, out, codec=args.codec, overrides=args.set, device=device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.read_text())
        print(f"summary: {summary}")
    return summary


def _grid(items: list[str]) -> dict[str, list]:
    """``["generation.cfg_scale=1,3"]`` -> ``{"generation.cfg_scale": [1, 3]}`` (values read as YAML)."""
    import yaml

    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {item}: give KEY=V1,V2,... (e.g. generation.cfg_scale=1,3)")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


@TrainExplorer
def explorer(launcher):
    print(__doc__)


if __name__ == "__main__":
    main()
