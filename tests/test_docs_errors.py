"""docs/errors.md is a list of tests: every row names at least one test, and every test it names exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_REF = re.compile(r"(tests/[\w/]+\.py)?::(\w+)")


def _rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] != "verb" and not set(cells[0]) <= {"-", ":"}:
            rows.append(cells)
    return rows


def test_every_row_of_docs_errors_names_tests_that_exist():
    rows = _rows((ROOT / "docs" / "errors.md").read_text(encoding="utf-8"))
    assert len(rows) >= 6
    missing = []
    for verb, fault, seen, tests in rows:
        refs = TEST_REF.findall(tests)
        assert refs, f"docs/errors.md: the row '{verb} | {fault}' names no test"
        current = None
        for file, name in refs:
            current = file or current  # "tests/a.py::t1, ::t2": t2 is in a.py too
            assert current, f"docs/errors.md: '::{name}' with no file before it"
            source = (ROOT / current).read_text(encoding="utf-8") if (ROOT / current).is_file() else ""
            if not re.search(rf"^\s*(async )?def {name}\(", source, re.M):
                missing.append(f"{current}::{name}")
    assert not missing, f"docs/errors.md names tests that do not exist: {missing}"


def test_the_check_finds_a_missing_test(tmp_path):
    rows = _rows("| verb | fault | seen | test |\n|---|---|---|---|\n| x | y | z | tests/test_errors.py::nope |\n")
    (_, _, _, tests), = rows
    (file, name), = TEST_REF.findall(tests)
    assert file == "tests/test_errors.py" and name == "nope"
    assert not re.search(rf"^\s*def {name}\(", (ROOT / file).read_text(), re.M)
