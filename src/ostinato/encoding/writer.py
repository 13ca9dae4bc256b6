"""The frozen-model-over-shards loop: audio shards -> a frozen model -> one array shard per audio shard.

Each audio shard becomes one shard of the same name, written atomically with a done marker (``shard-N.json``:
name, samples, frames, skipped), so a re-run skips finished shards; the caller writes the manifest last. Items of
equal length are encoded together, so a batch gives exactly what encoding each item alone gives. Several devices
each take every n-th pending shard in their own (spawned) process; ``workers`` processes per device decode audio.
Several machines share one output with ``part``: part I of N takes every N-th shard from the I-th, and the part
that finds every shard done when it finishes (the last one) returns the markers for the manifest.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.multiprocessing as mp
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ostinato.data.sources import ShardSource, iter_shard_audio, naming, output_folder, resolve_shards, sweep_temps
from ostinato.errors import UserError
from ostinato.devices import resolve_devices
from ostinato.fileio import (atomic_path, atomic_write_json, check_progress, read_json, shard_done, shard_marker,
                             shard_name)

log = logging.getLogger(__name__)

__all__ = ["ShardEncoder", "Written", "open_output", "parse_part", "write_shards"]


class ShardEncoder(Protocol):
    """What the loop needs of a frozen model (the per-kind adapters in this package)."""

    sample_rate: int
    channels: int

    def encode(self, wav: Tensor) -> dict[str, Tensor]:
        """``wav [B, C, T]`` on the model's device -> stream name -> ``[B, K, F]``."""

    def sample(self, arrays: dict[str, Tensor]) -> tuple[dict[str, bytes], dict[str, Any], int]:
        """One item's arrays (stream -> ``[K, F]``) -> (tar entries, fields added to its JSON, frames counted)."""


Opener = Callable[[str], ShardEncoder]  # device -> the encoder on it; picklable (spawned devices call it)


@dataclass
class Written:
    """What ``write_shards`` leaves for the manifest: the source, one marker per shard, skipped samples."""

    source: ShardSource
    markers: list[dict[str, Any]]
    skipped_by_shard: dict[str, int]

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_shard.values())

    @property
    def samples(self) -> int:
        return sum(m["samples"] for m in self.markers)

    def source_record(self, **extra: Any) -> dict[str, Any]:
        """The manifest's ``source``: shards, samples, skipped (total and per shard)."""
        return {"shards": self.source.urls, "samples": self.samples, "skipped": self.skipped,
                "skipped_by_shard": self.skipped_by_shard, **extra}


