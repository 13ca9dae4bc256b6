"""``ostinato tokenize``: audio shards -> token shards with a codec or a semantic tokenizer; batched, multi-worker,
multi-device, resumable.

Each audio shard becomes one token shard of the same name, written atomically with a done marker, so a re-run
skips finished shards; corrupt samples are skipped and counted (per shard marker, and ``source.skipped`` in the
manifest). The "codec" is anything ``load_tokenizer`` resolves: a neural codec, or a fitted ``SemanticTokenizer``
folder (one stream of k-means tokens, ``n_q = 1``). Items of equal length are encoded together, so a batch gives
exactly the codes that encoding each item alone gives. Several devices each take every n-th pending shard in their
own process.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ostinato.data.sources import (ShardSource, iter_shard_audio, naming, output_folder, resolve_shards,
                                   sweep_temps)
from ostinato.data.tokens import CodecInfo, TokenManifest, TokenShard, encode_codes
from ostinato.errors import UserError
from ostinato.fileio import (atomic_path, atomic_write_json, check_progress, read_json, shard_done, shard_marker,
                             shard_name)
from ostinato.interop.codecs import load_codec, weights_hash
from ostinato.store.records import codec_id
from ostinato.models.codec import Codec
from ostinato.models.semantic import SemanticTokenizer, is_semantic_tokenizer

log = logging.getLogger(__name__)


def load_tokenizer(ref: str | Path, trust: bool = False) -> Codec | SemanticTokenizer:
    """A semantic tokenizer folder (``semantic_tokenizer.json``) or anything ``load_codec`` takes."""
    if is_semantic_tokenizer(ref):
        return SemanticTokenizer.load(ref)
    return load_codec(str(ref), trust=trust)


def tokenizer_hash(codec: Codec | SemanticTokenizer) -> str:
    return codec.hash if isinstance(codec, SemanticTokenizer) else weights_hash(codec)


class _AudioItems(IterableDataset):
    """(shard, key, wav [C, T] at the codec's rate, meta) for whole shards split over DataLoader workers; a
    ``None`` key closes a shard, its meta ``{"skipped": n}`` counting the samples left out (undecodable, or lost
    to a truncated tar: ``expected`` gives each shard's count from its manifest)."""

    def __init__(self, urls: list[str], sample_rate: int, channels: int, expected: dict[str, int] | None = None):
        super().__init__()
        self.urls, self.sample_rate, self.channels = urls, sample_rate, channels
        self.expected = expected or {}

    def __iter__(self) -> Iterator[tuple[str, str | None, torch.Tensor | None, dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::workers]:
            skipped: list[str] = []
            for key, wav, meta in iter_shard_audio(url, self.sample_rate, self.channels, skipped,
                                                   self.expected.get(url)):
                yield url, key, wav, meta
            yield url, None, None, {"skipped": len(skipped)}


def _encode_group(codec: Codec, wavs: list[torch.Tensor], n_q: int | None, device: torch.device,
                  batch_size: int) -> list[torch.Tensor]:
    out = []
    for i in range(0, len(wavs), batch_size):
        x = torch.stack(wavs[i: i + batch_size]).to(device)
        with torch.inference_mode():
            codes = codec.encode(x, n_q=n_q)
        codes = codes.codes if hasattr(codes, "codes") else codes
        frames = math.ceil(x.shape[-1] / codec.hop_length)
        out.extend(c[:, :frames].cpu() for c in codes)
    return out


def _write_shard(out: Path, url: str, items: list[tuple[str, torch.Tensor, dict]], codec: Codec,
                 n_q: int | None, device: torch.device, batch_size: int, skipped: int = 0) -> TokenShard:
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (_, wav, _) in enumerate(items):
        by_length[wav.shape[-1]].append(i)
    codes: dict[int, torch.Tensor] = {}
    for indices in by_length.values():
        for i, c in zip(indices, _encode_group(codec, [items[i][1] for i in indices], n_q, device, batch_size)):
            codes[i] = c
    name = shard_name(url)
    frames = 0
    with naming(out / name), atomic_path(out / name) as tmp:  # a full or read-only disk names the shard
        with wds.TarWriter(str(tmp)) as writer:
            for i, (key, _, meta) in enumerate(items):
                c = codes[i]
                frames += c.shape[-1]
                meta = {**meta, "frames": int(c.shape[-1]), "frame_rate": codec.frame_rate}
                writer.write({"__key__": key, "npy": encode_codes(c), "json": json.dumps(meta).encode()})
    shard = TokenShard(name=name, samples=len(items), frames=frames)
    with naming(shard_marker(out, url)):
        atomic_write_json(shard_marker(out, url), {**shard.__dict__, "skipped": skipped})
    return shard


def _run_device(codec_ref: str, urls: list[str], out: Path, n_q: int | None, batch_size: int, workers: int,
                device: str, trust: bool, progress: bool, expected: dict[str, int] | None = None) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dev = torch.device(device)
    codec = load_tokenizer(codec_ref, trust=trust).to(dev)
    loader = DataLoader(_AudioItems(urls, codec.sample_rate, codec.channels, expected), batch_size=None,
                        num_workers=min(workers, len(urls)))
    pending: dict[str, list] = defaultdict(list)
    bar = tqdm(total=len(urls), desc=f"tokenize [{device}]", unit="shard", disable=not progress)
    for url, key, wav, meta in loader:
        if key is None:
            _write_shard(out, url, pending.pop(url, []), codec, n_q, dev, batch_size, meta.get("skipped", 0))
            bar.update()
        else:
            pending[url].append((key, wav, meta))
    bar.close()


def tokenize(codec_ref: str, shards: Any, out: str | Path, *, n_q: int | None = None, batch_size: int = 16,
             workers: int = 1, devices: list[str] | None = None, overwrite: bool = False, trust: bool = False,
             progress: bool = True) -> TokenManifest:
    """Encode every sample of ``shards`` (any spec ``resolve_shards`` takes) into token shards in ``out``.

    ``codec_ref``: a semantic tokenizer folder (``ostinato prep semantic``) or anything ``load_codec`` takes.
    """
    if batch_size < 1 or workers < 0 or (n_q is not None and n_q < 1):
        raise ValueError(f"--batch-size {batch_size}, --workers {workers}, --n-q {n_q}: the batch size and n_q must "
                         "be at least 1, the workers at least 0")
    out = output_folder(out, "OUT")
    source: ShardSource = resolve_shards(shards)
    codec = load_tokenizer(codec_ref, trust=trust)
    n_q = n_q or codec.n_q
    if not 1 <= n_q <= codec.n_q:
        raise ValueError(f"--n-q {n_q}: this codec has {codec.n_q} codebooks")
    info = CodecInfo(id=codec_id(codec_ref), hash=tokenizer_hash(codec), sample_rate=codec.sample_rate,
                     channels=codec.channels, frame_rate=codec.frame_rate, n_q=n_q,
                     cardinality=codec.cardinality)
    with naming(out / ".progress.json"):
        check_progress(out, {"codec_hash": info.hash, "n_q": n_q, "shards": source.urls}, overwrite,
                       "token shards")
    sweep_temps(out, [n for u in source.urls for n in (shard_name(u), shard_marker(out, u).name)]
                + ["manifest.json", ".progress.json"])
    todo = [u for u in source.urls if not shard_done(out, u)]
    devices = devices or (["cuda:%d" % i for i in range(torch.cuda.device_count())] or ["cpu"])
    devices = devices[: max(1, len(todo))]
    log.info("tokenizing %d of %d shards with %s on %s", len(todo), len(source.urls), info.id, ", ".join(devices))
    if len(devices) == 1:
        _run_device(codec_ref, todo, out, n_q, batch_size, workers, devices[0], trust, progress, source.counts)
    elif todo:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_run_device, args=(codec_ref, todo[i::len(devices)], out, n_q, batch_size,
                                                       workers, d, trust, progress and i == 0,
                                                       source.counts))
                 for i, d in enumerate(devices)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [d for d, p in zip(devices, procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"tokenization failed on {', '.join(failed)}; re-run to finish the remaining shards")
    markers = [read_json(shard_marker(out, u)) for u in source.urls]
    shards_done = [TokenShard(name=m["name"], samples=m["samples"], frames=m["frames"]) for m in markers]
    by_shard = {u: int(m.get("skipped", 0)) for u, m in zip(source.urls, markers) if m.get("skipped")}
    skipped = sum(by_shard.values())
    if skipped:
        log.warning("%d samples skipped (corrupt or lost to a damaged tar): %s", skipped,
                    ", ".join(f"{u} ({n})" for u, n in by_shard.items()))
    if not any(m["samples"] for m in markers):
        raise UserError(f"no sample of {shards} could be decoded ({skipped} skipped: corrupt audio or damaged "
                        "tars); rebuild the audio shards with `ostinato prep shards`")
    manifest = TokenManifest(shards=shards_done, codec=info, source={
        "shards": source.urls, "samples": sum(s.samples for s in shards_done), "skipped": skipped,
        "skipped_by_shard": by_shard,
        **({"semantic": codec.id} if isinstance(codec, SemanticTokenizer) else {})})
    with naming(out / "manifest.json"):
        manifest.save(out)
    return manifest
