"""Where shards come from: manifests, brace-expanded specs, local paths, ``http(s)://``, ``s3://`` and ``pipe:``.

Remote shards are opened through webdataset's ``gopen`` table; ``s3://`` is registered here as a pipe through a
command line that users can change with ``OSTINATO_S3_CMD`` (default ``aws s3 cp {url} -``), so any S3-compatible
tool (s5cmd, rclone) works without code changes.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shlex
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import torch
from webdataset.gopen import gopen, gopen_pipe, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ostinato.data.audio import AudioDecodeError, convert_channels, load_audio, resample
from ostinato.data.manifest import MANIFEST_NAME, Manifest, ShardManifest
from ostinato.errors import UserError

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")
S3_CMD_ENV = "OSTINATO_S3_CMD"


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    template = os.environ.get(S3_CMD_ENV, "aws s3 cp {url} -")
    return gopen_pipe("pipe:" + template.format(url=shlex.quote(url)), mode=mode, bufsize=bufsize)


gopen_schemes.setdefault("s3", _gopen_s3)


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


@dataclass
class ShardSource:
    """Resolved shard URLs plus what the manifests (when given) say about them."""

    urls: list[str]
    sample_rate: int | None = None
    channels: int | None = None
    num_samples: int | None = None  # known only when every part came from a manifest
    counts: dict[str, int] = field(default_factory=dict)  # samples per shard url, where a manifest gives them


def shard_counts(urls: Sequence[str], shards: Sequence[Any]) -> dict[str, int]:
    """Samples per shard url, from a manifest's shard entries (anything with ``samples``) listed in ``urls``'s
    order: what a truncated tar lost is counted against them (``TrainStream(expected=...)``)."""
    return {str(u): int(s.samples) for u, s in zip(urls, shards, strict=True)}


@dataclass
class Listed:
    """Shard folders of one kind read through their manifests: the manifests (with their folders), every shard
    path (checked to exist), samples per shard and in all."""

    manifests: list[tuple[Path, Any]]
    urls: list[str]
    counts: dict[str, int]
    total: int


def resolve_listed(spec: Any, cls: type[ShardManifest]) -> Listed:
    """A shard folder (or its ``manifest.json``), or a list of them, of the manifest class ``cls``."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError(f"empty {cls.KIND} shard spec: give a folder holding a {cls.KIND} manifest.json")
    out = Listed([], [], {}, 0)
    for s in specs:
        path = Path(s)
        manifest = cls.load(path)
        folder = path if path.is_dir() else path.parent
        paths = [str(folder / sh.name) for sh in manifest.shards]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{cls.KIND} shard not found: {missing[0]}, listed by {folder / MANIFEST_NAME}")
        out.manifests.append((folder, manifest))
        out.urls += paths
        out.counts.update(shard_counts(paths, manifest.shards))
        out.total += manifest.total_samples
    return out


def _read_remote_manifest(url: str) -> Manifest:
    with gopen(url) as f:
        return Manifest.from_dict(json.loads(f.read()), origin=url)


def _resolve_one(spec: str) -> ShardSource:
    spec = str(spec)
    if spec.endswith(MANIFEST_NAME) and is_remote(spec):
        m = _read_remote_manifest(spec)
        base = spec[: -len(MANIFEST_NAME)]
        urls = [base + s.name for s in m.shards]
        return ShardSource(urls, m.sample_rate, m.channels, m.total_samples, shard_counts(urls, m.shards))
    path = Path(spec)
    if not is_remote(spec) and (path.name == MANIFEST_NAME or path.is_dir()):
        m = Manifest.load(path)
        folder = path if path.is_dir() else path.parent
        urls = m.shard_paths(folder)
        _check_local(urls, f"manifest {folder / MANIFEST_NAME}")
        return ShardSource(urls, m.sample_rate, m.channels, m.total_samples, shard_counts(urls, m.shards))
    if not is_remote(spec) and path.is_file() and path.suffix != ".tar":
        raise UserError(f"{spec} is not a shard: give a folder with {MANIFEST_NAME}, a manifest, a shard .tar file "
                        "or a brace pattern (make shards from audio files with `ostinato prep shards SRC OUT`)")
    if not is_remote(spec) and "{" not in spec and not path.exists():
        raise FileNotFoundError(f"no shards at {spec}: expected a folder with {MANIFEST_NAME}, a manifest, "
                                "shard .tar files or a brace pattern (create them with `ostinato prep shards`)")
    urls = list(braceexpand.braceexpand(spec))
    if not is_remote(spec):
        _check_local(urls, f"spec {spec!r}")
    return ShardSource(urls)


