"""The MusicGen family: a ``CodebookLM`` over codec tokens, conditioned on text, melody and style.

Data: token shards (``TokenDataModule``) or audio shards (``AudioDataModule``) tokenized on the fly by the frozen
codec (``family.codec``).

Training step: codes ``[B, K, T]`` -> ``DelayPattern.build`` (special token = ``card``) -> the LM reads steps
``[:-1]`` and predicts steps ``[1:]``; the cross-entropy counts only positions that hold a real code of a valid
frame (pattern mask and item lengths). Frames past an item's length are replaced by the special token before the
pattern is built, so padding never enters the context of a valid target.

The model (``ostinato.models.musicgen.MusicGen``, ``self.model``) holds the LM, the conditioners, the pattern and
the frozen codec; this wrapper adds the dropouts, the loss and the logging (checkpoint keys ``model.lm.*``...).

Text: each sample's caption merged with its structured fields (``description``), encoded by a frozen
``TextConditioner``; in training a field is dropped with ``attribute_dropout`` and the whole description with
``cfg_dropout`` (the null condition for classifier-free guidance: an empty text, all-False mask).

Melody (MusicGen-melody): the one-hot chromagram of the segment's own audio (decoded from its codes by the frozen
codec when training on tokens), projected to the LM width and prepended. Style (MusicGen-Style): an excerpt of the
segment -> frozen features (the codec's latents, or an HF audio encoder) -> ``StyleConditioner`` (transformer + RVQ
bottleneck + downsampling) -> tokens, prepended before the melody. A dropped (or null) prefix condition is zeros
of the same shape, which is also what generation feeds the unconditional CFG rows. The codec is a frozen helper,
not a submodule (not trained, not in checkpoints), like the text encoder. On token shards the chroma is that of
the codec's reconstruction, which a small codec barely keeps (``generation.melody_adherence.melody_through_codec``);
on audio shards it is the segment's own audio, as the melody given at generation is.

Validation (``condition_losses``): ``ce`` with every condition, then the same batch with each condition at its null
alone (``ce_no_text``, ``ce_no_melody``, ``ce_no_style``) and with melody and style both (``ce_text_only``).
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ostinato.data.batch import AudioBatch
from ostinato.data.token_datamodule import TokenBatch
from ostinato.errors import DataMismatch, UserError
from ostinato.families.codebook_lm import CodebookLMFamily, masked_lm_losses
from ostinato.interop.codecs import load_codec
from ostinato.models.codec import Codec
from ostinato.models.musicgen import MusicGen, imported_kwargs, model_kwargs
from ostinato.nn.conditioners import description

__all__ = ["MusicGenFamily", "ImportedMusicGenFamily", "Conditions"]


@dataclass
class Conditions:
    """What the LM is conditioned on: cross-attention ``cond [B, Tc, D]`` + ``mask [B, Tc]``, a ``prefix
    [B, P, dim]`` (style tokens, melody, then a prefixed text), the style bottleneck's commitment ``penalty``, and
    ``text_only``: the prefix with style and melody at their null condition (None without either); ``targets``:
    ``[B, T]`` False on the frames a style excerpt was cut from when ``style.mask_excerpt`` (None = all).
    ``without``: per condition the model has ("text", "melody", "style"), ``(cond, mask, prefix)`` with that one
    condition at its null and the others kept (filled outside training only: what validation scores)."""

    cond: Tensor | None = None
    mask: Tensor | None = None
    prefix: Tensor | None = None
    penalty: Tensor | None = None
    text_only: Tensor | None = None
    targets: Tensor | None = None
    without: dict[str, tuple[Tensor | None, Tensor | None, Tensor | None]] = field(default_factory=dict)


class MusicGenFamily(CodebookLMFamily):
    """MusicGen LM training on token shards (or audio tokenized on the fly): ``self.model`` is the
    ``ostinato.models.musicgen.MusicGen`` it trains; this adds dropouts, the loss and logging.

    Args:
        n_q, card, lm, text, delays, codec: the model's (see ``MusicGen``); n_q / card are checked against the
            token manifests' codec at setup (``data`` ``codec.n_q`` / ``codec.card``). ``codec`` None = the
            one recorded in the token shards' manifest.
        melody: ``MelodyConditioner`` kwargs plus ``dropout`` (probability of leaving the melody out alone).
        style: ``StyleConditioner`` kwargs (see ``MusicGen``) plus ``dropout`` and ``penalty_weight``.
        cfg_dropout: probability, per training item, of the null condition (no text, zero prefix).
        attribute_dropout: probability, per training item and structured field, of leaving the field out.
        text_dropout: probability of leaving the text out alone (what double CFG's "style only" rows need).
        semantics: ``Semantics`` kwargs (text padding in cross-attention, which frames the loss counts).
        lora: ``LoRA`` kwargs (``rank``, ``alpha``, ``dropout``, ``targets``): train adapters on the LM alone;
            null = train the model.
        stereo_from_mono: ``continue_from`` is a mono MusicGen and this model its stereo version (``n_q`` L/R
            interleaved codebooks, delays by default ``[0, 0, 1, 1, ...]``): ``engine.weights.stereo_from_mono``
            maps its codebook embeddings and heads onto both channels.
    """

    def __init__(self, n_q: int, card: int, lm: Mapping[str, Any] | None = None,
                 text: Mapping[str, Any] | None = None, melody: Mapping[str, Any] | None = None,
                 style: Mapping[str, Any] | None = None, delays: Sequence[int] | None = None,
                 cfg_dropout: float = 0.1, attribute_dropout: float = 0.0, text_dropout: float = 0.0,
                 codec: str | None = None, semantics: Mapping[str, Any] | None = None,
                 lora: Mapping[str, Any] | None = None, stereo_from_mono: bool = False,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        kwargs = dict(n_q=n_q, card=card, lm=lm, text=text, melody=melody, style=style, delays=delays, codec=codec,
                      semantics=semantics, stereo_from_mono=stereo_from_mono)
        self.stereo_from_mono = bool(stereo_from_mono)  # read by continue_from (engine.weights.load_weights)
        self.model = MusicGen(**model_kwargs(kwargs))
        self.model.set_codec_loader(load_codec)
        self.melody_dropout = float((melody or {}).get("dropout", 0.0))
        self.style_dropout = float((style or {}).get("dropout", 0.0))
        self.style_penalty_weight = float((style or {}).get("penalty_weight", 1.0))
        self.cfg_dropout, self.attribute_dropout = float(cfg_dropout), float(attribute_dropout)
        self.text_dropout = float(text_dropout)
        model = self.model
        ema = ["lm"] + (["text"] if model.text is not None else []) + (["melody"] if model.melody is not None else [])
        if model.style is not None:  # not the RVQ codebooks: they keep their own EMA
            ema += ["style.input_proj", "style.transformer", "style.output_proj"]
        self.ema_modules = tuple(f"model.{name}" for name in ema)
        self.use_lora(lora)

    @property
    def n_q(self) -> int:
        return self.model.n_q

    @property
    def card(self) -> int:
        return self.model.card

    # -- engine hooks ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        info = getattr(dm, "codec", None)
        if info is not None and not isinstance(info, Codec):
            for key, have in (("n_q", info.n_q), ("card", info.card)):
                mine = self.n_q if key == "n_q" else self.card
                if int(have) != mine:
                    name = "n_q" if key == "n_q" else "card"
                    raise DataMismatch(f"family.{name}={mine} does not match the token shards: their codec "
                                     f"({info.id}) has {key}={have}; set family.{name}={have}")
            self._sample_rate = info.sample_rate
            if self.model.codec_ref is None:
                self.model.codec_ref = str(info.id)
        needs_codec = self.model.needs_audio_features or not isinstance(dm, _token_module())
        if needs_codec and dm is not None:
            try:  # fails early, naming the fix, when there is none or it cannot be read
                codec = self.model.codec
            except (ValueError, FileNotFoundError) as e:
                raise UserError(f"family.codec: {e}") from None
            self._sample_rate = codec.sample_rate

    # -- conditioning ---------------------------------------------------------------------------------------
    def descriptions(self, batch: TokenBatch | AudioBatch, train: bool) -> list[str]:
        if not train:
            return [description(m) for m in batch.meta]
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
        return [description(m, rng, self.attribute_dropout) for m in batch.meta]

    def batch_codes(self, batch: TokenBatch | AudioBatch) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(codes [B, K, T], frame lengths [B], audio [B, C, T'] or None)`` of a token or audio batch."""
        if isinstance(batch, AudioBatch):
            codec = self.model.codec
            with torch.no_grad():
                codes = codec.encode(batch.audio, n_q=self.n_q).codes
            lengths = torch.div(batch.lengths + codec.hop_length - 1, codec.hop_length, rounding_mode="floor")
            return codes, lengths.clamp(max=codes.shape[-1]), batch.audio
        return batch.codes[:, :self.n_q], batch.lengths, None

    def batch_conditions(self, batch: TokenBatch | AudioBatch, codes: Tensor, lengths: Tensor,
                         wav: Tensor | None, train: bool) -> Conditions:
        """All the conditions of a batch, with CFG / text / melody / style dropout in training."""
        b, model = codes.shape[0], self.model
        texts = self.descriptions(batch, train)
        null = torch.rand(b) < (self.cfg_dropout if train else 0.0)
        drop_text = null | (torch.rand(b) < (self.text_dropout if train else 0.0))
        texts = ["" if d else t for t, d in zip(texts, drop_text.tolist())]
        cond, mask = model.condition(texts)
        out = Conditions(cond, mask)
        text = model.text_tokens(texts)  # MusicGen-melody's text prefix (None for cross-attention)
        if not model.needs_audio_features:
            out.prefix = text
            if not train and model.text is not None:
                out.without["text"] = self._without_text(b, None, text)
            return out
        codec = model.codec
        if wav is None and model.melody is not None:
            with torch.no_grad():
                wav = codec.decode(codes)
                valid = torch.arange(wav.shape[-1], device=wav.device)[None] < (lengths * codec.hop_length)[:, None]
                wav = wav * valid[:, None].to(wav.dtype)
        keep = lambda p: (~(null | (torch.rand(b) < p))).to(codes.device)  # noqa: E731
        style = melody = None
        if model.style is not None:
            starts, length = model.style_excerpt(codes, train)
            style, out.penalty = model.style_tokens(codes, train, wav, excerpt=(starts, length))
            if model.style.mask_excerpt:  # audiocraft's compute_mask: no loss on what the style was cut from
                frames = torch.arange(codes.shape[-1], device=codes.device)[None]
                first = torch.tensor(starts, device=codes.device)[:, None]
                out.targets = (frames < first) | (frames >= first + length)
            if train:
                style = style * keep(self.style_dropout)[:, None, None].to(style.dtype)
        if model.melody is not None:
            assert wav is not None
            frames = model.melody_frames(codes.shape[-1], codec.frame_rate)
            chroma = model.fit_chroma(model.melody.features(wav, codec.sample_rate), frames)
            melody = model.melody(chroma)
            if train:
                silent = model.melody.null_tokens(b, frames)
                melody = torch.where(keep(self.melody_dropout)[:, None, None], melody, silent)
        out.prefix = model.prefix(style, melody, text)
        silent = None if melody is None else model.melody.null_tokens(b, melody.shape[1])  # type: ignore[union-attr]
        no_style = None if style is None else torch.zeros_like(style)
        out.text_only = model.prefix(no_style, silent, text)
        if not train:
            if model.text is not None:
                out.without["text"] = self._without_text(b, model.prefix(style, melody, None), text)
            if melody is not None:
                out.without["melody"] = (out.cond, out.mask, model.prefix(style, silent, text))
            if style is not None:
                out.without["style"] = (out.cond, out.mask, model.prefix(no_style, melody, text))
        return out

    def _without_text(self, b: int, prefix: Tensor | None,
                      text: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(cond, mask, prefix)`` with the null text (the empty text of CFG dropout) and ``prefix`` (the other
        prefix conditions) kept."""
        cond, mask = self.model.condition([""] * b)
        null_text = None if text is None else torch.zeros_like(text)  # "" is zero vectors as a prefix
        parts = [p for p in (prefix, null_text) if p is not None]
        return cond, mask, torch.cat(parts, dim=1) if parts else None

    # -- loss -----------------------------------------------------------------------------------------------
    def compute_losses(self, codes: Tensor, lengths: Tensor, cond: Tensor | None = None,
                       cond_mask: Tensor | None = None, prefix: Tensor | None = None,
                       targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-codebook mean cross-entropy ``[K]`` over valid targets, and the count of those targets ``[K]``."""
        trim = self.model.semantics.loss_frames == "trim_delays"
        return masked_lm_losses(self.model.lm, self.model.pattern, codes, lengths, prefix, cond, cond_mask, trim,
                                targets)

    def _step(self, batch: TokenBatch | AudioBatch, train: bool) -> tuple[Tensor, Tensor | None]:
        codes, lengths, wav = self.batch_codes(batch)
        c = self.batch_conditions(batch, codes, lengths, wav, train)
        ce, _ = self.compute_losses(codes, lengths, c.cond, c.mask, c.prefix, c.targets)
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

    def condition_losses(self, batch: TokenBatch | AudioBatch, codes: Tensor, lengths: Tensor,
                         wav: Tensor | None) -> dict[str, Tensor]:
        """Validation's cross-entropies of one batch, each ``[K]``: ``ce`` with every condition; ``ce_no_text``,
        ``ce_no_melody``, ``ce_no_style``: the same batch with that one condition at its null (what each adds);
        ``ce_text_only``: melody and style both at theirs. Only the conditions the model has are keys."""
        c = self.batch_conditions(batch, codes, lengths, wav, train=False)
        out = {"ce": self.compute_losses(codes, lengths, c.cond, c.mask, c.prefix, c.targets)[0]}
        for name, (cond, mask, prefix) in c.without.items():
            out[f"ce_no_{name}"] = self.compute_losses(codes, lengths, cond, mask, prefix, c.targets)[0]
        if c.text_only is not None:
            alone = [name for name in ("melody", "style") if name in c.without]
            if len(alone) == 1:  # one prefix condition: nulling it is the text-only score
                out["ce_text_only"] = out[f"ce_no_{alone[0]}"]
            else:
                out["ce_text_only"] = self.compute_losses(codes, lengths, c.cond, c.mask, c.text_only, c.targets)[0]
        return out

    def evaluate(self, batch: TokenBatch | AudioBatch, split: str) -> None:
        codes, lengths, wav = self.batch_codes(batch)
        losses = self.condition_losses(batch, codes, lengths, wav)
        for name, ce in losses.items():  # what each condition adds: the same batch with it at its null
            if name != "ce":
                self.log(f"{split}/{name}", ce.mean(), sync_dist=True, batch_size=len(batch))
        self.log_ce(split, losses["ce"], len(batch))

    @property
    def frame_rate(self) -> float | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        codec = getattr(dm, "codec", None)
        return None if codec is None else float(codec.frame_rate)


def _token_module() -> type:
    from ostinato.data.token_datamodule import TokenDataModule

    return TokenDataModule


class ImportedMusicGenFamily(MusicGenFamily):
    """``MusicGenFamily`` with the architecture, text encoder, delays and codec of an import (``export``'s
    config.yaml), for fine-tuning: ``ostinato train family=musicgen_import family.export=OUT continue_from=OUT``.

    Args:
        export: the folder ``ostinato import`` wrote.
        lm, text: changes to the import's ``LMConfig`` / ``TextConditioner`` kwargs (null values keep the import's).
        delays, cfg_dropout, attribute_dropout, codec: replace the import's values when not null.
        lora: LoRA adapters to train instead of the model (see ``MusicGenFamily``).
        stereo_from_mono: train the stereo version of the (mono) import, from its weights (``continue_from=OUT``):
            twice its codebooks, its delays doubled (``[0, 0, 1, 1, ...]``), the token shards' stereo codec.
    """

    def __init__(self, export: str, lm: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None,
                 delays: Sequence[int] | None = None, cfg_dropout: float | None = None,
                 attribute_dropout: float | None = None, codec: str | None = None,
                 lora: Mapping[str, Any] | None = None, stereo_from_mono: bool = False,
                 optim: Mapping[str, Any] | None = None):
        kwargs = imported_kwargs(export, lm, text, stereo_from_mono=stereo_from_mono, delays=delays,
                                 cfg_dropout=cfg_dropout, attribute_dropout=attribute_dropout, codec=codec)
        kwargs.pop("lora", None)  # an export's own adapters are merged into its weights
        super().__init__(**kwargs, lora=lora, optim=optim)
        self.stereo_from_mono = bool(stereo_from_mono)
        self.export_dir = str(export)
