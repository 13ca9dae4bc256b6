"""Kernel Audio Distance: parity with kadtk 1.1.0's own ``calc_kernel_audio_distance`` (tests/references.py), the
estimator's properties (near 0 for one distribution, growing with a shift, unbiased), chunking, the metric's
reference option, a two-rank gloo run equal to one process, and the ``kad`` suite metric."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ostinato.metrics.kad import KADTK_SCALE, KernelAudioDistance, kernel_audio_distance, median_pairwise_distance
from tests.references import kadtk
from tests.helpers import BandBackend, free_port

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def two_sets(m: int, n: int, d: int, seed: int, shift: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``[m, d]`` (correlated Gaussian) and generated ``[n, d]`` (scaled and shifted), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=F64) @ (torch.eye(d, dtype=F64) + 0.2 * torch.randn(d, d, generator=g,
                                                                                                   dtype=F64))
    y = torch.randn(n, d, generator=g, dtype=F64) * 1.2 + shift
    return x, y


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.mark.parametrize("m, n, d", [(40, 40, 8), (120, 75, 32), (64, 200, 128), (300, 257, 512)])
def test_matches_kadtk(m: int, n: int, d: int) -> None:
    ref = kadtk()
    assert KADTK_SCALE == ref.SCALE_FACTOR
    x, y = two_sets(m, n, d, seed=m + n + d)
    # kadtk in float64 (its default float32 kernel sums would be the error measured); its median is float32 pdist
    kadtk_kad = ref.calc_kernel_audio_distance  # (baseline, eval, cache_dirs, device, bandwidth, ..., precision)
    h_ref = ref.median_pairwise_distance(x)
    assert rel(median_pairwise_distance(x), h_ref) < 1e-6
    # a fixed bandwidth: one formula, summed in another order
    fixed = kadtk_kad(x, y, (None, None), "cpu", bandwidth=h_ref, precision=F64)
    assert rel(kernel_audio_distance(x, y, bandwidth=h_ref)[0], fixed) < 1e-10
    # the default: the reference set's median (what kadtk's README states) = kadtk given that bandwidth
    ours, h = kernel_audio_distance(x, y)
    assert rel(ours, fixed) < 1e-6 and rel(h, h_ref) < 1e-6
    # kadtk 1.1.0's code without a bandwidth takes the median of its second (evaluated) set
    adaptive = kadtk_kad(x, y, (None, None), "cpu", precision=F64)
    ours_generated, h_gen = kernel_audio_distance(x, y, bandwidth_from="generated")
    assert rel(ours_generated, adaptive) < 1e-6 and rel(h_gen, ref.median_pairwise_distance(y)) < 1e-6
    assert rel(ours_generated, ours) > 1e-3  # the two rules differ here: the test tells them apart


def test_near_zero_for_one_distribution_and_growing_with_a_shift() -> None:
    x, same = two_sets(400, 400, 16, seed=1, shift=0.0)
    g = torch.Generator().manual_seed(2)
    other = torch.randn(400, 16, generator=g, dtype=F64) * 1.2  # a second sample of `same`'s distribution
    near = kernel_audio_distance(same, other)[0]
    values = [float(kernel_audio_distance(same, other + s)[0]) for s in (0.1, 0.3, 1.0)]
    assert abs(float(near)) < 0.05 * values[0] and values[0] < values[1] < values[2]
    assert float(kernel_audio_distance(x, same)[0]) > 10 * abs(float(near))  # another covariance


def test_unbiased_over_many_small_draws() -> None:
    """Mean over 400 draws of 8 + 8 points of one distribution: 0 within 4 standard errors; the V-statistic
    (diagonal kept, the biased estimate) is far from 0 on the same draws."""
    g = torch.Generator().manual_seed(3)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = torch.randn(2, 8, 4, generator=g, dtype=F64)
        unbiased.append(float(kernel_audio_distance(x, y, bandwidth=2.0)[0]))
        both = torch.cat([x, y])
        k = torch.exp(-torch.cdist(both, both).square() / (2 * 2.0 ** 2 + 1e-8))
        biased.append(float(k[:8, :8].mean() + k[8:, 8:].mean() - 2 * k[:8, 8:].mean()) * KADTK_SCALE)
    u, b = torch.tensor(unbiased, dtype=F64), torch.tensor(biased, dtype=F64)
    sem = float(u.std() / len(u) ** 0.5)
    assert abs(float(u.mean())) < 4 * sem
    assert float(b.mean()) > 20 * sem


def test_chunked_equals_direct() -> None:
    x, y = two_sets(97, 61, 24, seed=4)
    direct, h = kernel_audio_distance(x, y)  # one block
    for chunk in (1, 7, 60):
        chunked, h_chunked = kernel_audio_distance(x, y, chunk_size=chunk)
        torch.testing.assert_close(chunked, direct, rtol=1e-12, atol=1e-14)
        assert float(h_chunked) == float(h)  # the same distances, the same order statistic
    # beyond max_pairs the median is of random pairs: close to the exact one, reproducible by seed
    sampled = median_pairwise_distance(x, max_pairs=2000, seed=1)
    assert rel(sampled, h) < 0.05 and float(sampled) == float(median_pairwise_distance(x, max_pairs=2000, seed=1))


def test_metric_reference_option_and_errors() -> None:
    x, y = two_sets(50, 44, 8, seed=5)
    streamed = KernelAudioDistance(8)
    for part in x.split(13):
        streamed.update(part.float(), real=True)  # float32 in (as backends give), float64 kept
    for part in y.split(10):
        streamed.update(part)
    given = KernelAudioDistance(8, reference=x.float())
    given.update(y)
    expected = kernel_audio_distance(x.float(), y)[0]
    torch.testing.assert_close(streamed.compute(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(given.compute(), expected, rtol=1e-12, atol=0)
    assert given.protocol()["bandwidth"] == pytest.approx(float(median_pairwise_distance(x.float())))
    assert given.protocol()["n_reference"] == 50 and given.protocol()["scale"] == 100.0
    with pytest.raises(ValueError, match="takes no real embeddings"):
        given.update(x, real=True)
    with pytest.raises(ValueError, match=r"expected generated embeddings \[N, 8\]"):
        given.update(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="needs >= 2 embeddings on each side"):
        KernelAudioDistance(8, reference=x).compute()
    with pytest.raises(ValueError, match="bandwidth_from"):
        KernelAudioDistance(8, bandwidth_from="eval")


# --------------------------------------------------------------------------------------------- two-rank DDP (gloo)

DDP_SIZES = (130, 77)


def run_kad(parts: list[slice]) -> torch.Tensor:
    """KAD of both sides streamed, and of the generated side against reference embeddings given (as a suite
    does: the ``real`` state then stays empty on every rank)."""
    x, y = two_sets(sum(DDP_SIZES), sum(DDP_SIZES), 16, seed=6)
    metric, given = KernelAudioDistance(16, chunk_size=50), KernelAudioDistance(16, reference=x[:100])
    for part in parts:
        metric.update(x[part], real=True)
        metric.update(y[part])
        given.update(y[part])
    return torch.stack([metric.compute(), given.compute()])


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        parts = [slice(0, DDP_SIZES[0]), slice(DDP_SIZES[0], sum(DDP_SIZES))]
        torch.save(run_kad([parts[rank]]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.mark.timeout(120)
def test_two_rank_ddp_equals_single_process(tmp_path: Path) -> None:
    mp.start_processes(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single = run_kad([slice(0, sum(DDP_SIZES))])
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), single, rtol=1e-12, atol=1e-14)
    half = run_kad([slice(0, DDP_SIZES[0])])  # one rank's share alone is another number
    assert rel(half[0], single[0]) > 1e-3 and rel(half[1], single[1]) > 1e-3


# --------------------------------------------------------------------------------------------- the suite metric

def test_suite_kad_scores_clip_means_against_the_reference_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import soundfile
    import yaml

    from ostinato.evaluation.scoring import SuiteMetrics
    from ostinato.evaluation.suite import SuiteError, load_suite
    from ostinato.metrics.embeddings import BACKENDS, clip_embeddings

    monkeypatch.setitem(BACKENDS, "bands", "tests.helpers:BandBackend")
    g = torch.Generator().manual_seed(7)
    (tmp_path / "ref").mkdir()
    for i in range(12):
        soundfile.write(tmp_path / "ref" / f"{i:02d}.wav", (0.1 * torch.randn(4000, generator=g)).numpy(), 16000)
    cfg = dict(kind="unconditional", reference=str(tmp_path / "ref"), num_samples=6, seconds=0.25,
               embedding="bands:x", metrics={"kad": {}, "fad": {"per": "clip"}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    suite = load_suite(tmp_path / "s.yaml")
    assert suite.metric("kad").options == {"embedding": "bands:x", "per": "clip", "bandwidth": None,
                                           "bandwidth_from": "reference"}
    scores = SuiteMetrics(suite, suite.metrics, 16000, progress=False, cache=tmp_path / "cache")
    assert any(p.name.startswith("bands-embeddings") for p in (tmp_path / "cache").iterdir())  # cached by content
    backend = BandBackend("x")
    ref = clip_embeddings([backend.embed_audio(torch.from_numpy(soundfile.read(p, dtype="float32")[0])[None, None],
                                               16000)[0] for p in sorted((tmp_path / "ref").iterdir())])
    values = []
    for gain in (0.1, 0.3):
        wav = gain * torch.randn(6, 1, 4000, generator=g)
        scores.reset()
        scores.update(wav, None, [""] * 6, [str(i) for i in range(6)])
        scalars, _ = scores.compute()
        gen = clip_embeddings(backend.embed_audio(wav, 16000))
        assert scalars["kad"] == pytest.approx(float(kernel_audio_distance(ref, gen)[0]), rel=1e-9)
        values.append(scalars["kad"])
    assert values[1] > 10 * abs(values[0])  # louder than the reference: far
    with pytest.raises(SuiteError, match="metrics.kad.bandwidth_from"):
        load_suite(tmp_path / "s.yaml", ["metrics.kad.bandwidth_from=eval"])
    with pytest.raises(SuiteError, match="metrics.kad.bandwidth"):
        load_suite(tmp_path / "s.yaml", ["metrics.kad.bandwidth=-1"])


# --------------------------------------------------------------------------------------------- bootstrap

def test_bootstrap_replicates_are_kad_of_the_pooled_clips_and_the_interval_narrows() -> None:
    from ostinato.metrics.kad import _ClipKernels, bootstrap_kad

    x, y = two_sets(60, 90, 8, seed=8, shift=0.2)
    clips = list(y.split([3, 1, 5, 2, 4] * 6))  # 30 clips of unequal frame counts
    h = median_pairwise_distance(x)
    kernels = _ClipKernels(x, clips, 1.0 / (2 * h * h + 1e-8), KADTK_SCALE, chunk_size=7)
    w = torch.tensor([0, 2, 1, 3, 0, 1] * 5)  # one replicate's draw counts: clips repeated, clips left out
    pooled = torch.cat([clip for clip, times in zip(clips, w.tolist()) for _ in range(times)])
    torch.testing.assert_close(kernels.kad(w), kernel_audio_distance(x, pooled, bandwidth=h)[0], rtol=1e-10,
                               atol=1e-13)
    ci = bootstrap_kad(x, clips, 200, seed=1)
    assert ci["point"] == pytest.approx(float(kernel_audio_distance(x, y)[0]), rel=1e-10)
    assert ci["low"] < ci["point"] < ci["high"] and ci["bias"] > 0  # duplicated clips add k(y, y) = 1 terms
    assert bootstrap_kad(x, clips, 200, seed=1) == ci  # seeded
    # one frame per clip: the replicates are KAD of the resampled rows, drawn as a direct loop would draw them
    from ostinato.metrics.fad import shifted_percentile_interval

    gen = torch.Generator().manual_seed(2)
    direct = torch.stack([kernel_audio_distance(x, y[torch.randint(len(y), (len(y),), generator=gen)],
                                                bandwidth=h)[0] for _ in range(40)])
    fast = bootstrap_kad(x, list(y[:, None]), 40, seed=2)
    expected = shifted_percentile_interval(float(kernel_audio_distance(x, y)[0]), direct)
    assert fast["low"] == pytest.approx(expected["low"], rel=1e-9)
    assert fast["high"] == pytest.approx(expected["high"], rel=1e-9)
    _, more = two_sets(60, 360, 8, seed=9, shift=0.2)
    wide = bootstrap_kad(x, list(more.split(3)), 200, seed=1)  # 4x the clips: about half the width
    assert wide["high"] - wide["low"] < 0.75 * (ci["high"] - ci["low"])

