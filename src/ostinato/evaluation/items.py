"""What a suite evaluates: one ``EvalItem`` per output clip (its prompt and paired reference clip), and how the
items are dealt over DDP ranks."""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ostinato.data.audio import convert_channels, resample
from ostinato.evaluation.suite import Suite, SuiteError

__all__ = ["EvalItem", "read_items", "rank_batches", "stack_references"]


@dataclass
class EvalItem:
    """Output clip ``index``: its ``prompt`` and, when the reference has clip ``index``, that clip's ``reference``
    ``[C, T]`` at the model's rate and channels (cropped to the suite's ``seconds``), valid for ``length`` samples."""

    index: int
    prompt: str = ""
    key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reference: Tensor | None = None
    length: int = 0
    has_reference: bool = False  # True even where ``reference`` was not kept (another rank's item)


def _convert(wav: Tensor, sr: int, sample_rate: int, channels: int, seconds: float | None) -> Tensor:
    if seconds is not None:  # crop before resampling: reference clips are often much longer
        wav = wav[:, : math.ceil(seconds * sr) + 64]
    wav = resample(convert_channels(wav.float(), "mono" if channels == 1 else "stereo"), sr, sample_rate)
    return wav if seconds is None else wav[:, : round(seconds * sample_rate)]


def read_items(suite: Suite, sample_rate: int, channels: int, num_samples: int | None = None,
               keep: Collection[int] | None = None) -> list[EvalItem]:
    """The suite's items in order: prompts from ``suite.prompts`` (cycled) or from the reference clips' metadata
    (``description(meta)``, MusicGen's conditioning text), each paired with reference clip ``i`` (shard order).

    ``keep``: the indices whose reference audio is decoded and kept (this rank's share; None = all)."""
    from ostinato.data.shards import iter_shard_samples
    from ostinato.data.sources import resolve_shards
    from ostinato.nn.conditioners import description

    n = num_samples if num_samples is not None else suite.num_samples
    where = suite.path or suite.name
    try:
        urls = resolve_shards(suite.reference).urls
    except (FileNotFoundError, ValueError) as e:
        raise SuiteError(f"{where}: reference: {e}") from None
    items: list[EvalItem] = []
    for url in urls:
        if n is not None and len(items) >= n:
            break
        for key, wav, sr, meta in iter_shard_samples(url):
            if n is not None and len(items) >= n:
                break
            i = len(items)
            ref = _convert(wav, sr, sample_rate, channels, suite.seconds) if keep is None or i in keep else None
            prompt = "" if suite.kind in ("reconstruction", "unconditional") else (  # no text reaches the model
                suite.prompts[i % len(suite.prompts)] if suite.prompts else description(meta))
            items.append(EvalItem(i, prompt, key, meta, ref, 0 if ref is None else ref.shape[-1], True))
    if n is None:
        n = len(items)
    if len(items) < n:
        if suite.needs_pairs:
            raise SuiteError(f"{where}: num_samples={n} but the reference ({suite.reference}) has {len(items)} clips; "
                             f"item i pairs with reference clip i (captions, melody, paired metrics): lower "
                             f"num_samples or give prompts and unpaired metrics only")
        assert suite.prompts is not None
        items += [EvalItem(i, suite.prompts[i % len(suite.prompts)]) for i in range(len(items), n)]
    if not items:
        raise SuiteError(f"{where}: reference: no clips in {suite.reference}")
    return items


def rank_batches(num_items: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Item indices of ``rank``'s batches.

    The items are cut into global batches of ``batch_size`` whatever the number of ranks, and the batches are
    dealt to the ranks in contiguous runs: an item meets the same items in the same batch (hence the same seed,
    ``seed + index of the batch's first item``, and the same clip) on any number of ranks, and gathered per-item
    results come back in item order. Every rank needs a batch (the metrics gather what each rank saw), so fewer
    batches than ranks is refused rather than cutting smaller batches, which would change the clips.
    """
    batches = [list(range(s, min(s + batch_size, num_items))) for s in range(0, num_items, batch_size)]
    if len(batches) < world:
        raise ValueError(f"{num_items} items in batches of batch_size={batch_size} make {len(batches)} batches, "
                         f"fewer than the {world} ranks: lower batch_size to {max(1, num_items // world)} or less, "
                         "or run fewer ranks")
    per, extra = divmod(len(batches), world)
    start = rank * per + min(rank, extra)
    return batches[start: start + per + (1 if rank < extra else 0)]


def stack_references(items: list[EvalItem], length: int | None = None) -> tuple[Tensor, Tensor]:
    """The items' references zero-padded to ``length`` (default: the longest) -> ``(wav [B, C, T], lengths [B])``."""
    refs = [it.reference for it in items]
    if any(r is None for r in refs):
        raise ValueError("every item needs a reference clip here")
    t = length or max(r.shape[-1] for r in refs)  # type: ignore[union-attr]
    wav = torch.stack([torch.nn.functional.pad(r[:, :t], (0, max(0, t - r.shape[-1]))) for r in refs])  # type: ignore
    lengths = torch.tensor([min(it.length, t) for it in items], dtype=torch.long)
    return wav, lengths


def count_clips(suite: Suite) -> int:
    """Clips of the reference (a reconstruction suite without ``num_samples`` takes them all)."""
    from ostinato.data.sources import iter_raw_samples, resolve_shards

    try:
        source = resolve_shards(suite.reference)
    except (FileNotFoundError, ValueError) as e:
        raise SuiteError(f"{suite.path or suite.name}: reference: {e}") from None
    if source.num_samples is not None:
        return source.num_samples
    return sum(1 for url in source.urls for _ in iter_raw_samples(url))
