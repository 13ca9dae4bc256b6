"""Reference statistics (mu, sigma) of a backend over a set of audio, cached on disk.

Sources: a string or a list of strings, each one of
  * a folder with ``manifest.json``, a manifest, a ``.tar`` shard or a brace pattern (``ostinato.data.sources``),
  * an audio file, or a folder without a manifest (its audio files, recursively).
Every clip (shard sample or file) is decoded, converted by ``backend.embed_audio`` and embedded; undecodable clips
and unreadable shard tails are skipped, counted and logged, and clips shorter than the analysis window (no frames)
are counted as ``empty``. Clips are visited in sorted source order, so ``max_items`` (a cap on decoded clips) takes
the same clips whatever order the sources were given in.

Cache: ``<cache_dir>/<backend>-<kind>-<key>.safetensors`` plus a ``.json`` with the counts, written atomically,
json last (it marks the entry complete and holds the sha256 of the tensor file, so a damaged file is recomputed).
The key is the sha256 of (cache format, ``backend.id()``, ``per``, ``max_items``, the sorted sources with size and
mtime in ns): editing, touching, adding or removing a file or changing the backend misses the cache. Remote shards
have no size or mtime; they are keyed by URL only (a warning says so).

``reference_embeddings`` does the same walk and returns the per-clip frame embeddings; it is cached likewise (all
frames in one tensor plus per-clip lengths; the json lists the clip names) when ``cache_dir`` is given, and not
cached by default, since frames of a large reference set take far more room than (mu, sigma).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from ostinato.data.audio import AUDIO_EXTENSIONS, AudioDecodeError, load_audio
from ostinato.data.manifest import MANIFEST_NAME
from ostinato.data.sources import is_remote, iter_raw_samples, resolve_shards
from ostinato.fileio import atomic_path, atomic_write_json, read_json
from ostinato.metrics.embeddings.base import EmbeddingBackend

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
AUDIO_MEMBERS = ("flac", "wav", "mp3", "ogg", "opus")  # shard member extensions holding the audio
MAX_LISTED = 20  # skipped clip names kept in the json
# Clips embedded by this process (cache hits embed none): what a caller reads to tell a hit from a miss.
counters: dict[str, int] = {"embedded_clips": 0}


@dataclass
class WalkReport:
    """What a walk over the sources met. ``clips``: decoded clips taken (``max_items`` caps it); ``frames``:
    embedding frames; ``corrupt``: undecodable clips skipped; ``empty``: clips with no frames (too short);
    ``bad_shards``: shards whose tar broke off (the clips before the damage are used)."""

    clips: int = 0
    frames: int = 0
    corrupt: int = 0
    empty: int = 0
    bad_shards: int = 0
    skipped: list[str] = field(default_factory=list)

    def skip(self, what: str, reason: Exception | str) -> None:
        if len(self.skipped) < MAX_LISTED:  # the rest only counted, and summed up at the end
            self.skipped.append(f"{what}: {reason}")
            log.warning("skipping %s: %s", what, reason)


@dataclass(frozen=True)
class _Source:
    kind: str  # "file" or "shard"
    path: str


# ----------------------------------------------------------------------------------------------- public API


def reference_stats(backend: EmbeddingBackend, sources: str | os.PathLike | Sequence[str | os.PathLike],
                    cache_dir: str | Path | None, *, per: str = "frame", max_items: int | None = None,
                    batch_size: int = 8, progress: bool = True, sharded: bool = False) -> tuple[Tensor, Tensor, int]:
    """Gaussian statistics of the embeddings of every clip of ``sources`` -> (mu [D], sigma [D, D], n) float64.

    ``per="frame"``: over all frames of all clips (n = frames); ``per="clip"``: over clip means (n = clips with
    at least one frame). sigma is the unbiased covariance (divides by n - 1). ``cache_dir=None`` disables the cache.
    ``sharded``: every rank of the initialised process group calls this together; rank r embeds clips
    r, r + world, ...; the float64 moments are summed over the ranks (every rank returns the same statistics,
    equal to one process's up to summation order) and rank 0 writes the cache.
    """
    if per not in ("frame", "clip"):
        raise ValueError(f"per must be 'frame' or 'clip', got {per!r}")
    rank, world = _dist_info() if sharded else (0, 1)
    entries, total = _resolve(sources)
    key = _cache_key(backend, "stats", per, max_items, entries)
    paths = _entry_paths(cache_dir, backend, f"stats-{per}", key)
    cached = None if paths is None else _read_entry(*paths, key)
    if world > 1 and not _everyone(cached is not None):  # one rank without the entry: all compute
        cached = None
    if paths is not None:
        if cached is not None:
            tensors, meta = cached
            mu, sigma = tensors.get("mu"), tensors.get("sigma")
            if mu is not None and sigma is not None and mu.shape == (backend.dim,) and sigma.shape == (
                    backend.dim, backend.dim):
                log.info("reference stats from cache %s (n=%d)", paths[0], meta["n"])
                return mu.double(), sigma.double(), int(meta["n"])
            log.warning("cache entry %s holds tensors of the wrong shape; recomputing", paths[0])
    report = WalkReport()
    moments = _Moments()
    for _, frames in _walk(backend, entries, total, report, max_items, batch_size, progress, (rank, world)):
        moments.add(frames.mean(dim=0, keepdim=True) if per == "clip" else frames)
    if world > 1:
        moments.all_reduce(backend.dim)
        report.frames, report.empty = (int(v) for v in _sum_over_ranks([report.frames, report.empty]))
    if moments.n < 2:
        raise ValueError(f"reference statistics of {_describe(sources)} need at least 2 {per}s, got {moments.n} "
                         f"({report.clips} clips, {report.corrupt} corrupt, {report.empty} shorter than one "
                         f"{backend.name} window); give more or longer audio")
    mu, sigma = moments.result()
    _log_report(report, sources)
    if paths is not None and rank == 0:
        _write_entry(*paths, {"mu": mu, "sigma": sigma},
                     _meta(key, backend, per, max_items, entries, sources, report, n=moments.n))
    return mu, sigma, moments.n


def reference_embeddings(backend: EmbeddingBackend, sources: str | os.PathLike | Sequence[str | os.PathLike],
                         cache_dir: str | Path | None = None, *, max_items: int | None = None, batch_size: int = 8,
                         progress: bool = True) -> list[Tensor]:
    """Per clip frame embeddings [F_i, D] float32 (on the CPU) of every clip of ``sources`` with at least one frame,
    in walk order. Cached like ``reference_stats`` only when ``cache_dir`` is given."""
    entries, total = _resolve(sources)
    key = _cache_key(backend, "embeddings", "frame", max_items, entries)
    paths = _entry_paths(cache_dir, backend, "embeddings", key)
    if paths is not None:
        cached = _read_entry(*paths, key)
        if cached is not None:
            tensors, meta = cached
            frames, lengths = tensors.get("frames"), tensors.get("lengths")
            if frames is not None and lengths is not None and frames.dim() == 2 and frames.shape[1] == backend.dim \
                    and int(lengths.sum()) == frames.shape[0]:
                log.info("reference embeddings from cache %s (%d clips)", paths[0], len(lengths))
                return list(frames.split(lengths.tolist()))
            log.warning("cache entry %s holds tensors of the wrong shape; recomputing", paths[0])
    report = WalkReport()
    names, clips = [], []
    for name, frames in _walk(backend, entries, total, report, max_items, batch_size, progress):
        names.append(name)
        clips.append(frames.float())
    _log_report(report, sources)
    if paths is not None:
        frames = torch.cat(clips) if clips else torch.zeros(0, backend.dim)
        lengths = torch.tensor([len(c) for c in clips], dtype=torch.int64)
        _write_entry(*paths, {"frames": frames.contiguous(), "lengths": lengths},
                     _meta(key, backend, "frame", max_items, entries, sources, report, n=len(clips), names=names))
    return clips


def cache_entry(backend: EmbeddingBackend, sources: str | os.PathLike | Sequence[str | os.PathLike],
                cache_dir: str | Path, *, kind: str = "stats", per: str = "frame",
                max_items: int | None = None) -> tuple[Path, bool]:
    """``(tensor file, complete)``: where ``reference_stats`` (``kind="stats"``) or ``reference_embeddings``
    (``kind="embeddings"``) keeps ``sources`` in ``cache_dir``, and whether a complete entry for them is there now."""
    if kind not in ("stats", "embeddings"):
        raise ValueError(f"kind must be 'stats' or 'embeddings', got {kind!r}")
    entries, _ = _resolve(sources)
    key = _cache_key(backend, kind, per if kind == "stats" else "frame", max_items, entries)
    paths = _entry_paths(cache_dir, backend, f"stats-{per}" if kind == "stats" else "embeddings", key)
    assert paths is not None
    complete = paths[1].is_file() and paths[0].is_file() and read_json(paths[1]).get("key") == key
    return paths[0], complete


def load_stats_file(path: str | Path) -> tuple[Tensor, Tensor, int, dict[str, Any]]:
    """A statistics entry written by ``reference_stats`` (``.safetensors`` or its ``.json``) -> ``(mu [D],
    sigma [D, D], n, meta)``; ``meta`` is the json (backend id, ``per``, sources, counts)."""
    path = Path(path).expanduser()
    tensor_path, meta_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (tensor_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{path}: statistics need both {tensor_path.name} and {meta_path.name} (as the "
                                    "cache writes them); give the pair's .safetensors file")
    meta = read_json(meta_path)
    if _sha256(tensor_path) != meta.get("sha256"):
        raise ValueError(f"{tensor_path} does not match the sha256 in {meta_path.name}: damaged or edited; "
                         "recompute it from the audio")
    tensors = load_file(str(tensor_path))
    if "mu" not in tensors or "sigma" not in tensors:
        raise ValueError(f"{tensor_path} holds no statistics (mu, sigma): it is a {sorted(tensors)} entry; give a "
                         "'*-stats-*' file of the cache")
    return tensors["mu"].double(), tensors["sigma"].double(), int(meta["n"]), meta


# ----------------------------------------------------------------------------------------------- the walk


def _resolve(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[_Source], int | None]:
    """Sources -> sorted entries and the number of clips when known (manifests and files)."""
    specs = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not specs:
        raise ValueError("no sources: give shard specs (a folder with manifest.json, a brace pattern), audio files "
                         "or folders of audio files")
    entries: list[_Source] = []
    total: int | None = 0
    for spec in map(str, specs):
        path = Path(spec)
        if not is_remote(spec) and path.is_dir() and not (path / MANIFEST_NAME).is_file():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not files:
                raise FileNotFoundError(f"{spec} has neither {MANIFEST_NAME} nor audio files "
                                        f"({', '.join(AUDIO_EXTENSIONS)})")
            entries += [_Source("file", str(p)) for p in files]
            total = None if total is None else total + len(files)
        elif not is_remote(spec) and path.suffix.lower() in AUDIO_EXTENSIONS:
            if not path.is_file():
                raise FileNotFoundError(f"audio file not found: {spec}")
            entries.append(_Source("file", spec))
            total = None if total is None else total + 1
        else:
            shards = resolve_shards(spec)
            entries += [_Source("shard", url) for url in shards.urls]
            total = None if total is None or shards.num_samples is None else total + shards.num_samples
    return sorted(entries, key=lambda e: e.path), total


def _iter_clips(entries: list[_Source], report: WalkReport) -> Iterator[tuple[str, Tensor, int]]:
    """(name, wav [C, T], sample_rate) of every decodable clip; the rest is counted in ``report``."""
    for entry in entries:
        if entry.kind == "file":
            try:
                wav, sr = load_audio(entry.path)
            except AudioDecodeError as e:
                report.corrupt += 1
                report.skip(entry.path, e)
                continue
            yield entry.path, wav, sr
            continue
        try:
            for raw in iter_raw_samples(entry.path):
                name = f"{entry.path}#{raw.get('__key__')}"
                audio = next((raw[k] for k in AUDIO_MEMBERS if k in raw), None)
                try:
                    if audio is None:
                        raise AudioDecodeError(f"no audio member ({', '.join(AUDIO_MEMBERS)})")
                    wav, sr = load_audio(audio)
                except AudioDecodeError as e:
                    report.corrupt += 1
                    report.skip(name, e)
                    continue
                yield name, wav, sr
        except (tarfile.TarError, EOFError) as e:
            report.bad_shards += 1
            report.skip(entry.path, f"unreadable tar after the samples above ({type(e).__name__}: {e})")


def _walk(backend: EmbeddingBackend, entries: list[_Source], total: int | None, report: WalkReport,
          max_items: int | None, batch_size: int, progress: bool,
          shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, Tensor]]:
    """(name, frames [F, D] on the CPU) of every clip with at least one frame, in entry order; with ``shard=(r,
    world)`` only clips r, r + world, ... are embedded (every rank decodes all, so all count the same clips)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_items is not None:
        total = max_items if total is None else min(total, max_items)
    rank, world = shard
    if total is not None and world > 1:
        total = len(range(rank, total, world))
    bar = tqdm(total=total, disable=not progress, unit="clip", desc=f"{backend.name} embeddings")
    batch: list[tuple[str, Tensor, int]] = []

    def flush() -> Iterator[tuple[str, Tensor]]:
        for name, frames in _embed_batch(backend, batch):
            counters["embedded_clips"] += 1
            bar.update(1)
            if frames.shape[0] == 0:
                report.empty += 1
                continue
            report.frames += frames.shape[0]
            yield name, frames
        batch.clear()

    with bar, closing(_iter_clips(entries, report)) as clips:
        for clip in clips:
            if max_items is not None and report.clips >= max_items:
                break
            report.clips += 1
            if (report.clips - 1) % world != rank:
                continue
            batch.append(clip)
            if len(batch) == batch_size:
                yield from flush()
        yield from flush()


def _embed_batch(backend: EmbeddingBackend, batch: list[tuple[str, Tensor, int]]) -> list[tuple[str, Tensor]]:
    """Embed clips, stacking those of equal rate, channels and length (padding would change the embeddings)."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (_, wav, sr) in enumerate(batch):
        groups.setdefault((sr, wav.shape[0], wav.shape[-1]), []).append(i)
    out: list[Tensor | None] = [None] * len(batch)
    for (sr, _, _), idx in groups.items():
        try:
            frames = backend.embed_audio(torch.stack([batch[i][1] for i in idx]), sr)
        except Exception as e:
            e.add_note(f"while embedding {batch[idx[0]][0]} (and {len(idx) - 1} more) with {backend.id()}")
            raise
        for i, f in zip(idx, frames):
            out[i] = f.detach().cpu()
    return [(name, f) for (name, _, _), f in zip(batch, out) if f is not None]


class _Moments:
    """Streaming float64 mean and covariance; sums are taken around the first batch's mean (a shift) so that
    large offsets do not cancel the variance out."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.double()
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        xc = x - self.shift
        self.sum += xc.sum(dim=0)
        self.outer += xc.T @ xc
        self.n += x.shape[0]

    def all_reduce(self, dim: int) -> None:
        """Sum the moments of every rank (re-centred on the mean of the ranks' shifts first): float64 sums."""
        has = self.shift is not None
        shift = self.shift if self.shift is not None else torch.zeros(dim, dtype=torch.float64)
        total_shift = _sum_over_ranks(torch.cat([shift * has, torch.tensor([float(has)], dtype=torch.float64)]))
        common = total_shift[:-1] / total_shift[-1].clamp(min=1)
        d = shift - common
        s = self.sum if self.sum is not None else torch.zeros(dim, dtype=torch.float64)
        outer = self.outer if self.outer is not None else torch.zeros(dim, dim, dtype=torch.float64)
        s, outer = s + self.n * d, outer + torch.outer(s, d) + torch.outer(d, s) + self.n * torch.outer(d, d)
        summed = _sum_over_ranks(torch.cat([s, outer.reshape(-1), torch.tensor([float(self.n)], dtype=torch.float64)]))
        self.shift, self.sum, self.outer = common, summed[:dim], summed[dim:-1].reshape(dim, dim)
        self.n = int(summed[-1].item())

    def result(self) -> tuple[Tensor, Tensor]:
        assert self.shift is not None and self.sum is not None and self.outer is not None
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return self.shift + mean, (cov + cov.T) / 2


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(values: Tensor | list[int]) -> Tensor:
    """float64 sum over the ranks (on the GPU under NCCL, which takes no CPU tensors), back on the CPU."""
    import torch.distributed as dist

    x = torch.as_tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        x = x.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(x)
    return x.cpu()


def _everyone(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    return bool(_sum_over_ranks([0 if flag else 1])[0].item() == 0)


# ----------------------------------------------------------------------------------------------- the cache


def _fingerprint(entry: _Source) -> list[Any]:
    if is_remote(entry.path):
        return [entry.path, None, None]
    st = os.stat(entry.path)
    return [str(Path(entry.path).resolve()), st.st_size, st.st_mtime_ns]


def _cache_key(backend: EmbeddingBackend, kind: str, per: str, max_items: int | None,
               entries: list[_Source]) -> str:
    remote = [e.path for e in entries if is_remote(e.path)]
    if remote:
        log.warning("%d remote shard(s) (e.g. %s) are keyed in the cache by URL only: delete the cache entry if "
                    "they change", len(remote), remote[0])
    body = {"format": CACHE_FORMAT, "kind": kind, "backend": backend.id(), "per": per, "max_items": max_items,
            "sources": sorted(_fingerprint(e) for e in entries)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _entry_paths(cache_dir: str | Path | None, backend: EmbeddingBackend, kind: str,
                 key: str) -> tuple[Path, Path] | None:
    if cache_dir is None:
        return None
    stem = Path(cache_dir).expanduser() / f"{backend.name}-{kind}-{key[:24]}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _read_entry(tensor_path: Path, meta_path: Path, key: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The cached tensors and json, or None when absent, stale or damaged (then logged)."""
    if not meta_path.is_file() or not tensor_path.is_file():
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("key") != key:
            return None
        if _sha256(tensor_path) != meta.get("sha256"):
            raise ValueError(f"{tensor_path} does not match the sha256 in {meta_path.name}")
        return load_file(str(tensor_path)), meta
    except Exception as e:  # a damaged entry is only a cache miss
        log.warning("ignoring damaged cache entry %s (%s: %s); recomputing", meta_path, type(e).__name__, e)
        return None


def _write_entry(tensor_path: Path, meta_path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    with atomic_path(tensor_path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": meta["key"]})
    atomic_write_json(meta_path, {**meta, "sha256": _sha256(tensor_path)})


def _meta(key: str, backend: EmbeddingBackend, per: str, max_items: int | None, entries: list[_Source],
          sources: Any, report: WalkReport, n: int, names: list[str] | None = None) -> dict[str, Any]:
    meta = {"format": CACHE_FORMAT, "key": key, "backend": backend.id(), "per": per, "max_items": max_items,
            "n": n, "dim": backend.dim, "sources": _describe(sources), "entries": len(entries),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(report)}
    if names is not None:
        meta["names"] = names
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(sources: Any) -> str | list[str]:
    return str(sources) if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]


def _log_report(report: WalkReport, sources: Any) -> None:
    if report.corrupt or report.bad_shards or report.empty:
        log.warning("reference audio %s: %d clips used, %d corrupt clips skipped, %d damaged shards, %d clips "
                    "shorter than one analysis window", _describe(sources), report.clips, report.corrupt,
                    report.bad_shards, report.empty)
