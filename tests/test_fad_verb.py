"""`ostinato fad REF GEN`: FAD between two folders with the codec backend on a tiny random EnCodec, the JSON
protocol, the statistics cache, shard sets and statistics files as input, bootstrap intervals, fadtk's FAD-inf
protocol, and the refusals of FAD-inf and per-song FAD when N is too small."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ostinato.cli import main
from ostinato.fileio import write_wav
from ostinato.metrics.embeddings import cache as embedding_cache
from ostinato.metrics.fad import FADInf, bootstrap_fad, frechet_distance, gaussian_stats
from tests.synth import tone, write_shards, write_tiny_encodec

pytestmark = pytest.mark.usefixtures("one_thread")
SR = 24000


def _folder(folder: Path, freqs: list[float], seconds: float = 0.5, noise: float = 0.0) -> Path:
    gen = torch.Generator().manual_seed(len(freqs))
    for i, f in enumerate(freqs):
        wav = tone(f, seconds, SR) + noise * torch.randn(1, round(seconds * SR), generator=gen)
        write_wav(folder / f"sub{i % 2}" / f"{i:03d}.wav", wav.clamp(-1, 1), SR)  # recursive walk
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fad")
    codec = write_tiny_encodec(root / "encodec")
    a = _folder(root / "a", [220 + 30 * i for i in range(8)])
    b = _folder(root / "b", [900 + 50 * i for i in range(8)], noise=0.3)
    short = _folder(root / "short", [300 + 40 * i for i in range(6)], seconds=0.1)  # 8 frames < D + 1 = 17
    (root / "empty").mkdir()
    write_shards(root / "shards", n_shards=2, per_shard=4, sample_rate=SR, seconds=0.5)
    return {"root": root, "codec": codec, "a": a, "b": b, "short": short, "empty": root / "empty",
            "shards": root / "shards", "cache": root / "cache"}


def _fad(data: dict[str, Path], ref: Path, gen: Path, *flags: str, out: str = "fad.json") -> dict:
    path = data["root"] / out
    main(["fad", str(ref), str(gen), "--embedding", f"codec:{data['codec']}", "--cache", str(data["cache"]),
          "--out", str(path), "--quiet", "--overwrite", *flags])  # the tests share a few --out files
    return json.loads(path.read_text())


def _error(data: dict[str, Path], capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["fad", *args, "--cache", str(data["cache"]), "--out", str(data["root"] / "err.json"), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_fad_of_a_folder_with_itself_is_zero_and_with_another_positive(data, capsys) -> None:
    same = _fad(data, data["a"], data["a"])
    other = _fad(data, data["a"], data["b"], out="ab.json")
    table = capsys.readouterr().out
    assert other["rows"][0]["fad"] > 1e-6  # the random codec's latents are small
    assert abs(same["rows"][0]["fad"]) < 1e-6 * other["rows"][0]["fad"]
    assert f"codec:{data['codec']}" in table and "FAD" in table and "ab.json" in table
    p = other["rows"][0]["protocol"]
    assert (p["backend"], p["sample_rate"], p["channels"], p["dim"], p["statistics"]) == ("codec", SR, 1, 16, "frame")
    assert p["window_seconds"] == p["hop_seconds"] == pytest.approx(320 / SR)
    assert p["n_ref"] == p["n_gen"] == 8 * 38  # ceil(12000 / 320) frames a clip
    assert p["sides"]["REF"]["clips"] == 8 and len(p["weights_sha256"]) == 64 and p["weights"] in p["backend_id"]
    assert {"torch", "python"} <= set(other["versions"])


def test_second_run_reads_the_cache_and_embeds_nothing(data) -> None:
    _fad(data, data["b"], data["a"])
    before = embedding_cache.counters["embedded_clips"]
    again = _fad(data, data["b"], data["a"])
    assert embedding_cache.counters["embedded_clips"] == before
    assert all(side["from_cache"] for side in again["rows"][0]["protocol"]["sides"].values())


def test_shard_set_and_statistics_file_as_inputs(data) -> None:
    shards = _fad(data, data["shards"], data["a"])
    assert shards["rows"][0]["protocol"]["sides"]["REF"]["clips"] == 8 and shards["rows"][0]["fad"] > 0
    first = _fad(data, data["a"], data["b"])
    stats_file = first["rows"][0]["protocol"]["sides"]["REF"]["stats_file"]
    from_file = _fad(data, Path(stats_file), data["b"])
    assert from_file["rows"][0]["protocol"]["sides"]["REF"]["kind"] == "statistics file"
    assert from_file["rows"][0]["fad"] == pytest.approx(first["rows"][0]["fad"], rel=1e-9)


def test_bootstrap_interval_in_the_json_holds_the_point(data) -> None:
    row = _fad(data, data["a"], data["b"], "--bootstrap", "50", "--seed", "3")["rows"][0]
    ci = row["bootstrap"]
    assert ci["low"] <= row["fad"] <= ci["high"] and ci["resamples"] == 50 and ci["seed"] == 3
    assert ci["point"] == pytest.approx(row["fad"], rel=1e-9)


def test_bootstrap_interval_narrows_with_n() -> None:
    gen = torch.Generator().manual_seed(0)
    reference = (torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 10**6)
    widths = []
    for n in (20, 320):
        clips = list((torch.randn(n, 5, 4, generator=gen) + 0.5).unbind(0))  # n clips of 5 frames
        ci = bootstrap_fad(reference, clips, resamples=200, seed=0)
        assert ci["low"] <= ci["point"] <= ci["high"]
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(N): 4x narrower for 16x the clips


def test_fad_inf_and_per_song_fad_are_refused_with_the_reason(data, capsys) -> None:
    row = _fad(data, data["a"], data["b"], "--inf", "--per-song")["rows"][0]
    out = capsys.readouterr().out
    assert "fad_inf" not in row["fad_inf"] and row["fad_inf"]["refused"].startswith("FAD-inf refused (8 clips < 100")
    assert row["fad_inf"]["refused"] in out and "refused (ostinato)" in out.splitlines()[2]
    assert row["per_song_fad"]["median"] > 0  # 38 frames a song >= D + 1
    short = _fad(data, data["a"], data["short"], "--per-song", "--inf-protocol", "fadtk", "--inf")["rows"][0]
    assert short["per_song_fad"]["refused"] == ("per-song FAD refused: the shortest song has 8 frames of 16-dim "
                                                "embeddings, and a full-rank covariance needs >= 17; give longer "
                                                "clips or a lower-dimensional embedding")
    assert "min_n=500 (fadtk protocol)" in short["fad_inf"]["refused"] and short["fad_inf"]["with_replacement"]


def test_fadtk_protocol_on_gaussians_with_a_known_fad() -> None:
    """Reference N(0, I), generated N(m, I): FAD = |m|^2 exactly. fadtk draws subsets with replacement at sizes
    int(linspace(min_n, N, steps)); ostinato's draw without, so its last point is the FAD of all."""
    d, total, m = 4, 40_000, torch.tensor([0.6, -0.3, 0.0, 0.2], dtype=torch.float64)
    reference = (torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), 10**9)
    fake = torch.randn(total, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + m
    full = float(frechet_distance(reference[0], reference[1], *gaussian_stats(fake)))
    results = {}
    for protocol in ("ostinato", "fadtk"):
        metric = FADInf(d, reference=reference, num_points=25, min_n=5000, seed=0, protocol=protocol)
        metric.update(fake)
        results[protocol] = metric.compute()
    fadtk, ours = results["fadtk"], results["ostinato"]
    assert fadtk["n"].tolist() == [int(n) for n in np.linspace(5000, total, 25)]
    assert float(ours["fad"][-1]) == pytest.approx(full, rel=1e-6)
    assert abs(float(fadtk["fad"][-1]) - full) > 1e-5  # a with-replacement draw of N is not the set itself
    for value in (fadtk, ours):
        assert float(value["fad_inf"]) == pytest.approx(float(m @ m), abs=0.02)


def test_bad_input_is_one_line_and_exit_2(data, capsys) -> None:
    codec = f"codec:{data['codec']}"
    assert "has neither manifest.json nor audio files" in _error(data, capsys, str(data["empty"]), str(data["a"]),
                                                                 "--embedding", codec)
    assert "no such file or folder" in _error(data, capsys, str(data["root"] / "nope"), str(data["a"]),
                                              "--embedding", codec)
    assert "unknown embedding backend 'nope'" in _error(data, capsys, str(data["a"]), str(data["b"]),
                                                        "--embedding", "nope:/x")
    assert "--embedding vggish" in _error(data, capsys, str(data["a"]), str(data["b"]), "--embedding", "vggish")
    assert "--embedding vggish:/no/vggish.pth" in _error(data, capsys, str(data["a"]), str(data["b"]),
                                                         "--embedding", "vggish:/no/vggish.pth")
    stats = _fad(data, data["a"], data["b"])["rows"][0]["protocol"]["sides"]["REF"]["stats_file"]
    assert "a statistics file has no embeddings" in _error(data, capsys, str(data["a"]), stats,
                                                          "--embedding", codec, "--bootstrap", "10")


def test_unreadable_files_are_skipped_and_counted(data) -> None:
    mixed = _folder(data["root"] / "mixed", [400, 500, 600])
    (mixed / "broken.wav").write_bytes(b"not audio at all" * 10)
    side = _fad(data, mixed, data["a"], out="mixed.json")["rows"][0]["protocol"]["sides"]["REF"]
    assert side["clips"] == 3 and side["corrupt_skipped"] == 1
    gen = _fad(data, data["a"], mixed, "--bootstrap", "5", out="mixed.json")["rows"][0]["protocol"]["sides"]["GEN"]
    assert gen["clips"] == 3 and gen["corrupt_skipped"] == 1  # the embeddings path counts them too


def test_suites_refuse_fad_inf_and_per_song_fad_too(data) -> None:
    """The suite scorer (``ostinato eval``) gives None and the reason, not a fit, for the same cases; its FAD-inf
    takes ``protocol: fadtk``."""
    import yaml

    from ostinato.evaluation.scoring import SuiteMetrics
    from ostinato.evaluation.suite import load_suite

    suite_file = data["root"] / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "name": "fadverb", "kind": "reconstruction", "reference": str(data["shards"]), "num_samples": 4,
        "seconds": 0.1, "embedding": f"codec:{data['codec']}",
        "metrics": [{"fad_inf": {"protocol": "fadtk", "num_points": 5}}, "per_song_fad", "fad"]}))
    suite = load_suite(suite_file)
    scores = SuiteMetrics(suite, suite.metrics, SR, progress=False, cache=data["cache"])
    assert scores.metrics["fad_inf"].protocol == "fadtk"
    wav = torch.stack([tone(300 + 50 * i, 0.1, SR) for i in range(4)])
    scores.update(wav, None, [""] * 4, [str(i) for i in range(4)])
    scalars, details = scores.compute(num_items=4)
    assert scalars["fad"] > 0 and scalars["fad_inf"] is None and scalars["per_song_fad_mean"] is None
    assert details["fad_inf_refused"].startswith("FAD-inf refused: FAD-inf needs more than min_n=500")
    assert details["per_song_fad_refused"].startswith("per-song FAD refused: the shortest song has 8 frames")
    assert details["per_song_fad"]["fad"] == [None] * 4


