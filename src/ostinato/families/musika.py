"""The Musika family: a spectrogram autoencoder with a continuous latent, and a GAN in that latent space.

``MusikaAutoencoderFamily`` trains ``SpectralAutoencoder`` (``self.model``) on audio shards: an L1 between the
decoded and the input (normalised) log-magnitude spectrograms, multi-scale mel + multi-resolution STFT + L1 waveform
losses, optionally adversarial (the codec's waveform discriminators, hinge + feature matching) after
``disc_warmup_steps``. Its latents are then written once as array shards (``ostinato encode``).

``MusikaFamily`` trains ``Musika`` (``self.model``: the generator and its windows) against ``LatentDiscriminator``
on windows of those latents, as Musika does: hinge losses, an R1 gradient penalty on real latents whose weight
adapts (Musika's "switch": the weight grows by ``gp_rate * gp_max_weight`` per step while the discriminator
separates real from fake with a margin above ``gp_stable_point``, and shrinks otherwise, within
``[0, gp_max_weight]``), and an EMA of the generator (``ema_modules``). Each batch takes one discriminator step and
one generator step on the same fakes (``ostinato.families.gan``); only the generator step counts as a training
step. Fakes come from random style vectors and coordinate windows at random phases relative to the anchors.

Validation reports the Fréchet distance between real and generated latent frames (``valid/latent_fd``, lower is
better), the discriminator's mean scores, and ``valid/diversity``: the std of generated windows across their noise
over that of real windows across items (about 1 when the generator varies as much as the data, ~0 when it
collapsed to one output whatever its seed).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ostinato.data.arrays import ArrayBatch
from ostinato.data.batch import AudioBatch
from ostinato.errors import DataMismatch
from ostinato.families.base import plain
from ostinato.families.gan import GANFamily, WaveformGANFamily
from ostinato.metrics.fad import FrechetAudioDistance
from ostinato.models.musika import AutoencoderOutput, Musika, SpectralAutoencoder
from ostinato.nn.discriminators import LatentDiscriminator, build_discriminator
from ostinato.nn.losses import MultiScaleMelLoss, MultiScaleSTFTLoss, l1_waveform

__all__ = ["MusikaAutoencoderFamily", "MusikaFamily", "AE_WEIGHTS"]

AE_WEIGHTS = {"spec": 1.0, "mel": 1.0, "stft": 1.0, "l1": 0.1, "adv": 1.0, "feat": 1.0, "saturation": 1.0}
SATURATION_LIMIT = 1.5  # |pre-tanh| above which the latents' saturation is penalised (tanh(1.5) = 0.905)


def saturation_loss(pre: Tensor, limit: float = SATURATION_LIMIT) -> Tensor:
    """pre [B, D, L] (the encoder's output before the tanh) -> mean of ``relu(|pre| - limit)^2``.

    Why: the decoder hears larger latents better, so without this the encoder drives them into the tanh's flat
    ends, where only their sign survives and no gradient flows back: every clip encodes to nearly the same +-1
    pattern and decodes to the same steady buzz, which the latent GAN then learns whatever its seed.
    """
    return F.relu(pre.float().abs() - limit).square().mean()


class MusikaAutoencoderFamily(WaveformGANFamily):
    """Trains a ``SpectralAutoencoder`` (``self.model``; rate and channels are its own) on ``AudioBatch``es;
    validation reports mel / STFT distance and SI-SNR.

    Args:
        sample_rate, channels: the audio.
        autoencoder: ``SpectralAutoencoder`` keys (``hop``, ``dimension``, ``n_filters``, ``ratios``, ...).
        loss_weights: ``spec`` (decoded vs input log-magnitudes), ``mel``, ``stft``, ``l1``, ``adv``, ``feat``
            (``adv``/``feat`` only with a discriminator).
        discriminator: ``{kinds: [msstft, ...], <kind>: {...}}`` as for the codec, or None for no GAN.
        disc_warmup_steps: generator steps before the discriminator starts.
    The model writes array shards (``ostinato encode``): stream ``latents``, float16 [D, F]. Its spectrum
    normalisation is fitted to the first training batch (``SpectralAutoencoder.fit_spectrum_``), so the EMA averages
    the encoder and the decoder only: an average with the unfitted statistics would mean nothing.
    """

    ema_modules = ("model.encoder", "model.decoder")

    def __init__(self, sample_rate: int = 24000, channels: int = 1, autoencoder: Mapping[str, Any] | None = None,
                 loss_weights: Mapping[str, float] | None = None, discriminator: Mapping[str, Any] | None = None,
                 disc_warmup_steps: int = 0, mel_n_mels: int = 64, optim: Mapping[str, Any] | None = None,
                 optim_disc: Mapping[str, Any] | None = None):
        super().__init__(optim, optim_disc, disc_warmup_steps)
        self.model = SpectralAutoencoder(sample_rate, channels, **(plain(autoencoder) or {}))
        self.weights = {**AE_WEIGHTS, **(plain(loss_weights) or {})}
        disc_cfg = dict(plain(discriminator) or {})
        self.discriminator = None
        if disc_cfg:
            kinds = disc_cfg.pop("kinds", ["msstft"])
            self.discriminator = build_discriminator(kinds, channels=self.model.channels, **disc_cfg)
        # normalized: each scale's L1 on power mels is divided by its window energy, keeping it the size of the
        # log terms rather than hundreds of times the spectrogram loss
        self.mel_loss = MultiScaleMelLoss(self.model.sample_rate, n_mels=mel_n_mels, normalized=True)
        self.stft_loss = MultiScaleSTFTLoss(n_ffts=(512, 1024, 2048), hop_lengths=(128, 256, 512),
                                            win_lengths=(512, 1024, 2048), factor_sc=1.0, factor_mag=1.0)
        self.track_reconstruction()

    # -- training ------------------------------------------------------------------------------------------------
    def losses(self, x: Tensor, out: AutoencoderOutput, adversarial: bool) -> dict[str, Tensor]:
        recon = out.recon
        losses = {"spec": F.l1_loss(out.logmag.float(), out.target.float()), "mel": self.mel_loss(recon, x),
                  "stft": self.stft_loss(recon, x), "l1": l1_waveform(recon, x), "saturation": saturation_loss(out.pre)}
        return self.weighted(losses, x, recon, adversarial)

    def training_step(self, batch: AudioBatch, batch_idx: int) -> None:
        out, adversarial, opt_g = self.reconstruct(batch)
        x, n = batch.audio, len(batch)
        losses = self.losses(x, out, adversarial)
        self.generator_step(opt_g, sum(self.weights[k] * v for k, v in losses.items()))
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=n, prog_bar=name == "mel")
        reconstruction = sum(self.weights[k] * losses[k] for k in ("spec", "mel", "stft", "l1") if k in losses)
        self.log("train/loss", reconstruction.detach(), batch_size=n)


class MusikaFamily(GANFamily):
    """Musika's latent GAN on array shards of autoencoder latents (stream ``latents``): trains ``Musika``
    (``self.model``) against a ``LatentDiscriminator``.

    Args:
        dimension: latent size D (checked against the array manifest at setup).
        window: latent frames per generated window (a multiple of the generator's ``upsample``); the data crops
            (``data.segment_seconds``) must hold at least this many frames.
        generator: ``MusikaGenerator`` keys (``coord_dim``, ``style_dim``, ``channels``, ``up_ratios``, ...).
        discriminator: ``LatentDiscriminator`` keys (``channels``, ``kernel_size``, ``norm``).
        anchor_spacing: coordinate steps between anchors (default: one window).
        gp_max_weight, gp_rate, gp_stable_point: the adaptive R1 penalty (see module docstring).
        autoencoder: the autoencoder that decodes the latents (anything ``ostinato.load`` takes); None = the one
            recorded in the array shards' manifest.
    """

    ema_modules = ("model.generator",)

    def __init__(self, dimension: int = 64, window: int = 64, generator: Mapping[str, Any] | None = None,
                 discriminator: Mapping[str, Any] | None = None, anchor_spacing: int | None = None,
                 gp_max_weight: float = 10.0, gp_rate: float = 1e-4, gp_stable_point: float = 0.9,
                 autoencoder: str | None = None, optim: Mapping[str, Any] | None = None,
                 optim_disc: Mapping[str, Any] | None = None):
        super().__init__(optim, optim_disc, default_optim_disc={"name": "adam", "lr": 1e-4, "betas": [0.5, 0.9]})
        self.model = Musika.build(dimension, window, plain(generator), anchor_spacing,
                                  None if autoencoder is None else str(autoencoder))
        self.discriminator = LatentDiscriminator(dimension=self.model.dimension, **(plain(discriminator) or {}))
        self.gp_max_weight, self.gp_rate, self.gp_stable_point = float(gp_max_weight), float(gp_rate), float(
            gp_stable_point)
        self.register_buffer("gp_weight", torch.tensor(float(gp_max_weight)))
        self.val_fd = FrechetAudioDistance(self.model.dimension)

    # -- data ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        streams = getattr(dm, "streams", None)
        if dm is None or streams is None:
            return
        if "latents" not in streams:
            raise DataMismatch(f"MusikaFamily trains on the `latents` stream of Musika autoencoder arrays; the data "
                             f"holds {list(streams)} ({dm.model.kind})")
        info, window = streams["latents"], self.model.window
        if info.channels != self.model.dimension:
            raise DataMismatch(f"family.dimension={self.model.dimension} but the latents have {info.channels} "
                             f"channels; set family.dimension={info.channels}")
        frames = round(dm.segment_seconds * info.rate)
        if frames < window:
            raise ValueError(f"data.segment_seconds={dm.segment_seconds} gives {frames} latent frames, fewer than "
                             f"family.window={window}; set data.segment_seconds>={window / info.rate:.3f}")
        self.model.latent_rate.fill_(float(info.rate))
        if self.model.autoencoder_ref is None:
            self.model.autoencoder_ref = dm.model.id

    def real_windows(self, batch: ArrayBatch) -> Tensor:
        """Random ``window``-frame crops of each item's valid latents: ``[B, D, window]``."""
        x, lengths, window = batch.arrays["latents"], batch.lengths["latents"], self.model.window
        out = []
        for item, n in zip(x, lengths.tolist()):
            n = max(min(n, item.shape[-1]), window)
            start = int(torch.randint(0, n - window + 1, (1,)))
            out.append(item[:, start:start + window])
        return torch.stack(out)

    # -- training ------------------------------------------------------------------------------------------------
    def r1_penalty(self, real: Tensor) -> tuple[Tensor, Tensor]:
        """(logits of ``real``, mean over items of ``|grad_x sum D(x)|^2``), differentiable for the D update."""
        real = real.detach().requires_grad_(True)
        logits = self.discriminator(real)
        (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
        return logits, grad.pow(2).sum(dim=(1, 2)).mean()

    @torch.no_grad()
    def adapt_gp_weight(self, d_real: Tensor, d_fake: Tensor) -> Tensor:
        """Musika's switch: how surely D separates real from fake (``clamp(mean D(real) - mean D(fake), 0, 2) /
        2``, averaged over ranks) above ``gp_stable_point`` raises the R1 weight, below it lowers it."""
        gap = torch.stack([d_real.mean() - d_fake.mean()]).detach().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(gap)
            gap /= dist.get_world_size()
        certainty = gap.clamp(0.0, 2.0)[0] / 2.0
        step = self.gp_rate * self.gp_max_weight
        delta = step if float(certainty) > self.gp_stable_point else -step
        self.gp_weight.copy_((self.gp_weight + delta).clamp(0.0, self.gp_max_weight))
        return certainty

    def training_step(self, batch: ArrayBatch, batch_idx: int) -> None:
        opt_g, opt_d = self.gan_optimizers()
        real = self.real_windows(batch)
        fake = self.model.random_windows(real.shape[0])
        n = real.shape[0]
        # discriminator: hinge + adaptive R1 on the real windows
        d_real, r1 = self.r1_penalty(real)
        d_fake = self.discriminator(fake.detach())
        d_hinge = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
        weight = self.gp_weight.detach().clone()
        self.discriminator_step(d_hinge + weight * r1, opt_d)
        certainty = self.adapt_gp_weight(d_real, d_fake)
        # generator
        g_loss = -self.discriminator(fake).mean()
        self.generator_step(opt_g, g_loss)
        self.discriminator.zero_grad(set_to_none=True)  # the generator's backward also reached D's parameters
        self.log("train/d_loss", d_hinge.detach(), batch_size=n)
        self.log("train/g_loss", g_loss.detach(), batch_size=n, prog_bar=True)
        self.log("train/loss", (d_hinge + g_loss).detach(), batch_size=n)
        self.log("train/r1", r1.detach(), batch_size=n)
        self.log("train/gp_weight", weight, batch_size=n)
        self.log("train/d_certainty", certainty, batch_size=n)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: ArrayBatch, prefix: str, batch_idx: int) -> None:
        """Real latent frames vs generated windows (the same noise at every evaluation, so the curve compares)."""
        lengths, window = batch.lengths["latents"], self.model.window
        valid = lengths >= window
        if not bool(valid.any()):
            return
        x = batch.arrays["latents"][valid]
        frames = torch.cat([item[:, :n].T for item, n in zip(x, lengths[valid].tolist())])
        real = torch.stack([item[:, :window] for item in x])
        fake = self.model.random_windows(real.shape[0], torch.Generator().manual_seed(batch_idx))
        self.val_fd.update(frames, real=True)
        self.val_fd.update(fake.transpose(1, 2).reshape(-1, self.model.dimension), real=False)
        n = real.shape[0]
        self.log(f"{prefix}/latent_fd", self.val_fd, batch_size=n, prog_bar=True)
        self.log(f"{prefix}/d_real", self.discriminator(real).mean(), batch_size=n, sync_dist=True)
        self.log(f"{prefix}/d_fake", self.discriminator(fake).mean(), batch_size=n, sync_dist=True)
        if n > 1:  # how much windows from different noise differ, against real windows: ~0 is a collapsed GAN
            diversity = fake.std(dim=0).mean() / real.std(dim=0).mean().clamp_min(1e-8)
            self.log(f"{prefix}/diversity", diversity, batch_size=n, sync_dist=True)

    def validation_step(self, batch: ArrayBatch, batch_idx: int) -> None:
        self._evaluate(batch, "valid", batch_idx)

    def test_step(self, batch: ArrayBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def sample_audio(self, batch: ArrayBatch) -> dict[str, Tensor]:
        """Generated windows decoded by the autoencoder (when one is known)."""
        if self.model.autoencoder_ref is None:
            return {}
        with torch.no_grad():
            return {"generated": self.model.decode(self.model.random_windows(min(len(batch), 2)))}
