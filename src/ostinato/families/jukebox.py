"""The Jukebox-style family: a hierarchical VQ-VAE, a top-level prior and two upsampler priors.

``JukeboxVQVAEFamily`` trains ``HierarchicalVQVAE`` on audio shards: per level multi-scale mel + L1 losses and the
VQ commitment (Jukebox has no adversarial loss), all levels in one step. Its codes are written once as array shards
(``ostinato encode``: streams ``top``, ``middle``, ``bottom``).

``JukeboxPrior`` is one ``CodebookLM`` per level (``level: top | middle | bottom``) trained with the masked
cross-entropy of MusicGen on crops of that level's codes, conditioned through its prefix on:

* the sample's metadata (``metadata.fields``, e.g. genre and composer), each field dropped with
  ``metadata.dropout`` and all of it with ``cfg_dropout`` (the null condition classifier-free guidance uses);
* for the upsamplers (middle, bottom), the codes of the level above, cropped at the same time, embedded and
  upsampled to this level's rate (``UpperConditioner``): one prefix vector per frame. The prefix always holds
  ``window`` frames (shorter windows are zero-padded), so the code of frame t and its condition are always the same
  number of positions apart, in training and in windowed generation alike.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.data.arrays import ArrayBatch, StreamInfo
from ostinato.data.batch import AudioBatch
from ostinato.families.base import FamilyModule, plain
from ostinato.families.codebook_lm import CodebookLMFamily, masked_lm_losses
from ostinato.metrics.codec import MelDistance
from ostinato.models.jukebox import LEVELS, HierarchicalVQVAE, MetadataConditioner, UpperConditioner
from ostinato.nn.losses import MultiScaleMelLoss, l1_waveform
from ostinato.nn.patterns import ParallelPattern
from ostinato.nn.transformer import CodebookLM, lm_config

__all__ = ["JukeboxVQVAEFamily", "JukeboxPrior", "UPPER"]

UPPER = {"bottom": "middle", "middle": "top", "top": None}


class JukeboxVQVAEFamily(FamilyModule):
    """Trains a ``HierarchicalVQVAE`` on ``AudioBatch``es; validation reports each level's mel distance.

    Args:
        sample_rate, channels: the audio.
        vqvae: ``HierarchicalVQVAE`` keys (``ratios`` per level, ``bins``, ``dimension``, ``n_filters``, ...).
        loss_weights: ``mel``, ``l1``; commitment_weight: weight of the VQ commitment loss.
    It writes array shards: ``array_streams()`` / ``encode_arrays(wav)`` (int16 codes ``[1, F_level]`` per level).
    """

    array_kind = "jukebox_vqvae"

    def __init__(self, sample_rate: int = 24000, channels: int = 1, vqvae: Mapping[str, Any] | None = None,
                 loss_weights: Mapping[str, float] | None = None, commitment_weight: float = 0.02,
                 mel_n_mels: int = 64, optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self._sample_rate, self.channels = int(sample_rate), int(channels)
        self.vqvae = HierarchicalVQVAE(sample_rate, channels, **(plain(vqvae) or {}))
        self.weights = {"mel": 1.0, "l1": 0.1, **(plain(loss_weights) or {})}
        self.commitment_weight = float(commitment_weight)
        # normalized: the L1 on power mels stays the size of the log terms (unnormalised it is hundreds of times
        # larger and drowns the codebooks' commitment)
        self.mel_loss = MultiScaleMelLoss(sample_rate, n_mels=mel_n_mels, normalized=True)
        self.val_mel = nn.ModuleDict({name: MelDistance(sample_rate) for name in LEVELS})
        self.ema_modules = tuple(self.vqvae.ema_modules("vqvae"))

    # -- arrays (ostinato encode) ---------------------------------------------------------------------------------
    def array_streams(self) -> dict[str, StreamInfo]:
        rates = self.vqvae.frame_rates
        return {name: StreamInfo(rate=rates[name], channels=1, dtype="int16", cardinality=self.vqvae.bins)
                for name in reversed(LEVELS)}

    def encode_arrays(self, wav: Tensor) -> dict[str, Tensor]:
        """wav [B, C, T] -> {"top": [B, 1, F_top], "middle": ..., "bottom": ...} int64 codes."""
        codes = self.vqvae.encode(wav)
        return {name: codes[name] for name in reversed(LEVELS)}

    # -- training ------------------------------------------------------------------------------------------------
    def level_losses(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per level ``{level: weighted reconstruction + commitment}`` and the VQ metrics."""
        losses, metrics = {}, {}
        for name, out in self.vqvae(x).items():
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
        for name, out in self.vqvae(x).items():
            self.val_mel[name].update(out.recon, x, lengths)
            self.log(f"{prefix}/mel_distance_{name}", self.val_mel[name], batch_size=n, prog_bar=name == "bottom")

    def validation_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "valid")

    def test_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def sample_audio(self, batch: AudioBatch) -> dict[str, Tensor]:
        with torch.no_grad():
            outs = self.vqvae(batch.audio)
        return {"original": batch.audio, **{f"reconstruction_{k}": v.recon for k, v in outs.items()}}


