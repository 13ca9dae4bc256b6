"""Atomic file writes: a crash mid-write never leaves a half-written file under the final name."""
from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_wav(path: str | os.PathLike, wav: torch.Tensor, sample_rate: int) -> None:
    """Every wav file ostinato writes: ``wav [C, T]`` (float, clamped to [-1, 1]) -> 16-bit PCM, atomically.
    Encoded in memory first, so that a full disk fails as an OSError naming ``path`` (libsndfile would only say
    "System error") and leaves nothing behind."""
    import soundfile as sf

    data = io.BytesIO()
    sf.write(data, wav.detach().float().clamp(-1, 1).T.cpu().numpy(), int(sample_rate), format="WAV",
             subtype="PCM_16")
    try:
        atomic_write_bytes(path, data.getvalue())
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write() names no file: name the one asked for
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; the error names the file on bad JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); delete or fix the file") from e


PROGRESS_NAME = ".progress.json"


def shard_name(url: str) -> str:
    """The output shard file of an input shard url (``.../shard-000001.tar`` -> ``shard-000001.tar``)."""
    name = url.rstrip("/").split("/")[-1]
    return name if name.endswith(".tar") else f"{name}.tar"


def shard_marker(out: Path, url: str) -> Path:
    """The JSON marker written beside an output shard once it is complete."""
    return out / shard_name(url).replace(".tar", ".json")


def shard_done(out: Path, url: str) -> bool:
    """Whether the output shard of ``url`` and its marker are both in ``out`` (a resumed job skips it)."""
    return shard_marker(out, url).is_file() and (out / shard_name(url)).is_file()


def check_progress(out: Path, fingerprint: dict[str, Any], overwrite: bool, what: str) -> None:
    """Start or resume a shard-by-shard job writing ``out``: a finished job (``manifest.json``) needs
    ``overwrite``; a partial one must have been started with the same ``fingerprint`` (settings, inputs)."""
    progress = out / PROGRESS_NAME
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'manifest.json'} exists: these {what} are complete; pass --overwrite to "
                              "rebuild them")
    if overwrite:
        for p in list(out.glob("shard-*.tar")) + list(out.glob("shard-*.json")) + [out / "manifest.json", progress]:
            p.unlink(missing_ok=True)
    if progress.is_file():
        saved = read_json(progress)
        diff = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
        if diff:
            raise ValueError(f"{out} holds a partial run with other {', '.join(diff)}; pass --overwrite to start "
                             "again")
    atomic_write_json(progress, fingerprint)
