"""The evaluation sweep: cfg_scale x top_k of one trained MusicGen, scored by a suite.

dora grids launch training XPs (``ostinato.train``) and an evaluation is not one, so this grid runs the sweep itself
through ``ostinato.evaluation.sweep`` (one ``run_suite`` per combination, then one summary table):

    python -m ostinato.grids.eval_sweep --model outputs/xps/<SIG> [--suite demo] [--out DIR] [--set key=value]
    torchrun --nproc_per_node 8 -m ostinato.grids.eval_sweep --model <SIG> --device cuda   # clips shared by ranks

``ostinato grid eval_sweep`` launches nothing and prints this usage. Edit SUITE and GRID for other sweeps (any suite
key: ``generation.top_p``, ``generation.temperature``, ``long_form.window``, ...).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._explorers import TrainExplorer

SUITE = "demo"
GRID: dict[str, list] = {"generation.cfg_scale": [1.0, 3.0, 5.0], "generation.top_k": [50, 250]}


def main(argv: list[str] | None = None) -> Path:
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
    args = parser.parse_args(argv)
    device = setup_distributed(args.device)
    model = Path(args.model.rstrip("/")).name
    out = Path(args.out) if args.out else (
        Path(os.environ.get("OSTINATO_OUTPUTS", "outputs")) / "eval" / "sweeps" / Path(args.suite).stem / model)
    summary = sweep(args.suite, args.model, GRID, out, codec=args.codec, overrides=args.set, device=device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.read_text())
        print(f"summary: {summary}")
    return summary


@TrainExplorer
def explorer(launcher):
    print(__doc__)


if __name__ == "__main__":
    main()
