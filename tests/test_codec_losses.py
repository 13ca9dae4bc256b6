"""Codec training parts: discriminators, losses, the gradient balancer and reconstruction metrics."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchaudio
from torchmetrics import Metric
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

from ostinato.metrics.codec import SISNR, MelDistance, MultiScaleSTFTDistance
from ostinato.nn.balancer import Balancer
from ostinato.nn.discriminators import (
    CombinedDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleSTFTDiscriminator,
    build_discriminator,
)
from ostinato.nn.losses import (
    MultiScaleMelLoss,
    MultiScaleSTFTLoss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    l1_waveform,
)
from tests.helpers import free_port

SR = 16000
N_FFTS = (1024, 2048, 512, 256, 128)
HOPS = (256, 512, 128, 64, 32)


def small_discriminator(channels: int) -> CombinedDiscriminator:
    return build_discriminator(
        ("msstft", "mpd", "msd"), channels=channels,
        msstft={"filters": 4, "max_filters": 16},
        mpd={"filters": 2, "max_filters": 16},
        msd={"filters": 4, "max_filters": 16},
    )


def noisy(x: torch.Tensor, level: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + level * torch.randn(x.shape, generator=g)


def signal(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(shape[-1]) / SR
    tone = torch.sin(2 * math.pi * 440.0 * t) * 0.5
    return tone + 0.1 * torch.randn(shape, generator=g)


# --------------------------------------------------------------------------------------------- discriminators


@pytest.mark.parametrize("channels", [1, 2])
def test_discriminator_structure_and_shapes(channels: int) -> None:
    torch.manual_seed(0)
    disc = small_discriminator(channels)
    b, t = 2, 4321  # not a multiple of any hop or period
    x = torch.randn(b, channels, t, requires_grad=True)
    logits, features = disc(x)

    assert len(logits) == len(features) == len(disc.names) == 5 + 5 + 3
    assert disc.names[0] == "msstft.0" and disc.names[5] == "mpd.0" and disc.names[-1] == "msd.2"
    assert all(lg.shape[0] == b and lg.shape[1] == 1 for lg in logits)
    # MS-STFT: [B, 1, frames, freqs]; frames from center=False framing, freqs halved by each of 3 strided convs.
    for lg, feats, n_fft, hop in zip(logits[:5], features[:5], N_FFTS, HOPS):
        freqs = n_fft // 2 + 1
        for _ in range(3):
            freqs = (freqs - 1) // 2 + 1
        assert lg.shape == (b, 1, (t - n_fft) // hop + 1, freqs)
        assert len(feats) == 5
    # MPD: the last axis is the period; 5 conv features + the output.
    for lg, feats, period in zip(logits[5:10], features[5:10], (2, 3, 5, 7, 11)):
        assert lg.dim() == 4 and lg.shape[-1] == period
        assert len(feats) == 6
    # MSD: 1-D logits, shorter at each pooled scale; 6 conv features + the output.
    lengths = [lg.shape[-1] for lg in logits[10:]]
    assert all(lg.dim() == 3 for lg in logits[10:]) and lengths[0] > lengths[1] > lengths[2]
    assert all(len(f) == 7 for f in features[10:])
    assert all(f.shape[0] == b for feats in features for f in feats)

    for i, lg in enumerate(logits):
        (grad,) = torch.autograd.grad(lg.square().mean(), x, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, disc.names[i]
    (grad,) = torch.autograd.grad(features[7][2].mean(), x)
    assert grad.abs().sum() > 0


def test_discriminator_rejects_wrong_channels_and_kinds() -> None:
    disc = MultiScaleSTFTDiscriminator(channels=2, filters=4)
    with pytest.raises(ValueError, match="B, 2, T"):
        disc(torch.randn(1, 1, 4096))
    with pytest.raises(ValueError, match="unknown discriminator kinds"):
        build_discriminator(("msstft", "wavlm"))
    with pytest.raises(ValueError, match="not in"):
        build_discriminator(("msstft",), mpd={"periods": (2,)})


def test_msstft_spectrogram_is_fp32_and_matches_torchaudio() -> None:
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(channels=2, filters=4, max_filters=8)
    x = torch.randn(2, 2, 3000)
    sub = disc.discriminators[0]
    reference = torchaudio.transforms.Spectrogram(
        n_fft=1024, hop_length=256, win_length=1024, normalized=True, center=False, power=None
    )(x)  # [B, C, freqs, frames] complex
    expected = torch.cat([reference.real, reference.imag], dim=1).transpose(-1, -2)
    torch.testing.assert_close(sub.spectrogram(x), expected, rtol=1e-4, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        spec = sub.spectrogram(x.bfloat16())
        logits, _ = disc(x.bfloat16())
    assert spec.dtype == torch.float32
    assert all(torch.isfinite(lg.float()).all() for lg in logits)

    disc.to(torch.bfloat16)  # bf16-true: parameters cast, the STFT still runs in fp32 then feeds bf16 convs
    logits, features = disc(x.bfloat16())
    assert logits[0].dtype == torch.bfloat16 and torch.isfinite(logits[0].float()).all()


def test_mpd_pads_lengths_not_multiple_of_period() -> None:
    mpd = MultiPeriodDiscriminator(periods=(3, 7), filters=2, max_filters=8)
    a = mpd(torch.randn(1, 1, 1000))[0]
    b = mpd(torch.randn(1, 1, 1001))[0]
    assert [lg.shape[-1] for lg in a] == [3, 7] and [lg.shape[-1] for lg in b] == [3, 7]


# --------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("channels", [1, 2])
def test_mel_loss_zero_for_identical_and_grows_with_noise(channels: int) -> None:
    loss = MultiScaleMelLoss(SR)
    x = signal(2, channels, 6000)
    assert loss(x, x.clone()).item() == 0.0
    values = [loss(noisy(x, level), x).item() for level in (0.003, 0.03, 0.3)]
    assert 0 < values[0] < values[1] < values[2]
    assert loss.alphas == pytest.approx([math.sqrt(2**i / 2) for i in range(6, 11)])


def test_mel_loss_runs_in_fp32_under_bf16_autocast() -> None:
    loss = MultiScaleMelLoss(SR)
    x = signal(2, 2, 6000).bfloat16()
    y = noisy(x.float(), 0.05).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(y, x)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # Same number as an fp32 computation on the same (bf16-rounded) samples: nothing ran in bf16.
    reference = loss(y.float(), x.float())
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=0.0)
    loss.to(torch.bfloat16)  # bf16-true casts modules; the filterbanks are not buffers and stay fp32
    torch.testing.assert_close(loss(y, x), reference, rtol=1e-6, atol=0.0)


def test_mel_loss_gradient_reaches_prediction() -> None:
    loss = MultiScaleMelLoss(SR, normalized=True)
    x = signal(1, 1, 4000)
    y = noisy(x, 0.05).requires_grad_()
    loss(y, x).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_multiscale_stft_loss() -> None:
    loss = MultiScaleSTFTLoss()
    x = signal(2, 2, 5000)
    assert loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    values = [loss(noisy(x, level), x).item() for level in (0.003, 0.03, 0.3)]
    assert 0 < values[0] < values[1] < values[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(noisy(x, 0.03).bfloat16(), x.bfloat16())
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_l1_waveform_mask() -> None:
    target = torch.zeros(2, 2, 10)
    pred = torch.ones(2, 2, 10)
    assert l1_waveform(pred, target).item() == 1.0
    mask = torch.arange(10)[None, :] < torch.tensor([[4], [10]])  # [B, T]
    pred[0, :, 4:] = 100.0  # garbage beyond item 0's valid length
    assert l1_waveform(pred, target, mask).item() == pytest.approx(1.0)
    assert l1_waveform(pred, target).item() > 1.0


def test_hinge_losses_known_values() -> None:
    real = [torch.tensor([2.0, 0.5, -1.0]), torch.tensor([[1.0]])]
    fake = [torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([[-1.0]])]
    # disc 0: mean(relu(1 - real)) = (0 + 0.5 + 2) / 3, mean(relu(1 + fake)) = (0 + 1 + 2) / 3; disc 1: 0 + 0.
    expected_d = ((2.5 / 3 + 1.0) + 0.0) / 2
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(expected_d)
    # mean(relu(1 - fake)): disc 0 (3 + 1 + 0) / 3, disc 1 2.
    assert hinge_generator_loss(fake).item() == pytest.approx((4 / 3 + 2) / 2)
    # -mean(fake): disc 0 1/3, disc 1 1.
    assert hinge_generator_loss(fake, margin=False).item() == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(ValueError):
        hinge_discriminator_loss(real, fake[:1])


def test_feature_matching_loss() -> None:
    real = [[torch.full((2, 3), 2.0, requires_grad=True), torch.randn(2, 4)], [torch.randn(1, 5)]]
    same = [[f.detach().clone() for f in feats] for feats in real]
    assert feature_matching_loss(real, same).item() == 0.0
    fake = [[torch.full((2, 3), 3.0, requires_grad=True), real[0][1].clone()], [real[1][0].clone()]]
    value = feature_matching_loss(real, fake)
    # disc 0: layer 0 |3 - 2| / 2 = 0.5, layer 1 0 -> 0.25; disc 1: 0 -> mean 0.125.
    assert value.item() == pytest.approx(0.125)
    value.backward()
    assert real[0][0].grad is None and fake[0][0].grad is not None and fake[0][0].grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- balancer


def _linear_setup(seed: int = 0, batch: int = 4, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 32).to(dtype)
    x = torch.randn(batch, 1, 16, dtype=dtype)
    target = torch.randn(batch, 1, 32, dtype=dtype)
    return model, x, target


def _losses(y: torch.Tensor, target: torch.Tensor, scale_b: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a": F.mse_loss(y, target), "b": scale_b * (y - target).abs().mean()}


def test_balancer_without_balancing_equals_weighted_backprop_exactly() -> None:
    weights = {"a": 2.0, "b": 0.5, "off": 0.0}
    model, x, target = _linear_setup()
    reference = torch.nn.Linear(16, 32)
    reference.load_state_dict(model.state_dict())

    y = model(x)
    losses = _losses(y, target)
    losses["off"] = torch.tensor(3.0)  # weight 0: skipped, so it need not even depend on y
    effective = Balancer(weights, balance_grads=False).backward(losses, y)

    y_ref = reference(x)
    ref = _losses(y_ref, target)
    total = 2.0 * ref["a"] + 0.5 * ref["b"]
    total.backward()

    assert torch.equal(model.weight.grad, reference.weight.grad)
    assert torch.equal(model.bias.grad, reference.bias.grad)
    assert effective.item() == pytest.approx(total.item(), rel=1e-6)
    assert not effective.requires_grad


def test_balancer_extra_loss_and_backward_fn() -> None:
    model, x, target = _linear_setup()
    reference = torch.nn.Linear(16, 32)
    reference.load_state_dict(model.state_dict())
    calls: list[torch.Tensor] = []

    def backward_fn(t: torch.Tensor) -> None:
        calls.append(t)
        t.backward()

    y = model(x)
    Balancer({"a": 1.0}, balance_grads=False).backward(
        {"a": F.mse_loss(y, target)}, y, extra_loss=0.25 * model.weight.square().sum(), backward_fn=backward_fn
    )
    (F.mse_loss(reference(x), target) + 0.25 * reference.weight.square().sum()).backward()
    assert len(calls) == 1 and calls[0].dim() == 0
    torch.testing.assert_close(model.weight.grad, reference.weight.grad, rtol=1e-6, atol=1e-7)


def test_balancer_retain_graph_for_a_later_backward() -> None:
    shared = torch.nn.Linear(16, 16)
    head = torch.nn.Linear(16, 32)
    x = torch.randn(2, 1, 16)
    for retain in (False, True):
        h = shared(x).tanh()  # like the encoder: feeds both the decoder output and the commitment penalty
        y = head(h)
        Balancer({"a": 1.0}).backward({"a": y.square().mean()}, y, retain_graph=retain)
        penalty = h.square().mean()
        if retain:
            penalty.backward()
            assert shared.weight.grad is not None
        else:
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                penalty.backward()


@pytest.mark.parametrize("per_batch_item", [True, False])
def test_balancer_gradient_shares_follow_weights_not_loss_scale(per_batch_item: bool) -> None:
    weights = {"a": 1.0, "b": 3.0}
    out_grads = []
    for scale_b in (1.0, 1000.0):
        _, _, target = _linear_setup()
        # A leaf stands for the decoder output: autograd.grad (taken per loss inside the balancer) leaves a leaf's
        # .grad alone, so y.grad is exactly what the final backward sends (retain_grad would also collect those).
        y = torch.randn(4, 1, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        # "a" only sees the first half of y and "b" the second, so each half of y.grad is one loss's contribution.
        losses = {
            "a": F.mse_loss(y[..., :16], target[..., :16]),
            "b": scale_b * (y[..., 16:] - target[..., 16:]).abs().mean(),
        }
        Balancer(weights, total_norm=2.0, per_batch_item=per_batch_item).backward(losses, y)
        g = y.grad
        if per_batch_item:
            norm_a = g[..., :16].flatten(1).norm(dim=1).mean()
            norm_b = g[..., 16:].flatten(1).norm(dim=1).mean()
        else:
            norm_a, norm_b = g[..., :16].norm(), g[..., 16:].norm()
        # First call: the EMA equals the current norms, so the shares are exact.
        assert norm_a.item() == pytest.approx(2.0 * 1 / 4, rel=1e-5)
        assert norm_b.item() == pytest.approx(2.0 * 3 / 4, rel=1e-5)
        out_grads.append(g.clone())
    torch.testing.assert_close(out_grads[0], out_grads[1], rtol=1e-5, atol=1e-9)


def test_balancer_ema_state_and_metrics() -> None:
    balancer = Balancer({"a": 1.0, "b": 1.0}, ema_decay=0.5, monitor=True, per_batch_item=False)
    expected_norms = []
    for step, scale in enumerate((1.0, 4.0)):
        model, x, target = _linear_setup(seed=step)
        y = model(x)
        losses = _losses(y, target, scale_b=scale)
        grads = {k: torch.autograd.grad(v, y, retain_graph=True)[0] for k, v in losses.items()}
        expected_norms.append({k: g.norm() for k, g in grads.items()})
        effective = balancer.backward(losses, y)
        ema = balancer.ema_norms
        # Each loss is scaled by total_norm * (w / sum w) / EMA norm: the EMA, not this step's norm, after step 0.
        want_effective = sum(0.5 / ema[k] * losses[k].detach() for k in ("a", "b"))
        torch.testing.assert_close(effective, want_effective)
        if step == 0:
            for k in ("a", "b"):
                torch.testing.assert_close(ema[k], expected_norms[0][k])
        else:
            for k in ("a", "b"):
                want = (0.5 * expected_norms[0][k] + expected_norms[1][k]) / 1.5
                torch.testing.assert_close(ema[k], want)
    metrics = balancer.metrics
    assert set(metrics) == {"ratio_a", "ratio_b", "norm_a", "norm_b"}
    assert (metrics["ratio_a"] + metrics["ratio_b"]).item() == pytest.approx(1.0)

    restored = Balancer({"a": 1.0, "b": 1.0}, ema_decay=0.5)
    restored.load_state_dict(balancer.state_dict())
    for k in ("a", "b"):
        torch.testing.assert_close(restored.ema_norms[k], balancer.ema_norms[k])


def test_balancer_input_errors() -> None:
    model, x, target = _linear_setup()
    y = model(x)
    balancer = Balancer({"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="require grad"):
        balancer.backward({"a": y.detach().sum()}, y.detach())
    with pytest.raises(ValueError, match="does not depend"):
        balancer.backward({"a": F.mse_loss(y, target), "b": model.weight.sum()}, y)
    with pytest.raises(KeyError):
        balancer.backward({"c": y.sum()}, y)


# --------------------------------------------------------------------------------------------- metrics


METRICS = {
    "mel": lambda: MelDistance(SR),
    "msstft": lambda: MultiScaleSTFTDistance(),
}


@pytest.mark.parametrize("name", list(METRICS))
def test_distance_zero_for_identical_and_grows_with_noise(name: str) -> None:
    x = signal(2, 2, 8000)
    values = []
    for level in (0.0, 0.003, 0.03, 0.3):
        metric = METRICS[name]()
        metric.update(noisy(x, level) if level else x.clone(), x)
        values.append(metric.compute())
    assert values[0].item() == 0.0
    assert 0 < values[1] < values[2] < values[3]
    assert values[0].dtype == torch.float32 and values[0].dim() == 0


@pytest.mark.parametrize("name", ["mel", "msstft", "sisnr"])
def test_metric_lengths_ignore_padding(name: str) -> None:
    make = {**METRICS, "sisnr": SISNR}[name]
    target = signal(3, 2, 8000)
    pred = noisy(target, 0.05)
    lengths = torch.tensor([5000, 8000, 3000])
    for b, n in enumerate(lengths.tolist()):
        target[b, :, n:] = 0.0
        pred[b, :, n:] = 0.0
    clean = make()
    clean.update(pred, target, lengths)
    garbage = pred.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage[b, :, n:] = 5.0 * torch.randn(2, 8000 - n)
    dirty = make()
    dirty.update(garbage, target, lengths)
    torch.testing.assert_close(dirty.compute(), clean.compute(), rtol=1e-6, atol=1e-6)
    # ... and equals the mean of the items measured one by one, cut to their lengths.
    single = []
    for b, n in enumerate(lengths.tolist()):
        m = make()
        m.update(pred[b : b + 1, :, :n], target[b : b + 1, :, :n])
        single.append(m.compute())
    torch.testing.assert_close(clean.compute(), torch.stack(single).mean(), rtol=1e-5, atol=1e-6)
    # Without lengths the garbage counts.
    unmasked = make()
    unmasked.update(garbage, target)
    assert not torch.allclose(unmasked.compute(), clean.compute(), rtol=1e-3)


@pytest.mark.parametrize("name", ["mel", "msstft", "sisnr"])
def test_metric_float64_states_and_merge(name: str) -> None:
    make = {**METRICS, "sisnr": SISNR}[name]
    x1, x2 = signal(2, 1, 6000, seed=1), signal(3, 1, 6000, seed=2)
    y1, y2 = noisy(x1, 0.02, seed=3), noisy(x2, 0.2, seed=4)
    m1, m2, union = make(), make(), make()
    m1.update(y1, x1)
    m2.update(y2, x2)
    union.update(torch.cat([y1, y2]), torch.cat([x1, x2]))
    float_states = {k: v for k, v in m1.metric_state.items() if v.is_floating_point()}
    assert float_states and all(v.dtype == torch.float64 for v in float_states.values())
    m1.to(dtype=torch.bfloat16)  # what Lightning's bf16-true does to the LightningModule's children
    assert all(getattr(m1, k).dtype == torch.float64 for k in float_states)
    m1.merge_state(m2)
    torch.testing.assert_close(m1.compute(), union.compute(), rtol=1e-6, atol=1e-6)
    # Weighted by items: differs from the mean of the two batch means (2 vs 3 items, different noise).
    assert not torch.isclose(union.compute(), (make_compute(make, y1, x1) + make_compute(make, y2, x2)) / 2)


def make_compute(make: Callable[[], Metric], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    m = make()
    m.update(pred, target)
    return m.compute()


def test_sisnr_orders_reconstructions_and_matches_torchmetrics() -> None:
    x = signal(2, 2, 4000)
    values = [make_compute(SISNR, noisy(x, level), x) for level in (0.01, 0.1, 1.0)]
    assert values[0] > values[1] > values[2]
    expected = scale_invariant_signal_noise_ratio(noisy(x, 0.1), x).mean()  # equal channel counts per item
    torch.testing.assert_close(values[1], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- two-rank DDP (gloo)



def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Balancer: different batch sizes and loss scales per rank, so the local norms differ.
        batch = 2 + rank
        model, x, target = _linear_setup(seed=rank, batch=batch)
        y = model(x)
        losses = _losses(y, target, scale_b=1.0 + 9.0 * rank)
        local = {}
        for k, v in losses.items():
            (g,) = torch.autograd.grad(v, y, retain_graph=True)
            local[k] = g.flatten(1).norm(dim=1).mean()
        balancer = Balancer({"a": 1.0, "b": 2.0}, ema_decay=0.9)
        balancer.backward(losses, y)

        # Metrics: each rank sees its own data; compute() syncs the float64 sums.
        data = [signal(2 + r, 1, 6000, seed=10 + r) for r in range(world)]
        preds = [noisy(d, 0.05 * (r + 1), seed=20 + r) for r, d in enumerate(data)]
        metrics = {"mel": MelDistance(SR), "msstft": MultiScaleSTFTDistance(), "sisnr": SISNR()}
        synced = {}
        for name, metric in metrics.items():
            metric.update(preds[rank], data[rank])
            synced[name] = metric.compute()
        torch.save(
            {"ema": balancer.ema_norms, "local": local, "batch": batch, "metrics": synced},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_balancer_ema_is_averaged_over_ranks(ddp_results: list[dict]) -> None:
    r0, r1 = ddp_results
    for k in ("a", "b"):
        assert torch.equal(r0["ema"][k], r1["ema"][k])
        # First call: the EMA is the batch-size-weighted mean of the two ranks' norms.
        want = (r0["local"][k] * r0["batch"] + r1["local"][k] * r1["batch"]) / (r0["batch"] + r1["batch"])
        torch.testing.assert_close(r0["ema"][k], want)
        assert not torch.isclose(r0["local"][k], r1["local"][k], rtol=1e-2)


def test_metrics_sync_over_ranks_equals_single_process(ddp_results: list[dict]) -> None:
    data = [signal(2 + r, 1, 6000, seed=10 + r) for r in range(2)]
    preds = [noisy(d, 0.05 * (r + 1), seed=20 + r) for r, d in enumerate(data)]
    single = {
        "mel": make_compute(lambda: MelDistance(SR), torch.cat(preds), torch.cat(data)),
        "msstft": make_compute(MultiScaleSTFTDistance, torch.cat(preds), torch.cat(data)),
        "sisnr": make_compute(SISNR, torch.cat(preds), torch.cat(data)),
    }
    for name, value in single.items():
        torch.testing.assert_close(ddp_results[0]["metrics"][name], value, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ddp_results[1]["metrics"][name], value, rtol=1e-6, atol=1e-6)
