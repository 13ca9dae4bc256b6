"""FAD, FAD-inf and per-song FAD: against a scipy reference, invariances, errors, the 1/N extrapolation, and a
two-rank gloo run equal to one process (FAD, FAD-inf, per-song FAD, text-audio score, label KLD)."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ostinato.metrics.fad import FADInf, FrechetAudioDistance, PerSongFAD, fad_inf_fit, frechet_distance, gaussian_stats
from ostinato.metrics.kld import LabelKLD
from ostinato.metrics.text_audio import TextAudioScore
from tests.helpers import free_port

F64 = torch.float64


def gaussians(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets ``[n, d]`` float64 with different means and (correlated) covariances."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) * 0.3 + 1.0
    b = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64) - 0.5
    return a, b


def scipy_fad(a: torch.Tensor, b: torch.Tensor) -> float:
    """The classic implementation: np.cov, scipy.linalg.sqrtm of the (non-symmetric) product."""
    an, bn = a.numpy(), b.numpy()
    mu1, mu2 = an.mean(0), bn.mean(0)
    s1, s2 = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fad(real: torch.Tensor, fake: torch.Tensor, chunk: int | None = None, **kwargs) -> torch.Tensor:
    metric = FrechetAudioDistance(real.shape[1], **kwargs)
    for side, x in ((True, real), (False, fake)):
        if side and "reference" in kwargs:
            continue
        for part in (x,) if chunk is None else x.split(chunk):
            metric.update(part, real=side)
    return metric.compute()


@pytest.mark.parametrize("d", [16, 32, 128])
def test_fad_matches_scipy_sqrtm(d: int) -> None:
    real, fake = gaussians(20 * d, d, seed=d)
    want = scipy_fad(real, fake)
    got = fad(real, fake)
    assert got.dtype == F64 and got.dim() == 0
    assert abs(got.item() - want) / want <= 1e-6, (got.item(), want)
    mu1, s1 = gaussian_stats(real)
    mu2, s2 = gaussian_stats(fake)
    assert abs(frechet_distance(mu1, s1, mu2, s2).item() - want) / want <= 1e-6


def test_gaussian_stats_is_unbiased_float64() -> None:
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == F64
    torch.testing.assert_close(sigma, torch.from_numpy(np.cov(x.double().numpy(), rowvar=False)))
    torch.testing.assert_close(mu, x.double().mean(0))


def test_fad_zero_shift_symmetry_chunks_and_reference() -> None:
    real, fake = gaussians(2000, 32, seed=1)
    assert abs(fad(real, real).item()) <= 1e-8
    shift = torch.linspace(-1.0, 2.0, 32, dtype=F64)
    torch.testing.assert_close(fad(real, real + shift), shift @ shift, rtol=1e-9, atol=1e-8)
    whole = fad(real, fake)
    torch.testing.assert_close(fad(fake, real), whole, rtol=1e-9, atol=0)
    torch.testing.assert_close(fad(real, fake, chunk=333), whole, rtol=1e-10, atol=0)
    mu, sigma = gaussian_stats(real)
    torch.testing.assert_close(fad(real, fake, reference=(mu, sigma, len(real))), whole, rtol=1e-10, atol=0)

    metric = FrechetAudioDistance(32)
    for part in real.split(500):
        metric.update(part, real=True)
    metric.update(fake)
    for (m1, s1, n1), x in ((metric.real_stats(), real), (metric.fake_stats(), fake)):
        m2, s2 = gaussian_stats(x)
        assert n1 == len(x)
        torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-12)


def test_fad_errors_and_warnings() -> None:
    metric = FrechetAudioDistance(8)
    metric.update(torch.randn(1, 8))
    metric.update(torch.randn(10, 8), real=True)
    with pytest.raises(ValueError, match="real=10, fake=1"):
        metric.compute()
    metric.update(torch.randn(3, 8))
    with pytest.warns(UserWarning, match=r"N=4 fake embeddings of dimension D=8 is unreliable"):
        metric.compute()
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        metric.update(torch.randn(4, 7))
    ref = FrechetAudioDistance(8, reference=(torch.zeros(8), torch.eye(8), 100))
    with pytest.raises(ValueError, match="reference"):
        ref.update(torch.randn(4, 8), real=True)
    with pytest.raises(ValueError, match="n >= 2"):
        FrechetAudioDistance(8, reference=(torch.zeros(8), torch.eye(8), 1))
    with pytest.raises(ValueError, match=">= 2 embeddings"):
        gaussian_stats(torch.randn(1, 8))


def test_states_stay_float64_when_cast() -> None:
    metric = FrechetAudioDistance(4).to(torch.bfloat16)
    inf = FADInf(4).to(torch.bfloat16)
    inf.update(torch.randn(10, 4))
    inf = inf.to(torch.float16)
    assert metric.fake_outer.dtype == metric.real_n.dtype == F64
    assert inf.fake[0].dtype == torch.float32 and inf.real_sum.dtype == F64


# --------------------------------------------------------------------------------------------- FAD-inf


def test_fad_inf_fit_recovers_intercept() -> None:
    g = torch.Generator().manual_seed(0)
    n = torch.linspace(500, 5000, 15).round()
    c, k = 3.25, 1800.0
    values = c + k / n + 1e-5 * torch.randn(15, generator=g, dtype=F64)
    intercept, slope, r2 = fad_inf_fit(n, values)
    assert abs(intercept.item() - c) <= 1e-3
    assert abs(slope.item() - k) / k <= 1e-3
    assert r2.item() > 0.999999


def test_fad_inf_extrapolates_gaussian_bias() -> None:
    """Fake ~ N(mu, I) vs the exact reference N(0, I): FAD(N) ~ |mu|^2 + k / N, k ~ D + D (D + 1) / 4 (mean error
    D / N plus, to first order, ||S_N - I||_F^2 / 4 for the covariance), 0.148 at N = 2000, D = 32.

    The tolerance 0.1 on FAD-inf: over 20 seeds the error had mean 0.002 and sd 0.035 (mostly the full set's own
    sample-mean error, 2 mu . (m_N - mu) with sd 2 |mu| / sqrt(N) = 0.022, which no extrapolation removes), so
    0.1 is ~3 sd, yet below the 0.15 bias that FAD at N = 2000 has.
    """
    d, n, mu2 = 32, 2000, 0.25
    mu = torch.zeros(d, dtype=F64)
    mu[0] = mu2**0.5
    fake = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=F64) + mu
    metric = FADInf(d, reference=(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64), 10**6))
    for part in fake.split(700):
        metric.update(part)
    out = metric.compute()
    assert out["n"].tolist()[0] == n // 10 and out["n"].tolist()[-1] == n and len(out["n"]) == 15
    err_inf, err_full = abs(out["fad_inf"].item() - mu2), abs(out["fad"][-1].item() - mu2)
    assert err_full > 0.1 and err_inf < 0.1 and err_inf < err_full, (err_inf, err_full)
    assert abs(out["slope"].item() / (d + d * (d + 1) / 4) - 1) < 0.2
    assert out["r2"].item() > 0.95
    again = FADInf(d, reference=(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64), 10**6))
    again.update(fake)
    torch.testing.assert_close(again.compute()["fad_inf"], out["fad_inf"], rtol=1e-9, atol=0)  # seeded subsets


def test_fad_inf_errors() -> None:
    metric = FADInf(8)
    metric.update(torch.randn(100, 8), real=True)
    metric.update(torch.randn(9, 8))
    with pytest.raises(ValueError, match="more than min_n=9"):
        metric.compute()


# --------------------------------------------------------------------------------------------- per-song FAD


def test_per_song_fad_orders_songs_and_keeps_ids() -> None:
    g = torch.Generator().manual_seed(3)
    d = 8
    real = torch.randn(4000, d, generator=g, dtype=F64)
    metric = PerSongFAD(d)
    metric.update(list(real.split(1000)), real=True)
    near = torch.randn(60, d, generator=g, dtype=F64)
    far = torch.randn(60, d, generator=g, dtype=F64) + 1.5
    metric.update([far, near], ids=["far", "near"])
    metric.update(torch.randn(2, 40, d, generator=g), ids=["b0", "b1"])
    metric.update([torch.randn(1, d, generator=g)])
    out = metric.compute()
    assert out["ids"] == ["far", "near", "b0", "b1", None]
    assert out["frames"].tolist() == [60, 60, 40, 40, 1]
    assert out["fad"][1] < out["fad"][0] and out["fad"][0] > d * 1.5**2 * 0.8
    assert torch.isnan(out["fad"][4]) and torch.isfinite(out["fad"][:4]).all()
    mu_r, s_r = gaussian_stats(real)
    mu_f, s_f = gaussian_stats(near)
    torch.testing.assert_close(out["fad"][1], frechet_distance(mu_r, s_r, mu_f, s_f), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------- two-rank DDP (gloo)

DDP_SIZES = (300, 212)  # unequal halves: the gathered lists differ in length


def ddp_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = sum(DDP_SIZES)
    return {
        "real": torch.randn(n, 16, generator=g, dtype=F64),
        "fake": torch.randn(n, 16, generator=g, dtype=F64) * 1.2 + 0.3,
        "audio": torch.randn(n, 8, generator=g),
        "text": torch.randn(n, 8, generator=g),
        "gen_logits": torch.randn(n, 5, generator=g),
        "ref_logits": torch.randn(n, 5, generator=g),
    }


def run_metrics(parts: list[slice]) -> dict[str, object]:
    """Every metric updated with ``data[part]`` for each part, then computed."""
    data = ddp_data()
    metrics = {"fad": FrechetAudioDistance(16), "inf": FADInf(16, num_points=5), "song": PerSongFAD(16),
               "clap": TextAudioScore(), "kld": LabelKLD()}
    for part in parts:
        for side in (True, False):
            metrics["fad"].update(data["real" if side else "fake"][part], real=side)
            metrics["inf"].update(data["real" if side else "fake"][part], real=side)
        metrics["song"].update(data["real"][part][None], real=True)
        songs = list(data["fake"][part].split(50))
        metrics["song"].update(songs, ids=[f"{part.start}-{i}" for i in range(len(songs))])
        metrics["clap"].update(data["audio"][part], data["text"][part])
        metrics["kld"].update(data["gen_logits"][part], data["ref_logits"][part])
    out = {name: metric.compute() for name, metric in metrics.items()}
    out["fake_stats"] = metrics["fad"].fake_stats()  # outside compute(): syncs by itself
    return out


def ddp_parts() -> list[slice]:
    return [slice(0, DDP_SIZES[0]), slice(DDP_SIZES[0], sum(DDP_SIZES))]


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(run_metrics([ddp_parts()[rank]]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.mark.timeout(120)
def test_two_rank_ddp_equals_single_process(tmp_path: Path) -> None:
    # fork, not spawn: a spawned child re-imports torchmetrics (~20 s on a loaded 2-core box), a forked one 0.3 s.
    # Workers run single-threaded (torch.set_num_threads(1)), as DataLoader's forked workers do.
    mp.start_processes(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = run_metrics(ddp_parts())
    for result in ranks:
        for name in ("fad", "clap", "kld"):
            torch.testing.assert_close(result[name], single[name], rtol=1e-10, atol=1e-12)
        for key in ("fad_inf", "slope", "r2", "fad"):
            torch.testing.assert_close(result["inf"][key], single["inf"][key], rtol=1e-10, atol=1e-12)
        assert torch.equal(result["inf"]["n"], single["inf"]["n"])
        assert result["fake_stats"][2] == single["fake_stats"][2] == sum(DDP_SIZES)
        torch.testing.assert_close(result["fake_stats"][1], single["fake_stats"][1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["song"]["fad"], single["song"]["fad"], rtol=1e-10, atol=1e-12)
        assert result["song"]["ids"] == single["song"]["ids"] and len(single["song"]["ids"]) == 6 + 5
