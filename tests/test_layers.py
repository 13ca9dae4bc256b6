"""The house's floors are a contract: import-linter (pyproject's [tool.importlinter], run by `make test`) keeps the
tree as it is and refuses an import that runs up a floor or brings Lightning into the models."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", str(tree / "pyproject.toml")], cwd=tree, capture_output=True,
                          text=True, env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}, timeout=300)


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("house")
    shutil.copytree(ROOT / "src" / "ostinato", tree / "src" / "ostinato",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_contract(copy) -> None:
    proc = lint(copy)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("models/codec.py", "from ostinato.families import base  # noqa", "ostinato.models is not allowed to import "
                                                                      "ostinato.families"),
    ("data/batch.py", "import ostinato.models.musicgen  # noqa", "ostinato.data is not allowed to import "
                                                               "ostinato.models"),
    ("engine/trainer.py", "import ostinato.evaluation.callback  # noqa", "ostinato.engine is not allowed to import "
                                                                        "ostinato.evaluation"),
    ("nn/conv.py", "import lightning  # noqa", "ostinato.nn is not allowed to import lightning"),
])
def test_a_wrong_import_breaks_a_contract(copy, module, line, broken) -> None:
    path = copy / "src" / "ostinato" / module
    original = path.read_text()
    try:
        path.write_text(original + "\n" + line + "\n")
        proc = lint(copy)
    finally:
        path.write_text(original)
    assert proc.returncode == 1 and "BROKEN" in proc.stdout
    assert broken in " ".join(proc.stdout.split()), proc.stdout[-3000:]
