"""Training the Jukebox-style family: the hierarchical VQ-VAE and the level priors (models in
``ostinato.models.jukebox``).

``JukeboxVQVAEFamily`` trains ``HierarchicalVQVAE`` (``self.model``) on audio shards: per level multi-scale mel + L1
losses and the VQ commitment (Jukebox has no adversarial loss), all levels in one step. Its codes are written once as
array shards (``ostinato encode`` with its export: streams ``top``, ``middle``, ``bottom``).

``JukeboxPrior`` trains one ``LevelPrior`` (``self.model``, ``level: top | middle | bottom``) with the codebook-LM
base's masked cross-entropy on crops of that level's codes. What training adds: the metadata fields dropped with
``metadata.dropout`` and all of the metadata with ``cfg_dropout`` (the null condition classifier-free guidance uses);
for the upsamplers, the codes of the level above cropped with this level's, upsampled and added to the LM's input
frame by frame (``LevelPrior.upper_condition``; the null condition keeps them). The
level's frame rate and window come from the array shards' manifest at setup.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.data.arrays import ArrayBatch, StreamInfo
from ostinato.data.batch import AudioBatch
from ostinato.errors import DataMismatch
from ostinato.families.base import FamilyModule, plain
from ostinato.families.codebook_lm import CodebookLMFamily, masked_lm_losses
from ostinato.metrics.codebooks import CodePerplexity
from ostinato.metrics.codec import MelDistance
from ostinato.models.jukebox import LEVELS, HierarchicalVQVAE, LevelPrior
from ostinato.nn.losses import MultiScaleMelLoss, l1_waveform

__all__ = ["JukeboxVQVAEFamily", "JukeboxPrior"]


class JukeboxVQVAEFamily(FamilyModule):
    """Trains a ``HierarchicalVQVAE`` on ``AudioBatch``es; validation reports each level's mel distance and its
    codebook perplexity over the whole validation set (``valid/perplexity_level{k}``, bottom = 0: near 1 is a
    collapsed level, ``card`` every code used equally).

    Args:
        sample_rate, channels: the audio.
        vqvae: ``HierarchicalVQVAE`` keys (``ratios`` per level, ``card``, ``dimension``, ``n_filters``, ...).
        loss_weights: ``mel``, ``l1``; commitment_weight: weight of the VQ commitment loss.
    """

    def __init__(self, sample_rate: int, channels: int = 1, vqvae: Mapping[str, Any] | None = None,
                 loss_weights: Mapping[str, float] | None = None, commitment_weight: float = 0.02,
                 mel_n_mels: int = 64, optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.model = HierarchicalVQVAE(sample_rate, channels, **(plain(vqvae) or {}))
        self._sample_rate, self.channels = self.model.sample_rate, self.model.channels
        self.weights = {"mel": 1.0, "l1": 0.1, **(plain(loss_weights) or {})}
        self.commitment_weight = float(commitment_weight)
        # normalized: the L1 on power mels stays the size of the log terms (unnormalised it is hundreds of times
        # larger and drowns the codebooks' commitment)
        self.mel_loss = MultiScaleMelLoss(sample_rate, n_mels=mel_n_mels, normalized=True)
        self.val_mel = nn.ModuleDict({name: MelDistance(sample_rate) for name in LEVELS})
        self.val_perplexity = nn.ModuleDict({name: CodePerplexity(self.model.card) for name in LEVELS})
        self.ema_modules = tuple(self.model.ema_modules("model"))

    def level_losses(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per level ``{level: weighted reconstruction + commitment}`` and the VQ metrics of ``x [B, C, T]``."""
        losses, metrics = {}, {}
        for name, out in self.model(x).items():
            rec = self.weights["mel"] * self.mel_loss(out.recon, x) + self.weights["l1"] * l1_waveform(out.recon, x)
            losses[name] = rec + self.commitment_weight * out.penalty
            for key, value in out.metrics.items():
                if key.startswith(("perplexity", "replaced")):
                    metrics[f"{name}_{key.split('_q')[0]}"] = value
        return losses, metrics

    def training_step(self, batch: AudioBatch, batch_idx: int) -> Tensor:
        losses, metrics = self.level_losses(batch.audio)
        loss = sum(losses.values())
        n = len(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=n)
        for name, value in metrics.items():
            self.log(f"train/vq/{name}", torch.as_tensor(value, dtype=torch.float32), batch_size=n)
        return loss

    def _evaluate(self, batch: AudioBatch, prefix: str) -> None:
        valid = batch.lengths > 0
        if not bool(valid.any()):
            return
        x, lengths, n = batch.audio[valid], batch.lengths[valid], int(valid.sum())
        for k, (name, out) in enumerate(self.model(x).items()):
            self.val_mel[name].update(out.recon, x, lengths)
            self.log(f"{prefix}/mel_distance_{name}", self.val_mel[name], batch_size=n, prog_bar=name == "bottom")
            hop = self.model.hop_lengths[k]
            frames = torch.arange(out.codes.shape[-1], device=x.device)[None] < (lengths[:, None] + hop - 1) // hop
            self.val_perplexity[name].update(out.codes[:, 0][frames])
            self.log(f"{prefix}/perplexity_level{k}", self.val_perplexity[name], batch_size=n)

    def validation_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "valid")

    def test_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def sample_audio(self, batch: AudioBatch) -> dict[str, Tensor]:
        with torch.no_grad():
            outs = self.model(batch.audio)
        return {"original": batch.audio, **{f"reconstruction_{k}": v.recon for k, v in outs.items()}}