def test_kad_beside_fad_with_its_bootstrap(data) -> None:
    from ostinato.metrics.embeddings import load_backend, reference_embeddings
    from ostinato.metrics.kad import kernel_audio_distance

    row = _fad(data, data["a"], data["b"], "--kad", "--bootstrap", "30")["rows"][0]
    kad = row["kad"]
    assert kad["kad"] > 0 and kad["statistics"] == "clip" and (kad["n_ref"], kad["n_gen"]) == (8, 8)
    assert kad["bootstrap"]["low"] <= kad["kad"] <= kad["bootstrap"]["high"]
    assert row["bootstrap"]["low"] <= row["fad"] <= row["bootstrap"]["high"]
    backend_clips = {}
    backend = load_backend(f"codec:{data['codec']}")
    for side in ("a", "b"):
        backend_clips[side] = torch.stack([c.double().mean(0) for c in reference_embeddings(backend, data[side],
                                                                                             progress=False)])
    expected, _ = kernel_audio_distance(backend_clips["a"], backend_clips["b"])
    assert kad["kad"] == pytest.approx(float(expected), rel=1e-9)
    same = _fad(data, data["a"], data["a"], "--kad")["rows"][0]["kad"]["kad"]
    assert same <= 0 < kad["kad"]  # one set on both sides: the unbiased MMD^2 drops the k(x, x) = 1 terms only
    # from the within-set means, so it is <= 0


