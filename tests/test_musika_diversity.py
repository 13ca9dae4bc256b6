"""Musika's generations depend on their seed: the autoencoder's latents stay out of the tanh's flat ends (else every
clip encodes to the same +-1 pattern and decodes to one steady buzz, which the GAN then learns whatever its seed),
and a GAN trained on them writes clips that differ from seed to seed and with ``--truncation``.
``autoencoder_diversity`` tells an autoencoder whose decoder writes one spectrum whatever its latents (PyTorch's
default init) from one that keeps clips apart, and ``unit_gain_`` keeps a signal's size through convs and transposed
convs."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ostinato.data.arrays import ArrayBatch
from ostinato.families.musika import MusikaAutoencoderFamily, MusikaFamily, saturation_loss
from ostinato.generation.musika import autoencoder_diversity, seed_diversity
from ostinato.metrics.diversity import diversity_report
from ostinato.models.musika import SpectralAutoencoder
from ostinato.nn.conv import NormConv1d, NormConvTranspose1d
from ostinato.nn.discriminators import LatentDiscriminator
from ostinato.nn.init import unit_gain_

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 24000
AE = dict(hop=240, dimension=16, n_filters=16, ratios=[4, 2])  # 12.5 latent frames / s


def melodies(n: int, seconds: float, seed: int, note: float = 0.32) -> torch.Tensor:
    """``[n, 1, T]``: random tunes (a note every ``note`` s, four harmonics, per-clip level and brightness)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(round(seconds * SR)) / SR
    midi = 48 + torch.randint(0, 30, (n, int(seconds / note) + 1), generator=g).float()
    hz = 440 * 2 ** ((midi[:, (t / note).long()] - 69) / 12)
    phase = 2 * torch.pi * torch.cumsum(hz / SR, dim=1)
    level, bright = 0.1 + 0.2 * torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g)
    return sum(level * bright ** (k - 1) * torch.sin(k * phase) for k in range(1, 5))[:, None]


def train_autoencoder(saturation: float, steps: int, start_saturated: bool) -> tuple[MusikaAutoencoderFamily, list]:
    torch.manual_seed(0)
    family = MusikaAutoencoderFamily(SR, 1, autoencoder=AE, loss_weights={"saturation": saturation})
    if start_saturated:  # as the demo's encoder is after a few hundred steps: 2/3 of its latents beyond 0.95
        with torch.no_grad():
            for name, p in family.model.encoder.model[-1].named_parameters():
                if name.endswith(("bias", "original0")):
                    p.mul_(30.0)
    opt = torch.optim.Adam(family.model.parameters(), 2e-3)
    x = melodies(8, 0.64, 1)
    history = []
    for _ in range(steps):
        out = family.model(x)
        history.append(float((out.latents.abs() > 0.95).float().mean()))
        losses = family.losses(x, out, adversarial=False)
        opt.zero_grad()
        sum(family.weights[k] * v for k, v in losses.items()).backward()
        opt.step()
    return family.eval(), history


def test_the_saturation_loss_brings_latents_back_from_the_flat_ends_of_the_tanh():
    pre = torch.tensor([[[0.5, -1.5, 2.5, -3.5]]], requires_grad=True)
    loss = saturation_loss(pre)
    loss.backward()
    assert loss.item() == pytest.approx((1.0 + 4.0) / 4) and pre.grad[0, 0, :2].abs().sum() == 0
    assert pre.grad[0, 0, 2] > 0 > pre.grad[0, 0, 3]  # pulled back towards the tanh's slope
    x = melodies(8, 0.64, 3)
    for weight, steps, expect_saturated in ((0.0, 20, True), (1.0, 40, False)):
        family, history = train_autoencoder(weight, steps, start_saturated=True)
        with torch.no_grad():
            z = family.model.encode(x)
        saturated = float((z.abs() > 0.95).float().mean())
        print(f"saturation weight {weight}: latents beyond 0.95 {history[0]:.3f} -> {saturated:.3f}, std across "
              f"clips {float(z.std(0).mean()):.3f}")
        if expect_saturated:  # the old loss: no gradient comes back through the flat tanh (the clips still differ in
            assert saturated > 0.9  # their signs since the input is centred: tests/test_musika_autoencoder.py)
        else:
            assert saturated < 0.2 < history[0] and float(z.std(0).mean()) > 0.02