class JukeboxPrior(CodebookLMFamily):
    """Trains a ``LevelPrior`` on the array shards of a ``JukeboxVQVAEFamily``'s export.

    Args:
        level, card, lm, metadata, conditioner, level_ratio: the ``LevelPrior``'s (``card`` and ``level_ratio`` are
            checked against the array manifest at setup); ``metadata.dropout``: probability, per item and field, of
            leaving the field out.
        cfg_dropout: probability, per training item, of the null condition (zero metadata prefix).
        vqvae: the VQ-VAE the codes come from (anything ``ostinato.load`` takes); None = the one recorded in the
            array shards' manifest.
        lora: LoRA adapters to train on the LM instead of the model (``LoRA`` kwargs; null = off).
    """

    ema_modules = ("model.lm", "model.prefix_modules")

    def __init__(self, level: str, card: int, cfg_dropout: float = 0.1, vqvae: str | None = None,
                 lora: Mapping[str, Any] | None = None, optim: Mapping[str, Any] | None = None, **model: Any):
        super().__init__(optim)
        model = {k: plain(v) for k, v in model.items()}
        self.metadata_dropout = float((model.get("metadata") or {}).get("dropout", 0.0))
        self.model = LevelPrior(level, card, **model)
        self.cfg_dropout = float(cfg_dropout)
        self.vqvae_ref = None if vqvae is None else str(vqvae)
        self.use_lora(lora)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        streams: dict[str, StreamInfo] | None = getattr(dm, "streams", None)
        if dm is None or streams is None:
            return
        prior = self.model
        need = [prior.level] + ([prior.upper] if prior.upper else [])
        if list(streams)[:len(need)] != need:
            raise DataMismatch(f"the {prior.level} prior reads the streams {need} (this level first); set "
                             f"data.streams={need} (the data holds {list(streams)})")
        info = streams[prior.level]
        if info.card != prior.card:
            raise DataMismatch(f"family.card={prior.card} but the {prior.level} codes have {info.card} codes; "
                             f"set family.card={info.card}")
        if prior.upper is not None:
            ratio = info.rate / streams[prior.upper].rate
            if abs(ratio - prior.level_ratio) > 1e-6:
                raise DataMismatch(f"family.level_ratio={prior.level_ratio} but the {prior.level} codes are {ratio:g}x "
                                 f"as fast as the {prior.upper} codes")
        prior.codes_per_second.fill_(info.rate)
        prior.window_frames.fill_(round(dm.segment_seconds * info.rate))
        if prior.upper is not None and prior.window % prior.level_ratio:
            raise ValueError(f"data.segment_seconds={dm.segment_seconds} gives {prior.window} {prior.level} frames, "
                             f"not a multiple of {prior.level_ratio}; choose a whole number of {prior.upper} frames")
        if self.vqvae_ref is None:
            self.vqvae_ref = dm.model.id

    def batch_prefix(self, batch: ArrayBatch, train: bool) -> Tensor | None:
        """The LM prefix of a batch ``[B, fields, dim]``: metadata (fields dropped, then all of it with
        ``cfg_dropout`` in training); None without metadata."""
        prior = self.model
        gen = torch.Generator().manual_seed(random.getrandbits(31)) if train and prior.metadata_fields else None
        meta = prior.metadata_prefix(batch.meta, self.metadata_dropout if train else 0.0, gen)
        if meta is not None and train and self.cfg_dropout > 0:
            keep = (torch.rand(meta.shape[0], device=meta.device) >= self.cfg_dropout).to(meta.dtype)
            meta = meta * keep[:, None, None]
        return meta

    def batch_step_cond(self, batch: ArrayBatch) -> Tensor | None:
        """Upsamplers: the upper codes of the crop as ``[B, F_up * level_ratio, dim]``, row t for frame t; the top
        prior: None."""
        prior = self.model
        if prior.upper is None:
            return None
        return prior.upper_condition(batch.arrays[prior.upper], batch.lengths[prior.upper])

    def _ce(self, batch: ArrayBatch, prefix: Tensor | None, step_cond: Tensor | None) -> Tensor:
        """Cross-entropy ``[1]`` of this level's codes (a crop padded or cut to ``window`` frames)."""
        prior = self.model
        codes, lengths = batch.arrays[prior.level], batch.lengths[prior.level]
        if prior.window and codes.shape[-1] != prior.window:
            codes = F.pad(codes[..., :prior.window], (0, max(0, prior.window - codes.shape[-1])))
        ce, _ = masked_lm_losses(prior.lm, prior.pattern, codes, lengths.clamp(max=codes.shape[-1]), prefix,
                                 step_cond=step_cond)
        return ce

    def losses(self, batch: ArrayBatch, train: bool) -> Tensor:
        """Cross-entropy ``[1]`` of this level's codes (a crop padded or cut to ``window`` frames)."""
        return self._ce(batch, self.batch_prefix(batch, train), self.batch_step_cond(batch))

    def condition_losses(self, batch: ArrayBatch) -> dict[str, Tensor]:
        """What each condition adds, validation's cross-entropies ``[1]`` of the batch: ``ce_no_metadata`` with the
        metadata at its null (CFG's zeros), ``ce_shuffled_upper`` (upsamplers, 2 items or more) with each item given
        the next item's upper codes."""
        prior = self.model
        meta, step = self.batch_prefix(batch, False), self.batch_step_cond(batch)
        out = {}
        if meta is not None:
            out["ce_no_metadata"] = self._ce(batch, torch.zeros_like(meta), step)
        if step is not None and len(batch) > 1:
            out["ce_shuffled_upper"] = self._ce(batch, meta, prior.upper_condition(
                batch.arrays[prior.upper].roll(-1, 0), batch.lengths[prior.upper].roll(-1, 0)))
        return out

    def evaluate(self, batch: ArrayBatch, split: str) -> None:
        if not bool((batch.lengths[self.model.level] > 0).any()):  # a batch of blanked items has no target
            return
        super().evaluate(batch, split)
        for name, ce in self.condition_losses(batch).items():  # a prior that ignores a condition: the same CE
            self.log(f"{split}/{name}", ce.mean(), sync_dist=True, batch_size=len(batch))