class JukeboxPrior(CodebookLMFamily):
    """A Jukebox prior over one level's codes (array shards of a ``JukeboxVQVAEFamily``).

    Args:
        level: ``top`` (the top-level prior) or ``middle`` / ``bottom`` (upsamplers, conditioned on the level above).
        bins: codebook size of the VQ-VAE (checked against the array manifest at setup).
        lm: ``LMConfig`` kwargs, optionally ``preset: tiny|small|...`` plus overrides.
        metadata: ``{fields: [genre, composer], buckets: 1024, dropout: 0.1}`` or None for no metadata.
        conditioner: ``UpperConditioner`` keys (``layers``, ``kernel_size``) for the upsamplers.
        level_ratio: frames of this level per frame of the level above (4 for hops 8 : 32 : 128).
        cfg_dropout: probability, per training item, of the null condition (zero metadata prefix).
        vqvae: the VQ-VAE the codes come from (anything ``ostinato.load`` takes); None = the one recorded in the
            array shards' manifest.
    """

    ema_modules = ("lm", "prefix_modules")

    def __init__(self, level: str, bins: int, lm: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None, conditioner: Mapping[str, Any] | None = None,
                 level_ratio: int = 4, cfg_dropout: float = 0.1, vqvae: str | None = None,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        if level not in LEVELS:
            raise ValueError(f"family.level={level!r}: use top, middle or bottom")
        self.level, self.upper = level, UPPER[level]
        self.bins, self.level_ratio = int(bins), int(level_ratio)
        self.cfg = lm_config(lm, n_q=1, card=self.bins, cross_attention=False)
        self.lm = CodebookLM(self.cfg)
        self.pattern = ParallelPattern(1)
        self.prefix_modules = nn.ModuleDict()
        self.metadata_dropout = 0.0
        if metadata is not None:
            kw = dict(metadata)
            self.metadata_dropout = float(kw.pop("dropout", 0.0))
            self.prefix_modules["metadata"] = MetadataConditioner(self.cfg.dim, **kw)
        if self.upper is not None:
            self.prefix_modules["upper"] = UpperConditioner(self.bins, self.cfg.dim, ratio=self.level_ratio,
                                                            **(plain(conditioner) or {}))
        self.cfg_dropout = float(cfg_dropout)
        self.vqvae_ref = None if vqvae is None else str(vqvae)
        # frames/s of this level, of the level above, the audio sample rate, and the training window in frames
        self.register_buffer("rates", torch.zeros(3))
        self.register_buffer("window_frames", torch.zeros((), dtype=torch.long))

    # -- data ----------------------------------------------------------------------------------------------------
    @property
    def frame_rate(self) -> float:
        return float(self.rates[0])

    @property
    def window(self) -> int:
        """Frames per training window (= per generation window)."""
        return int(self.window_frames)

    @property
    def metadata_fields(self) -> list[str]:
        meta = self.prefix_modules["metadata"] if "metadata" in self.prefix_modules else None
        return [] if meta is None else list(meta.fields)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        streams: dict[str, StreamInfo] | None = getattr(dm, "streams", None)
        if dm is None or streams is None:
            return
        need = [self.level] + ([self.upper] if self.upper else [])
        if list(streams)[:len(need)] != need:
            raise ValueError(f"the {self.level} prior reads the streams {need} (this level first); set "
                             f"data.streams={need} (the data holds {list(streams)})")
        info = streams[self.level]
        if info.cardinality != self.bins:
            raise ValueError(f"family.bins={self.bins} but the {self.level} codes have {info.cardinality} bins; set "
                             f"family.bins={info.cardinality}")
        if self.upper is not None:
            ratio = info.rate / streams[self.upper].rate
            if abs(ratio - self.level_ratio) > 1e-6:
                raise ValueError(f"family.level_ratio={self.level_ratio} but the {self.level} codes are {ratio:g}x "
                                 f"as fast as the {self.upper} codes")
            self.rates[1] = streams[self.upper].rate
        self.rates[0], self.rates[2] = info.rate, float(dm.model.sample_rate)
        self.window_frames.fill_(round(dm.segment_seconds * info.rate))
        if self.upper is not None and self.window % self.level_ratio:
            raise ValueError(f"data.segment_seconds={dm.segment_seconds} gives {self.window} {self.level} frames, not "
                             f"a multiple of {self.level_ratio}; choose a whole number of {self.upper} frames")
        if self.vqvae_ref is None:
            self.vqvae_ref = dm.model.id

    # -- conditioning --------------------------------------------------------------------------------------------
    def metadata_prefix(self, metas: Sequence[Mapping[str, Any]], train: bool) -> Tensor | None:
        """``[B, fields, dim]`` metadata embeddings, zeroed per item with ``cfg_dropout`` in training."""
        if "metadata" not in self.prefix_modules:
            return None
        module = self.prefix_modules["metadata"]
        gen = torch.Generator().manual_seed(random.getrandbits(31)) if train else None
        pre = module(module.ids(metas, self.metadata_dropout if train else 0.0, gen))
        if train and self.cfg_dropout > 0:
            keep = (torch.rand(pre.shape[0], device=pre.device) >= self.cfg_dropout).to(pre.dtype)
            pre = pre * keep[:, None, None]
        return pre

    def upper_condition(self, upper: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Codes of the level above ``[B, 1, F_up]`` -> ``[B, F_up * level_ratio, dim]``."""
        return self.prefix_modules["upper"](upper, lengths)

    def prefix(self, meta: Tensor | None, condition: Tensor | None, batch: int) -> Tensor | None:
        """The LM prefix: metadata, then the upper condition zero-padded to ``window`` frames."""
        parts = [p for p in (meta,) if p is not None]
        if condition is not None:
            n = self.window or condition.shape[1]
            parts.append(F.pad(condition[:, :n], (0, 0, 0, n - min(n, condition.shape[1]))))
        return torch.cat(parts, dim=1) if parts else None

    def batch_prefix(self, batch: ArrayBatch, train: bool) -> Tensor | None:
        meta = self.metadata_prefix(batch.meta, train)
        cond = None
        if self.upper is not None:
            cond = self.upper_condition(batch.arrays[self.upper], batch.lengths[self.upper])
        return self.prefix(meta, cond, len(batch))

    # -- steps ---------------------------------------------------------------------------------------------------
    def losses(self, batch: ArrayBatch, train: bool) -> Tensor:
        """Cross-entropy ``[1]`` of this level's codes (a crop padded or cut to ``window`` frames)."""
        codes, lengths = batch.arrays[self.level], batch.lengths[self.level]
        if self.window and codes.shape[-1] != self.window:
            codes = F.pad(codes[..., :self.window], (0, max(0, self.window - codes.shape[-1])))
        ce, _ = masked_lm_losses(self.lm, self.pattern, codes, lengths.clamp(max=codes.shape[-1]),
                                 self.batch_prefix(batch, train))
        return ce

    def evaluate(self, batch: ArrayBatch, split: str) -> None:
        if bool((batch.lengths[self.level] > 0).any()):  # a batch of blanked items has no target
            super().evaluate(batch, split)