def _check_local(paths: list[str], origin: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}, listed by {origin}")


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSource:
    """Expand a spec (or a list of specs) into shard URLs.

    A spec is a folder holding ``manifest.json``, a manifest path or URL, or a brace pattern such as
    ``data/train/shard-{000000..000031}.tar`` or ``s3://bucket/music/shard-{0..99}.tar``. Local shards are
    checked up front: a missing one raises ``FileNotFoundError`` naming it.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("empty shard spec: give a manifest, a folder with manifest.json, or a brace pattern")
    parts = [_resolve_one(str(s)) for s in specs]
    rates = {p.sample_rate for p in parts if p.sample_rate}
    chans = {p.channels for p in parts if p.channels}
    counts = [p.num_samples for p in parts]
    return ShardSource(
        urls=[u for p in parts for u in p.urls],
        sample_rate=rates.pop() if len(rates) == 1 else None,
        channels=chans.pop() if len(chans) == 1 else None,
        num_samples=sum(counts) if all(c is not None for c in counts) else None,
        counts={u: n for p in parts for u, n in p.counts.items()},
    )


def open_shard(url: str):
    """A readable binary stream for a local path or any URL webdataset's ``gopen`` knows."""
    if not is_remote(url):
        if not Path(url).is_file():
            raise FileNotFoundError(f"shard not found: {url}")
        return open(url, "rb")
    return gopen(url)


def iter_raw_samples(url: str) -> Iterator[dict]:
    """Yield raw samples ``{"__key__": str, "flac": bytes, "json": bytes, ...}`` of one shard, in order.

    Opening errors (missing shard, failed download) propagate; a tar that is truncated part-way raises
    ``tarfile.ReadError`` after the complete samples before the damage were yielded.
    """
    stream = open_shard(url)
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            sample.pop("__url__", None)
            yield sample
    finally:
        stream.close()


AUDIO_KEYS = ("flac", "wav", "ogg", "mp3")


def iter_shard_audio(url: str, sample_rate: int, channels: int, skipped: list[str],
                     expected: int | None = None) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """``(key, wav [channels, T] at sample_rate, meta)`` of every decodable sample of an audio shard, in order.

    Each sample left out appends its reason to ``skipped``: an undecodable one, and every one a truncated tar
    lost after the damage (``expected - read``, from the manifest; 1 when ``expected`` is unknown). One warning per
    damaged shard names it. A missing shard raises FileNotFoundError.
    """
    before, read = len(skipped), 0
    try:
        for raw in iter_raw_samples(url):
            read += 1
            key = raw["__key__"]
            audio = next((raw[k] for k in AUDIO_KEYS if k in raw), None)
            try:
                if audio is None:
                    raise AudioDecodeError(f"no audio entry (have {sorted(k for k in raw if not k.startswith('__'))})")
                wav, sr = load_audio(audio)
                meta = json.loads(raw.get("json", b"{}"))
            except (AudioDecodeError, ValueError) as e:
                skipped.append(f"sample {key}: {e}")
                continue
            yield key, resample(convert_channels(wav, channels), sr, sample_rate), meta
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or unreadable tar: keep the samples before the damage
        lost = max(1, (expected or 0) - read)
        skipped.extend([f"{type(e).__name__} after sample {read}: {e}"] * lost)
    else:  # a tar cut at a member boundary ends without an error
        skipped.extend([f"the tar ends after sample {read} of the {expected} its manifest lists"]
                       * max(0, (expected or 0) - read))
    if len(skipped) > before:
        log.warning("%s: %d samples skipped (first: %s)", url, len(skipped) - before, skipped[before])


def output_folder(path: str | os.PathLike, option: str) -> Path:
    """Create the output folder ``path`` (``option`` names it in messages) and check that it takes files: a file
    there, a read-only or full file system end in one line naming the folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder; give a folder for the output (created if "
                        "missing)")
    with naming(path):
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    return path


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a file-system error (full disk, read-only, no permission) of the block as one naming ``path``
    rather than the temp file it happened on (which is gone by then)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def sweep_temps(folder: Path, names: Iterator[str] | list[str]) -> int:
    """Remove the temp files (``.NAME.*.tmp``, see ``ostinato.fileio.atomic_path``) that a killed run left for
    the outputs ``names`` in ``folder``; returns how many."""
    swept = 0
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
            swept += 1
    if swept:
        log.info("removed %d temp files of an interrupted run in %s", swept, folder)
    return swept
