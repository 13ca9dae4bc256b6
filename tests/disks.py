"""Small real file systems for the fault tests: a tmpfs mounted read-only or nearly full (the tests run as root,
where permission bits do not stop a write)."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs with ``options`` (``size=16k``, ``size=64k,ro``) on ``folder`` (made when missing) for the
    block; the lazy unmount lets a failed write that still holds a file open go."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)
