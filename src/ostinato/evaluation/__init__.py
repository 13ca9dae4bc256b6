"""Benchmark suites for trained models: ``ostinato eval SUITE --model REF`` (see ``evaluation/README.md``).

``load_suite`` reads a suite YAML, ``run_suite`` generates (or reconstructs), scores and writes ``metrics.json``
with a Markdown/HTML report, ``sweep`` runs a suite over a grid of settings, and ``EvaluationCallback`` logs FAD
while a MusicGen trains.
"""
from __future__ import annotations

from typing import Any

__all__ = ["EvaluationCallback", "Suite", "load_suite", "run_suite", "sweep", "write_report"]


def __getattr__(name: str) -> Any:  # lazy: the CLI imports this package without loading Lightning or metrics
    if name in ("Suite", "load_suite"):
        from ostinato.evaluation import suite

        return getattr(suite, name)
    if name == "run_suite":
        from ostinato.evaluation.runner import run_suite

        return run_suite
    if name == "sweep":
        from ostinato.evaluation.sweep import sweep

        return sweep
    if name == "write_report":
        from ostinato.evaluation.report import write_report

        return write_report
    if name == "EvaluationCallback":
        from ostinato.evaluation.callback import EvaluationCallback

        return EvaluationCallback
    raise AttributeError(name)
