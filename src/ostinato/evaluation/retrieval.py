"""Retrieval suites: a MuLaN embeds the reference clips (from their start, ``seconds`` long, or whole: windows
averaged) and their captions (``description(meta)``), and ranks them both ways.

``metrics.json``'s metrics: ``t2a_r{k}`` / ``a2t_r{k}`` (recall at each ``k`` of ``metrics.retrieval.ks``),
``t2a_median_rank`` / ``a2t_median_rank``, ``t2a_mean_rank`` / ``a2t_mean_rank`` (expected ranks under random
tie-breaking; 1 = perfect), the chance levels (``chance_r{k}``, ``chance_median_rank``, ``chance_mean_rank``) and
``n``. Clips sharing a caption are distinct targets, so a perfect score is out of reach when captions repeat.
Under DDP every rank embeds its share; the embeddings are gathered (torchmetrics) before ranking.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ostinato.evaluation.items import rank_batches, read_items
from ostinato.evaluation.scoring import barrier, dist_info
from ostinato.evaluation.suite import Suite
from ostinato.fileio import atomic_write_json, atomic_write_text
from ostinato.nn.contrastive import RetrievalMetrics, retrieval_metrics, retrieval_ranks

__all__ = ["retrieval_scores", "run_retrieval"]


def retrieval_scores(audio: Tensor, text: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Paired embeddings ``audio, text: [N, D]`` -> recall at ``ks``, median and mean ranks both ways, chance."""
    values = retrieval_metrics(audio, text, ks)
    for name, (queries, keys) in (("t2a", (text, audio)), ("a2t", (audio, text))):
        greater, ties = retrieval_ranks(queries.double(), keys.double())
        values[f"{name}_mean_rank"] = (1 + greater.double() + ties.double() / 2).mean()
    values["chance_mean_rank"] = torch.tensor((len(audio) + 1) / 2, dtype=torch.float64)
    return {k: float(v) for k, v in values.items()}


def run_retrieval(suite: Suite, producer: Any, model_ref: str, out: Path, device: torch.device, *,
                  progress: bool = True, report: bool = True) -> dict[str, Any]:
    """Embed the suite's items with ``producer`` (``embed(items) -> (audio, text)``), rank, write ``metrics.json``
    and ``report.md`` into ``out``; returns what ``metrics.json`` holds plus ``out_dir`` and ``report``."""
    from ostinato.evaluation.items import count_clips
    from ostinato.evaluation.report import format_table, versions

    t0 = time.time()
    rank, world = dist_info()
    n = suite.num_samples if suite.num_samples is not None else count_clips(suite)
    mine = rank_batches(n, suite.batch_size, rank, world)
    items = read_items(suite, producer.sample_rate, producer.channels, n, keep={i for b in mine for i in b})
    spec = suite.metric("retrieval")
    assert spec is not None
    ks = tuple(int(k) for k in spec.options["ks"])
    gathered = RetrievalMetrics(ks).to(device)
    with tqdm(total=sum(len(b) for b in mine), unit="clip", desc=f"{suite.name}: embedding",
              disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        for batch in mine:
            audio, text = producer.embed([items[i] for i in batch])
            gathered.update(audio.to(device), text.to(device))
            bar.update(len(batch))
    audio, text = gathered.embeddings()
    scalars = retrieval_scores(audio, text, ks)
    result: dict[str, Any] = {
        "suite": suite.name, "suite_file": None if suite.path is None else str(suite.path), "kind": suite.kind,
        "model": str(model_ref), "codec": None, "sample_rate": producer.sample_rate, "num_items": len(items),
        "seconds": suite.seconds, "metrics": scalars, "settings": producer.describe(),
        "items": [{"index": it.index, "prompt": it.prompt, "key": it.key} for it in items],
        "suite_config": suite.config, "device": str(device), "world_size": world,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
        "elapsed_seconds": round(time.time() - t0, 2),
    }
    out = Path(out)
    if rank == 0:
        atomic_write_json(out / "metrics.json", result)
        if report:
            atomic_write_text(out / "report.md", f"# {suite.name}: retrieval by {model_ref}\n\n{len(items)} clips and "
                                                 f"their captions, ranked both ways.\n\n```\n"
                                                 f"{format_table(scalars)}\n```\n")
    barrier()
    return {**result, "out_dir": str(out), "report": str(out / "report.md")}