class _AudioItems(IterableDataset):
    """(shard, key, wav [C, T] at the model's rate, meta) for whole shards split over DataLoader workers; a
    ``None`` key closes a shard, its meta ``{"skipped": n}`` counting the samples left out (undecodable, or lost
    to a truncated tar: ``expected`` gives each shard's count from its manifest)."""

    def __init__(self, urls: list[str], sample_rate: int, channels: int, expected: dict[str, int] | None = None):
        super().__init__()
        self.urls, self.sample_rate, self.channels = urls, sample_rate, channels
        self.expected = expected or {}

    def __iter__(self) -> Iterator[tuple[str, str | None, Tensor | None, dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::workers]:
            skipped: list[str] = []
            for key, wav, meta in iter_shard_audio(url, self.sample_rate, self.channels, skipped,
                                                   self.expected.get(url)):
                yield url, key, wav, meta
            yield url, None, None, {"skipped": len(skipped)}


@torch.inference_mode()
def _encode_items(encoder: ShardEncoder, wavs: list[Tensor], batch_size: int,
                  device: torch.device) -> list[dict[str, Tensor]]:
    """``wavs`` (each ``[C, T]``) -> per item, stream -> ``[K, F]`` on the CPU; equal lengths batched together."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, wav in enumerate(wavs):
        by_length[wav.shape[-1]].append(i)
    out: dict[int, dict[str, Tensor]] = {}
    for indices in by_length.values():
        for s in range(0, len(indices), batch_size):
            group = indices[s:s + batch_size]
            arrays = encoder.encode(torch.stack([wavs[i] for i in group]).to(device))
            for j, i in enumerate(group):
                out[i] = {name: x[j].cpu() for name, x in arrays.items()}
    return [out[i] for i in range(len(wavs))]


def _write_shard(out: Path, url: str, items: list[tuple[str, Tensor, dict]], encoder: ShardEncoder,
                 device: torch.device, batch_size: int, skipped: int = 0) -> dict[str, Any]:
    arrays = _encode_items(encoder, [wav for _, wav, _ in items], batch_size, device)
    name = shard_name(url)
    frames = 0
    with naming(out / name), atomic_path(out / name) as tmp:  # a full or read-only disk names the shard
        with wds.TarWriter(str(tmp)) as writer:
            for (key, _, meta), arr in zip(items, arrays):
                entries, fields, n = encoder.sample(arr)
                frames += n
                writer.write({"__key__": key, **entries, "json": json.dumps({**meta, **fields}).encode()})
    marker = {"name": name, "samples": len(items), "frames": frames, "skipped": skipped}
    with naming(shard_marker(out, url)):
        atomic_write_json(shard_marker(out, url), marker)
    return marker


def _run_device(opener: Opener | ShardEncoder, urls: list[str], out: Path, batch_size: int, workers: int,
                device: str, progress: bool, expected: dict[str, int] | None, desc: str) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dev = torch.device(device)
    encoder = opener(device) if callable(opener) else opener
    loader = DataLoader(_AudioItems(urls, encoder.sample_rate, encoder.channels, expected), batch_size=None,
                        num_workers=min(workers, len(urls)))
    pending: dict[str, list] = defaultdict(list)
    bar = tqdm(total=len(urls), desc=f"{desc} [{device}]", unit="shard", disable=not progress)
    for url, key, wav, meta in loader:
        if key is None:
            _write_shard(out, url, pending.pop(url, []), encoder, dev, batch_size, meta.get("skipped", 0))
            bar.update()
        else:
            pending[url].append((key, wav, meta))
    bar.close()


def parse_part(text: str, env: dict[str, str] | None = None) -> tuple[int, int]:
    """``--part``: ``I/N`` (the I-th of N parts, from 0) or ``slurm`` (``SLURM_PROCID`` of ``SLURM_NTASKS``, the
    task of an ``srun`` step) -> ``(I, N)``."""
    env = os.environ if env is None else env
    if text == "slurm":
        if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
            raise UserError("--part slurm: SLURM_PROCID / SLURM_NTASKS are not set; run the command under srun "
                            "(srun --nodes 4 --ntasks-per-node 1 ostinato tokenize ...) or give --part I/N")
        text = f"{env['SLURM_PROCID']}/{env['SLURM_NTASKS']}"
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise UserError(f"--part {text}: give I/N with 0 <= I < N (the I-th of N processes sharing the shards), "
                        "or slurm")
    return int(index), int(count)


def open_output(shards: Any, out: str | Path) -> tuple[ShardSource, Path]:
    """The audio shards and the output folder, checked before any model loads (a file there, a read-only disk)."""
    return resolve_shards(shards), output_folder(out, "OUT")


def write_shards(opener: Opener, shards: Any, out: str | Path, *, identity: dict[str, Any], what: str,
                 batch_size: int = 16, workers: int = 1, devices: list[str] | None = None, overwrite: bool = False,
                 progress: bool = True, loaded: ShardEncoder | None = None,
                 part: tuple[int, int] = (0, 1)) -> Written | None:
    """Encode every sample of ``shards`` (any spec ``resolve_shards`` takes) into shards in ``out``.

    ``identity`` (the model's weights hash and settings) must match an earlier run's to resume it; ``what`` names
    the output in messages (``token shards``); ``loaded``: the encoder already on ``devices[0]``, used instead of
    ``opener`` when one device does the work; ``part``: ``(I, N)``, this process's share of the shards when N
    processes (on several machines) write ``out`` together: None comes back unless this part finished last.
    """
    if batch_size < 1 or workers < 0:
        raise ValueError(f"--batch-size {batch_size}, --workers {workers}: the batch size must be at least 1, "
                         "the workers at least 0")
    index, parts = part
    if parts > 1 and overwrite:  # one part would delete the shards that the others are writing
        raise UserError(f"--overwrite with --part {index}/{parts}: the parts cannot clear {out} together; delete "
                        "it, or run once with --overwrite and no --part")
    source, out = open_output(shards, out)
    with naming(out / ".progress.json"):
        check_progress(out, {**identity, "shards": source.urls}, overwrite, what)
    mine = source.urls[index::parts]
    # the manifest's and progress file's temps may be another part's, in flight: only a lone part sweeps them
    sweep_temps(out, [n for u in mine for n in (shard_name(u), shard_marker(out, u).name)]
                + (["manifest.json", ".progress.json"] if parts == 1 else []))
    todo = [u for u in mine if not shard_done(out, u)]
    devices = devices or resolve_devices("auto")
    devices = devices[: max(1, len(todo))]
    log.info("writing %d of %d %s on %s", len(todo), len(source.urls), what, ", ".join(devices))
    desc = what.split()[0]
    if len(devices) == 1:
        if todo:
            _run_device(loaded or opener, todo, out, batch_size, workers, devices[0], progress, source.counts, desc)
    elif todo:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_run_device, args=(opener, todo[i::len(devices)], out, batch_size, workers, d,
                                                       progress and i == 0, source.counts, desc))
                 for i, d in enumerate(devices)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [d for d, p in zip(devices, procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{what} failed on {', '.join(failed)}; re-run to finish the remaining shards")
    if parts > 1:
        waiting = [u for u in source.urls if not shard_done(out, u)]
        if waiting:
            log.info("part %d/%d: my %d shards are done; %d shards of other parts are not, the last part to finish "
                     "writes the manifest", index, parts, len(mine), len(waiting))
            return None
    markers = [read_json(shard_marker(out, u)) for u in source.urls]
    by_shard = {u: int(m.get("skipped", 0)) for u, m in zip(source.urls, markers) if m.get("skipped")}
    written = Written(source, markers, by_shard)
    if written.skipped:
        log.warning("%d samples skipped (corrupt or lost to a damaged tar): %s", written.skipped,
                    ", ".join(f"{u} ({n})" for u, n in by_shard.items()))
    if not any(m["samples"] for m in markers):
        raise UserError(f"no sample of {shards} could be decoded ({written.skipped} skipped: corrupt audio or "
                        "damaged tars); rebuild the audio shards with `ostinato prep shards`")
    return written
