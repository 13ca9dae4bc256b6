"""Issue 16, part E: the demo report (curves of different scale, an unreliable FAD-inf, the "better" column) and the
`ostinato demo` verb's early checks (a file as --data, a read-only --outputs, a half-rendered corpus, no fluidsynth
or soundfont): each ends in one line naming the problem and the fix, exit code 2, before any training."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ostinato.demo import DemoPlan, check_demo, demo_table
from ostinato.demo.report import _curve_figure, curve_panels, write_demo_report
from ostinato.evaluation.report import format_table, metric_notes
from ostinato.metrics.fad import FAD_INF_MIN_ITEMS, fad_inf_reliability
from ostinato.nn.contrastive import retrieval_metrics
from tests.disks import tmpfs
from tests.synth import write_shards, write_tiny_encodec

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # subprocesses run this checkout, not the installed one
# every scalar an evaluation suite writes (scoring.py's names)
EVAL_METRICS = ("fad", "fad_inf", "fad_inf_slope", "fad_inf_r2", "per_song_fad_mean", "per_song_fad_median",
                "text_audio", "kld", "chroma", "mel_distance", "stft_distance", "sisnr")


def _falling(start: float, end: float, steps: int = 20) -> list[tuple[int, float]]:
    return [(10 * i, start + (end - start) * i / (steps - 1)) for i in range(steps)]


def test_codec_chart_draws_each_scale_on_its_own_axis() -> None:
    """Train loss in the hundreds and validation mel distance near 1: each curve fills most of its own y axis."""
    series = {"train/loss": _falling(600.0, 150.0), "valid/mel_distance": _falling(1.4, 0.6, 5)}
    fig = _curve_figure("codec", series)
    drawn = {}
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        for line in ax.get_lines():
            y = line.get_ydata()
            assert lo <= min(y) and max(y) <= hi, line.get_label()
            drawn[line.get_label()] = (max(y) - min(y)) / (hi - lo)
    assert set(drawn) == set(series)
    assert all(share > 0.5 for share in drawn.values()), drawn  # not flat at zero


def test_curve_panels_keep_comparable_curves_together() -> None:
    mulan = {"train/loss": _falling(4.0, 2.5), "valid/t2a_r10": _falling(0.1, 0.6, 5),
             "valid/a2t_r10": _falling(0.1, 0.5, 5), "valid/chance_r10": [(0, 0.3), (90, 0.3)]}
    assert curve_panels(mulan) == [["train/loss"], ["valid/t2a_r10", "valid/a2t_r10", "valid/chance_r10"]]
    musicgen = {"train/ce": _falling(7.0, 4.0), "valid/ce": _falling(6.8, 4.5, 5), "valid/ce_text_only": []}
    assert curve_panels(musicgen) == [["train/ce", "valid/ce"]]


def _metric_rows(page: str) -> list[tuple[str, str, str]]:
    return re.findall(r"<tr><td>(.*?)</td><td class='n'>(.*?)</td><td>(.*?)</td></tr>", page)


def test_every_metric_the_demo_shows_says_which_way_is_better(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    retrieval = {k: float(v) for k, v in retrieval_metrics(torch.randn(12, 8, generator=gen),
                                                           torch.randn(12, 8, generator=gen)).items()}
    table = demo_table(dict.fromkeys(EVAL_METRICS, 1.5), 5.1, 5.4, 6.2, retrieval, 2.0, 0.7)
    notes = {"fad_inf": fad_inf_reliability(0.009, 32)["note"]}
    page = write_demo_report(tmp_path / "report.html", [], table, {}, notes=notes).read_text()
    rows = _metric_rows(page)
    shown = {re.search(r"<code>(.*?)</code>", name).group(1) for name, _, _ in rows}
    assert shown >= set(EVAL_METRICS) | {"valid/ce", "t2a_r10", "chance_median_rank", "n", "valid/mel_distance"}
    assert [name for name, _, better in rows if not better.strip()] == []
    fad_inf = next(value for name, value, _ in rows if "<code>fad_inf</code>" in name)
    assert fad_inf.startswith("1.5 (unreliable (fit R^2 0.009 &lt; 0.8, 32 clips &lt; 100)")


def test_fad_inf_reliability_thresholds() -> None:
    assert fad_inf_reliability(0.97, FAD_INF_MIN_ITEMS) == {"reliable": True, "note": "", "min_items": 100,
                                                            "min_r2": 0.8}
    assert fad_inf_reliability(0.97, 32)["note"].startswith("unreliable (32 clips < 100)")
    assert not fad_inf_reliability(None, 500)["reliable"]


def test_fad_inf_of_few_clips_is_flagged_in_metrics_json_reports_and_table(tmp_path: Path) -> None:
    """A real suite run (reconstruction by a tiny random EnCodec: no training) on 8 clips."""
    from ostinato.evaluation.runner import run_suite

    torch.set_num_threads(1)
    codec = write_tiny_encodec(tmp_path / "codec", 24000)
    write_shards(tmp_path / "ref", n_shards=1, per_shard=8, sample_rate=24000, seconds=1.0)
    suite = tmp_path / "recon.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "recon", "kind": "reconstruction", "reference": str(tmp_path / "ref"), "num_samples": 8,
        "seconds": 1.0, "batch_size": 4, "embedding": f"codec:{codec}",
        "metrics": ["mel", {"fad_inf": {"per": "frame", "num_points": 5}}]}))
    result = run_suite(str(suite), str(codec), tmp_path / "out", progress=False, cache=tmp_path / "cache")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["fad_inf_fit"]["reliable"] is False and "8 clips < 100" in saved["fad_inf_fit"]["note"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert saved["metrics"]["fad_inf"] is None and saved["fad_inf_refused"].startswith("FAD-inf refused (8 clips")
    row = next(line for line in md.splitlines() if "(`fad_inf`)" in line)
    assert "refused" in row and "8 clips < 100" in row and "n/a" in row  # the reason, not a number
    rows = [line.split("|") for line in md.splitlines() if re.match(r"\| .* \(`\w+`\) \|", line)]
    assert len(rows) == 4 and all(cells[3].strip() for cells in rows), rows  # mel, fad_inf, slope, r2: a direction
    assert "refused" in (tmp_path / "out" / "report.html").read_text()
    assert "FAD-inf refused (8 clips < 100" in format_table(result["metrics"], metric_notes(result))


# -- the demo verb: early checks --------------------------------------------------------------------------------


def _demo(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {**os.environ, "PYTHONPATH": CHECKOUT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ostinato.cli", "demo", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ostinato: error: "), proc.stderr[-3000:]
    assert "$ ostinato" not in proc.stdout  # stopped before the first step
    return lines[0]


def test_demo_data_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "corpus").write_text("not a folder")
    line = _one_line_error(_demo(tmp_path, "--data", "corpus", "--outputs", "out"))
    assert line.endswith("--data corpus is a file; give a folder (--data DIR)")
    assert (tmp_path / "corpus").read_text() == "not a folder"


def test_demo_outputs_on_a_read_only_file_system(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "out", "size=64k,ro") as out:
        line = _one_line_error(_demo(tmp_path, "--data", "data", "--outputs", str(out)))
    assert line.endswith(f"--outputs {out} is on a read-only file system; give a writable folder (--outputs DIR)")


def test_demo_without_fluidsynth_names_the_packages(tmp_path: Path) -> None:
    line = _one_line_error(_demo(tmp_path, "--data", "data", "--outputs", "out", env={"PATH": str(tmp_path)}))
    assert "fluidsynth program is not on PATH" in line and "apt-get install fluidsynth fluid-soundfont-gm" in line


def test_demo_with_a_missing_soundfont_names_the_packages(tmp_path: Path) -> None:
    line = _one_line_error(_demo(tmp_path, "--data", "data", "--outputs", "out",
                                 env={"OSTINATO_SOUNDFONT": str(tmp_path / "gm.sf2")}))
    assert f"$OSTINATO_SOUNDFONT {tmp_path / 'gm.sf2'} is not a file" in line
    assert "apt-get install fluidsynth fluid-soundfont-gm" in line


def test_demo_data_holding_a_corpus_of_another_size(tmp_path: Path) -> None:
    """`ostinato demo --quick` then `ostinato demo` on the same folder: say so before anything runs."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.json").write_text(json.dumps({"options": {"hours": 0.05}}))
    line = _one_line_error(_demo(tmp_path, "--data", "data", "--outputs", "out"))
    assert "--data data holds a demo corpus of 0.05 h, this demo renders 1 h" in line
    assert line.endswith("give another --data folder, or delete data to render it again")


