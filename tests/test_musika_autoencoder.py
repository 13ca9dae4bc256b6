"""Musika's autoencoder keeps different clips apart after a short training: its spectrum normalisation is fitted to
the first training batch, so the encoder reads a centred input and the decoder starts on the average spectrum.

With the fixed statistics (``log_mean`` -3, ``log_std`` 3) the tunes' log-magnitudes normalise to a mean near -1;
the decoder's first steps go to lowering its level, with an L1 gradient of the same sign for every clip, and the
encoder's first conv turns into a level detector whose units sit in the ELU's flat end (92 % of its inputs below -3
after 150 steps, fitted: 24 %): the reconstructions of different tunes stay nearer one spectrum (log-mel cosine 0.85
between them against 0.59 between the tunes, 5 of 8 nearest their own tune; fitted: 0.79, 8 of 8).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ostinato.families.musika import MusikaAutoencoderFamily
from ostinato.generation.musika import autoencoder_diversity
from ostinato.metrics.diversity import spectral_similarity
from ostinato.models.musika import SpectralAutoencoder
from tests.test_musika_diversity import SR, melodies

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = dict(hop=240, dimension=32, n_filters=32, ratios=[4, 2], n_residual_layers=1, last_kernel_size=3)  # tiny


def log_mels(clips: torch.Tensor) -> torch.Tensor:
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=1024, hop_length=256, n_mels=64)
    return torch.log(mel(clips[:, 0]) + 1e-5).flatten(1).double()


def nearest_own(recon: torch.Tensor, clips: torch.Tensor) -> float:
    """Share of reconstructions whose log-mel spectrogram is nearest (L2) to their own clip's."""
    distances = torch.cdist(log_mels(recon), log_mels(clips))
    return float((distances.argmin(dim=1) == torch.arange(len(clips))).double().mean())


def mean_pair_cosine(clips: torch.Tensor) -> float:
    sim, n = spectral_similarity(clips, SR), clips.shape[0]
    pairs = torch.triu_indices(n, n, offset=1)
    return float(sim[pairs[0], pairs[1]].mean())


def train(steps: int, fixed_statistics: bool) -> tuple[SpectralAutoencoder, list[float]]:
    """The tiny preset's autoencoder trained as its family does (every reconstruction loss, saturation included;
    Adam 2e-3, batches of 8 x 0.64 s). ``fixed_statistics``: today's code before the fit (the normalisation marked
    fitted at its defaults). Returns the model and, per step, the share of the encoder's first ELU inputs below -3."""
    torch.manual_seed(0)
    family = MusikaAutoencoderFamily(SR, 1, autoencoder=PRESET)
    model = family.model
    if fixed_statistics:
        model.spectrum_fitted.fill_(True)
    dead: list[float] = []
    first_elu = next(m for m in model.encoder.modules() if isinstance(m, nn.ELU))
    first_elu.register_forward_hook(lambda m, inp, out: dead.append(float((inp[0] < -3).float().mean())))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    pool, g = melodies(64, 0.64, 1), torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = pool[torch.randint(0, 64, (8,), generator=g)]
        losses = family.losses(x, model(x), adversarial=False)
        opt.zero_grad()
        sum(family.weights[k] * v for k, v in losses.items()).backward()
        opt.step()
    return model.eval(), dead


@pytest.fixture(scope="module")
def trained() -> dict[bool, tuple[SpectralAutoencoder, list[float]]]:
    return {fixed: train(150, fixed) for fixed in (True, False)}


def test_a_briefly_trained_autoencoder_reconstructs_different_clips_differently(trained):
    clips = melodies(8, 1.28, 5)  # tunes it never saw
    real = mean_pair_cosine(clips)
    results = {}
    for fixed, (model, dead) in trained.items():
        with torch.no_grad():
            recon = model(clips).recon
        results[fixed] = dict(cos=mean_pair_cosine(recon), own=nearest_own(recon, clips), dead=max(dead[-20:]),
                              report=autoencoder_diversity(model, clips))
        print(f"fixed statistics {fixed}: reconstructions' log-mel cosine {results[fixed]['cos']:.3f} (clips "
              f"{real:.3f}), nearest their own clip {results[fixed]['own']:.2f}, first ELU inputs below -3 "
              f"{results[fixed]['dead']:.2f}, decoded log-magnitude cosine {results[fixed]['report']['logmag_cos']:.3f}"
              f" (clips {results[fixed]['report']['target_cos']:.3f})")
    fitted, fixed = results[False], results[True]
    assert fitted["cos"] < real + 0.25 and fitted["own"] >= 0.9
    assert fitted["report"]["logmag_cos"] < fitted["report"]["target_cos"] + 0.15
    # today's code before the fix: nearer one spectrum for all, through a first layer mostly in the ELU's flat end
    assert fixed["cos"] > fitted["cos"] and fixed["own"] < 0.9 and fixed["dead"] > 0.5 > fitted["dead"]


def test_the_normalisation_is_fitted_to_the_first_training_batch_and_kept():
    torch.manual_seed(0)
    model = SpectralAutoencoder(SR, 1, **PRESET)
    x, later = melodies(4, 0.64, 2), melodies(4, 0.64, 3)
    unfitted = model.state_dict()
    with torch.no_grad():
        model.eval()(x)  # evaluation does not fit
        assert not bool(model.spectrum_fitted) and float(model.spectrum_mean.mean()) == model.log_mean
        model.train()(x)
        features = model.features(x)
        assert bool(model.spectrum_fitted)
        assert features.mean(dim=(0, 2)).abs().max() < 1e-4 and abs(float(features.std()) - 1) < 1e-3
        mean = model.spectrum_mean.clone()
        model(later)  # kept: later batches do not move it
        assert torch.equal(model.spectrum_mean, mean)
    again = SpectralAutoencoder(SR, 1, **PRESET).eval()
    again.load_state_dict(model.state_dict())  # the statistics travel with the weights (checkpoints, exports)
    with torch.no_grad():
        assert torch.equal(again.decode(model.encode(x)), model.eval().decode(model.encode(x)))
    assert {"spectrum_mean", "spectrum_scale", "spectrum_fitted"} <= set(unfitted)
