"""Evaluation suites end to end on tiny real parts: a random transformers EnCodec (codec and FAD embedding),
synthetic audio shards, and a tiny melody MusicGen trained through `ostinato train` with the in-training
evaluation callback on."""
from __future__ import annotations

import csv
import json
import math
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
import yaml

from ostinato.evaluation.items import rank_batches
from ostinato.evaluation.runner import run_suite
from ostinato.evaluation.suite import SuiteError, load_suite
from tests.runner import train, xp_folder
from tests.synth import write_shards, write_tiny_encodec
from tests.helpers import BandBackend

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

SR = 24000


def _write_suite(path: Path, **cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict:
    root = tmp_path_factory.mktemp("evaluation")
    write_tiny_encodec(root / "codec", SR)
    for split, n in (("train", 8), ("valid", 4), ("test", 8)):
        write_shards(root / "data" / "demo" / "shards" / split, n_shards=1, per_shard=n, sample_rate=SR, seconds=1.5)
    test = root / "data" / "demo" / "shards" / "test"
    embedding = f"codec:{root / 'codec'}"
    suites = {
        "t2m": _write_suite(root / "t2m.yaml", name="t2m", kind="text_to_music", reference=str(test), num_samples=4,
                            seconds=1.0, batch_size=2, embedding=embedding,
                            generation={"cfg_scale": 3.0, "top_k": 20, "seed": 0}, melody_from_reference="auto",
                            metrics={"fad": {}, "fad_inf": {"num_points": 5}, "per_song_fad": {}, "chroma": {}}),
        "recon": _write_suite(root / "recon.yaml", name="recon", kind="reconstruction", reference=str(test),
                              num_samples=8, seconds=1.0, batch_size=4, embedding=embedding,
                              metrics=["mel", "stft", "sisnr", {"fad": {"per": "frame"}}, "per_song_fad"]),
    }
    run_env = {**env, "OSTINATO_DATA": str(root / "data"), "OSTINATO_OUTPUTS": str(root / "out"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = ["experiment=musicgen_tiny", "data=demo", f"data.sample_rate={SR}", "data.channels=1",
           f"family.codec={root / 'codec'}", f"family.melody={{sample_rate:{SR}}}", "family.lm.num_layers=1",
           "family.lm.dim=64", "family.lm.ffn_dim=128", "data.segment_seconds=1.0", "data.batch_size=4",
           "data.eval_batch_size=4", "trainer.max_steps=2", "trainer.checkpoint_every_steps=2",
           "data.batches_per_epoch=2", "trainer.limit_val_batches=1", "trainer.validate_first=false",
           "data.num_workers=0", "trainer.log_every_n_steps=1",
           f"evaluate.suite={suites['t2m']}", "evaluate.every_steps=1", "evaluate.num_samples=2"]
    train(run_env, *run)
    return {"root": root, "codec": str(root / "codec"), "suites": suites, "env": run_env,
            "model": xp_folder(run_env, *run), "cache": root / "out" / "eval_cache"}


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_callback_logs_eval_fad_during_training(parts: dict) -> None:
    with open(parts["model"] / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/fad")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["eval/fad"])) and float(r["eval/fad"]) > 0 for r in rows)


def test_cli_eval_writes_metrics_report_and_wavs(parts: dict, tmp_path: Path) -> None:
    out = tmp_path / "t2m"
    cmd = [sys.executable, "-m", "ostinato.cli", "eval", str(parts["suites"]["t2m"]), "--model", str(parts["model"]),
           "--out", str(out), "--set", "generation.cfg_scale=1", "--quiet"]
    proc = subprocess.run(cmd, env=parts["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fad_inf" in proc.stdout and f"report: {out / 'report.md'}" in proc.stdout
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    for key in ("fad", "fad_inf_r2", "per_song_fad_mean", "per_song_fad_median", "chroma"):
        assert _finite(m[key]), key
    # FAD-inf from 4 clips is refused: no fit, the reason in its place (metrics.json and the printed table)
    assert m["fad_inf"] is None and m["fad_inf_slope"] is None
    assert result["fad_inf_refused"].startswith("FAD-inf refused (4 clips < 100") and "FAD-inf refused" in proc.stdout
    assert len(result["per_song_fad"]["fad"]) == 4 and all(_finite(v) for v in result["per_song_fad"]["fad"])
    assert result["settings"]["generation"]["cfg_scale"] == 1 and result["settings"]["melody_from_reference"]
    assert result["suite_config"]["generation"]["cfg_scale"] == 1 and result["versions"]["torch"]
    assert result["items"][0]["prompt"] == "clip 0" and result["codec"] == parts["codec"]
    for name in ("report.md", "report.html", "figures/per_song_fad.png", "figures/spectrograms.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for report in ("report.md", "report.html"):
        links = re.findall(r"(?:\]\(|src=')([^)']+\.(?:wav|png))", (out / report).read_text())
        assert len([x for x in links if x.endswith(".wav")]) == 8  # 4 generated + 4 references
        assert all((out / link).is_file() for link in links), report


def test_cli_eval_errors_name_the_suite_key(parts: dict, capsys: pytest.CaptureFixture) -> None:
    from ostinato.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(parts["suites"]["t2m"]), "--model", "x", "--set", "generation.beam=4"])
    assert exit_.value.code == 2
    assert "t2m.yaml: generation.beam (set by --set): unknown generation setting" in capsys.readouterr().err
    # reranking needs a MuLaN: a MusicGen refuses it in one line, once it knows the model is a MusicGen
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(parts["suites"]["t2m"]), "--model", str(parts["model"]), "--set", "rerank=2", "--quiet"])
    assert exit_.value.code == 2
    assert re.search(r"t2m.yaml: rerank: 2: .* is a MusicGen, which has no MuLaN to rank candidates with; rerank "
                     r"is for MusicLM bundles", capsys.readouterr().err)


def _ddp_worker(rank: int, world: int, port: int, suite: str, codec: str, out: str, cache: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        run_suite(suite, codec, out, cache=cache, progress=False)
    finally:
        dist.destroy_process_group()


def test_reconstruction_suite_on_two_ranks_gives_the_numbers_of_one(parts: dict, tmp_path: Path) -> None:
    suite = str(parts["suites"]["recon"])
    one = run_suite(suite, parts["codec"], tmp_path / "one", cache=parts["cache"], progress=False)  # one thread,
    m = one["metrics"]
    assert set(m) == {"mel_distance", "stft_distance", "sisnr", "fad", "per_song_fad_mean", "per_song_fad_median"}
    assert all(_finite(v) for v in m.values()) and m["mel_distance"] > 0
    assert (tmp_path / "one" / "report.html").is_file() and "| key | reconstruction | reference |" in \
        (tmp_path / "one" / "report.md").read_text()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # as the ranks: FFTs round alike. Fork: a spawned child would re-import torch and transformers (slow here)
    mp.start_processes(_ddp_worker, args=(2, port, suite, parts["codec"], str(tmp_path / "two"), str(parts["cache"])),
                       nprocs=2, join=True, start_method="fork")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and set(two["metrics"]) == set(m)
    for key, value in m.items():
        assert math.isclose(two["metrics"][key], value, rel_tol=1e-12, abs_tol=1e-12), key
    assert two["per_song_fad"] == one["per_song_fad"] and two["per_song_fad"]["ids"] == [str(i) for i in range(8)]
    assert len(list((tmp_path / "two" / "generated").glob("*.wav"))) == 8  # both ranks wrote their share


def test_sweep_writes_one_summary_table(parts: dict, tmp_path: Path) -> None:
    from ostinato.evaluation.sweep import sweep

    summary = sweep(parts["suites"]["t2m"], str(parts["model"]), {"generation.cfg_scale": [1.0, 3.0]},
                    tmp_path / "sweep", overrides=["num_samples=2"], cache=parts["cache"], progress=False)
    table = summary.read_text()
    assert table.count("[report](") == 2 and "| cfg_scale | fad ↓ |" in table
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())["rows"]
    assert [r["settings"] for r in rows] == [{"generation.cfg_scale": 1.0}, {"generation.cfg_scale": 3.0}]
    assert all(_finite(r["metrics"]["fad"]) for r in rows) and rows[0]["metrics"] != rows[1]["metrics"]
    assert (tmp_path / "sweep" / "cfg_scale=1.0" / "report.md").is_file()


def test_run_demo_eval_returns_the_report(parts: dict, tmp_path: Path) -> None:
    from ostinato.demo.evaluation import run_demo_eval

    report = run_demo_eval(parts["root"] / "data" / "demo", tmp_path / "outputs", str(parts["model"]), parts["codec"],
                           overrides=["num_samples=2", "seconds=1.5"], progress=False)
    assert report == tmp_path / "outputs" / "demo" / "eval" / "report.md" and report.is_file()
    result = json.loads((report.parent / "metrics.json").read_text())
    assert result["suite"] == "demo" and _finite(result["metrics"]["fad"]) and _finite(result["metrics"]["chroma"])


class FakeTextBackend(BandBackend):
    """A joint audio-text "model" for the text_audio path: RMS of 10 ms frames per band, texts by their letters."""

    name, has_text = "faketext", True

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[float(t.count(c)) + 0.1 for c in "aeio"] for t in texts])


def test_kld_and_text_audio_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ostinato.evaluation.scoring import SuiteMetrics
    from ostinato.metrics.embeddings import BACKENDS

    monkeypatch.setitem(BACKENDS, "faketext", "tests.test_evaluation:FakeTextBackend")
    torch.manual_seed(0)
    cfg = transformers.ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 num_mel_bins=16, max_length=48, num_labels=5)
    transformers.ASTForAudioClassification(cfg).save_pretrained(tmp_path / "ast")
    transformers.ASTFeatureExtractor(num_mel_bins=16, max_length=48).save_pretrained(tmp_path / "ast")
    path = _write_suite(tmp_path / "s.yaml", kind="text_to_music", reference="unused", num_samples=3, seconds=1.0,
                        metrics={"text_audio": {"embedding": "faketext:x"},
                                 "kld": {"classifier": f"hf:{tmp_path / 'ast'}"}})
    suite = load_suite(path)
    scores = SuiteMetrics(suite, suite.metrics, SR, progress=False)
    wav, ref = 0.1 * torch.randn(3, 1, SR), 0.1 * torch.randn(3, 1, SR // 2)
    scores.update(wav, None, ["a piano", "an organ", "eerie"], ["0", "1", "2"], ref, torch.tensor([SR // 2] * 3))
    scalars, _ = scores.compute()
    assert set(scalars) == {"text_audio", "kld"} and _finite(scalars["text_audio"]) and scalars["kld"] >= 0
    scores.reset()
    scores.update(wav, None, ["a"] * 3, ["0", "1", "2"], wav, None)
    assert scores.compute()[0]["kld"] == pytest.approx(0.0, abs=1e-6)  # same audio, same labels


def test_kld_zero_shot_through_a_text_audio_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ostinato.evaluation.classifier import ZeroShotClassifier, load_classifier
    from ostinato.evaluation.scoring import SuiteMetrics
    from ostinato.metrics.embeddings import BACKENDS

    monkeypatch.setitem(BACKENDS, "faketext", "tests.test_evaluation:FakeTextBackend")
    clf = load_classifier("faketext:x", ["aaaa", "eeee", "iiii"])
    assert isinstance(clf, ZeroShotClassifier) and clf.num_labels == 3
    loud_low = torch.zeros(2, 1, SR)
    loud_low[0, 0] = 0.5  # energy in all four "bands" of the fake backend
    loud_low[1, 0].view(-1, 160)[:, :40] = 0.5  # energy in its first band only: the "aaaa" tag
    logits = clf.logits(loud_low, SR)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all() and not torch.allclose(logits[0], logits[1])
    path = _write_suite(tmp_path / "s.yaml", kind="text_to_music", reference="unused", num_samples=2, seconds=1.0,
                        metrics={"kld": {"classifier": "faketext:x", "labels": ["aaaa", "eeee", "iiii"]}})
    suite = load_suite(path)
    scores = SuiteMetrics(suite, suite.metrics, SR, progress=False)
    scores.update(loud_low, None, ["a", "b"], ["0", "1"], loud_low, None)
    assert scores.compute()[0]["kld"] == pytest.approx(0.0, abs=1e-6)
    scores.reset()
    scores.update(loud_low, None, ["a", "b"], ["0", "1"], loud_low.flip(0), None)
    assert scores.compute()[0]["kld"] > 1e-3
    with pytest.raises(SuiteError, match="labels"):
        _ = load_suite(_write_suite(tmp_path / "t.yaml", kind="text_to_music", reference="unused", num_samples=2,
                                    seconds=1.0, metrics={"kld": {"classifier": "faketext:x", "labels": ["one"]}}))


@pytest.mark.parametrize("overrides, message", [
    (["kind=mixing"], "kind (set by --set): 'mixing': use one of text_to_music, reconstruction"),
    (["metrics.fid={}"], "metrics.fid (set by --set): unknown metric"),
    (["metrics.fad.per=song"], "metrics.fad.per (set by --set): 'song'"),
    (["metrics.mel={}"], "metrics.mel (set by --set): mel compares a clip with its own reconstruction"),
    (["embedding=null"], "metrics.fad.embedding: missing"),
    (["seconds=0"], "seconds (set by --set): 0: a positive number"),
    (["prompts_file=nowhere.txt"], "prompts_file (set by --set): nowhere.txt: no such file"),
    (["colour=red"], "colour (set by --set): unknown key"),
])
def test_suite_errors_name_the_file_and_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    path = _write_suite(tmp_path / "s.yaml", kind="text_to_music", reference="shards", num_samples=2, seconds=1.0,
                        embedding="codec:/c", metrics={"fad": {}})
    with pytest.raises(SuiteError) as err:
        load_suite(path, overrides)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_suite_format_and_rank_split(tmp_path: Path) -> None:
    path = _write_suite(tmp_path / "s.yaml", kind="text_to_music", reference=["a", "b"], prompts=["x", "y", "z"],
                        seconds=2, embedding="codec:/c", metrics=["fad", {"fad_inf": {"num_points": 4}}])
    suite = load_suite(path)
    assert suite.num_samples == 3 and suite.metric("fad_inf").options["num_points"] == 4
    assert suite.metric("fad").options == {"embedding": "codec:/c", "per": "frame"} and not suite.needs_pairs
    assert load_suite(path, ["metrics.fad.per=clip"]).metric("fad").options["per"] == "clip"
    for name in ("demo", "codec_demo"):  # the shipped suites validate
        assert load_suite(name).name == name
    # batches do not depend on the number of ranks (nor shrink for more ranks: the clips would change); every rank
    # gets some
    assert rank_batches(8, 4, 0, 1) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_batches(8, 4, 1, 2) == [[4, 5, 6, 7]]
    assert [rank_batches(5, 2, r, 2) for r in range(2)] == [[[0, 1], [2, 3]], [[4]]]
    with pytest.raises(ValueError, match="make 1 batches, fewer than the 2 ranks: lower batch_size to 1"):
        rank_batches(3, 8, 0, 2)
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        rank_batches(3, 1, 0, 4)