def test_minibatch_std_lets_the_critic_see_identical_windows():
    torch.manual_seed(0)
    d = LatentDiscriminator(dimension=8, channels=[16, 16], minibatch_std=4)
    varied, same = torch.randn(8, 8, 16), torch.randn(1, 8, 16).expand(8, -1, -1)
    features = d.model[:d.split]
    with torch.no_grad():
        assert float(d._group_std(features(same)).abs().max()) < 1e-3 < float(d._group_std(features(varied)).min())
        assert d(torch.randn(5, 8, 16)).shape == (5, 1, 8) and d(varied).shape == (8, 1, 8)  # any batch size
    assert set(LatentDiscriminator(8, [16, 16]).state_dict()) == set(d.state_dict())  # the same parameter names


def test_unit_gain_keeps_a_signal_s_size_through_convs_and_transposed_convs():
    torch.manual_seed(0)
    up = torch.nn.Sequential(NormConvTranspose1d(64, 32, 8, 4, norm="weight_norm"),
                             NormConvTranspose1d(32, 16, 4, 2, norm="weight_norm"), NormConvTranspose1d(16, 8, 4, 2),
                             NormConv1d(8, 8, 3, norm="weight_norm"), NormConv1d(8, 4, 3))
    x = torch.randn(4, 64, 50)
    with torch.no_grad():
        shrunk = float(up(x).std())  # PyTorch's default init: ~1/sqrt(3) per layer
        unit_gain_(up)
        kept = float(up(x).std())
    assert shrunk < 0.2 and 0.6 < kept < 1.6, (shrunk, kept)
    convs = [m for m in up.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    assert len(convs) == 5 and not any(m.bias.detach().any() for m in convs)


def test_autoencoder_diversity_tells_a_decoder_that_ignores_its_latents():
    """At PyTorch's default init the autoencoder's output is its decoder's biases: every clip decodes to one
    spectrum (``logmag_cos`` 1.000, latents' spread 0.02 across clips against a centre of 0.10); at unit gain the
    decoded spectra differ as the clips do (0.84 against the inputs' 0.66). Training from either start settles on
    the average spectrum first (see docs/musika.md, the diversity bullet): the check the GPU run prints."""
    x = melodies(6, 1.28, 7)
    reports = {}
    for gain in (None, 1.0):
        torch.manual_seed(0)
        ae = SpectralAutoencoder(SR, 1, **AE)
        if gain is not None:
            unit_gain_(ae.encoder, gain)
            unit_gain_(ae.decoder, gain)
        reports[gain] = autoencoder_diversity(ae, x)
    flat, live = reports[None], reports[1.0]
    assert flat["logmag_cos"] > 0.99 > 0.8 > flat["target_cos"] and flat["recon_spectral_sim_mean"] > 0.99
    assert flat["latent_spread"] < 0.5 * flat["latent_centre"]
    assert live["logmag_cos"] < 0.9 and live["recon_spectral_sim_mean"] < 0.9
    assert live["latent_spread"] > 5 * flat["latent_spread"]
    assert flat["target_cos"] == live["target_cos"] and flat["spec_l1_clip"] < flat["spec_l1_constant"]
    with pytest.raises(ValueError, match="N >= 2"):
        autoencoder_diversity(ae, x[:1])


class _Crops(L.LightningDataModule):
    """``steps`` batches of ``batch`` whole-latent items drawn from ``latents [N, D, L]``."""

    def __init__(self, latents: torch.Tensor, steps: int, batch: int = 16):
        super().__init__()
        self.latents, self.steps, self.batch = latents, steps, batch

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        n, length = self.latents.shape[0], self.latents.shape[-1]
        items = [self.latents[torch.randint(0, n, (self.batch,), generator=g)] for _ in range(self.steps)]
        return DataLoader([ArrayBatch({"latents": x}, {"latents": torch.full((self.batch,), length)},
                                      [{}] * self.batch) for x in items], batch_size=None)


@pytest.fixture(scope="module")
def trained_musika():
    """A demo-size autoencoder (32-dim latents) trained 150 steps on random tunes, and a small latent GAN trained 200
    steps on its latents (minibatch std on, as the family configs have it)."""
    torch.manual_seed(0)
    ae_keys = dict(hop=240, dimension=32, n_filters=32, ratios=[4, 2], n_residual_layers=1, last_kernel_size=3)
    family = MusikaAutoencoderFamily(SR, 1, autoencoder=ae_keys, loss_weights={"saturation": 0.0})
    opt = torch.optim.Adam(family.model.parameters(), 2e-3)
    pool = melodies(64, 0.64, 1)
    for _ in range(150):
        x = pool[torch.randint(0, 64, (8,))]
        losses = family.losses(x, family.model(x), adversarial=False)
        opt.zero_grad()
        sum(family.weights[k] * v for k, v in losses.items()).backward()
        opt.step()
    ae = family.model.eval()
    with torch.no_grad():
        latents = ae.encode(melodies(48, 2.6, 2))
    torch.manual_seed(0)
    gan = MusikaFamily(dimension=32, window=32, gp_max_weight=1.0, discriminator=dict(channels=[32, 64, 64],
                       minibatch_std=4), generator=dict(coord_dim=32, style_dim=32, channels=64, up_ratios=[2, 2],
                                                        up_channels=[48, 32], blocks=2, dilations=[1, 2]),
                       optim={"name": "adam", "lr": 5e-4, "betas": [0.5, 0.9]},
                       optim_disc={"name": "adam", "lr": 5e-4, "betas": [0.5, 0.9]})
    gan.model.latent_rate.fill_(ae.frame_rate)
    trainer = L.Trainer(accelerator="cpu", max_steps=200, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(gan, datamodule=_Crops(latents, 200))
    return gan.model.eval().attach(ae), melodies(8, 2.56, 5)


def test_generations_depend_on_the_seed_and_the_truncation(trained_musika):
    model, reference = trained_musika
    report = seed_diversity(model, seeds=6, seconds=2.56, reference=reference)
    print({k: {n: round(v, 3) if isinstance(v, float) else v for n, v in r.items()} for k, r in report.items()})
    ceiling = report["reference"]  # real clips through the same autoencoder: what different clips look like
    assert ceiling["spectral_sim_mean"] < 0.9  # the autoencoder itself keeps different clips apart
    ae = autoencoder_diversity(model.autoencoder, reference)
    assert ae["recon_spectral_sim_mean"] == pytest.approx(ceiling["spectral_sim_mean"], abs=0.02)
    assert ae["logmag_cos"] < 0.95 and ae["latent_spread"] > 0.5 * ae["latent_centre"]
    # a collapsed GAN (the demo's symptom): waveform correlation 0.997 and log-mel cosine ~1 between seeds.
    # Measured with the critic's minibatch std (without it, the old critic: 0.19 against 0.38, 0.85, 0.968, 0.985)
    seeds, latents = report["seeds"], report["latents"]
    assert latents["std_over_seeds"] > 0.5 * latents["std_real"]  # 0.34 against 0.38
    assert seeds["waveform_corr_mean"] < 0.8 and seeds["spectral_sim_mean"] < 0.97  # 0.60, 0.93
    assert report["truncation"]["waveform_corr_max"] < 0.98  # --truncation 0.5 against 2, the same seed: 0.91
    clips = torch.cat([model.generate(2.56, seed=s) for s in (0, 0, 1)])
    assert torch.equal(clips[0], clips[1]) and diversity_report(clips[1:], SR)["waveform_corr_max"] < 0.99
