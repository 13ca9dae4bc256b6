"""The MusicGen family: a ``CodebookLM`` over codec tokens, conditioned on text, melody and style.

Data: token shards (``TokenDataModule``) or audio shards (``AudioDataModule``) tokenized on the fly by the frozen
codec (``family.codec``).

Training step: codes ``[B, K, T]`` -> ``DelayPattern.build`` (special token = ``card``) -> the LM reads steps
``[:-1]`` and predicts steps ``[1:]``; the cross-entropy counts only positions that hold a real code of a valid
frame (pattern mask and item lengths). Frames past an item's length are replaced by the special token before the
pattern is built, so padding never enters the context of a valid target.

Text: each sample's caption merged with its structured fields (``description``), encoded by a frozen
``TextConditioner``; in training a field is dropped with ``attribute_dropout`` and the whole description with
``cfg_dropout`` (the null condition for classifier-free guidance: an empty text, all-False mask).

Melody (MusicGen-melody): the one-hot chromagram of the segment's own audio (decoded from its codes by the frozen
codec when training on tokens), projected to the LM width and prepended. Style (MusicGen-Style): an excerpt of the
segment -> frozen features (the codec's latents, or an HF audio encoder) -> ``StyleConditioner`` (transformer + RVQ
bottleneck + downsampling) -> tokens, prepended before the melody. A dropped (or null) prefix condition is zeros
of the same shape, which is also what generation feeds the unconditional CFG rows. The codec is a frozen helper,
not a submodule (not trained, not in checkpoints), like the text encoder.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ostinato.data.batch import AudioBatch
from ostinato.data.token_datamodule import TokenBatch
from ostinato.families.codebook_lm import CodebookLMFamily, masked_lm_losses
from ostinato.nn.chroma import MelodyConditioner
from ostinato.models.codec import Codec
from ostinato.nn.conditioners import TextConditioner, description
from ostinato.nn.style import HFAudioFeatures, StyleConditioner, codec_latent_features
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.transformer import CodebookLM, lm_config

__all__ = ["MusicGenFamily", "Conditions"]


@dataclass
class Conditions:
    """What the LM is conditioned on: cross-attention ``cond [B, Tc, D]`` + ``mask [B, Tc]``, a ``prefix
    [B, P, dim]`` (style tokens then melody), and the style bottleneck's commitment ``penalty``."""

    cond: Tensor | None = None
    mask: Tensor | None = None
    prefix: Tensor | None = None
    penalty: Tensor | None = None


