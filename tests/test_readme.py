"""README.md and docs/, run as written: every code block marked ``<!-- runnable -->`` runs (python in a subprocess
on this checkout, bash in bash) in a folder holding the tiny models the blocks name, and the commands of the
README's CLI quick start (``<!-- cli-quick-start -->``) run in the order given on tiny settings, each placeholder
filled from an earlier command's output. Links between the pages resolve, anchors included."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from tests.doc_blocks import PAGES, ROOT, Block, marked_blocks, shell_commands
from tests.synth import write_shards
from tests.test_quick_start import self_contained_export

RUNNABLE = [b for page in PAGES for b in marked_blocks(page, "runnable")]
KNOWN_MARKS = re.compile(r"runnable|cli-quick-start|journey: \w+")
# What the quick start's commands get on top of what the README writes (argparse and Hydra keep the last value),
# so that the whole chain runs in minutes on one core: the demo in miniature, a few training steps, 1 s clips.
TINY = {
    "demo": ["--quick"],
    "train": ["trainer.max_steps=2", "trainer.checkpoint_every_steps=2", "data.batches_per_epoch=2",
              "trainer.limit_val_batches=1", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=4"],
    "export": [],
    "generate": ["--seconds", "1"],
    "eval": ["--num-samples", "1", "--set", "seconds=1", "--set", "batch_size=1"],  # the quick demo tests 1 clip
}
# A placeholder of the quick start and where its value is printed by the command before it.
FILLED_FROM = {"<SIG>": re.compile(r"\bXP (\w+) in ")}


def environment(root: Path) -> dict[str, str]:
    """What a user's shell has after ``source .venv/bin/activate``, on this checkout, offline, one thread."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1",
            "OSTINATO_DATA": str(root / "data"), "OSTINATO_OUTPUTS": str(root / "outputs"), "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the runnable blocks name, in a folder each copy of which is a block's current folder:
    ``exports/musicgen`` (a tiny MusicGen export that carries its codec) and ``data/demo/shards/{train,valid,test}``
    (tones in the demo corpus' shard format)."""
    root = tmp_path_factory.mktemp("world")
    (root / "exports").mkdir()
    self_contained_export(root / "exports" / "musicgen")
    for split in ("train", "valid", "test"):
        write_shards(root / "data" / "demo" / "shards" / split, n_shards=2, per_shard=4, sample_rate=24000)
    return root


def test_the_pages_mark_their_blocks() -> None:
    """The README has a runnable Python quick start and a CLI quick start; no mark is misspelt (a block whose mark
    no test knows would silently not run)."""
    marks = [b for page in PAGES for b in marked_blocks(page)]
    assert all(KNOWN_MARKS.fullmatch(b.mark) for b in marks), [(b.name, b.mark) for b in marks]
    readme = [b for b in RUNNABLE if b.page.name == "README.md"]
    assert any(b.lang == "python" and "ostinato.load(" in b.code for b in readme), readme
    assert len(marked_blocks(ROOT / "README.md", "cli-quick-start")) == 1
    assert all(b.lang in ("python", "bash") for b in RUNNABLE), [(b.name, b.lang) for b in RUNNABLE]


@pytest.fixture(scope="module")
def ran(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """Each runnable block, run once in its own copy of ``world``: name -> (folder, finished process)."""
    results = {}
    for block in RUNNABLE:
        folder = tmp_path_factory.mktemp("block") / "work"
        shutil.copytree(world, folder)
        if block.lang == "python":
            (folder / "block.py").write_text(block.code)
            cmd = [sys.executable, "block.py"]
        else:
            cmd = ["bash", "-c", "set -eo pipefail\n" + block.code]
        results[block.name] = folder, subprocess.run(cmd, cwd=folder, env=environment(folder), capture_output=True,
                                                     text=True, timeout=300)
    return results


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_runnable_block_runs(block: Block, ran: dict) -> None:
    _, proc = ran[block.name]
    assert proc.returncode == 0, f"{block.name} ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_the_python_quick_start_writes_what_it_says(ran: dict) -> None:
    """The README's Python quick start: two 8 s clips, then a 12 s one that goes on from the first."""
    block = next(b for b in RUNNABLE if b.page.name == "README.md" and b.lang == "python")
    folder, proc = ran[block.name]
    assert proc.returncode == 0, proc.stderr[-4000:]
    reel, sr = sf.read(folder / "reel.wav", always_2d=True)
    longer, sr2 = sf.read(folder / "reel_longer.wav", always_2d=True)
    assert sr == sr2 and len(reel) == 8 * sr and len(longer) == 12 * sr and abs(reel).max() > 0
    assert f"(2, 1, {8 * sr}) {sr}" in proc.stdout


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_between_the_pages_resolve() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


# -- the CLI quick start, command by command -----------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every command of the CLI quick start, in order, in a fresh folder (the user's checkout), with ``TINY``'s
    settings appended; a placeholder takes the value the command that printed it gave."""
    root = tmp_path_factory.mktemp("cli_quick_start")
    env = environment(root)
    (block,) = marked_blocks(ROOT / "README.md", "cli-quick-start")
    values: dict[str, str] = {}
    runs = []
    for words in shell_commands(block.code):
        assert words[0] == "ostinato" and words[1] in TINY, f"{block.name}: {' '.join(words)}"
        filled = [values.get(w, w) for w in words]
        left = [w for w in filled if re.fullmatch(r"<\w+>", w)]
        assert not left, f"{block.name}: {' '.join(words)}: {left} is printed by no command before it"
        proc = subprocess.run([sys.executable, "-m", "ostinato.cli", *filled[1:], *TINY[words[1]]], cwd=root,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(filled)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        for name, pattern in FILLED_FROM.items():
            found = pattern.search(proc.stdout + proc.stderr)
            if found:
                values[name] = found[1]
        runs.append((filled, proc))
    return {"root": root, "runs": runs, "values": values}


def test_cli_quick_start_runs_in_order(quick_start: dict) -> None:
    root, runs = quick_start["root"], quick_start["runs"]
    verbs = [filled[1] for filled, _ in runs]
    assert verbs == ["demo", "train", "export", "generate", "eval"]
    demo, train, export, generate, evaluate = (proc for _, proc in runs)
    assert demo.stdout.strip().splitlines()[-1] == f"report: {root / 'outputs' / 'demo' / 'report.html'}"
    sig = quick_start["values"]["<SIG>"]
    assert runs[2][0][2] == sig  # export took the signature train printed
    assert (root / "outputs" / "xps" / sig / "checkpoints" / "last.ckpt").is_file()
    exported = {p.name for p in (root / "exports" / "mine").iterdir()}
    assert {"model.safetensors", "config.yaml", "export.json"} <= exported
    wav, sr = sf.read(root / "gen" / "reel" / "000.wav")
    assert len(wav) == sr and abs(wav).max() > 0  # TINY's --seconds 1 over the README's 8
    assert json.loads((root / "gen" / "reel" / "000.json").read_text())["prompt"].startswith("An irish reel")
    result = json.loads(next((root / "outputs" / "eval").rglob("metrics.json")).read_text())
    assert result["num_items"] == 1 and result["metrics"]["fad"] >= 0


# -- every `ostinato VERB --flag` the pages write exists ------------------------------------------------------
DORA_VERBS = {"train", "grid", "launch", "info"}  # their options and overrides are dora's and Hydra's
# `ostinato` in command position: a line's start (a shell prompt, indentation), after `$(`, `&&`, `;`, `do`, `then`
COMMAND = re.compile(r"(?:^|\$\(|&&|;|\bdo\b|\bthen\b)\s*(?:\$ )?ostinato ((?:[^\n|;&#)`]|\\\n)*)", re.M)


def written_commands(page: Path) -> list[list[str]]:
    """The words after ``ostinato`` of each command the page writes, in code blocks and inline code alike."""
    text = page.read_text()
    fenced = re.findall(r"^```[\w-]*\n(.*?)^```", text, re.M | re.S)
    inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    commands = []
    for code in [*fenced, *inline]:
        for m in COMMAND.finditer(code.replace("\\\n", " ")):
            commands.append(m[1].split())
    return commands


def parsers() -> dict[str, argparse.ArgumentParser]:
    """``VERB`` (and ``prep corpus``, ``bundle jukebox``, ...) -> its parser, from the CLI itself."""
    from ostinato.cli import build_parser

    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    found = {}
    for verb, parser in subparsers(build_parser()).items():
        found[verb] = parser
        found.update({f"{verb} {sub}": p for sub, p in subparsers(parser).items()})
    return found


def test_every_verb_and_flag_the_pages_write_exists() -> None:
    """A renamed or removed flag (or one kept only as a deprecated spelling) in any page fails here, naming the page
    and the command."""
    verbs = parsers()
    wrong = []
    for page in [p for p in PAGES if p.name != "errors.md"]:  # errors.md quotes wrong commands on purpose
        for words in written_commands(page):
            words = [w for w in words if w not in ("--debug", "-v", "--verbose")]
            if not words or words[0] in ("VERB", "VERB,") or words[0].startswith(("<", "-")) or words[0][-1] == ":":
                continue  # `ostinato VERB --help`: prose about every verb; `ostinato eval: error: ...`: a message
            verb = words[0] if words[0] in verbs else None
            if verb is None:
                wrong.append(f"{page.relative_to(ROOT)}: ostinato {' '.join(words)}: no verb {words[0]!r}")
                continue
            if len(words) > 1 and f"{verb} {words[1]}" in verbs:
                verb = f"{verb} {words[1]}"
            if verb in DORA_VERBS:
                continue
            options = {o for a in verbs[verb]._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
            for word in words:
                flag = re.match(r"--?[a-zA-Z][\w-]*", word)
                if flag and flag[0] not in options:
                    wrong.append(f"{page.relative_to(ROOT)}: ostinato {' '.join(words)}: {verb} has no {flag[0]}")
    assert not wrong, "\n".join(wrong)
