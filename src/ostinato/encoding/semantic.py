"""Fit a ``SemanticTokenizer``: mini-batch k-means over frame features streamed from audio shards.

    pass 0      stream clips (shard order shuffled by the seed, up to ``max_hours``) -> features [F, D]:
                per-dimension mean / std (float64 sums), a reservoir sample of frames, and an in-memory feature
                cache while it fits in ``cache_gb`` (else later passes extract the same clips again)
    init        k-means++ (or random frames) on the normalised reservoir
    passes 1..  frames through a seeded shuffle buffer -> batches of ``batch_frames`` -> sklearn's
                ``MiniBatchKMeans.partial_fit`` (Sculley's per-centroid learning rates, low-count reassignment);
                mean inertia per frame, used centroids and token entropy are reported per pass

Deterministic for a seed: the shard order, reservoir, init, shuffles and sklearn's reassignments all derive from it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ostinato.data.sources import iter_shard_audio, output_folder, resolve_shards
from ostinato.devices import resolve_device
from ostinato.models.semantic import (CONFIG_NAME, SemanticFeatures, SemanticTokenizer, make_features,
                                  token_stats)

log = logging.getLogger(__name__)
DEFAULT_K = {"mfcc": 500, "logmel": 500, "hf": 1024}


class _Clips(IterableDataset):
    """Per clip: ``("clip", key, x)`` with x = features [F, D] (when ``features`` is given: extracted in the
    worker) or mono audio [1, T] at ``sample_rate``; ``("skip", url, reason)`` per sample left out: undecodable,
    or lost by a truncated shard (all of them, counted against ``expected``, samples per url from the manifest)."""

    def __init__(self, urls: list[str], sample_rate: int, features: SemanticFeatures | None,
                 expected: Mapping[str, int]):
        super().__init__()
        self.urls, self.sample_rate, self.features, self.expected = urls, sample_rate, features, expected

    def __iter__(self) -> Iterator[tuple[str, str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::workers]:
            skipped: list[str] = []
            try:
                for key, x, _ in iter_shard_audio(url, self.sample_rate, 1, skipped, self.expected.get(url)):
                    yield from _drain(url, skipped)
                    if self.features is not None:
                        with torch.no_grad():
                            x = self.features(x[None], self.sample_rate)[0]
                    yield "clip", f"{url}:{key}", x
            except FileNotFoundError as e:  # deleted since the fit started: every sample it held is lost
                skipped.extend([f"{type(e).__name__}: {e}"] * max(1, self.expected.get(url, 0)))
            yield from _drain(url, skipped)


def _drain(url: str, skipped: list[str]) -> Iterator[tuple[str, str, str]]:
    """``("skip", url, reason)`` for each reason in ``skipped``, emptying it."""
    while skipped:
        yield "skip", url, skipped.pop(0)


class _FeatureStream:
    """The clips of the fit, as features [F, D] float32 CPU tensors, in the same order every pass."""

    def __init__(self, urls: list[str], features: SemanticFeatures, *, max_seconds: float | None, workers: int,
                 device: torch.device, cache_bytes: float, expected: Mapping[str, int] | None = None):
        self.urls, self.features, self.max_seconds = urls, features, max_seconds
        self.expected = dict(expected or {})  # samples per shard url (manifests): what a truncated tar lost
        self.workers, self.device, self.cache_bytes = workers, device, cache_bytes
        self.cache: list[torch.Tensor] | None = []
        self.clips: int | None = None  # clips taken by pass 0 (max_hours), replayed by later passes
        self.seconds, self.skipped, self.reasons = 0.0, 0, []

    def _extract(self) -> Iterator[tuple[str, str, Any]]:
        in_workers = self.features.in_workers and self.workers > 0
        dataset = _Clips(self.urls, self.features.sample_rate, self.features if in_workers else None,
                         self.expected)
        loader = DataLoader(dataset, batch_size=None, num_workers=min(self.workers, len(self.urls)))
        for kind, key, x in loader:
            if kind == "clip" and not in_workers:
                with torch.no_grad():
                    x = self.features(x[None].to(self.device), self.features.sample_rate)[0].float().cpu()
            yield kind, key, x

    def first_pass(self, progress: bool) -> Iterator[torch.Tensor]:
        bar = tqdm(desc="semantic features", unit="h", total=self.max_seconds and self.max_seconds / 3600,
                   disable=not progress, bar_format="{l_bar}{bar}| {n:.2f}/{total_fmt} h [{elapsed}]")
        clips, cached = 0, 0
        for kind, key, x in self._extract():
            if kind == "skip":
                self.skipped += 1
                self.reasons.append(f"{key}: {x}")  # iter_shard_audio warns once per damaged shard
                continue
            clips += 1
            seconds = x.shape[0] / self.features.frame_rate
            self.seconds += seconds
            bar.update(seconds / 3600)
            if self.cache is not None:
                cached += x.numel() * x.element_size()
                if cached > self.cache_bytes:
                    log.info("features exceed the %.1f GB cache: later passes extract them again",
                             self.cache_bytes / 1e9)
                    self.cache = None
                else:
                    self.cache.append(x)
            yield x
            if self.max_seconds is not None and self.seconds >= self.max_seconds:
                break
        bar.close()
        self.clips = clips

    def replay(self, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        """The pass-0 clips again: from the cache in a shuffled order, else extracted again in the same order."""
        if self.cache is not None:
            for i in rng.permutation(len(self.cache)):
                yield self.cache[i]
            return
        clips = 0
        for kind, _, x in self._extract():
            if kind == "clip":
                yield x
                clips += 1
                if clips >= (self.clips or 0):
                    return


def _batches(clips: Iterator[torch.Tensor], batch_frames: int, buffer_frames: int,
             rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Clip features -> shuffled batches [batch_frames, D] (the last one shorter): neighbouring frames of a clip
    are alike, so a batch of consecutive frames would pull a few centroids at a time."""
    pending: list[torch.Tensor] = []
    size = 0
    for x in clips:
        pending.append(x)
        size += x.shape[0]
        if size >= buffer_frames:
            buf = torch.cat(pending)[torch.from_numpy(rng.permutation(size))]
            keep = size - (size // batch_frames) * batch_frames
            yield from buf[: size - keep].split(batch_frames)
            pending, size = [buf[size - keep:]], keep
    if size:
        buf = torch.cat(pending)[torch.from_numpy(rng.permutation(size))]
        yield from buf.split(batch_frames)


def _reservoir_add(reservoir: np.ndarray, seen: int, x: np.ndarray, rng: np.random.Generator) -> int:
    """Algorithm R over the rows of ``x`` [F, D]; returns the rows seen so far."""
    size = reservoir.shape[0]
    idx = np.arange(seen, seen + x.shape[0])
    fill = idx < size
    reservoir[idx[fill]] = x[fill]
    rest = ~fill
    if rest.any():
        slots = rng.integers(0, idx[rest] + 1)
        take = slots < size
        reservoir[slots[take]] = x[rest][take]  # later rows win on equal slots, as in the sequential algorithm
    return seen + x.shape[0]


def fit_semantic_tokenizer(shards: Any, out: str | Path | None, *, features: str | SemanticFeatures = "mfcc",
                           layer: int | None = None, frame_rate: float | None = 25.0, k: int | None = None,
                           batch_frames: int = 10000, iterations: int = 10, max_hours: float | None = None,
                           seed: int = 0, workers: int = 1, init: str = "k-means++",
                           reservoir_frames: int | None = None, cache_gb: float = 4.0, device: str | None = None,
                           overwrite: bool = False, progress: bool = True) -> SemanticTokenizer:
    """Fit K centroids of normalised ``features`` over ``shards`` (any spec ``resolve_shards`` takes) and save the
    tokenizer to ``out`` (None: do not save).

    Args:
        features: ``mfcc`` | ``logmel`` | ``hf:/folder`` (with ``layer``) or a ``SemanticFeatures``.
        frame_rate: token rate (25 or 50 Hz); for ``hf:`` None keeps the model's own rate.
        k: centroids (default 500 for MFCC / log-mel, 1024 for SSL features).
        batch_frames: frames per mini-batch; iterations: passes over the clips after the statistics pass.
        max_hours: audio used (the first clips of the seeded shard order); None = all.
        init: ``k-means++`` or ``random``, on a reservoir of ``reservoir_frames`` frames (default max(25 K, 20000)).
        workers: audio decoding (and MFCC / log-mel) processes; cache_gb: features kept in memory between passes.
    """
    from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus

    if init not in ("k-means++", "random"):
        raise ValueError(f"init={init!r}: use 'k-means++' or 'random'")
    if iterations < 1 or batch_frames < 1:
        raise ValueError(f"iterations ({iterations}) and batch_frames ({batch_frames}) must be >= 1")
    if out is not None and (Path(out) / CONFIG_NAME).is_file() and not overwrite:
        raise FileExistsError(f"{Path(out) / CONFIG_NAME} exists: a tokenizer is already fitted there; pass "
                              "--overwrite to replace it")
    if out is not None:
        output_folder(out, "OUT")  # before the fit: a file there, a read-only or full disk
    start = time.perf_counter()
    feats = make_features(features, frame_rate=frame_rate, layer=layer) if isinstance(features, str) else features
    # MFCC / log-mel are cheapest on the CPU, in the decoding workers; SSL models run on the device.
    dev = torch.device("cpu" if feats.in_workers else resolve_device(device))
    feats = feats.to(dev).eval()
    k = k or DEFAULT_K[feats.kind]
    if k < 2:
        raise ValueError(f"k={k}: a tokenizer needs at least 2 centroids")
    if batch_frames < k:
        raise ValueError(f"batch_frames={batch_frames} < k={k}: a mini-batch must hold at least k frames; raise "
                         "--batch-frames or lower --k")
    source = resolve_shards(shards)
    rng = np.random.default_rng(seed)
    urls = [source.urls[i] for i in rng.permutation(len(source.urls))]
    stream = _FeatureStream(urls, feats, max_seconds=None if max_hours is None else max_hours * 3600,
                            workers=workers, device=dev, cache_bytes=cache_gb * 1e9, expected=source.counts)

    # pass 0: statistics, reservoir, cache
    reservoir = np.zeros((reservoir_frames or max(25 * k, 20000), feats.dim), dtype=np.float32)
    seen = 0
    total = np.zeros(feats.dim, dtype=np.float64)
    total_sq = np.zeros(feats.dim, dtype=np.float64)
    for x in stream.first_pass(progress):
        a = x.numpy()
        total += a.sum(axis=0, dtype=np.float64)
        total_sq += np.square(a, dtype=np.float64).sum(axis=0)
        seen = _reservoir_add(reservoir, seen, a, rng)
    if seen < k:
        raise ValueError(f"{seen} feature frames from {shards} ({stream.clips} clips, {stream.skipped} skipped) "
                         f"are fewer than k={k} centroids: lower --k or give more audio")
    mean = total / seen
    std = np.sqrt(np.maximum(total_sq / seen - mean ** 2, 0.0)).clip(min=1e-5)
    sample = ((reservoir[: min(seen, reservoir.shape[0])] - mean) / std).astype(np.float32)
    log.info("%d frames (%.2f h, %d clips, %d skipped); init %s on %d frames", seen, stream.seconds / 3600,
             stream.clips, stream.skipped, init, sample.shape[0])

    if init == "k-means++":
        centers, _ = kmeans_plusplus(sample, k, random_state=seed)
    else:
        centers = sample[rng.choice(sample.shape[0], k, replace=False)]
    kmeans = MiniBatchKMeans(n_clusters=k, init=centers, n_init=1, batch_size=batch_frames, random_state=seed,
                             compute_labels=True)
    mean_t, std_t = torch.from_numpy(mean).float(), torch.from_numpy(std).float()
    passes: list[dict[str, Any]] = []
    for p in range(1, iterations + 1):
        pass_rng = np.random.default_rng([seed, p])
        inertia, frames, counts = 0.0, 0, np.zeros(k, dtype=np.int64)
        bar = tqdm(total=seen, desc=f"k-means pass {p}/{iterations}", unit="frame", disable=not progress)
        for batch in _batches(stream.replay(pass_rng), batch_frames, max(8 * batch_frames, 4 * k), pass_rng):
            kmeans.partial_fit(((batch - mean_t) / std_t).numpy())
            inertia += float(kmeans.inertia_)
            frames += batch.shape[0]
            counts += np.bincount(kmeans.labels_, minlength=k)
            bar.update(batch.shape[0])
            bar.set_postfix(inertia=f"{inertia / frames:.3f}")
        bar.close()
        row = {"pass": p, "inertia_per_frame": inertia / max(frames, 1), **token_stats(torch.from_numpy(counts))}
        passes.append(row)
        log.info("k-means pass %d/%d: inertia/frame %.4f, %d/%d centroids used, entropy %.2f bits", p,
                 iterations, row["inertia_per_frame"], row["used"], k, row["entropy_bits"])

    fit = dict(shards=len(source.urls), clips=stream.clips, skipped=stream.skipped,
               skipped_samples=stream.reasons[:100], frames=seen, hours=stream.seconds / 3600, k=k,
               batch_frames=batch_frames, iterations=iterations, max_hours=max_hours, seed=seed, init=init,
               reservoir_frames=int(sample.shape[0]), passes=passes, seconds=time.perf_counter() - start)
    tokenizer = SemanticTokenizer(feats, torch.from_numpy(kmeans.cluster_centers_).float(), mean_t, std_t, fit=fit)
    if out is not None:
        tokenizer.save(out)
    return tokenizer.eval()
