"""Folder of audio files -> WebDataset shards plus ``manifest.json`` (``ostinato prep shards``).

Output folder layout (every file is written atomically; nothing else in ``out`` is ever touched)::

  shard-000000.tar   samples ``<key>.flac`` + ``<key>.json`` (see ``ostinato.data.manifest``)
  shard-000000.json  done marker of that shard: samples, seconds, bytes, its files, what was skipped
  .progress.json     options and source fingerprint, written before the first shard (resume guard)
  report.json        skipped files with reasons, ignored files, metadata problems and overrides
  manifest.json      written last: its presence means the build is complete

Choices:

* Files: ``src`` is scanned recursively (``out`` and hidden names excluded); audio = ``AUDIO_EXTENSIONS`` (any
  case), sorted by relative POSIX path. ``.json .jsonl .txt .csv .tsv`` are metadata, anything else is listed as
  ``ignored``.
  A file that fails to decode or convert is skipped, logged and listed in ``report.json``; the job goes on.
  A file cut short (a WAV whose header claims more data than it holds, an Ogg stream without its end page,
  fewer frames than the header says) keeps the part that decodes, since that audio is intact, and is logged and
  listed under ``truncated`` in ``report.json`` with both durations, so the user can fetch it again.
* Shards: shard ``i`` holds ``files[i * files_per_shard:(i + 1) * files_per_shard]``, so a re-run maps the same
  files to the same shard whatever ``workers`` is. A shard whose files all fail gets a marker but no tar and is
  left out of the manifest (shard names then have a gap).
* Sample rate: ``None`` = the most common rate among readable headers (a tie goes to the higher rate).
* ``channels="keep"``: the output keeps the most common channel count among readable headers (a tie goes to the
  larger count); files with another count are converted to it (mono is duplicated, stereo averaged), and a
  file that cannot be converted (anything to or from more than two channels) is skipped and reported.
* Order per file: decode, channels, resample, loudness (whole file, ``normalize_loudness``), segment.
* Segments: windows of ``segment_seconds`` every ``segment_seconds - overlap_seconds``. After the last full
  window, if audio remains, one shorter tail window (starting one hop later, running to the end) is kept when
  it lasts at least ``min_segment_seconds`` (default ``segment_seconds / 2``). A file shorter than one window
  is a single tail window under the same rule. ``segment_seconds=None`` keeps each file whole.
* Metadata precedence, lowest first: sidecar ``<stem>.json`` < ``metadata`` table row < sidecar ``<stem>.txt``
  (caption only) < fields set by this tool (source, offset, duration, segment, sample_rate, channels). Every
  value replaced by a later layer is listed under ``metadata_overrides`` in ``report.json``. In a sidecar or
  row without ``caption``, a ``description`` or else ``text`` field is renamed to ``caption``. CSV cells are
  strings (empty cells are left out); use JSONL for numbers and lists. A table row naming no audio file of
  ``src`` is listed under ``metadata_issues``, as is an unreadable sidecar (the audio is kept without it).
* Keys: ``<sanitised relative path>_<8 hex of sha1(relative path)>_s<segment:04d>``: no dots, no slashes.
* Resume: ``.progress.json`` holds the options and the source fingerprint (relative paths and sizes of the
  audio files and their sidecars, sha256 of the table). A re-run with equal values keeps every shard whose
  marker and tar are intact and builds the others; different values are refused unless ``overwrite``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import webdataset as wds
from tqdm import tqdm

from ostinato.data.audio import (
    AUDIO_EXTENSIONS,
    audio_info,
    convert_channels,
    encode_flac,
    load_audio,
    normalize_loudness,
    resample,
    truncation_note,
)
from ostinato.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from ostinato.data.sources import iter_raw_samples, naming, output_folder
from ostinato.errors import UserError
from ostinato.fileio import atomic_path, atomic_write_json, read_json

log = logging.getLogger(__name__)

PROGRESS_NAME = ".progress.json"
REPORT_NAME = "report.json"
METADATA_EXTENSIONS = (".json", ".jsonl", ".txt", ".csv", ".tsv")
CAPTION_ALIASES = ("description", "text")
TOOL_FIELDS = ("source", "offset", "duration", "segment", "sample_rate", "channels")
TAR_MTIME = 0  # fixed member mtime: identical inputs give byte-identical shards
_SHARD_RE = re.compile(r"shard-\d{6}\.(tar|json)")
_OWN_TEMP_RE = re.compile(r"\.(shard-\d{6}\.(tar|json)|manifest\.json|report\.json|\.progress\.json)\..+\.tmp")


@dataclass(frozen=True)
class _Target:
    """What every sample is converted to; identical for all shards of one build."""

    sample_rate: int
    channels: int
    channel_policy: str
    loudness: float | None
    segment_seconds: float | None
    overlap_seconds: float
    min_segment_seconds: float | None
    bits: int


@dataclass
class _ShardJob:
    index: int
    src: str
    out: str
    files: list[str]
    rows: dict[str, dict[str, Any]]
    target: _Target


@dataclass
class _FileResult:
    samples: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)
    skipped: str | None = None
    truncated: str | None = None
    issues: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- public API


def build_shards(src: str | Path, out: str | Path, *, sample_rate: int | None = None,
                 channels: Literal["mono", "stereo", "keep"] = "keep", loudness: float | None = None,
                 segment_seconds: float | None = None, overlap_seconds: float = 0.0,
                 min_segment_seconds: float | None = None, metadata: str | Path | None = None,
                 files_per_shard: int = 64, bits: int = 16, workers: int = 1, overwrite: bool = False,
                 progress: bool = True) -> Manifest:
    """Convert every audio file under ``src`` into WebDataset shards in ``out``; returns the saved manifest.

    Raises FileExistsError when ``out`` holds a complete build and ValueError when it holds a partial build made
    with other options or from another source (both unless ``overwrite``). See the module docstring.
    """
    src_path, out_path = Path(src), Path(out)
    if min_segment_seconds is None and segment_seconds is not None:
        min_segment_seconds = segment_seconds / 2
    _validate(sample_rate, channels, segment_seconds, overlap_seconds, min_segment_seconds, files_per_shard,
              bits, workers)
    if src_path.is_file():
        raise UserError(f"{src_path} is a file, not a folder: give the folder that holds the audio files "
                        f"(e.g. {src_path.parent}); it is searched recursively")
    if not src_path.is_dir():
        raise FileNotFoundError(f"source folder {src_path} does not exist; give the folder that holds the audio "
                                "files")
    output_folder(out_path, "OUT")
    manifest_path = out_path / MANIFEST_NAME
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"{manifest_path} exists: the shards are complete; pass --overwrite to rebuild them")
    if overwrite:
        _remove_own_files(out_path)

    files, sidecars, ignored = _scan(src_path, out_path)
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {src_path}")
    rows, table_issues = _read_table(Path(metadata), src_path, files) if metadata is not None else ({}, [])
    options = {
        "sample_rate": sample_rate, "channels": channels, "loudness": loudness,
        "segment_seconds": segment_seconds, "overlap_seconds": overlap_seconds,
        "min_segment_seconds": min_segment_seconds,
        "metadata": str(Path(metadata).resolve()) if metadata is not None else None,
        "files_per_shard": files_per_shard, "bits": bits,
    }
    fingerprint = {"files": len(files), "hash": _source_hash(src_path, files, sidecars),
                   "metadata_sha256": _file_sha256(Path(metadata)) if metadata is not None else None}
    with naming(out_path):  # a full or read-only disk names OUT, not a temp file
        out_rate, out_channels = _start_or_resume(src_path, out_path, files, options, fingerprint)
        target = _Target(out_rate, out_channels, channels, loudness, segment_seconds, overlap_seconds,
                         min_segment_seconds, bits)

        jobs = [_ShardJob(i, str(src_path), str(out_path), chunk, {f: rows[f] for f in chunk if f in rows},
                          target) for i, chunk in enumerate(_chunks(files, files_per_shard))]
        markers = _run_jobs(jobs, out_path, workers, progress)

        report = _report(files, markers, ignored, table_issues)
        atomic_write_json(out_path / REPORT_NAME, report)
        if report["samples"] == 0:
            raise UserError(f"no sample could be written from {src_path}: every audio file was skipped; see the "
                            f"reasons in {out_path / REPORT_NAME}")
        if report["skipped"]:
            log.warning("%d of %d files skipped; see %s", len(report["skipped"]), len(files),
                        out_path / REPORT_NAME)
        manifest = Manifest(
            shards=[ShardInfo(m["shard"], m["samples"], m["seconds"], m["bytes"]) for m in markers
                    if m["samples"]],
            sample_rate=out_rate, channels=out_channels, options=options,
            source={"root": str(src_path), **fingerprint}, skipped=len(report["skipped"]),
        )
        manifest.save(out_path)
    return manifest


def iter_shard_samples(path: str | Path) -> Iterator[tuple[str, torch.Tensor, int, dict[str, Any]]]:
    """Read a shard back: (key, wav [C, T] float32, sample_rate, meta) for each sample, in tar order."""
    for raw in iter_raw_samples(str(path)):
        key = raw["__key__"]
        if "flac" not in raw or "json" not in raw:
            raise ValueError(f"{path}: sample {key!r} lacks its .flac or .json member")
        wav, sr = load_audio(raw["flac"])
        yield key, wav, sr, json.loads(raw["json"])


def sample_key(rel: str, segment: int) -> str:
    """WebDataset-safe, readable, unique key of segment ``segment`` of the file at relative path ``rel``."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", _stem(rel)).strip("_")[-64:].lstrip("_") or "audio"
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return f"{slug}_{digest}_s{segment:04d}"


