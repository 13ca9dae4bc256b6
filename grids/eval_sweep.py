"""The evaluation sweep: cfg_scale x top_k of one trained MusicGen, scored by a suite.

It is the verb ``ostinato eval-sweep`` (``ostinato eval-sweep --help``):

    ostinato eval-sweep [SUITE] --model outputs/xps/<SIG> [--out DIR] [--set key=value]
    ostinato eval-sweep demo --model <SIG> -d 8                                  # clips shared by 8 ranks
    ostinato eval-sweep demo --model <SIG> --slurm nodes=2,gpus=8,partition=P    # one SLURM job, 16 ranks
    ostinato eval-sweep demo --model <SIG> --grid generation.top_p=0.9,0.95      # another grid

``python -m ostinato.grids.eval_sweep ARGS`` still runs it (``--suite NAME`` for SUITE). ``ostinato grid eval_sweep``
launches nothing and prints this usage. The default grid is ``ostinato.evaluation.sweep.DEFAULT_GRID``.
"""
from __future__ import annotations

import sys

from ._explorers import TrainExplorer


def main(argv: list[str] | None = None) -> None:
    from ostinato.cli import main as cli_main

    print("python -m ostinato.grids.eval_sweep is `ostinato eval-sweep` now", file=sys.stderr)
    cli_main(["eval-sweep", *(sys.argv[1:] if argv is None else argv)])


@TrainExplorer
def explorer(launcher):
    print(__doc__)


if __name__ == "__main__":
    main()
