"""The Musika family: a spectrogram autoencoder with a continuous latent, and a GAN in that latent space.

``MusikaAutoencoderFamily`` trains ``SpectralAutoencoder`` on audio shards: an L1 between the decoded and the input
(normalised) log-magnitude spectrograms, multi-scale mel + multi-resolution STFT + L1 waveform losses, optionally
adversarial (the codec's waveform discriminators, hinge + feature matching) after ``disc_warmup_steps``. Its latents
are then written once as array shards (``ostinato encode``).

``MusikaFamily`` trains ``MusikaGenerator`` against ``LatentDiscriminator`` on windows of those latents, as
Musika does: hinge losses, an R1 gradient penalty on real latents whose weight adapts (Musika's "switch": the
weight grows by ``gp_rate * gp_max_weight`` per step while the discriminator separates real from fake with a
margin above ``gp_stable_point``, and shrinks otherwise, within ``[0, gp_max_weight]``), and an EMA of the
generator (``ema_modules``). Each batch takes one discriminator step and one generator step on the same fakes;
only the generator step counts as a training step. Fakes come from random style vectors and coordinate windows at
random phases relative to the anchors.

Validation reports the Fréchet distance between real and generated latent frames (``valid/latent_fd``, lower is
better) and the discriminator's mean scores.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ostinato.data.arrays import ArrayBatch, StreamInfo
from ostinato.data.batch import AudioBatch
from ostinato.families.distributed import average_gradients, no_sync
from ostinato.families.base import FamilyModule, plain
from ostinato.families.guard import grads_finite
from ostinato.families.optim import build_optimizer, build_scheduler
from ostinato.metrics.codec import SISNR, MelDistance, MultiScaleSTFTDistance
from ostinato.metrics.fad import FrechetAudioDistance
from ostinato.nn.discriminators import build_discriminator
from ostinato.nn.losses import (MultiScaleMelLoss, MultiScaleSTFTLoss, feature_matching_loss,
                                hinge_discriminator_loss, hinge_generator_loss, l1_waveform)
from ostinato.models.musika import (AutoencoderOutput, LatentDiscriminator, MusikaGenerator, SpectralAutoencoder,
                                window_coordinates)

__all__ = ["MusikaAutoencoderFamily", "MusikaFamily", "AE_WEIGHTS"]

AE_WEIGHTS = {"spec": 1.0, "mel": 1.0, "stft": 1.0, "l1": 0.1, "adv": 1.0, "feat": 1.0}


def _optimizers(module: FamilyModule) -> tuple[Any, Any | None]:
    opts = module.optimizers()
    return (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)


def _raw_step(module: FamilyModule, loss: Tensor, params: list[torch.nn.Parameter], opt: Any) -> None:
    """A discriminator update: backward under ``no_sync``, explicit gradient averaging, clipping, a non-finite
    check, and a step of the raw optimizer (not a training step)."""
    opt.zero_grad(set_to_none=True)
    with no_sync(module):
        module.manual_backward(loss)
    average_gradients(params)
    if module.manual_gradient_clip:
        torch.nn.utils.clip_grad_norm_(params, module.manual_gradient_clip)
    if bool(grads_finite([p.grad for p in params if p.grad is not None])):
        opt.optimizer.step()


def _generator_step(module: FamilyModule, loss: Tensor, params: list[torch.nn.Parameter], opt: Any) -> None:
    opt.zero_grad(set_to_none=True)
    with no_sync(module):
        module.manual_backward(loss)
    average_gradients(params)
    if module.manual_gradient_clip:
        module.clip_gradients(opt, gradient_clip_val=module.manual_gradient_clip, gradient_clip_algorithm="norm")
    opt.step()
    scheduler = module.lr_schedulers()
    if scheduler is not None:
        scheduler.step()


class MusikaAutoencoderFamily(FamilyModule):
    """Trains a ``SpectralAutoencoder`` on ``AudioBatch``es; validation reports mel / STFT distance and SI-SNR.

    Args:
        sample_rate, channels: the audio.
        autoencoder: ``SpectralAutoencoder`` keys (``hop``, ``dimension``, ``n_filters``, ``ratios``, ...).
        loss_weights: ``spec`` (decoded vs input log-magnitudes), ``mel``, ``stft``, ``l1``, ``adv``, ``feat``
            (``adv``/``feat`` only with a discriminator).
        discriminator: ``{kinds: [msstft, ...], <kind>: {...}}`` as for the codec, or None for no GAN.
        disc_warmup_steps: generator steps before the discriminator starts.
    It writes array shards: ``array_streams()`` / ``encode_arrays(wav)`` (stream ``latents``, float16 [D, F]).
    """

    ema_modules = ("autoencoder",)
    array_kind = "musika_autoencoder"

    def __init__(self, sample_rate: int = 24000, channels: int = 1, autoencoder: Mapping[str, Any] | None = None,
                 loss_weights: Mapping[str, float] | None = None, discriminator: Mapping[str, Any] | None = None,
                 disc_warmup_steps: int = 0, mel_n_mels: int = 64, optim: Mapping[str, Any] | None = None,
                 optim_disc: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.automatic_optimization = False
        self._sample_rate, self.channels = int(sample_rate), int(channels)
        self.autoencoder = SpectralAutoencoder(sample_rate, channels, **(plain(autoencoder) or {}))
        self.weights = {**AE_WEIGHTS, **(plain(loss_weights) or {})}
        disc_cfg = dict(plain(discriminator) or {})
        self.discriminator = None
        if disc_cfg:
            kinds = disc_cfg.pop("kinds", ["msstft"])
            self.discriminator = build_discriminator(kinds, channels=channels, **disc_cfg)
        self.disc_warmup_steps = int(disc_warmup_steps)
        self.optim_disc_cfg = plain(optim_disc) or {"name": "adam", "lr": 3e-4, "betas": [0.5, 0.9]}
        # normalized: each scale's L1 on power mels is divided by its window energy, keeping it the size of the
        # log terms rather than hundreds of times the spectrogram loss
        self.mel_loss = MultiScaleMelLoss(sample_rate, n_mels=mel_n_mels, normalized=True)
        self.stft_loss = MultiScaleSTFTLoss(n_ffts=(512, 1024, 2048), hop_lengths=(128, 256, 512),
                                            win_lengths=(512, 1024, 2048), factor_sc=1.0, factor_mag=1.0)
        self.val_mel = MelDistance(sample_rate)
        self.val_stft = MultiScaleSTFTDistance()
        self.val_sisnr = SISNR()

    # -- arrays (ostinato encode) ---------------------------------------------------------------------------------
    def array_streams(self) -> dict[str, StreamInfo]:
        ae = self.autoencoder
        return {"latents": StreamInfo(rate=ae.frame_rate, channels=ae.dimension, dtype="float16")}

    def encode_arrays(self, wav: Tensor) -> dict[str, Tensor]:
        """wav [B, C, T] -> {"latents": [B, D, ceil(T / hop_length)]}."""
        return {"latents": self.autoencoder.encode(wav)}

    # -- training ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 10**9
        opt = build_optimizer(self.autoencoder, self.optim_cfg)
        sched = build_scheduler(opt, self.optim_cfg.get("schedule") or {}, total)
        optimizers = [opt] + ([build_optimizer(self.discriminator, self.optim_disc_cfg)]
                              if self.discriminator is not None else [])
        return optimizers, [sched] if sched else []

    def losses(self, x: Tensor, out: AutoencoderOutput, adversarial: bool) -> dict[str, Tensor]:
        recon = out.recon
        losses = {"spec": F.l1_loss(out.logmag.float(), out.target.float()), "mel": self.mel_loss(recon, x),
                  "stft": self.stft_loss(recon, x), "l1": l1_waveform(recon, x)}
        if adversarial:
            assert self.discriminator is not None
            fake_logits, fake_features = self.discriminator(recon)
            with torch.no_grad():
                _, real_features = self.discriminator(x)
            losses["adv"] = hinge_generator_loss(fake_logits)
            losses["feat"] = feature_matching_loss(real_features, fake_features)
        return {k: v for k, v in losses.items() if self.weights.get(k, 0) > 0}

    def training_step(self, batch: AudioBatch, batch_idx: int) -> None:
        opt_g, opt_d = _optimizers(self)
        x = batch.audio
        out = self.autoencoder(x)
        recon = out.recon
        adversarial = self.discriminator is not None and self.global_step >= self.disc_warmup_steps
        n = len(batch)
        if adversarial:
            assert self.discriminator is not None and opt_d is not None
            real_logits, _ = self.discriminator(x)
            fake_logits, _ = self.discriminator(recon.detach())
            d_loss = hinge_discriminator_loss(real_logits, fake_logits)
            _raw_step(self, d_loss, [p for p in self.discriminator.parameters() if p.requires_grad], opt_d)
            self.log("train/d_loss", d_loss.detach(), batch_size=n)
        losses = self.losses(x, out, adversarial)
        total = sum(self.weights[k] * v for k, v in losses.items())
        _generator_step(self, total, [p for p in self.autoencoder.parameters() if p.requires_grad], opt_g)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=n, prog_bar=name == "mel")
        reconstruction = sum(self.weights[k] * losses[k] for k in ("spec", "mel", "stft", "l1") if k in losses)
        self.log("train/loss", reconstruction.detach(), batch_size=n)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: AudioBatch, prefix: str) -> None:
        valid = batch.lengths > 0
        if not bool(valid.any()):
            return
        x, lengths = batch.audio[valid], batch.lengths[valid]
        recon = self.autoencoder(x).recon
        for metric in (self.val_mel, self.val_stft, self.val_sisnr):
            metric.update(recon, x, lengths)
        n = int(valid.sum())
        self.log(f"{prefix}/mel_distance", self.val_mel, batch_size=n, prog_bar=True)
        self.log(f"{prefix}/stft_distance", self.val_stft, batch_size=n)
        self.log(f"{prefix}/sisnr", self.val_sisnr, batch_size=n)

    def validation_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "valid")

    def test_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def sample_audio(self, batch: AudioBatch) -> dict[str, Tensor]:
        with torch.no_grad():
            return {"original": batch.audio, "reconstruction": self.autoencoder(batch.audio).recon}


class MusikaFamily(FamilyModule):
    """Musika's latent GAN on array shards of autoencoder latents (stream ``latents``).

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

    ema_modules = ("generator",)

    def __init__(self, dimension: int = 64, window: int = 64, generator: Mapping[str, Any] | None = None,
                 discriminator: Mapping[str, Any] | None = None, anchor_spacing: int | None = None,
                 gp_max_weight: float = 10.0, gp_rate: float = 1e-4, gp_stable_point: float = 0.9,
                 autoencoder: str | None = None, optim: Mapping[str, Any] | None = None,
                 optim_disc: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.automatic_optimization = False
        self.dimension, self.window = int(dimension), int(window)
        self.generator = MusikaGenerator(dimension=dimension, **(plain(generator) or {}))
        self.discriminator = LatentDiscriminator(dimension=dimension, **(plain(discriminator) or {}))
        up = self.generator.upsample
        if self.window % up:
            raise ValueError(f"family.window={window} must be a multiple of the generator's upsampling {up} "
                             f"(prod of family.generator.up_ratios)")
        self.coarse_window = self.window // up
        self.anchor_spacing = int(anchor_spacing or self.coarse_window)
        self.gp_max_weight, self.gp_rate, self.gp_stable_point = float(gp_max_weight), float(gp_rate), float(
            gp_stable_point)
        self.register_buffer("gp_weight", torch.tensor(float(gp_max_weight)))
        self.register_buffer("rates", torch.zeros(2))  # latent frames/s and audio sample rate, from the data
        self.autoencoder_ref = None if autoencoder is None else str(autoencoder)
        self.optim_disc_cfg = plain(optim_disc) or {"name": "adam", "lr": 1e-4, "betas": [0.5, 0.9]}
        self.val_fd = FrechetAudioDistance(self.dimension)

    # -- data ----------------------------------------------------------------------------------------------------
    @property
    def frame_rate(self) -> float:
        """Latent frames per second (recorded from the array manifest at setup; 0 before training)."""
        return float(self.rates[0])

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        streams = getattr(dm, "streams", None)
        if dm is None or streams is None:
            return
        if "latents" not in streams:
            raise ValueError(f"MusikaFamily trains on the `latents` stream of Musika autoencoder arrays; the data "
                             f"holds {list(streams)} ({dm.model.kind})")
        info = streams["latents"]
        if info.channels != self.dimension:
            raise ValueError(f"family.dimension={self.dimension} but the latents have {info.channels} channels; "
                             f"set family.dimension={info.channels}")
        frames = round(dm.segment_seconds * info.rate)
        if frames < self.window:
            raise ValueError(f"data.segment_seconds={dm.segment_seconds} gives {frames} latent frames, fewer than "
                             f"family.window={self.window}; set data.segment_seconds>={self.window / info.rate:.3f}")
        self.rates[0], self.rates[1] = float(info.rate), float(dm.model.sample_rate)
        if self.autoencoder_ref is None:
            self.autoencoder_ref = dm.model.id

    def real_windows(self, batch: ArrayBatch) -> Tensor:
        """Random ``window``-frame crops of each item's valid latents: ``[B, D, window]``."""
        x, lengths = batch.arrays["latents"], batch.lengths["latents"]
        out = []
        for item, n in zip(x, lengths.tolist()):
            n = max(min(n, item.shape[-1]), self.window)
            start = int(torch.randint(0, n - self.window + 1, (1,)))
            out.append(item[:, start:start + self.window])
        return torch.stack(out)

    def sample_noise(self, batch: int, generator: torch.Generator | None = None,
                     truncation: float | None = None) -> tuple[Tensor, Tensor]:
        """Coordinates of one window per item at a random phase relative to its anchors, with the generator's
        halo, and style vectors: ``([B, coord_dim, coarse_window + 2 halo], [B, style_dim])``."""
        from ostinato.models.musika import truncated_normal

        g, device = self.generator, self.gp_weight.device
        h, spacing = g.halo, self.anchor_spacing
        span = self.coarse_window + 2 * h
        n_anchors = (spacing + span) // spacing + 2
        rows = []
        for _ in range(batch):
            anchors = truncated_normal((1, g.coord_dim, n_anchors), truncation, generator).to(device)
            phase = int(torch.randint(0, spacing, (1,), generator=generator))
            rows.append(window_coordinates(anchors, spacing, [phase + h], self.coarse_window, h))
        style = truncated_normal((batch, g.style_dim), truncation, generator).to(device)
        return torch.cat(rows), style

    def fake_windows(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        coords, style = self.sample_noise(batch, generator)
        return self.generator.windows(coords, style)

    # -- training ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 10**9
        opt_g = build_optimizer(self.generator, self.optim_cfg)
        sched = build_scheduler(opt_g, self.optim_cfg.get("schedule") or {}, total)
        return [opt_g, build_optimizer(self.discriminator, self.optim_disc_cfg)], [sched] if sched else []

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
        opt_g, opt_d = _optimizers(self)
        assert opt_d is not None
        real = self.real_windows(batch)
        fake = self.fake_windows(real.shape[0])
        n = real.shape[0]
        # discriminator: hinge + adaptive R1 on the real windows
        d_real, r1 = self.r1_penalty(real)
        d_fake = self.discriminator(fake.detach())
        d_hinge = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
        weight = self.gp_weight.detach().clone()
        _raw_step(self, d_hinge + weight * r1, [p for p in self.discriminator.parameters() if p.requires_grad], opt_d)
        certainty = self.adapt_gp_weight(d_real, d_fake)
        # generator
        g_loss = -self.discriminator(fake).mean()
        _generator_step(self, g_loss, [p for p in self.generator.parameters() if p.requires_grad], opt_g)
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
        lengths = batch.lengths["latents"]
        valid = lengths >= self.window
        if not bool(valid.any()):
            return
        x = batch.arrays["latents"][valid]
        frames = torch.cat([item[:, :n].T for item, n in zip(x, lengths[valid].tolist())])
        real = torch.stack([item[:, :self.window] for item in x])
        fake = self.fake_windows(real.shape[0], torch.Generator().manual_seed(batch_idx))
        self.val_fd.update(frames, real=True)
        self.val_fd.update(fake.transpose(1, 2).reshape(-1, self.dimension), real=False)
        n = real.shape[0]
        self.log(f"{prefix}/latent_fd", self.val_fd, batch_size=n, prog_bar=True)
        self.log(f"{prefix}/d_real", self.discriminator(real).mean(), batch_size=n, sync_dist=True)
        self.log(f"{prefix}/d_fake", self.discriminator(fake).mean(), batch_size=n, sync_dist=True)

    def validation_step(self, batch: ArrayBatch, batch_idx: int) -> None:
        self._evaluate(batch, "valid", batch_idx)

    def test_step(self, batch: ArrayBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def sample_audio(self, batch: ArrayBatch) -> dict[str, Tensor]:
        """Generated windows decoded by the autoencoder (when one is known)."""
        if self.autoencoder_ref is None:
            return {}
        from ostinato.generation.musika import load_autoencoder

        ae = load_autoencoder(self.autoencoder_ref).to(self.gp_weight.device)
        with torch.no_grad():
            return {"generated": ae.decode(self.fake_windows(min(len(batch), 2)))}
