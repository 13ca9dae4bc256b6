"""A suite over a grid of settings: one ``run_suite`` per combination and one summary table.

dora grids launch training XPs (``ostinato.train``), not ``ostinato eval``, so the evaluation sweep is this plain
launcher, which ``ostinato eval-sweep`` calls (see ``evaluation/README.md``).
"""
from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ostinato.evaluation.report import METRIC_INFO, format_value
from ostinato.evaluation.scoring import dist_info
from ostinato.evaluation.suite import Suite, load_suite
from ostinato.fileio import atomic_write_json, atomic_write_text

__all__ = ["DEFAULT_GRID", "DEFAULT_SUITE", "parse_grid", "sweep"]

DEFAULT_SUITE = "demo"
DEFAULT_GRID: dict[str, list] = {"generation.cfg_scale": [1.0, 3.0, 5.0], "generation.top_k": [50, 250]}


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["generation.cfg_scale=1,3"]`` -> ``{"generation.cfg_scale": [1, 3]}`` (values read as YAML)."""
    import yaml

    from ostinato.errors import UserError

    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UserError(f"--grid {item}: give KEY=V1,V2,... (e.g. generation.cfg_scale=1,3)")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def _folder(keys: Sequence[str], values: Sequence[Any]) -> str:
    name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
    return re.sub(r"[^A-Za-z0-9=.,_-]+", "-", name) or "default"


def sweep(suite: Suite | str | os.PathLike, model: str, grid: Mapping[str, Sequence[Any]], out: str | os.PathLike,
          *, codec: str | None = None, overrides: Sequence[str] = (), device: str = "cpu", trust: bool = False,
          progress: bool = True, cache: str | os.PathLike | None = None) -> Path:
    """Run ``suite`` on ``model`` for every combination of ``grid`` (suite keys -> values, e.g.
    ``{"generation.cfg_scale": [1, 3], "generation.top_k": [50, 250]}``), each into ``out/<key=value,...>/``,
    then write ``out/summary.md`` and ``out/summary.json`` (one row per combination). Returns summary.md."""
    from ostinato.evaluation.runner import load_producer, run_suite

    base = suite if isinstance(suite, Suite) else load_suite(suite, list(overrides))
    keys = list(grid)
    if not keys or any(not isinstance(grid[k], Sequence) or isinstance(grid[k], str) or not grid[k] for k in keys):
        raise ValueError(f"sweep grid {dict(grid)!r}: map suite keys to non-empty lists of values")
    for key in keys:  # fail before generating anything
        base.with_overrides([_override(key, grid[key][0])])
    out = Path(out)
    producer = load_producer(base, model, codec=codec, device=device, trust=trust)  # once for all combinations
    rows = []
    for values in itertools.product(*(grid[k] for k in keys)):
        folder = _folder(keys, values)
        result = run_suite(base, model, out / folder, codec=codec, device=device, trust=trust, progress=progress,
                           cache=cache, producer=producer,
                           overrides=[_override(k, v) for k, v in zip(keys, values)])
        rows.append({"settings": dict(zip(keys, values)), "metrics": result["metrics"],
                     "report": f"{folder}/report.md"})
    if dist_info()[0] == 0:
        atomic_write_json(out / "summary.json", {"suite": base.name, "model": model, "grid": dict(grid),
                                                  "rows": rows})
        atomic_write_text(out / "summary.md", _summary(base.name, model, keys, rows))
    return out / "summary.md"


def _summary(suite: str, model: str, keys: list[str], rows: list[dict]) -> str:
    metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    arrows = {"lower": " ↓", "higher": " ↑"}
    head = [k.split(".")[-1] for k in keys] + [m + arrows.get(METRIC_INFO.get(m, ("", ""))[1], "") for m in metrics]
    head.append("report")
    lines = [f"# Sweep: {suite} on {Path(str(model)).name}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---:" for _ in head) + "|"]
    for r in rows:
        cells = [str(r["settings"][k]) for k in keys] + [format_value(r["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells + [f"[report]({r['report']})"]) + " |")
    return "\n".join(lines) + "\n"
