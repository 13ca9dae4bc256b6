"""Audio shards -> array shards with a trained encoder: Musika autoencoder latents (float16) or Jukebox VQ-VAE codes
per level (int16). Resumable, atomic, corrupt samples skipped and counted.

    ostinato encode data/demo/shards/train data/demo/latents/train --model outputs/exports/musika_ae_tiny
    ostinato encode data/demo/shards/train data/demo/jukebox/train --model outputs/exports/jukebox_vqvae_tiny

The model is anything ``ostinato.load`` takes whose family writes arrays (``array_streams()`` +
``encode_arrays(wav)``). Each audio shard becomes one array shard of the same name, written atomically with a
done marker, so a re-run skips finished shards; the manifest is written last. Items of equal length are encoded
together, so a batch gives exactly what encoding each item alone gives.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from tqdm import tqdm

from ostinato.data.arrays import ArrayManifest, ArrayShard, ModelInfo, encode_array
from ostinato.data.sources import iter_shard_audio, naming, output_folder, resolve_shards, sweep_temps
from ostinato.errors import UserError
from ostinato.fileio import (atomic_path, atomic_write_json, check_progress, read_json, shard_done, shard_marker,
                             shard_name)

log = logging.getLogger(__name__)

__all__ = ["encode_shards", "load_encoder"]


def load_encoder(ref: str, trust: bool = False, device: str = "cpu") -> Any:
    """The family behind ``ref`` (XP signature, //sig/SIG, XP folder, .ckpt, export folder), checked to write
    arrays, in eval mode on ``device``."""
    from ostinato.models import load
    from ostinato.store.records import resolve_ref, xps_dir

    module = load(resolve_ref(str(ref)), xps_dir=xps_dir(), trust=trust)
    if not hasattr(module, "encode_arrays") or not hasattr(module, "array_streams"):
        raise ValueError(f"{ref} holds a {type(module).__name__}, which writes no arrays: give a Musika autoencoder "
                         "(family=musika_autoencoder_tiny) or a Jukebox VQ-VAE (family=jukebox_vqvae_tiny)")
    return module.to(device).eval()


@torch.inference_mode()
def _encode_items(model: Any, items: list[tuple[str, torch.Tensor, dict]], batch_size: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]]:
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (_, wav, _) in enumerate(items):
        by_length[wav.shape[-1]].append(i)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for indices in by_length.values():
        for s in range(0, len(indices), batch_size):
            group = indices[s:s + batch_size]
            arrays = model.encode_arrays(torch.stack([items[i][1] for i in group]).to(device))
            for j, i in enumerate(group):
                out[i] = {name: x[j].cpu() for name, x in arrays.items()}
    return [out[i] for i in range(len(items))]


def _write_shard(out: Path, url: str, model: Any, batch_size: int, device: torch.device,
                 expected: int | None = None) -> dict[str, Any]:
    reasons: list[str] = []
    items = list(iter_shard_audio(url, model.sample_rate, model.channels, reasons, expected))
    skipped = len(reasons)
    arrays = _encode_items(model, items, batch_size, device)
    name = shard_name(url)
    first = next(iter(model.array_streams()))
    frames = 0
    with naming(out / name), atomic_path(out / name) as tmp:  # a full or read-only disk names the shard
        with wds.TarWriter(str(tmp)) as writer:
            for (key, _, meta), arr in zip(items, arrays):
                frames += int(arr[first].shape[-1])
                meta = {**meta, "frames": {n: int(x.shape[-1]) for n, x in arr.items()}}
                sample = {"__key__": key, "json": json.dumps(meta).encode()}
                sample.update({f"{n}.npy": encode_array(x) for n, x in arr.items()})
                writer.write(sample)
    marker = {"name": name, "samples": len(items), "frames": frames, "skipped": skipped}
    with naming(shard_marker(out, url)):
        atomic_write_json(shard_marker(out, url), marker)
    return marker


def encode_shards(model_ref: str | Any, shards: Any, out: str | Path, *, batch_size: int = 16,
                  device: str = "cpu", overwrite: bool = False, trust: bool = False,
                  progress: bool = True) -> ArrayManifest:
    """Encode every sample of ``shards`` (any spec ``resolve_shards`` takes) into array shards in ``out``.

    ``model_ref``: a reference ``load_encoder`` takes, or an already loaded family that writes arrays.
    """
    from ostinato.interop.codecs import weights_hash

    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    out = output_folder(out, "OUT")
    source = resolve_shards(shards)
    model = load_encoder(model_ref, trust, device) if isinstance(model_ref, (str, Path)) else model_ref
    dev = torch.device(device)
    info = ModelInfo(id=str(model_ref) if isinstance(model_ref, (str, Path)) else type(model).__name__,
                     hash=weights_hash(model), kind=model.array_kind, sample_rate=int(model.sample_rate),
                     channels=int(model.channels))
    with naming(out / ".progress.json"):
        check_progress(out, {"model_hash": info.hash, "shards": source.urls}, overwrite, "array shards")
    sweep_temps(out, [n for u in source.urls for n in (shard_name(u), shard_marker(out, u).name)]
                + ["manifest.json", ".progress.json"])
    todo = [u for u in source.urls if not shard_done(out, u)]
    log.info("encoding %d of %d shards with %s (%s)", len(todo), len(source.urls), info.id, info.kind)
    for url in tqdm(todo, desc="encode", unit="shard", disable=not progress):
        _write_shard(out, url, model, batch_size, dev, source.counts.get(url))
    markers = [read_json(shard_marker(out, u)) for u in source.urls]
    by_shard = {u: int(m.get("skipped", 0)) for u, m in zip(source.urls, markers) if m.get("skipped")}
    skipped = sum(by_shard.values())
    if skipped:
        log.warning("%d samples skipped (corrupt or lost to a damaged tar): %s", skipped,
                    ", ".join(f"{u} ({n})" for u, n in by_shard.items()))
    if not any(m["samples"] for m in markers):
        raise UserError(f"no sample of {shards} could be decoded ({skipped} skipped: corrupt audio or damaged "
                        "tars); rebuild the audio shards with `ostinato prep shards`")
    manifest = ArrayManifest(shards=[ArrayShard(m["name"], m["samples"], m["frames"]) for m in markers],
                             streams=dict(model.array_streams()), model=info,
                             source={"shards": source.urls, "samples": sum(m["samples"] for m in markers),
                                     "skipped": skipped, "skipped_by_shard": by_shard})
    with naming(out / "manifest.json"):
        manifest.save(out)
    return manifest
