"""``ostinato prep mulan``'s tokens: every clip of audio shards embedded once by a frozen MuLaN and quantized in
every namespace of a ``MuLaNQuantizer`` -> ``MuLaNTokens`` (``data/musiclm_tokens.py``: keys + ``[N, n_q]`` per
namespace), so the MusicLM stages never re-embed a clip per step."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.data.musiclm_tokens import MuLaNTokens
from ostinato.data.sources import resolve_shards
from ostinato.data.streams import EvalSet, count_samples

log = logging.getLogger(__name__)

__all__ = ["write_mulan_tokens"]


@torch.no_grad()
def write_mulan_tokens(shards: Any, out: str | Path, mulan_ref: Any, quantizer: Any, *,
                       segment_seconds: float = 10.0, batch_size: int = 16, source: str | None = None) -> MuLaNTokens:
    """Embed every clip of audio ``shards`` once with MuLaN (the first ``segment_seconds``, windowed by the
    tower) and quantize it in every namespace of ``quantizer`` -> ``out/`` (``MuLaNTokens``).

    ``mulan_ref``: a ``MuLaN`` or an ``ostinato.load`` ref (``source``: the ref to record when it
    is an object); ``quantizer``: a ``MuLaNQuantizer`` or its safetensors path.
    """
    mulan = mulan_ref
    if not hasattr(mulan, "embed_audio"):
        from ostinato.models.mulan import as_mulan

        mulan = as_mulan(mulan_ref)
    if isinstance(quantizer, (str, Path)):
        from ostinato.models.mulan import MuLaNQuantizer

        quantizer = MuLaNQuantizer.load(quantizer)
    src = resolve_shards(shards)
    n = src.num_samples if src.num_samples is not None else count_samples(src.urls)
    clips = EvalSet(src.urls, num_samples=n, sample_rate=mulan.sample_rate, channels=1,
                    segment_seconds=segment_seconds, batch_size=batch_size)
    keys: list[str] = []
    parts: dict[str, list[Tensor]] = {ns: [] for ns in quantizer.namespaces}
    was_training = getattr(mulan, "training", False)
    if hasattr(mulan, "eval"):
        mulan.eval()
    for batch in clips:
        valid = batch.lengths > 0
        if not bool(valid.any()):
            continue
        emb = mulan.embed_audio(batch.audio[valid], mulan.sample_rate, batch.lengths[valid])
        keys += [m["__key__"] for m, v in zip(batch.meta, valid.tolist()) if v]
        for ns in parts:
            parts[ns].append(quantizer.tokens(emb, ns).cpu())
    if hasattr(mulan, "train"):
        mulan.train(was_training)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{shards}: sample keys repeat across shards; MuLaN tokens are joined by key")
    tokens = MuLaNTokens(keys, {ns: torch.cat(p) for ns, p in parts.items()},
                         {ns: int(quantizer.card(ns)) for ns in parts},
                         source=source or (str(mulan_ref) if isinstance(mulan_ref, (str, Path)) else ""),
                         quantizer=str(getattr(quantizer, "path", "") or ""))
    tokens.save(out)
    log.info("wrote MuLaN tokens of %d clips (%s) to %s", len(keys), list(parts), out)
    return tokens
