"""bench/learning_run.py: packing a corpus for the 64 MiB carry, the --tiny run end to end, the targets' verdict."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from tests.synth import tune

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SR = 32000


def _load_bench(name: str = "learning_run"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lr = _load_bench()
carry = _load_bench("carry")


def _write_corpus(root: Path, counts: dict[str, int], seconds: float = 2.0) -> Path:
    """A rendered-corpus look-alike: audio/{split}/NAME.flac + NAME.json sidecars (caption, piece, segment) and
    corpus.json; two pieces per split, each a different tune, segments in turn."""
    for split, n in counts.items():
        folder = root / "audio" / split
        folder.mkdir(parents=True)
        for i in range(n):
            piece, segment = f"{split}{i % 2}", i // 2
            notes = [60 + (i % 5), 64 + (i % 3), 67, 72 - (i % 4)]
            sf.write(folder / f"{piece}_{segment:03d}.flac", tune(seconds, notes, SR)[0].numpy(), SR,
                     subtype="PCM_16")
            caption = f"A {'calm' if i % 2 else 'lively'} tune number {i} in {['C', 'D', 'E'][i % 3]} major."
            (folder / f"{piece}_{segment:03d}.json").write_text(json.dumps(
                {"caption": caption, "piece": piece, "segment": segment, "duration": seconds, "split": split}))
    (root / "corpus.json").write_text(json.dumps({"format": "ostinato.demo-corpus/1", "summary": {
        "clips": counts, "seconds": {s: n * seconds for s, n in counts.items()}}}))
    return root


def test_choose_clips_keeps_whole_clips_and_each_splits_share():
    sizes = {"train": [(f"t{i}", 100) for i in range(90)], "valid": [(f"v{i}", 100) for i in range(5)],
             "test": [(f"s{i}", 100) for i in range(5)]}
    chosen = carry.choose_clips(sizes, budget=2000)  # a fifth of the 10000 bytes
    assert {k: len(v) for k, v in chosen.items()} == {"train": 18, "valid": 1, "test": 1}
    assert chosen["train"] == [f"t{i}" for i in range(18)]  # the packing order, a prefix of it
    assert carry.choose_clips(sizes, budget=10**6) == {k: [n for n, _ in v] for k, v in sizes.items()}


def test_clip_order_takes_each_pieces_first_segment_first():
    metas = {"a_000": {"piece": "a", "segment": 0}, "a_001": {"piece": "a", "segment": 1},
             "b_000": {"piece": "b", "segment": 0}, "b_001": {"piece": "b", "segment": 1}}
    assert carry.clip_order(metas) == ["a_000", "b_000", "a_001", "b_001"]


def test_pack_fits_the_budget_and_unpack_gives_a_32k_flac_corpus(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", {"train": 40, "valid": 4, "test": 4}, seconds=4.0)
    info = carry.pack(corpus, tmp_path / "carry", budget_mb=0.4, transport="lossy", quality=0.8)
    size = sum(p.stat().st_size for p in (tmp_path / "carry").rglob("*") if p.is_file())
    assert size <= 0.4 * 2**20
    assert info["transport"] == "lossy" and info["format"] == "OGG" and 10 < info["kbps"] < 120
    assert 0 < info["clips"]["train"] < 40 and info["clips"]["valid"] >= 1 and info["clips"]["test"] >= 1
    assert info["clips"]["train"] > 5 * info["clips"]["test"]  # the splits' proportions
    with pytest.raises(FileExistsError, match="already packed"):
        carry.pack(corpus, tmp_path / "carry", budget_mb=0.4)
    carry.unpack(tmp_path / "carry", tmp_path / "decoded", workers=1)
    flacs = sorted((tmp_path / "decoded" / "audio" / "test").glob("*.flac"))
    assert len(flacs) == info["clips"]["test"]
    for path in flacs:
        wav, sr = sf.read(path, dtype="float32")
        original, _ = sf.read(corpus / "audio" / "test" / path.name, dtype="float32")
        assert sr == SR and len(wav) == len(original)
        assert torch.corrcoef(torch.stack([torch.from_numpy(wav), torch.from_numpy(original)]))[0, 1] > 0.95
        assert json.loads(path.with_suffix(".json").read_text())["caption"].startswith("A ")
    assert (tmp_path / "decoded" / "corpus.json").is_file()


def test_unpack_with_shards_gives_the_layout_of_prep_corpus(tmp_path):
    """The demo on a GPU machine: the unpacked corpus has shards and says what transport its clips went through."""
    from ostinato.data.manifest import Manifest

    corpus = _write_corpus(tmp_path / "corpus", {"train": 6, "valid": 2, "test": 2})
    corpus_json = json.loads((corpus / "corpus.json").read_text())
    (corpus / "corpus.json").write_text(json.dumps({**corpus_json, "options": {"sample_rate": SR, "channels": "mono"}}))
    carry.pack(corpus, tmp_path / "carry", budget_mb=1.0)
    carry.unpack(tmp_path / "carry", tmp_path / "decoded", workers=1, shards=True)
    assert Manifest.load(tmp_path / "decoded" / "shards" / "train").total_samples == 6
    options = json.loads((tmp_path / "decoded" / "corpus.json").read_text())["options"]
    assert options["sample_rate"] == SR and options["transport"]["transport"] == "lossy"


def test_verdict_says_met_missed_and_the_gaps():
    v = lr.verdict(val_ce=4.0, entropy=5.5, recon_fad=2.0, gen_fad=5.0)
    assert v["ce"]["met"] is True and v["ce"]["gap_nats"] == 0.0 and v["ce"]["nats_below_unigram"] == 1.5
    assert v["fad"]["met"] is False and v["fad"]["ratio"] == 2.5 and v["fad"]["gap_fad"] == 1.0
    v = lr.verdict(val_ce=5.0, entropy=5.5, recon_fad=None, gen_fad=1.0)
    assert v["ce"]["met"] is False and v["ce"]["gap_nats"] == pytest.approx(0.5)
    assert v["fad"]["met"] is None
    md = lr.render_results_md({"date": "2026-12-05", "command": "python bench/learning_run.py run", "targets": v,
                               "corpus": {"transport": "lossy", "hours": 2.1, "format": "OGG", "subtype": "VORBIS",
                                          "kbps": 55.0, "clips": {"train": 700}},
                               "stages": {"codec_train": 120.0}, "val_ce": 5.0, "unigram_entropy": 5.5})
    assert "carried as lossy (OGG VORBIS, 55 kbps)" in md and "| codec_train | 120.0 |" in md
    assert "missed (0.500 nats below; gap 0.500)" in md and "not measured" in md


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("learning_run")
    corpus = _write_corpus(root / "corpus", {"train": 16, "valid": 4, "test": 3})
    packed = root / "carry"
    carry.pack(corpus, packed, budget_mb=4.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_run.py"), "--corpus", str(packed),
                           "--out", str(root / "out"), "--work", str(root / "work"), "--tiny", "--workers", "1",
                           "--text", "captions"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "out": root / "out", "work": root / "work",
            "results": json.loads((root / "out" / "results.json").read_text())}


def test_tiny_run_measures_every_stage_and_writes_its_report(tiny_run):
    r, out = tiny_run["results"], tiny_run["out"]
    assert list(r["stages"]) == ["decode", "shards", "codec_train", "codec_export", "tokenize", "text_encoder",
                                 "musicgen_train", "generate", "evaluate"]
    assert all(s > 0 for s in r["stages"].values())
    assert r["musicgen_data"] == "audio"  # audio shards, tokenized per batch: the melody is the audio's chroma
    for key in ("val_ce", "unigram_entropy", "recon_fad", "gen_fad", "gen_fad_text_only", "melody_through_codec"):
        assert isinstance(r[key], float) and r[key] == r[key], key  # a number, not NaN
    assert set(r["ce_by_condition"]) == {"every condition", "without the text", "without the melody"}
    assert set(r["chroma_cosine"]) == {"melody-conditioned", "unconditioned (no melody)"}
    assert len(r["codebook_perplexity"]) == 4 and all(1 <= p <= r["codebook_card"] for p in r["codebook_perplexity"])
    # the per-codebook perplexities are exp of the per-codebook entropies whose mean is the unigram entropy
    assert sum(torch.tensor(r["codebook_perplexity"]).log()) / 4 == pytest.approx(r["unigram_entropy"], rel=1e-5)
    assert list(r["codebook_perplexity_test"]) == [f"perplexity_q{k}" for k in range(4)]
    assert r["targets"]["ce"]["met"] in (True, False) and r["targets"]["fad"]["met"] in (True, False)
    assert any("lossy transport" in note for note in r["notes"])
    assert r["text_encoder"] == "captions" and any("random BERT" in note for note in r["notes"])
    md = (out / "results.md").read_text()
    assert "## Learning run" in md and "--tiny" in md and "| validation CE, without the melody |" in md
    names = {p.name for p in out.iterdir()}
    assert {"curves_codec.png", "curves_musicgen.png", "generated_0.wav", "spectrogram_generated_0.png"} <= names
    assert not any(p.suffix == ".ckpt" for p in out.rglob("*"))  # checkpoints stay in --work
    assert sum(p.stat().st_size for p in out.rglob("*")) < 50e6
    assert {p.name for p in tiny_run["work"].glob(".done-*")} == {f".done-{s}" for s in (
        "decode", "shards", "codec_train", "codec_export", "tokenize", "text_encoder", "musicgen_train")}


def test_a_stage_finished_in_an_earlier_call_is_skipped_with_its_time(tmp_path):
    calls = []
    first = lr.Stages(tmp_path)
    first.run("codec_train", lambda: calls.append(1) or time.sleep(0.05))
    first.run("generate", lambda: calls.append(2), resume=False)
    second = lr.Stages(tmp_path)
    second.run("codec_train", lambda: calls.append(3))
    second.run("generate", lambda: calls.append(4), resume=False)
    assert calls == [1, 2, 4] and second.skipped == ["codec_train"]
    assert second.seconds["codec_train"] == pytest.approx(first.seconds["codec_train"], abs=0.05)
    assert second.seconds["codec_train"] >= 0.05


def test_spectrograms_without_matplotlib_are_drawn_with_pil(tmp_path):
    from PIL import Image

    image = torch.linspace(0, 1, 96 * 50).reshape(96, 50).numpy()
    assert lr._pil_png(tmp_path / "s.png", image)
    png = Image.open(tmp_path / "s.png")
    assert png.size == (400, 240) and png.getpixel((0, 239)) == 0 and png.getpixel((399, 0)) == 255


def test_the_caption_text_encoder_tells_captions_apart(tmp_path):
    """Where the packaged MiniLM does not fit the carry: a random BERT over the captions' words, each word a token,
    loads as family.text.model and gives different states for different captions (one word apart)."""
    from ostinato.nn.conditioners import TextConditioner

    captions = ["A baroque chorale for organ, in C major.", "A baroque chorale for choir, in C major."]
    folder = lr.write_caption_text_encoder(captions, tmp_path / "text", width=64, layers=1)
    text = TextConditioner(str(folder), dim=16).eval()
    ids = text.tokenize(captions)["input_ids"]
    assert (ids == 1).sum() == 0  # no [UNK]: every word is in the vocabulary
    with torch.no_grad():
        cond, mask = text(captions)
    assert cond.shape[0] == 2 and mask.all()
    assert not torch.allclose(cond[0], cond[1])
