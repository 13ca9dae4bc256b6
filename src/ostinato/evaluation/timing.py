"""Where an evaluation's time goes: seconds per stage on each rank (``metrics.json`` ``ranks`` and
``stage_seconds``), and ``stage_shares`` to print them (what a benchmark run reports as the share of each stage)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["StageClock", "stage_shares"]


class StageClock:
    """Accumulates wall-clock seconds per named stage; on a GPU it waits for the device's queued work at both ends
    of a stage, so a stage is charged with its own kernels, not the next one's."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def move(self, source: str, target: str, seconds: float) -> None:
        """Charge ``seconds`` of what ``source`` measured to ``target`` (a part that the stage's own code timed,
        e.g. the codec decoding inside ``generate``)."""
        seconds = min(max(0.0, seconds), self.seconds.get(source, 0.0))
        if seconds:
            self.seconds[source] -= seconds
            self.seconds[target] = self.seconds.get(target, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def stage_shares(result: Mapping[str, Any] | str | os.PathLike) -> str:
    """A table of ``metrics.json``'s per-rank stage seconds (a dict or the file): per stage the slowest rank's
    seconds, the mean over ranks and the share of the slowest ranks' total, then the items per rank (how evenly
    the batches were dealt)."""
    if not isinstance(result, Mapping):
        result = json.loads(Path(result).read_text())
    ranks = result.get("ranks") or []
    if not ranks:
        return "no per-rank timings in this metrics.json (written before they were recorded)"
    stages = list(dict.fromkeys(s for r in ranks for s in r["seconds"]))
    worst = {s: max(r["seconds"].get(s, 0.0) for r in ranks) for s in stages}
    total = sum(worst.values()) or 1.0
    lines = [f"{len(ranks)} rank(s), {result.get('num_items')} items, {result.get('elapsed_seconds')} s end to end "
             f"(rank 0)", "| stage | slowest rank s | mean s | share |", "|---|---:|---:|---:|"]
    for s in stages:
        mean = sum(r["seconds"].get(s, 0.0) for r in ranks) / len(ranks)
        lines.append(f"| {s} | {worst[s]:.2f} | {mean:.2f} | {100 * worst[s] / total:.1f}% |")
    lines.append("items per rank: " + ", ".join(str(r["items"]) for r in ranks))
    return "\n".join(lines)
