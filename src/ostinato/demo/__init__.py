"""``ostinato demo`` (what ``make demo`` runs) in one place: the end-to-end run (``pipeline``), its evaluation
(``evaluation``: ``evaluation/demo.yaml`` on the demo MusicGen) and its HTML report (``report``).

The demo sits below the CLI: it runs training in subprocesses and the generation verbs in-process through the
``verb`` the CLI hands to ``run_demo``.
"""
from __future__ import annotations

from ostinato.demo.pipeline import (CODEC_EXPERIMENT, GPU_OVERRIDES, MULAN_EXPERIMENT, MUSICGEN_EXPERIMENT,
                                    DemoPlan, check_demo, demo_table, mulan_retrieval, run_demo, unigram_entropy)

__all__ = ["CODEC_EXPERIMENT", "GPU_OVERRIDES", "MULAN_EXPERIMENT", "MUSICGEN_EXPERIMENT", "DemoPlan", "check_demo",
           "demo_table", "mulan_retrieval", "run_demo", "unigram_entropy"]
