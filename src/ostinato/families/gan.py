"""``GANFamily``: the one GAN training step that the codec and Musika families share; ``WaveformGANFamily``: the
reconstruction GANs among them (codec, Musika autoencoder), whose model reconstructs waveforms.

A GAN family trains ``self.model`` (the generator side: a codec, an autoencoder, a latent generator) against
``self.discriminator`` by manual optimisation: each batch takes one discriminator update (``discriminator_step``)
and one generator update (``generator_step``). Only the generator update counts as a training step (the
discriminator's optimizer is stepped directly), so ``trainer.max_steps``, schedules and warm-ups are all in
generator steps. Backward passes run under DDP's ``no_sync`` and gradients are averaged explicitly before each
update (``ostinato.families.distributed``); a discriminator update with non-finite gradients is skipped.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ostinato.data.batch import AudioBatch
from ostinato.families.base import FamilyModule, plain
from ostinato.families.distributed import average_gradients, no_sync
from ostinato.families.guard import grads_finite
from ostinato.families.optim import build_optimizer, build_scheduler
from ostinato.metrics.codec import SISNR, MelDistance, MultiScaleSTFTDistance
from ostinato.nn.losses import feature_matching_loss, hinge_discriminator_loss, hinge_generator_loss

DISC_OPTIM = {"name": "adam", "lr": 3e-4, "betas": [0.5, 0.9]}


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class GANFamily(FamilyModule):
    """Base of the GAN families: ``self.model`` is the generator side, ``self.discriminator`` (None: no GAN, the
    model trains on its reconstruction losses alone) the critic, optimised with ``optim`` and ``optim_disc``.

    ``disc_warmup_steps``: generator steps before the discriminator starts (``adversarial()``).
    """

    discriminator: nn.Module | None

    def __init__(self, optim: Mapping[str, Any] | None = None, optim_disc: Mapping[str, Any] | None = None,
                 disc_warmup_steps: int = 0, default_optim_disc: Mapping[str, Any] = DISC_OPTIM) -> None:
        super().__init__(optim)
        self.automatic_optimization = False
        self.optim_disc_cfg: dict[str, Any] = plain(optim_disc) or dict(default_optim_disc)
        self.disc_warmup_steps = int(disc_warmup_steps)

    def configure_optimizers(self) -> Any:
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 10**9
        opt_g = build_optimizer(self.model, self.optim_cfg)
        sched = build_scheduler(opt_g, self.optim_cfg.get("schedule") or {}, total)
        optimizers = [opt_g] + ([build_optimizer(self.discriminator, self.optim_disc_cfg)]
                                if self.discriminator is not None else [])
        return optimizers, [sched] if sched else []

    def gan_optimizers(self) -> tuple[Any, Any | None]:
        """(generator optimizer, discriminator optimizer or None)."""
        opts = self.optimizers()
        return (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)

    def adversarial(self) -> bool:
        """Whether this step trains against the discriminator (there is one, and its warm-up is over)."""
        return self.discriminator is not None and self.global_step >= self.disc_warmup_steps

    # -- the two updates -----------------------------------------------------------------------------------------
    def discriminator_step(self, loss: Tensor, opt_d: Any) -> None:
        """One discriminator update from ``loss``: backward, averaging, clipping, a non-finite check, and a step of
        the raw optimizer (not a training step)."""
        assert self.discriminator is not None
        params = _trainable(self.discriminator)
        opt_d.zero_grad(set_to_none=True)
        with no_sync(self):
            self.manual_backward(loss)
        average_gradients(params)
        if self.manual_gradient_clip:
            torch.nn.utils.clip_grad_norm_(params, self.manual_gradient_clip)
        if bool(grads_finite([p.grad for p in params if p.grad is not None])):
            opt_d.optimizer.step()

    def generator_step(self, opt_g: Any, loss: Tensor | Callable[[], None]) -> None:
        """One generator update (a training step): ``loss`` is backpropagated, or called when it is the backward
        itself (e.g. the balancer's); then averaging, clipping, the step and the schedule."""
        opt_g.zero_grad(set_to_none=True)
        with no_sync(self):
            loss() if callable(loss) else self.manual_backward(loss)
        average_gradients(_trainable(self.model))
        if self.manual_gradient_clip:
            self.clip_gradients(opt_g, gradient_clip_val=self.manual_gradient_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()


class WaveformGANFamily(GANFamily):
    """A GAN family whose model reconstructs waveforms (``model(x).recon``, [B, C, T] -> [B, C, T]), judged by
    waveform discriminators that return ``(logits, features)`` (``ostinato.nn.discriminators``): hinge losses and
    feature matching. Validation and test report mel distance, MS-STFT distance and SI-SNR; samples are the
    original and its reconstruction. Subclasses call ``track_reconstruction()`` once ``self.model`` is built."""

    weights: dict[str, float]  # loss name -> weight; a loss of weight 0 is not computed into the total

    def track_reconstruction(self) -> None:
        self.val_mel = MelDistance(self.model.sample_rate)
        self.val_stft = MultiScaleSTFTDistance()
        self.val_sisnr = SISNR()

    # -- the adversarial losses ----------------------------------------------------------------------------------
    def reconstruct(self, batch: AudioBatch) -> tuple[Any, bool, Any]:
        """The start of a training step: the model's output on ``batch.audio`` and, when ``adversarial()``, the
        discriminator's update on it -> ``(output, adversarial, generator optimizer)``."""
        opt_g, opt_d = self.gan_optimizers()
        out = self.model(batch.audio)
        return out, self.discriminator_update(batch.audio, out.recon, opt_d, len(batch)), opt_g

    def weighted(self, losses: dict[str, Tensor], real: Tensor, fake: Tensor,
                 adversarial: bool) -> dict[str, Tensor]:
        """``losses`` plus, when ``adversarial``, ``adv`` and ``feat``: those of a weight above 0."""
        if adversarial:
            losses = {**losses, **self.adversarial_losses(real, fake)}
        return {k: v for k, v in losses.items() if self.weights.get(k, 0) > 0}

    def discriminator_update(self, real: Tensor, fake: Tensor, opt_d: Any, batch_size: int) -> bool:
        """When ``adversarial()``: one update of the discriminator's hinge loss on ``real`` and (detached)
        ``fake`` waveforms [B, C, T], logged as ``train/d_loss``. Returns whether it ran."""
        if not self.adversarial():
            return False
        assert self.discriminator is not None
        real_logits, _ = self.discriminator(real)
        fake_logits, _ = self.discriminator(fake.detach())
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        self.discriminator_step(loss, opt_d)
        self.log("train/d_loss", loss.detach(), batch_size=batch_size)
        return True

    def adversarial_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """The generator's ``adv`` (hinge) and ``feat`` (feature matching to ``real``) losses for ``fake``."""
        assert self.discriminator is not None
        fake_logits, fake_features = self.discriminator(fake)
        with torch.no_grad():
            _, real_features = self.discriminator(real)
        return {"adv": hinge_generator_loss(fake_logits), "feat": feature_matching_loss(real_features, fake_features)}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: AudioBatch, prefix: str) -> None:
        valid = batch.lengths > 0
        if not bool(valid.any()):
            return
        x, lengths = batch.audio[valid], batch.lengths[valid]
        out = self.model(x)
        for metric in (self.val_mel, self.val_stft, self.val_sisnr):
            metric.update(out.recon, x, lengths)
        n = int(valid.sum())
        self.log(f"{prefix}/mel_distance", self.val_mel, batch_size=n, prog_bar=True)
        self.log(f"{prefix}/stft_distance", self.val_stft, batch_size=n)
        self.log(f"{prefix}/sisnr", self.val_sisnr, batch_size=n)
        self.evaluate_output(out, lengths, prefix)

    def evaluate_output(self, out: Any, lengths: Tensor, prefix: str) -> None:
        """What a subclass measures beyond the reconstruction on the model's output for an evaluation batch
        (``lengths`` [B] in samples); nothing here."""

    def validation_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "valid")

    def test_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def sample_audio(self, batch: AudioBatch) -> dict[str, Tensor]:
        with torch.no_grad():
            return {"original": batch.audio, "reconstruction": self.model(batch.audio).recon}