def segment_bounds(frames: int, sample_rate: int, segment_seconds: float | None, overlap_seconds: float = 0.0,
                   min_segment_seconds: float | None = None) -> list[tuple[int, int]]:
    """[start, end) frame windows of one file under the segmenting rule of the module docstring."""
    if segment_seconds is None:
        return [(0, frames)]
    size = max(1, round(segment_seconds * sample_rate))
    hop = max(1, round((segment_seconds - overlap_seconds) * sample_rate))
    min_len = max(1, round((segment_seconds / 2 if min_segment_seconds is None else min_segment_seconds)
                           * sample_rate))
    bounds, start = [], 0
    while start + size <= frames:
        bounds.append((start, start + size))
        if start + size == frames:
            return bounds
        start += hop
    if frames - start >= min_len:
        bounds.append((start, frames))
    return bounds


# ------------------------------------------------------------------------------------------ setup and resume


def _validate(sample_rate: int | None, channels: str, segment_seconds: float | None, overlap_seconds: float,
              min_segment_seconds: float | None, files_per_shard: int, bits: int, workers: int) -> None:
    if sample_rate is not None and sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if channels not in ("mono", "stereo", "keep"):
        raise ValueError(f"channels must be 'mono', 'stereo' or 'keep', got {channels!r}")
    if segment_seconds is not None:
        if segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be positive, got {segment_seconds}")
        if not 0 <= overlap_seconds < segment_seconds:
            raise ValueError(f"overlap_seconds must be in [0, segment_seconds), got {overlap_seconds}")
        assert min_segment_seconds is not None
        if not 0 < min_segment_seconds <= segment_seconds:
            raise ValueError(f"min_segment_seconds must be in (0, segment_seconds], got {min_segment_seconds}")
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be at least 1, got {files_per_shard}")
    if bits not in (16, 24):
        raise ValueError(f"bits must be 16 or 24, got {bits}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def _is_own_file(name: str) -> bool:
    return (name in (MANIFEST_NAME, REPORT_NAME, PROGRESS_NAME) or bool(_SHARD_RE.fullmatch(name))
            or bool(_OWN_TEMP_RE.fullmatch(name)))


def _remove_own_files(out: Path) -> None:
    if out.is_dir():
        for path in out.iterdir():
            if path.is_file() and _is_own_file(path.name):
                path.unlink()


def _remove_stale_temps(out: Path) -> None:
    """Temp files of a killed run; atomic_path cleans up after exceptions but not after SIGKILL."""
    for path in out.iterdir():
        if path.is_file() and _OWN_TEMP_RE.fullmatch(path.name):
            path.unlink()


def _scan(src: Path, out: Path) -> tuple[list[str], list[str], list[str]]:
    """(audio files, their sidecars, ignored files) as sorted relative POSIX paths; ``out`` and hidden files
    and folders (``.git``, ``.DS_Store``) are skipped."""
    out_resolved = out.resolve()
    audio, other, ignored = [], set(), []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and (here / d).resolve() != out_resolved)
        for name in filenames:
            if name.startswith("."):
                continue
            rel = (here / name).relative_to(src).as_posix()
            suffix = Path(name).suffix.lower()
            if suffix in AUDIO_EXTENSIONS:
                audio.append(rel)
            elif suffix in METADATA_EXTENSIONS:
                other.add(rel)
            else:
                ignored.append(rel)
    audio.sort()
    sidecars = sorted({s for rel in audio for s in _sidecar_paths(rel) if s in other})
    return audio, sidecars, sorted(ignored)


