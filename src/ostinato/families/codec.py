"""The neural audio codec family (EnCodec/SoundStream): SEANet + residual VQ, trained as a GAN.

Manual optimisation: each batch takes one discriminator step (after ``disc_warmup_steps``) and one generator
step. Only the generator step counts as a training step (the discriminator's optimizer is stepped directly),
so ``trainer.max_steps``, schedules and warm-ups are all in generator steps. Backward passes run under DDP's
``no_sync`` and gradients are averaged explicitly (see ``ostinato.families.distributed``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ostinato.data.batch import AudioBatch
from ostinato.families.distributed import average_gradients, no_sync
from ostinato.families.base import FamilyModule, plain
from ostinato.families.guard import grads_finite
from ostinato.families.optim import build_optimizer, build_scheduler
from ostinato.metrics.codec import SISNR, MelDistance, MultiScaleSTFTDistance
from ostinato.nn.balancer import Balancer
from ostinato.models.codec import Codec
from ostinato.nn.discriminators import build_discriminator
from ostinato.nn.losses import (MultiScaleMelLoss, feature_matching_loss, hinge_discriminator_loss,
                                hinge_generator_loss, l1_waveform)

DEFAULT_WEIGHTS = {"l1": 0.1, "mel": 1.0, "adv": 3.0, "feat": 3.0}


class CodecFamily(FamilyModule):
    """Trains a ``Codec`` on ``AudioBatch``es; validation reports mel distance, MS-STFT distance and SI-SNR."""

    ema_modules = ("codec.encoder", "codec.decoder")  # codebooks keep their own EMA; never the discriminator

    def __init__(self, sample_rate: int = 24000, channels: int = 1, codec: Mapping[str, Any] | None = None,
                 discriminator: Mapping[str, Any] | None = None, loss_weights: Mapping[str, float] | None = None,
                 commitment_weight: float = 1.0, balancer: bool = True, disc_warmup_steps: int = 0,
                 mel_n_mels: int = 64, optim: Mapping[str, Any] | None = None,
                 optim_disc: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.automatic_optimization = False
        self._sample_rate, self.channels = sample_rate, channels
        self.codec = Codec.from_config(sample_rate=sample_rate, channels=channels, **(plain(codec) or {}))
        self.weights = {**DEFAULT_WEIGHTS, **(plain(loss_weights) or {})}
        self.adversarial = self.weights.get("adv", 0) > 0 or self.weights.get("feat", 0) > 0
        disc_cfg = dict(plain(discriminator) or {})
        kinds = disc_cfg.pop("kinds", ["msstft"])
        self.discriminator = build_discriminator(kinds, channels=channels, **disc_cfg) if self.adversarial else None
        self.mel_loss = MultiScaleMelLoss(sample_rate, n_mels=mel_n_mels)
        self.balancer = Balancer({k: w for k, w in self.weights.items()}) if balancer else None
        self.commitment_weight, self.disc_warmup_steps = commitment_weight, disc_warmup_steps
        self.optim_disc_cfg = plain(optim_disc) or {"name": "adam", "lr": 3e-4, "betas": [0.5, 0.9]}
        self.val_mel = MelDistance(sample_rate)
        self.val_stft = MultiScaleSTFTDistance()
        self.val_sisnr = SISNR()

    # -- optimisers ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 10**9
        opt_g = build_optimizer(self.codec, self.optim_cfg)
        optimizers, schedulers = [opt_g], []
        sched = build_scheduler(opt_g, self.optim_cfg.get("schedule") or {}, total)
        if sched:
            schedulers.append(sched)
        if self.discriminator is not None:
            optimizers.append(build_optimizer(self.discriminator, self.optim_disc_cfg))
        return optimizers, schedulers

    # -- training -----------------------------------------------------------------------------------------------
    def _discriminator_step(self, x: torch.Tensor, recon: torch.Tensor, opt_d: Any) -> torch.Tensor:
        real_logits, _ = self.discriminator(x)
        fake_logits, _ = self.discriminator(recon.detach())
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        opt_d.zero_grad(set_to_none=True)
        with no_sync(self):
            self.manual_backward(loss)
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        average_gradients(params)
        if self.manual_gradient_clip:
            torch.nn.utils.clip_grad_norm_(params, self.manual_gradient_clip)
        if bool(grads_finite([p.grad for p in params if p.grad is not None])):
            opt_d.optimizer.step()  # the raw optimizer: a discriminator step is not a training step
        return loss.detach()

    def _generator_losses(self, x: torch.Tensor, recon: torch.Tensor, adversarial: bool) -> dict[str, torch.Tensor]:
        losses = {"l1": l1_waveform(recon, x), "mel": self.mel_loss(recon, x)}
        if adversarial:
            fake_logits, fake_features = self.discriminator(recon)
            with torch.no_grad():
                _, real_features = self.discriminator(x)
            losses["adv"] = hinge_generator_loss(fake_logits)
            losses["feat"] = feature_matching_loss(real_features, fake_features)
        return {k: v for k, v in losses.items() if self.weights.get(k, 0) > 0}

    def training_step(self, batch: AudioBatch, batch_idx: int) -> None:
        optimizers = self.optimizers()
        opt_g = optimizers[0] if isinstance(optimizers, list) else optimizers
        x = batch.audio
        out = self.codec(x)
        adversarial = self.discriminator is not None and self.global_step >= self.disc_warmup_steps
        if adversarial:
            self.log("train/d_loss", self._discriminator_step(x, out.recon, optimizers[1]), batch_size=len(batch))
        losses = self._generator_losses(x, out.recon, adversarial)
        opt_g.zero_grad(set_to_none=True)
        commitment = self.commitment_weight * out.penalty if out.penalty.requires_grad else None
        with no_sync(self):  # one backward: the balanced reconstruction losses plus the VQ commitment
            if self.balancer is not None:
                self.balancer.backward(losses, out.recon, extra_loss=commitment, backward_fn=self.manual_backward)
            else:
                total = sum(self.weights[k] * v for k, v in losses.items())
                self.manual_backward(total + commitment if commitment is not None else total)
        average_gradients([p for p in self.codec.parameters() if p.requires_grad])
        if self.manual_gradient_clip:
            self.clip_gradients(opt_g, gradient_clip_val=self.manual_gradient_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        n = len(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=n, prog_bar=name == "mel")
        self.log("train/commitment", out.penalty.detach(), batch_size=n)
        self.log("train/loss", losses["mel"].detach() if "mel" in losses else sum(losses.values()).detach(),
                 batch_size=n)
        for name, value in (out.metrics or {}).items():
            self.log(f"train/vq/{name}", torch.as_tensor(value, dtype=torch.float32), batch_size=n)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.balancer is not None:
            checkpoint["balancer"] = self.balancer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.balancer is not None and "balancer" in checkpoint:
            self.balancer.load_state_dict(checkpoint["balancer"])

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _evaluate(self, batch: AudioBatch, prefix: str) -> None:
        recon = self.codec(batch.audio).recon
        valid = batch.lengths > 0
        if not bool(valid.any()):
            return
        x, y, lengths = batch.audio[valid], recon[valid], batch.lengths[valid]
        self.val_mel.update(y, x, lengths)
        self.val_stft.update(y, x, lengths)
        self.val_sisnr.update(y, x, lengths)
        n = int(valid.sum())
        self.log(f"{prefix}/mel_distance", self.val_mel, batch_size=n, prog_bar=True)
        self.log(f"{prefix}/stft_distance", self.val_stft, batch_size=n)
        self.log(f"{prefix}/sisnr", self.val_sisnr, batch_size=n)

    def validation_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "valid")

    def test_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def sample_audio(self, batch: AudioBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"original": batch.audio, "reconstruction": self.codec(batch.audio).recon}
