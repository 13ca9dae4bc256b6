"""Explorers: how a grid prints its experiments' metrics (from the history the engine pushes each epoch)."""
from __future__ import annotations

import typing as tp

import treetable as tt
from dora import Explorer


def _last(history: list[dict], group: str, name: str) -> float | None:
    for entry in reversed(history):
        value = entry.get(group, {}).get(name)
        if value is not None:
            return value
    return None


class TrainExplorer(Explorer):
    """Columns: step, epoch, train loss, valid loss (last value) and best valid loss."""

    metrics = ("loss",)

    def get_grid_metrics(self) -> list[tp.Any]:
        return [
            tt.group("progress", [tt.leaf("step"), tt.leaf("epoch")], align=">"),
            tt.group("train", [tt.leaf(m, ".4f") for m in self.metrics], align=">"),
            tt.group("valid", [tt.leaf(m, ".4f") for m in self.metrics] + [tt.leaf("best", ".4f")], align=">"),
        ]

    def process_history(self, history: list[dict]) -> dict:
        if not history:
            return {}
        valid = [e["valid"][self.metrics[0]] for e in history if self.metrics[0] in e.get("valid", {})]
        return {
            "progress": {"step": history[-1].get("step"), "epoch": history[-1].get("epoch", len(history) - 1)},
            "train": {m: _last(history, "train", m) for m in self.metrics},
            "valid": {**{m: _last(history, "valid", m) for m in self.metrics},
                      "best": min(valid) if valid else None},
        }
