"""`ostinato eval` for the families without a test of their own there: a MusicLM's text_to_music suite with MuLaN
reranking (`rerank: k`), a Jukebox bundle's unconditional suite (jukebox_demo.yaml) with the seed diversity, and
the one suite format of every shipped suite. Tiny random models in memory (the MusicLM pipeline of test_musiclm,
the Jukebox of test_jukebox), synthetic shards and a tiny transformers EnCodec as the FAD embedding."""
from __future__ import annotations

import json
import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ostinato.evaluation.producers import JukeboxProducer, MusicLMProducer
from ostinato.evaluation.runner import run_suite
from ostinato.evaluation.suite import SuiteError, load_suite, suites_dir
from ostinato.metrics.diversity import ClipDiversity, diversity_report
from ostinato.nn.decoding import GenerationParams
from tests.synth import write_shards, write_tiny_encodec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

SR = 24000
FORMAT = ("name", "kind", "reference", "num_samples", "seconds", "batch_size", "embedding", "generation", "metrics",
          "report")


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evalfam")
    write_tiny_encodec(root / "codec", SR)
    write_shards(root / "test", n_shards=1, per_shard=6, sample_rate=SR, seconds=1.0)
    return {"root": root, "reference": str(root / "test"), "embedding": f"codec:{root / 'codec'}",
            "cache": root / "cache"}


def test_musiclm_suite_keeps_the_candidate_mulan_scores_highest(parts: dict, tmp_path: Path) -> None:
    from tests.test_musiclm import pipeline

    torch.manual_seed(0)
    model = pipeline(window=0.4)
    suite = load_suite("musiclm_demo", [f"reference={parts['reference']}", f"embedding={parts['embedding']}",
                                        "num_samples=3", "seconds=0.5", "batch_size=2", "generation.top_k=8",
                                        "metrics.diversity.max_clips=3"])
    assert suite.rerank == 3  # the shipped suite reranks
    result = run_suite(suite, "musiclm-tiny", tmp_path, producer=MusicLMProducer.from_model(suite, model),
                       cache=parts["cache"], progress=False)
    m, rerank = result["metrics"], result["rerank"]
    assert result["settings"]["rerank"] == 3 and rerank["candidates"] == 3 and len(rerank["items"]) == 3
    for record in rerank["items"]:  # the kept candidate is the best-scored one, and the choice means something
        assert record["kept"] == max(range(3), key=lambda c: record["scores"][c])
        assert len(set(record["scores"])) == 3
    kept = [r["scores"][r["kept"]] for r in rerank["items"]]
    every = [s for r in rerank["items"] for s in r["scores"]]
    assert m["rerank_score_kept"] == pytest.approx(sum(kept) / 3)
    assert m["rerank_score_all"] == pytest.approx(sum(every) / 9) and m["rerank_score_kept"] > m["rerank_score_all"]
    # the written clip is that candidate: the first batch again (seed 0 + its first index) gives the same scores
    prompts = [it["prompt"] for it in result["items"][:2]]
    again = model.sample(prompts, 0.5, params=GenerationParams(top_k=8, cfg_scale=3.0, temperature=1.0, seed=0),
                         num_candidates=3)
    for i in range(2):
        assert again.scores[i].tolist() == pytest.approx(rerank["items"][i]["scores"], abs=1e-5)
        wav, _ = sf.read(tmp_path / result["items"][i]["generated"], dtype="float32")
        best = again.candidates[i, int(again.best[i]), 0].clamp(-1, 1)
        assert (best - torch.from_numpy(wav)).abs().max() < 2 / 32768
    assert m["fad"] >= 0 and -1 <= m["diversity_spectral_sim_mean"] <= m["diversity_spectral_sim_max"] <= 1
    assert m["diversity_pairs"] == 3
    report = (tmp_path / "report.md").read_text()
    assert "best of 3 candidates for its prompt by MuLaN audio-text cosine" in report
    assert "`rerank_score_kept`" in report and "`diversity_spectral_sim_mean`" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["rerank"] == rerank


def _musiclm_run(out: Path, cache: Path, reference: str, embedding: str) -> dict:
    from tests.test_musiclm import pipeline

    torch.manual_seed(0)
    model = pipeline(window=0.4)
    suite = load_suite("musiclm_demo", [f"reference={reference}", f"embedding={embedding}", "num_samples=4",
                                        "seconds=0.5", "batch_size=2", "generation.top_k=8",
                                        "metrics.diversity.max_clips=2"])
    return run_suite(suite, "musiclm-tiny", out, producer=MusicLMProducer.from_model(suite, model), cache=cache,
                     progress=False)


