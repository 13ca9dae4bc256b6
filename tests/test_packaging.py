"""The package declaration stays in step with the source tree."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_declared():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    found.add("ostinato.grids")
    assert found == declared, f"update [tool.setuptools].packages in pyproject.toml: {sorted(found ^ declared)}"


def test_wav_files_are_written_by_one_function():
    """``ostinato.fileio.write_wav`` clamps, writes atomically and names the file on a full disk; no module writes
    audio files another way (data/audio.py encodes FLAC into shard buffers, not files)."""
    writes = re.compile(r"\b(sf|soundfile)\.write\(|torchaudio\.save\(|\.tofile\(")
    found = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in sorted((ROOT / "src").rglob("*.py"))
             for line in p.read_text().splitlines() if writes.search(line)]
    assert [f for f in found if not f.startswith("src/ostinato/fileio.py:") and 'format="FLAC"' not in f] == []
    assert any(f.startswith("src/ostinato/fileio.py:") for f in found)


def test_argparse_lives_in_the_cli_only():
    """Library functions take plain arguments: no module but cli.py parses flags or takes an argparse namespace."""
    uses = re.compile(r"^\s*(import argparse|from argparse import)|argparse\.Namespace")
    found = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "src").rglob("*.py"))
             if any(uses.search(line) for line in p.read_text().splitlines())]
    assert found == ["src/ostinato/cli.py"]