def test_bootstrap_replicates_are_fad_of_the_resampled_clips(monkeypatch: pytest.MonkeyPatch) -> None:
    """bootstrap_fad sums per-clip moments weighted by the draw counts; the same draws, FAD of the pooled frames;
    in blocks of 4 clips and replicates too (what large D gets)."""
    from ostinato.metrics import fad as fad_module

    gen = torch.Generator().manual_seed(5)
    reference = gaussian_stats(torch.randn(300, 6, generator=gen, dtype=torch.float64)) + (300,)
    clips = [torch.randn(int(f), 6, generator=gen) + 0.3 for f in torch.randint(3, 12, (15,), generator=gen)]
    ci = bootstrap_fad(reference, clips, resamples=40, seed=9)
    draws = torch.Generator().manual_seed(9)
    reps = []
    for _ in range(40):
        pooled = torch.cat([clips[i] for i in torch.randint(15, (15,), generator=draws).tolist()])
        reps.append(frechet_distance(reference[0], reference[1], *gaussian_stats(pooled)))
    reps = torch.stack(reps)
    point = float(frechet_distance(reference[0], reference[1], *gaussian_stats(torch.cat(clips))))
    assert ci["point"] == pytest.approx(point, rel=1e-9)
    assert ci["std"] == pytest.approx(float(reps.std()), rel=1e-9)
    assert ci["bias"] == pytest.approx(float(reps.mean()) - point, rel=1e-9)
    monkeypatch.setattr(fad_module, "_BOOTSTRAP_BLOCK_BYTES", 4 * 8 * 6 * 6)
    blocked = bootstrap_fad(reference, clips, resamples=40, seed=9)
    assert all(blocked[k] == pytest.approx(ci[k], rel=1e-9) for k in ("point", "low", "high", "std"))


def test_several_embeddings_give_a_row_each(data, capsys) -> None:
    from tests.synth import write_tiny_hubert

    hubert = write_tiny_hubert(data["root"] / "hubert")
    path = data["root"] / "rows.json"
    main(["fad", str(data["a"]), str(data["b"]), "--embedding", f"encodec:{data['codec']}", "--embedding",
          f"hf:{hubert}", "--cache", str(data["cache"]), "--out", str(path), "--quiet"])
    rows = json.loads(path.read_text())["rows"]
    table = capsys.readouterr().out.splitlines()
    assert [r["embedding"] for r in rows] == [f"encodec:{data['codec']}", f"hf:{hubert}"]
    assert [r["protocol"]["sample_rate"] for r in rows] == [SR, 16000] and rows[1]["protocol"]["backend"] == "hf"
    assert rows[0]["fad"] == pytest.approx(_fad(data, data["a"], data["b"])["rows"][0]["fad"], rel=1e-12)
    assert all(r["fad"] > 0 for r in rows) and table[2].startswith("encodec:") and table[3].startswith("hf:")