def _stem(rel: str) -> str:
    """Relative path without its extension."""
    suffix = Path(rel).suffix
    return rel[: -len(suffix)] if suffix else rel


def _sidecar_paths(rel: str) -> tuple[str, str]:
    return f"{_stem(rel)}.json", f"{_stem(rel)}.txt"


def _source_hash(src: Path, files: list[str], sidecars: list[str]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files + sidecars):
        digest.update(f"{rel}\t{(src / rel).stat().st_size}\n".encode("utf-8"))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_table(path: Path, src: Path, files: list[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Rows of a CSV/TSV/JSONL table keyed by relative path, and the rows that match no audio file."""
    known, rows, issues = set(files), {}, []
    for line, row in _table_rows(path):
        column = "path" if "path" in row else "file" if "file" in row else None
        if column is None:
            raise ValueError(f"{path}: row {line} has no 'path' (or 'file') column")
        rel = _table_path(str(row.pop(column) or "").strip(), src)
        if rel not in known:
            issues.append({"source": f"{path.name}:{line}", "reason": f"no audio file {rel!r} under the source"})
            continue
        if rel in rows:
            issues.append({"source": f"{path.name}:{line}", "reason": f"second row for {rel!r}; it replaces the first"})
        rows[rel] = _with_caption(row)
    return rows, issues


def _table_path(value: str, src: Path) -> str:
    """A table's path cell as a relative POSIX path (absolute paths under ``src`` are accepted)."""
    path = Path(value.replace("\\", "/"))
    if path.is_absolute():
        try:
            return path.resolve().relative_to(src.resolve()).as_posix()
        except ValueError:
            return value
    return path.as_posix()


def _table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for line, row in enumerate(reader, start=2):
                yield line, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    row = json.loads(text)
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{line}: expected a JSON object per line")
                    yield line, row
    else:
        raise ValueError(f"{path}: metadata table must be .csv, .tsv or .jsonl")


def _start_or_resume(src: Path, out: Path, files: list[str], options: dict[str, Any],
                     fingerprint: dict[str, Any]) -> tuple[int, int]:
    """Check or create ``.progress.json``; returns the output (sample_rate, channels)."""
    progress_path = out / PROGRESS_NAME
    if progress_path.exists():
        saved = read_json(progress_path)
        changes = _differences(saved.get("options", {}), options) + _differences(saved.get("source", {}),
                                                                                   fingerprint, "source ")
        if changes:
            raise ValueError(f"{out} holds a partial build made differently ({'; '.join(changes)}); re-run with "
                             f"the same options and source, or pass --overwrite to rebuild from scratch")
        _remove_stale_temps(out)
        return int(saved["sample_rate"]), int(saved["channels"])
    if out.is_dir() and any(_SHARD_RE.fullmatch(p.name) for p in out.iterdir()):
        raise ValueError(f"{out} holds shards without {PROGRESS_NAME}; pass --overwrite to replace them")
    rate, channels = _output_format(src, files, options["sample_rate"], options["channels"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(progress_path, {"options": options, "source": fingerprint,
                                      "sample_rate": rate, "channels": channels})
    return rate, channels


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    return [f"{prefix}{k}: {saved.get(k)!r} then, {now.get(k)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def _output_format(src: Path, files: list[str], sample_rate: int | None, channels: str) -> tuple[int, int]:
    if sample_rate is not None and channels != "keep":
        return sample_rate, 1 if channels == "mono" else 2
    headers = []
    for rel in files:
        try:
            headers.append(audio_info(src / rel))
        except Exception:  # reported with its reason when the file is decoded
            continue
    if not headers:
        raise ValueError(f"none of the {len(files)} audio files under {src} has a readable header")
    rate = sample_rate if sample_rate is not None else _most_common([h[0] for h in headers])
    count = {"mono": 1, "stereo": 2}.get(channels) or _most_common([h[1] for h in headers])
    return rate, count


def _most_common(values: list[int]) -> int:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ------------------------------------------------------------------------------------------- running shards


def _shard_name(index: int, ext: str) -> str:
    return f"shard-{index:06d}.{ext}"


def _finished_marker(job: _ShardJob) -> dict[str, Any] | None:
    """The marker of a shard an earlier run completed, or None if the shard must be (re)built."""
    marker_path = Path(job.out) / _shard_name(job.index, "json")
    try:
        marker = read_json(marker_path)
    except (FileNotFoundError, ValueError):
        return None
    if marker.get("files") != job.files:
        return None
    if marker.get("samples", 0) == 0:
        return marker
    tar_path = Path(job.out) / str(marker.get("shard"))
    return marker if tar_path.is_file() and tar_path.stat().st_size == marker.get("bytes") else None


def _run_jobs(jobs: list[_ShardJob], out: Path, workers: int, progress: bool) -> list[dict[str, Any]]:
    markers: dict[int, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        marker = _finished_marker(job)
        if marker is None:
            todo.append(job)
        else:
            markers[job.index] = marker
    done_files = sum(len(job.files) for job in jobs if job.index in markers)
    total_files = sum(len(job.files) for job in jobs)
    with tqdm(total=total_files, initial=done_files, unit="file", desc=f"shards -> {out}",
              disable=not progress) as bar:
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                markers[job.index] = _log_skips(_build_shard(job, on_file=lambda: bar.update(1)))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                     initializer=_init_worker) as pool:
                futures = {pool.submit(_build_shard, job): job for job in todo}
                for future in as_completed(futures):
                    markers[futures[future].index] = _log_skips(future.result())
                    bar.update(len(futures[future].files))
    return [markers[job.index] for job in jobs]


def _init_worker() -> None:
    torch.set_num_threads(1)


def _log_skips(marker: dict[str, Any]) -> dict[str, Any]:
    for entry in marker["skipped"]:
        log.warning("skipped %s: %s", entry["source"], entry["reason"])
    for entry in marker.get("truncated", []):
        log.warning("cut short %s: %s", entry["source"], entry["reason"])
    return marker


class _EmptyShard(Exception):
    """Raised inside the tar's atomic_path block so that a shard without samples leaves no tar behind."""


def _build_shard(job: _ShardJob, on_file: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write one shard tar and then its marker; returns the marker."""
    out = Path(job.out)
    name = _shard_name(job.index, "tar")
    marker: dict[str, Any] = {"shard": name, "files": job.files, "samples": 0, "seconds": 0.0, "bytes": 0,
                              "skipped": [], "truncated": [], "metadata_issues": [], "metadata_overrides": []}
    try:
        with atomic_path(out / name) as tmp, open(tmp, "wb") as stream:
            with wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
                for rel in job.files:
                    result = _process_file(Path(job.src), rel, job.rows.get(rel, {}), job.target)
                    _record(marker, rel, result, writer)
                    if on_file is not None:
                        on_file()
            if marker["samples"] == 0:
                raise _EmptyShard
    except _EmptyShard:
        (out / name).unlink(missing_ok=True)
        marker["shard"] = None
    else:
        marker["bytes"] = (out / name).stat().st_size
    atomic_write_json(out / _shard_name(job.index, "json"), marker)
    return marker


def _record(marker: dict[str, Any], rel: str, result: _FileResult, writer: wds.TarWriter) -> None:
    marker["metadata_issues"] += result.issues
    marker["metadata_overrides"] += result.overrides
    if result.skipped is not None:
        marker["skipped"].append({"source": rel, "reason": result.skipped})
        return
    if result.truncated is not None:
        marker["truncated"].append({"source": rel, "reason": f"{result.truncated}; kept what decodes"})
    for key, flac, meta in result.samples:
        writer.write({"__key__": key, "flac": flac, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        marker["samples"] += 1
        marker["seconds"] += meta["duration"]


# ------------------------------------------------------------------------------------------------- one file


def _process_file(src: Path, rel: str, row: dict[str, Any], target: _Target) -> _FileResult:
    result = _FileResult()
    meta = _merged_metadata(src, rel, row, result)
    try:
        wav, result.truncated = _convert(src / rel, target)
    except Exception as e:  # one bad file never stops the job; the reason goes to the report
        result.skipped = str(e).removeprefix(f"{src / rel}: ")
        return result
    sr = target.sample_rate
    for index, (start, end) in enumerate(segment_bounds(wav.shape[-1], sr, target.segment_seconds,
                                                        target.overlap_seconds, target.min_segment_seconds)):
        fields = {"source": rel, "offset": start / sr, "duration": (end - start) / sr, "segment": index,
                  "sample_rate": sr, "channels": target.channels}
        sample_meta = _overlay(dict(meta), fields, "ostinato", rel, result.overrides if index == 0 else [])
        sample_meta.setdefault("caption", "")
        result.samples.append((sample_key(rel, index), encode_flac(wav[:, start:end], sr, target.bits),
                               sample_meta))
    if not result.samples:
        result.skipped = (f"shorter ({wav.shape[-1] / sr:.3f} s) than min_segment_seconds "
                          f"({target.min_segment_seconds} s)")
    return result


def _convert(path: Path, target: _Target) -> tuple[torch.Tensor, str | None]:
    """The file as the target's [C, T], and why it looks cut short (or None)."""
    wav, sr = load_audio(path)
    note = truncation_note(path, wav.shape[-1])
    if target.channel_policy != "keep":
        wav = convert_channels(wav, target.channel_policy)  # type: ignore[arg-type]
    elif wav.shape[0] != target.channels:
        if max(wav.shape[0], target.channels) > 2:
            raise ValueError(f"{path}: has {wav.shape[0]} channels and the output {target.channels}; "
                             f"channels='keep' converts only between mono and stereo")
        wav = convert_channels(wav, target.channels)
    wav = resample(wav, sr, target.sample_rate)
    if target.loudness is not None:
        wav = normalize_loudness(wav, target.sample_rate, target.loudness)
    return wav.contiguous(), note


def _merged_metadata(src: Path, rel: str, row: dict[str, Any], result: _FileResult) -> dict[str, Any]:
    json_rel, txt_rel = _sidecar_paths(rel)
    meta: dict[str, Any] = {}
    sidecar = _read_sidecar_json(src / json_rel, json_rel, result)
    _overlay(meta, sidecar, json_rel, rel, result.overrides)
    _overlay(meta, row, "metadata table", rel, result.overrides)
    if (src / txt_rel).is_file():
        try:
            caption = (src / txt_rel).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            result.issues.append({"source": txt_rel, "reason": f"unreadable caption ({e}); ignored"})
        else:
            _overlay(meta, {"caption": caption}, txt_rel, rel, result.overrides)
    return meta


def _read_sidecar_json(path: Path, rel: str, result: _FileResult) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        result.issues.append({"source": rel, "reason": f"unreadable sidecar ({e}); ignored"})
        return {}
    if not isinstance(data, dict):
        result.issues.append({"source": rel, "reason": "sidecar is not a JSON object; ignored"})
        return {}
    return _with_caption(data)


def _with_caption(fields: dict[str, Any]) -> dict[str, Any]:
    if "caption" not in fields:
        for alias in CAPTION_ALIASES:
            if alias in fields:
                fields["caption"] = fields.pop(alias)
                break
    return fields


def _overlay(meta: dict[str, Any], layer: dict[str, Any], by: str, rel: str,
             overrides: list[dict[str, Any]]) -> dict[str, Any]:
    """Update ``meta`` with ``layer``, noting each earlier value that gets replaced by a different one."""
    for key, value in layer.items():
        if key in meta and meta[key] != value:
            overrides.append({"source": rel, "field": key, "old": meta[key], "new": value, "by": by})
        meta[key] = value
    return meta


# --------------------------------------------------------------------------------------------------- report


def _report(files: list[str], markers: list[dict[str, Any]], ignored: list[str],
            table_issues: list[dict[str, Any]]) -> dict[str, Any]:
    skipped = [entry for m in markers for entry in m["skipped"]]
    return {
        "files": len(files),
        "written_files": len(files) - len(skipped),
        "samples": sum(m["samples"] for m in markers),
        "seconds": round(sum(m["seconds"] for m in markers), 3),
        "skipped": skipped,
        "truncated": [entry for m in markers for entry in m.get("truncated", [])],
        "ignored": ignored,
        "metadata_issues": table_issues + [entry for m in markers for entry in m["metadata_issues"]],
        "metadata_overrides": [entry for m in markers for entry in m["metadata_overrides"]],
        "empty_shards": [_shard_name(i, "tar") for i, m in enumerate(markers) if m["samples"] == 0],
    }