def test_demo_resumes_a_half_rendered_corpus(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    (data / "audio" / "train").mkdir(parents=True)
    (data / "audio" / "train" / "bwv_1_000.flac").write_bytes(b"fLaC")
    (data / "audio" / "train" / "bwv_1_000.json").write_text("{}")
    assert check_demo(data, tmp_path / "out", DemoPlan.make(quick=True)) == ["--overwrite"]
    assert "stopped while writing the corpus (2 files, no corpus.json); rendering it again" in capsys.readouterr().out
    (data / "audio" / "train" / "notes.txt").write_text("mine")  # not the demo's: never overwritten
    proc = _demo(tmp_path, "--data", "data", "--outputs", "out", "--quick")
    line = _one_line_error(proc)
    assert "notes.txt is not a clip of the demo corpus" in line and line.endswith("give an empty or new --data folder")
    assert (data / "audio" / "train" / "notes.txt").read_text() == "mine"


def test_a_failed_demo_step_ends_in_one_line_that_says_how_to_go_on(tmp_path: Path) -> None:
    """The step prints its own error; the demo adds one line, not a CalledProcessError traceback."""
    from ostinato.demo.pipeline import _run
    from ostinato.errors import UserError

    with pytest.raises(UserError, match=r"^the step `ostinato prep shards` stopped on the error above; fix it, then "
                                        r"run `ostinato demo` again \(finished steps are kept\)$"):
        _run(["prep", "shards", str(tmp_path / "missing"), str(tmp_path / "shards")])


def test_demo_outputs_holds_the_demos_xps(tmp_path: Path) -> None:
    """`--outputs X` puts the demo's training runs under X/xps too (they went to $OSTINATO_OUTPUTS or ./outputs).
    A fresh process, as `ostinato demo` is: dora fixes the XP folder when ostinato.train is first imported."""
    probe = (  # the demo's own XP lookup in place of the demo (no training); ostinato.train imported as run_demo does
        "import sys, ostinato.demo as demo\n"
        "def plan(data, outputs, quick=False, **_):\n"
        "    from ostinato.train import main as train_main\n"
        "    print(train_main.get_xp(demo.CODEC_EXPERIMENT).folder)\n"
        "demo.run_demo = plan\n"
        "from ostinato.cli import main\n"
        "main(sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k != "OSTINATO_OUTPUTS"}
    proc = subprocess.run([sys.executable, "-c", probe, "demo", "--data", str(tmp_path / "data"), "--outputs",
                           str(tmp_path / "elsewhere")], env={**env, "PYTHONPATH": CHECKOUT}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip().splitlines()[-1]).parent == tmp_path / "elsewhere" / "xps"
