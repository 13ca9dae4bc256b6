"""The fenced code blocks of the docs' markdown pages that an HTML comment marks (``<!-- runnable -->``,
``<!-- journey: sweep -->``), and the commands of a shell block: what the tests that run the docs share."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a comment on its own line, then (blank lines allowed) a fence with its language, the code, the closing fence
MARKED = re.compile(r"^<!--\s*(?P<mark>[^>]*?)\s*-->[ \t]*\n\s*^```(?P<lang>[\w-]*)[ \t]*\n(?P<code>.*?)^```[ \t]*$",
                    re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    mark: str  # the comment's text: "runnable", "journey: sweep"
    lang: str
    code: str

    @property
    def name(self) -> str:
        """``PAGE:LINE``, relative to the repository: the id of the block in a test's name and its failures."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def marked_blocks(page: Path, mark: str | None = None) -> list[Block]:
    """The blocks of ``page`` that follow an HTML comment, in page order; ``mark``: only those whose comment's text
    is ``mark``."""
    text = page.read_text()
    blocks = []
    for m in MARKED.finditer(text):
        if mark is None or m["mark"] == mark:
            line = text.count("\n", 0, m.start("code"))  # the fence's line: the code starts on the next one
            blocks.append(Block(page, line, m["mark"], m["lang"], m["code"]))
    return blocks


def section(page: Path, heading: str) -> str:
    """The text under the heading ``heading`` (``## Quick start``), down to the next heading of its level or
    above."""
    level = len(heading) - len(heading.lstrip("#"))
    text = page.read_text()
    start = re.search(rf"^{re.escape(heading)}[ \t]*$", text, re.M)
    assert start, f"{page}: no heading {heading!r}"
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start.end())
    return text[start.end():end.start() if end else len(text)]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: one per line (``\\`` joins the next), comments and blank lines dropped, each
    split as the shell splits words (quotes kept together)."""
    joined = re.sub(r"\\\n", " ", code)
    return [words for words in (shlex.split(line, comments=True) for line in joined.splitlines()) if words]