def _ddp_worker(rank: int, world: int, port: int, out: str, cache: str, reference: str, embedding: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        _musiclm_run(Path(out), Path(cache), reference, embedding)
    finally:
        dist.destroy_process_group()


def test_reranking_and_diversity_on_two_ranks_give_the_numbers_of_one(parts: dict, tmp_path: Path) -> None:
    """Rank 1 makes items 2-3: its reranking records join rank 0's, and it keeps no clip for diversity (the first
    2 are rank 0's), yet both gather."""
    one = _musiclm_run(tmp_path / "one", parts["cache"], parts["reference"], parts["embedding"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks share this process's string hashes (the stub MuLaN's text embedding) and skip re-imports
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "two"), str(parts["cache"]), parts["reference"],
                                          parts["embedding"]), nprocs=2, join=True, start_method="fork")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and set(two["metrics"]) == set(one["metrics"])
    assert [r["index"] for r in two["rerank"]["items"]] == [0, 1, 2, 3]
    for mine, theirs in zip(one["rerank"]["items"], two["rerank"]["items"]):
        assert mine["kept"] == theirs["kept"] and theirs["scores"] == pytest.approx(mine["scores"], abs=1e-6)
    assert one["metrics"]["diversity_pairs"] == 1
    for key, value in one["metrics"].items():
        assert math.isclose(two["metrics"][key], value, rel_tol=1e-6, abs_tol=1e-6), key


def test_jukebox_suite_generates_scores_and_measures_seed_diversity(parts: dict, tmp_path: Path) -> None:
    from tests.test_jukebox import _tiny_jukebox

    torch.manual_seed(0)
    jukebox = _tiny_jukebox()
    suite = load_suite("jukebox_demo", [f"reference={parts['reference']}", f"embedding={parts['embedding']}",
                                        "num_samples=3", "seconds=0.5", "batch_size=2",
                                        "metrics.diversity.max_clips=3"])
    assert suite.kind == "unconditional"
    result = run_suite(suite, "jukebox-tiny", tmp_path, producer=JukeboxProducer.from_model(suite, jukebox),
                       cache=parts["cache"], progress=False)
    m = result["metrics"]
    assert result["settings"]["family"] == "jukebox" and m["fad"] >= 0 and m["per_song_fad_mean"] >= 0
    # the suite metric is diversity_report of the written clips
    clips = torch.stack([torch.from_numpy(sf.read(tmp_path / it["generated"], dtype="float32")[0])
                         for it in result["items"]])
    expected = diversity_report(clips, SR)
    for key in ("waveform_corr_mean", "waveform_corr_max", "spectral_sim_mean", "spectral_sim_max", "pairs"):
        assert m[f"diversity_{key}"] == pytest.approx(expected[key], abs=1e-3), key
    # the untrained VQ-VAE decodes the priors' different codes (each seed's) to one clip: the collapse shows up
    codes = [jukebox.generate_codes([{}], 0.5, GenerationParams(cfg_scale=3.0, seed=s))["bottom"]
             for s in (0, 2)]
    assert not torch.equal(codes[0], codes[1])
    assert m["diversity_waveform_corr_mean"] > 0.999 and m["diversity_spectral_sim_mean"] > 0.999
    report = (tmp_path / "report.md").read_text()
    assert "log-mel cosine between clips" in report
    # nothing conditioned these clips (no genre or composer in the reference metadata): no prompt, no caption
    assert all("prompt" not in it and "conditioning" not in it for it in result["items"])
    assert "clip 0" not in report and "| # | generated | reference | per-song FAD |" in report


def test_unconditional_items_carry_no_prompt_and_a_jukebox_lists_the_metadata_it_read(parts: dict) -> None:
    from ostinato.evaluation.items import read_items
    from ostinato.evaluation.report import _markdown
    from tests.test_jukebox import _tiny_jukebox

    reference = [f"reference={parts['reference']}", f"embedding={parts['embedding']}", "num_samples=2"]
    musika, text = load_suite("musika_demo", reference), load_suite("demo", reference)
    assert [it.prompt for it in read_items(musika, SR, 1)] == ["", ""]  # the reference captions were never used
    assert [it.prompt for it in read_items(text, SR, 1)] == ["clip 0", "clip 1"]
    jukebox = load_suite("jukebox_demo", reference)
    producer = JukeboxProducer.from_model(jukebox, _tiny_jukebox())
    item = read_items(jukebox, SR, 1)[0]
    item.meta.update(genre="chorale", composer="Bach", caption="a caption the priors never read")
    assert producer.item_fields(item) == {"conditioning": "genre: chorale, composer: Bach"}
    result = {"suite": "jukebox_demo", "kind": "unconditional", "model": "m", "metrics": {},
              "items": [{"index": 0, "conditioning": "genre: chorale, composer: Bach", "generated": "g.wav"}]}
    assert "| # | conditioning | generated | reference |\n|---:|---|---|---|\n| 0 | genre: chorale, composer: Bach" \
        in _markdown(result, result["items"], {})


