"""The neural audio codec family (EnCodec/SoundStream): trains ``ostinato.models.codec.Codec`` (``self.model``)
as a GAN against waveform discriminators, with the one GAN step of ``ostinato.families.gan``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ostinato.data.batch import AudioBatch
from ostinato.families.base import plain
from ostinato.families.gan import WaveformGANFamily
from ostinato.metrics.codebooks import CodePerplexity
from ostinato.models.codec import Codec, CodecOutput
from ostinato.nn.balancer import Balancer
from ostinato.nn.discriminators import build_discriminator
from ostinato.nn.losses import MultiScaleMelLoss, l1_waveform

DEFAULT_WEIGHTS = {"l1": 0.1, "mel": 1.0, "adv": 3.0, "feat": 3.0}


class CodecFamily(WaveformGANFamily):
    """Trains a ``Codec`` (``self.model``; rate and channels are its own) on ``AudioBatch``es; validation reports
    mel distance, MS-STFT distance, SI-SNR and each RVQ stage's codebook perplexity over the whole validation set
    (``valid/perplexity_q{k}``: near 1 is a collapsed codebook, ``card`` every code used equally)."""

    ema_modules = ("model.encoder", "model.decoder")  # codebooks keep their own EMA; never the discriminator

    def __init__(self, sample_rate: int = 24000, channels: int = 1, codec: Mapping[str, Any] | None = None,
                 discriminator: Mapping[str, Any] | None = None, loss_weights: Mapping[str, float] | None = None,
                 commitment_weight: float = 1.0, balancer: bool = True, disc_warmup_steps: int = 0,
                 mel_n_mels: int = 64, optim: Mapping[str, Any] | None = None,
                 optim_disc: Mapping[str, Any] | None = None):
        super().__init__(optim, optim_disc, disc_warmup_steps)
        self.model = Codec.build(sample_rate=sample_rate, channels=channels, **(plain(codec) or {}))
        self.weights = {**DEFAULT_WEIGHTS, **(plain(loss_weights) or {})}
        disc_cfg = dict(plain(discriminator) or {})
        kinds = disc_cfg.pop("kinds", ["msstft"])
        adversarial = self.weights.get("adv", 0) > 0 or self.weights.get("feat", 0) > 0
        self.discriminator = build_discriminator(kinds, channels=self.model.channels, **disc_cfg) \
            if adversarial else None
        self.mel_loss = MultiScaleMelLoss(self.model.sample_rate, n_mels=mel_n_mels)
        self.balancer = Balancer(dict(self.weights)) if balancer else None
        self.commitment_weight = commitment_weight
        self.track_reconstruction()
        self.val_perplexity = nn.ModuleList([CodePerplexity(self.model.card) for _ in range(self.model.n_q)])

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: AudioBatch, batch_idx: int) -> None:
        out, adversarial, opt_g = self.reconstruct(batch)
        x, n = batch.audio, len(batch)
        losses = self.weighted({"l1": l1_waveform(out.recon, x), "mel": self.mel_loss(out.recon, x)}, x, out.recon,
                               adversarial)
        commitment = self.commitment_weight * out.penalty if out.penalty.requires_grad else None

        def backward() -> None:  # one backward: the balanced reconstruction losses plus the VQ commitment
            if self.balancer is not None:
                self.balancer.backward(losses, out.recon, extra_loss=commitment, backward_fn=self.manual_backward)
            else:
                total = sum(self.weights[k] * v for k, v in losses.items())
                self.manual_backward(total + commitment if commitment is not None else total)

        self.generator_step(opt_g, backward)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=n, prog_bar=name == "mel")
        self.log("train/commitment", out.penalty.detach(), batch_size=n)
        self.log("train/loss", losses["mel"].detach() if "mel" in losses else sum(losses.values()).detach(),
                 batch_size=n)
        for name, value in (out.metrics or {}).items():
            self.log(f"train/vq/{name}", torch.as_tensor(value, dtype=torch.float32), batch_size=n)

    def evaluate_output(self, out: CodecOutput, lengths: Tensor, prefix: str) -> None:
        hop = self.model.hop_length
        frames = torch.arange(out.codes.shape[-1], device=lengths.device)[None] < (lengths[:, None] + hop - 1) // hop
        for k in range(out.codes.shape[1]):
            self.val_perplexity[k].update(out.codes[:, k][frames])
            self.log(f"{prefix}/perplexity_q{k}", self.val_perplexity[k], batch_size=len(lengths))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.balancer is not None:
            checkpoint["balancer"] = self.balancer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.balancer is not None and "balancer" in checkpoint:
            self.balancer.load_state_dict(checkpoint["balancer"])