class MusicGenFamily(CodebookLMFamily):
    """MusicGen LM training on token shards (or audio tokenized on the fly).

    Args:
        n_q, card: codebooks and codebook size of the tokens; checked against the token manifests' codec at
            setup (``data`` ``codec.n_q`` / ``codec.cardinality``).
        lm: ``LMConfig`` kwargs, optionally ``preset: tiny|small|medium|large`` plus overrides.
        text: ``TextConditioner`` kwargs (``model``, ``max_length``, ``dropout``); None = no text.
        melody: ``MelodyConditioner`` kwargs (``sample_rate`` of the chroma analysis, ``hop_seconds``, ``argmax``)
            plus ``dropout`` (probability of leaving the melody out alone); None = no melody.
        style: ``StyleConditioner`` kwargs (``feature_dim``, ``width``, ``num_layers``, ``n_q``, ``bins``,
            ``eval_q``, ``downsample``, ``excerpt_seconds``, ...) plus ``features`` ("codec" = the codec's latents,
            or a local HF audio encoder folder such as MERT / HuBERT), ``layer``, ``trust_remote_code``,
            ``dropout`` and ``penalty_weight``; None = no style.
        delays: the delay pattern (default ``[0, 1, ..., n_q - 1]``).
        cfg_dropout: probability, per training item, of the null condition (no text, zero prefix).
        attribute_dropout: probability, per training item and structured field, of leaving the field out.
        text_dropout: probability of leaving the text out alone (what double CFG's "style only" rows need).
        codec: the codec the tokens come from (anything ``load_codec`` takes); None = the one recorded in the
            token shards' manifest. Generation decodes with it; melody and style features are computed with it.
    """

    def __init__(self, n_q: int, card: int, lm: Mapping[str, Any] | None = None,
                 text: Mapping[str, Any] | None = None, melody: Mapping[str, Any] | None = None,
                 style: Mapping[str, Any] | None = None, delays: Sequence[int] | None = None,
                 cfg_dropout: float = 0.1, attribute_dropout: float = 0.0, text_dropout: float = 0.0,
                 codec: str | None = None, optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.n_q, self.card = int(n_q), int(card)
        self.cfg = lm_config(lm, n_q=self.n_q, card=self.card, cross_attention=text is not None)
        self.lm = CodebookLM(self.cfg)
        self.text: TextConditioner | None = None
        if text is not None:
            kw = dict(text)
            if "dim" in kw and kw["dim"] != self.cfg.kv_dim:
                raise ValueError(f"family.text.dim={kw['dim']} must equal the LM cross-attention width "
                                 f"{self.cfg.kv_dim}; leave it out")
            kw["dim"] = self.cfg.kv_dim
            self.text = TextConditioner(**kw)
        self.melody: MelodyConditioner | None = None
        self.melody_dropout = 0.0
        if melody is not None:
            kw = dict(melody)
            self.melody_dropout = float(kw.pop("dropout", 0.0))
            kw.setdefault("sample_rate", 32000)
            self.melody = MelodyConditioner(dim=self.cfg.dim, **kw)
        self.style: StyleConditioner | None = None
        self.style_dropout, self.style_penalty_weight = 0.0, 1.0
        self.style_source = "codec"
        if style is not None:
            kw = dict(style)
            self.style_dropout = float(kw.pop("dropout", 0.0))
            self.style_penalty_weight = float(kw.pop("penalty_weight", 1.0))
            self.style_source = str(kw.pop("features", "codec"))
            hf_kw = {k: kw.pop(k) for k in ("layer", "trust_remote_code") if k in kw}
            if self.style_source != "codec":
                features = HFAudioFeatures(self.style_source, **hf_kw)
                self.__dict__["_style_features"] = features  # frozen, unregistered (like the text encoder)
                if kw.setdefault("feature_dim", features.dim) != features.dim:
                    raise ValueError(f"family.style.feature_dim={kw['feature_dim']} but {self.style_source} gives "
                                     f"{features.dim}-dim features; leave feature_dim out")
            elif "feature_dim" not in kw:
                raise ValueError("family.style.feature_dim is required with features: codec (the codec's latent "
                                 "dimension, e.g. 128 for EnCodec)")
            if "excerpt_seconds" in kw:
                kw["excerpt_seconds"] = tuple(kw["excerpt_seconds"])
            self.style = StyleConditioner(dim=self.cfg.dim, **kw)
        self.pattern = DelayPattern(self.n_q, delays)
        self.cfg_dropout, self.attribute_dropout = float(cfg_dropout), float(attribute_dropout)
        self.text_dropout = float(text_dropout)
        self.codec_ref = None if codec is None else str(codec)
        ema = ["lm"] + (["text"] if self.text is not None else []) + (["melody"] if self.melody is not None else [])
        if self.style is not None:  # not the RVQ codebooks: they keep their own EMA
            ema += ["style.input_proj", "style.transformer", "style.output_proj"]
        self.ema_modules = tuple(ema)

    # -- the frozen codec -----------------------------------------------------------------------------------
    @property
    def needs_audio_features(self) -> bool:
        return self.melody is not None or self.style is not None

    def attach_codec(self, codec: Codec) -> None:
        """Use ``codec`` (frozen, not a submodule) for decoding and for melody / style features."""
        if codec.n_q < self.n_q or codec.cardinality != self.card:
            raise ValueError(f"the model predicts {self.n_q} x {self.card} codes but the codec has "
                             f"{codec.n_q} x {codec.cardinality}")
        self.__dict__["_codec"] = codec.eval().requires_grad_(False)

    @property
    def codec(self) -> Codec:
        codec = self.__dict__.get("_codec")
        if codec is None:
            if self.codec_ref is None:
                raise ValueError("this MusicGen has no codec: set family.codec (or train on token shards, whose "
                                 "manifest names their codec), or pass --codec")
            from ostinato.interop.codecs import load_codec

            self.attach_codec(load_codec(self.codec_ref))
            codec = self.__dict__["_codec"]
        device = self.lm.emb[0].weight.device
        if next(codec.parameters()).device != device:
            codec.to(device)
        return codec

    # -- engine hooks ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        info = getattr(dm, "codec", None)
        if info is not None and not isinstance(info, Codec):
            for key, have in (("n_q", info.n_q), ("cardinality", info.cardinality)):
                mine = self.n_q if key == "n_q" else self.card
                if int(have) != mine:
                    name = "n_q" if key == "n_q" else "card"
                    raise ValueError(f"family.{name}={mine} does not match the token shards: their codec "
                                     f"({info.id}) has {key}={have}; set family.{name}={have}")
            self._sample_rate = info.sample_rate
            if self.codec_ref is None:
                self.codec_ref = str(info.id)
        needs_codec = self.needs_audio_features or not isinstance(dm, _token_module())
        if needs_codec and dm is not None:
            codec = self.codec  # fails early, naming the fix, when there is none
            self._sample_rate = codec.sample_rate

    # -- conditioning ---------------------------------------------------------------------------------------
    def descriptions(self, batch: TokenBatch | AudioBatch, train: bool) -> list[str]:
        if not train:
            return [description(m) for m in batch.meta]
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
        return [description(m, rng, self.attribute_dropout) for m in batch.meta]

    def condition(self, texts: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
        """``(cond [B, Tc, D], mask [B, Tc])`` for the LM; None, None when there is no text conditioner.

        A null condition (all-False mask) attends to one zero vector instead: with bias-free keys/values that
        adds exactly nothing, where an all-masked softmax would give NaN.
        """
        if self.text is None:
            return None, None
        cond, mask = self.text(list(texts))
        attend = mask.clone()
        attend[~mask.any(dim=1), 0] = True
        return cond, attend

    def melody_frames(self, n_frames: int, frame_rate: float) -> int:
        """Melody prefix tokens for a window of ``n_frames`` codec frames."""
        assert self.melody is not None
        return max(1, self.melody.num_frames(math.ceil(n_frames / frame_rate * self.melody.sample_rate)))

    def style_features(self, codes: Tensor, wav: Tensor | None = None) -> tuple[Tensor, float]:
        """Frozen style features ``[B, T, feature_dim]`` of an excerpt's codes (or audio), and their frame rate."""
        codec = self.codec
        if self.style_source == "codec":
            return codec_latent_features(codec.quantizer.decode, codes), float(codec.frame_rate)
        features: HFAudioFeatures = self.__dict__["_style_features"]
        if wav is None:
            with torch.no_grad():
                wav = codec.decode(codes)
        return features(wav, codec.sample_rate), float(features.frame_rate)

    def style_tokens(self, codes: Tensor, train: bool, wav: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A style excerpt of ``codes [B, K, T]`` (per-item start in training, from frame 0 in eval) ->
        ``(tokens [B, Ts, dim], penalty)``; the excerpt length is shared by the batch."""
        assert self.style is not None
        codec = self.codec
        start, length = self.style.excerpt(codes.shape[-1], codec.frame_rate, train=train)
        if train and codes.shape[-1] > length:
            starts = torch.randint(0, codes.shape[-1] - length + 1, (codes.shape[0],)).tolist()
        else:
            starts = [start] * codes.shape[0]
        excerpt = torch.stack([c[:, s:s + length] for c, s in zip(codes, starts)])
        piece = None
        if wav is not None:
            hop = codec.hop_length
            piece = torch.stack([w[:, s * hop:(s + length) * hop] for w, s in zip(wav, starts)])
        feats, _ = self.style_features(excerpt, piece)
        return self.style(feats)

    def prefix(self, style: Tensor | None, melody: Tensor | None) -> Tensor | None:
        parts = [p for p in (style, melody) if p is not None]
        return torch.cat(parts, dim=1) if parts else None

    def batch_codes(self, batch: TokenBatch | AudioBatch) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(codes [B, K, T], frame lengths [B], audio [B, C, T'] or None)`` of a token or audio batch."""
        if isinstance(batch, AudioBatch):
            codec = self.codec
            with torch.no_grad():
                codes = codec.encode(batch.audio, n_q=self.n_q).codes
            lengths = torch.div(batch.lengths + codec.hop_length - 1, codec.hop_length, rounding_mode="floor")
            return codes, lengths.clamp(max=codes.shape[-1]), batch.audio
        return batch.codes[:, :self.n_q], batch.lengths, None

    def batch_conditions(self, batch: TokenBatch | AudioBatch, codes: Tensor, lengths: Tensor,
                         wav: Tensor | None, train: bool) -> Conditions:
        """All the conditions of a batch, with CFG / text / melody / style dropout in training."""
        b = codes.shape[0]
        texts = self.descriptions(batch, train)
        null = torch.rand(b) < (self.cfg_dropout if train else 0.0)
        drop_text = null | (torch.rand(b) < (self.text_dropout if train else 0.0))
        texts = ["" if d else t for t, d in zip(texts, drop_text.tolist())]
        cond, mask = self.condition(texts)
        out = Conditions(cond, mask)
        if not self.needs_audio_features:
            return out
        codec = self.codec
        if wav is None and self.melody is not None:
            with torch.no_grad():
                wav = codec.decode(codes)
                valid = torch.arange(wav.shape[-1], device=wav.device)[None] < (lengths * codec.hop_length)[:, None]
                wav = wav * valid[:, None].to(wav.dtype)
        keep = lambda p: (~(null | (torch.rand(b) < p))).to(codes.device)  # noqa: E731
        style = melody = None
        if self.style is not None:
            style, out.penalty = self.style_tokens(codes, train, wav)
            if train:
                style = style * keep(self.style_dropout)[:, None, None].to(style.dtype)
        if self.melody is not None:
            assert wav is not None
            chroma = self.melody.features(wav, codec.sample_rate)[:, :self.melody_frames(codes.shape[-1],
                                                                                          codec.frame_rate)]
            melody = self.melody(chroma)
            if train:
                melody = melody * keep(self.melody_dropout)[:, None, None].to(melody.dtype)
        out.prefix = self.prefix(style, melody)
        return out

    # -- loss -----------------------------------------------------------------------------------------------
    def compute_losses(self, codes: Tensor, lengths: Tensor, cond: Tensor | None = None,
                       cond_mask: Tensor | None = None, prefix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-codebook mean cross-entropy ``[K]`` over valid targets, and the count of those targets ``[K]``."""
        return masked_lm_losses(self.lm, self.pattern, codes, lengths, prefix, cond, cond_mask)

    def _step(self, batch: TokenBatch | AudioBatch, train: bool) -> tuple[Tensor, Tensor | None]:
        codes, lengths, wav = self.batch_codes(batch)
        c = self.batch_conditions(batch, codes, lengths, wav, train)
        ce, _ = self.compute_losses(codes, lengths, c.cond, c.mask, c.prefix)
        return ce, c.penalty

    def losses(self, batch: TokenBatch | AudioBatch, train: bool) -> Tensor:
        return self._step(batch, train)[0]

    def training_step(self, batch: TokenBatch | AudioBatch, batch_idx: int) -> Tensor:
        ce, penalty = self._step(batch, train=True)
        loss = ce.mean()
        if penalty is not None:
            self.log("train/style_penalty", penalty, batch_size=len(batch))
            loss = loss + self.style_penalty_weight * penalty
        return self.log_ce("train", ce, len(batch), loss)

    def evaluate(self, batch: TokenBatch | AudioBatch, split: str) -> None:
        codes, lengths, wav = self.batch_codes(batch)
        c = self.batch_conditions(batch, codes, lengths, wav, train=False)
        ce, _ = self.compute_losses(codes, lengths, c.cond, c.mask, c.prefix)
        if c.prefix is not None:  # what melody / style add: the same batch with a null (zero) prefix
            ce_text, _ = self.compute_losses(codes, lengths, c.cond, c.mask, torch.zeros_like(c.prefix))
            self.log(f"{split}/ce_text_only", ce_text.mean(), sync_dist=True, batch_size=len(batch))
        self.log_ce(split, ce, len(batch))

    @property
    def frame_rate(self) -> float | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        codec = getattr(dm, "codec", None)
        return None if codec is None else float(codec.frame_rate)


def _token_module() -> type:
    from ostinato.data.token_datamodule import TokenDataModule

    return TokenDataModule