def test_clip_diversity_keeps_the_first_clips_whatever_the_batches_and_finds_a_collapse() -> None:
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(6, 1, 4000, generator=g)
    whole = diversity_report(clips[:4], 8000)
    for order in ([[0, 1, 2], [3, 4, 5]], [[5, 3], [1], [4, 0, 2]]):  # batches as two ranks or shuffled would give
        metric = ClipDiversity(8000, 4000, max_clips=4)
        for batch in order:
            metric.update(clips[batch], torch.tensor(batch))
        assert metric.compute() == pytest.approx(whole)
    collapsed = ClipDiversity(8000, 4000, max_clips=4)
    collapsed.update(clips[:1].repeat(4, 1, 1) * torch.tensor([1.0, 0.5, 2.0, 1.0])[:, None, None], torch.arange(4))
    value = collapsed.compute()
    assert value["spectral_sim_mean"] > 0.99 and value["waveform_corr_mean"] > 0.99
    assert whole["spectral_sim_mean"] < 0.5


def test_every_shipped_suite_has_the_one_format() -> None:
    kinds = {}
    for path in sorted(suites_dir().glob("*.yaml")):
        suite = load_suite(path)
        assert all(key in suite.config for key in FORMAT), (path.name, sorted(set(FORMAT) - set(suite.config)))
        kinds[path.stem] = suite.kind
    assert kinds == {"codec_demo": "reconstruction", "demo": "text_to_music", "jukebox_demo": "unconditional",
                     "mulan_demo": "retrieval", "musiclm_demo": "text_to_music", "musika_demo": "unconditional"}
    for suite, key in (("musika_demo", "diversity"), ("jukebox_demo", "diversity"), ("demo", "diversity")):
        assert load_suite(suite).metric(key) is not None, suite


@pytest.mark.parametrize("suite, overrides, message", [
    ("jukebox_demo", ["rerank=2"], r"jukebox_demo.yaml: rerank \(set by --set\): 2: unconditional suites have "
                                   r"no prompts to rerank against"),
    ("codec_demo", ["generation.seed=1"], r"codec_demo.yaml: generation \(set by --set\): a reconstruction suite "
                                          r"generates nothing"),
    ("codec_demo", ["metrics.diversity.max_clips=4"], r"metrics.diversity \(set by --set\): diversity compares "
                                                      r"generated clips"),
    ("musika_demo", ["metrics.diversity.max_clips=1"], r"metrics.diversity.max_clips \(set by --set\): 1: an "
                                                       r"integer >= 2"),
    ("musiclm_demo", ["rerank=0"], r"rerank \(set by --set\): 0: an integer >= 1"),
])
def test_suite_keys_a_kind_cannot_use_are_named(suite: str, overrides: list[str], message: str) -> None:
    with pytest.raises(SuiteError, match=message):
        load_suite(suite, overrides)


def test_diversity_of_one_clip_is_refused_with_its_reason() -> None:
    """A suite cut to one clip (the quick demo's one test clip) runs: diversity is None with the reason, as FAD-inf."""
    from ostinato.evaluation.scoring import SuiteMetrics
    from ostinato.evaluation.suite import load_suite

    suite = load_suite("musika_demo", ["num_samples=1"])
    spec = suite.metric("diversity")
    scores = SuiteMetrics(suite, [spec], 16000, progress=False)
    seconds = round(suite.seconds * 16000)
    scores.update(torch.randn(1, 1, seconds) * 0.1, None, [""], ["0"])
    scalars, details = scores.compute(num_items=1)
    assert scalars["diversity_spectral_sim_mean"] is None and scalars["diversity_waveform_corr_max"] is None
    assert details["diversity_refused"] == ("diversity refused: it compares pairs of clips and 1 clip(s) were "
                                            "scored; generate at least 2")
