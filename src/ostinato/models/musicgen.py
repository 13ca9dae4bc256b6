"""MusicGen: a ``CodebookLM`` over codec tokens, conditioned on text, melody and style, with its frozen codec.

The model is what training and generation share: the LM, the conditioners, the delay pattern and the
conditioning methods (``condition``, ``style_tokens``, ``prefix``...). ``MusicGenFamily`` trains it;
``generate`` samples audio from it, in the spirit of audiocraft's ``MusicGen.generate``.

Text: a frozen ``TextConditioner`` (the encoder stays out of the state dict). Melody (MusicGen-melody): the one-hot
chromagram of a reference, projected to the LM width and prepended. Style (MusicGen-Style): an excerpt -> frozen
features (the codec's latents, or an HF audio encoder) -> ``StyleConditioner`` tokens, prepended before the melody.
A null prefix condition is zeros of the same shape. The codec is a frozen helper (``attach_codec``), not a
submodule: not trained, not in the state dict.

Long outputs: ``LongForm("window", ...)`` is audiocraft's sliding window (each new window is prompted with the last
``window - stride`` seconds); ``LongForm("chain", ...)`` is UnlimitedMusicGen's chaining of independent segments
joined by a crossfade over their shared ``overlap``. In both, the melody prefix of every window is the part of the
melody (looped when shorter than the output) under that window, as in training; an import of audiocraft's chroma
(``melody.chroma: audiocraft``) follows audiocraft's ``generate_with_chroma`` instead (``_audiocraft_melody``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ostinato.data.audio import convert_channels
from ostinato.models.codec import Codec
from ostinato.nn.chroma import MelodyConditioner
from ostinato.nn.conditioners import TextConditioner
from ostinato.nn.decoding import GenerationParams, Progress, crossfade, generate, generate_chained
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.resample import resample
from ostinato.nn.style import HFAudioFeatures, StyleConditioner, codec_latent_features
from ostinato.nn.transformer import CodebookLM, lm_config

__all__ = ["MusicGen", "Semantics", "LongForm", "AudioRef", "recorded_codec", "locate", "model_kwargs",
           "exported_family", "imported_kwargs", "stereo_kwargs", "FAMILY_TARGET"]

FAMILY_TARGET = "ostinato.families.musicgen.MusicGenFamily"
# codecs come in several formats (ostinato, transformers, audiocraft) that interop reads; resolved on use, as the
# registry's entries are, so the model sits below the readers
TRAINING_KEYS = {"melody": ("dropout",), "style": ("dropout", "penalty_weight")}


class AudioRef(Protocol):
    """A reference recording: ``wav [C, T]`` at ``sample_rate`` (``generation.request.AudioInput`` is one)."""

    wav: Tensor
    sample_rate: int


@dataclass(frozen=True)
class Semantics:
    """How the model's source computes what generation, evaluation and training share; an import records its
    source's, so that the imported model gives the source's tokens and losses.

    text_padding: "masked" (ostinato, transformers): cross-attention skips the padded positions of a batch's
        shorter texts; "attended" (audiocraft): they are zero vectors that still take a share of the softmax, so a
        text's condition depends on the longest text of its batch.
    loss_frames: "all" (ostinato, transformers): every valid frame of every codebook is a target, and frames
        past an item's length are special tokens in the context; "trim_delays" (audiocraft's solver): the last
        ``delays[k]`` frames of codebook ``k`` of the batch are not targets, and the frames past an item's length
        keep their codes in the context (``masked_lm_losses``).
    """

    text_padding: str = "masked"
    loss_frames: str = "all"

    def __post_init__(self) -> None:
        if self.text_padding not in ("masked", "attended"):
            raise ValueError(f"family.semantics.text_padding={self.text_padding!r}: use masked or attended")
        if self.loss_frames not in ("all", "trim_delays"):
            raise ValueError(f"family.semantics.loss_frames={self.loss_frames!r}: use all or trim_delays")


@dataclass
class LongForm:
    """How to go past one window: ``mode`` "window" (sliding, ``stride`` s added per extra window) or "chain"
    (segments of ``window`` s sharing ``overlap`` s, crossfaded). ``window`` None = the whole output at once."""

    mode: str = "window"
    window: float | None = None
    stride: float | None = None
    overlap: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("window", "chain"):
            raise ValueError(f"long-form mode must be 'window' or 'chain', got {self.mode!r}")
        if self.window is not None and self.window <= 0:
            raise ValueError(f"long-form window {self.window:g} s must be > 0 (--long-form-window)")
        if self.window is None:
            return
        if self.mode == "window" and self.stride is not None and not 0 < self.stride <= self.window:
            raise ValueError(f"long-form stride {self.stride:g} s must be > 0 and at most the window "
                             f"({self.window:g} s): lower --long-form-stride or raise --long-form-window")
        if self.mode == "chain" and not 0 <= self.overlap < self.window:
            raise ValueError(f"long-form overlap {self.overlap:g} s must be >= 0 and shorter than the window "
                             f"({self.window:g} s): lower --long-form-overlap or raise --long-form-window")


def recorded_codec(cfg: Mapping[str, Any] | None, strict: bool = False) -> str | None:
    """The codec a MusicGen's stored config names: ``family.codec``, else the one of its training token shards
    (``data.train``); None when neither (or, unless ``strict``, when the token shards cannot be read)."""
    from ostinato.data.tokens import TokenManifest

    cfg = cfg or {}
    family = cfg.get("family") or {}
    ref = family.get("codec")
    # a fine-tuned import: the import's codec (not a mono import's when the model is its stereo version)
    if ref is None and family.get("export") is not None and not family.get("stereo_from_mono"):
        ref = exported_family(family["export"]).get("codec")
    train = (cfg.get("data") or {}).get("train")
    if ref is None and train is not None:
        try:
            ref = TokenManifest.load(train).codec.id
        except (FileNotFoundError, ValueError):
            if strict:
                raise
    return None if ref is None else str(ref)


def locate(ref: str, folder: Path | None) -> str:
    """A relative path as the same path under ``folder`` when it is there (an export records its codec and text
    encoder relative to itself), else as recorded."""
    path = Path(ref).expanduser()
    if ref.startswith("//") or path.is_absolute() or folder is None:
        return ref
    inside = Path(folder) / path
    return str(inside) if inside.exists() else ref


def exported_family(export: str | Path) -> dict[str, Any]:
    """The ``family`` section of a MusicGen export folder's ``config.yaml`` (plain containers, no ``_target_``;
    relative paths resolved against the folder)."""
    from omegaconf import OmegaConf

    folder = Path(export).expanduser()
    path = folder / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"family.export={export}: no config.yaml there; give the folder that "
                                "`ostinato import` (or `ostinato export`) wrote")
    family = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("family")  # type: ignore[union-attr]
    target = family.get("_target_") if isinstance(family, dict) else None
    if target != FAMILY_TARGET:
        raise ValueError(f"{path}: family._target_ is {target!r}, expected {FAMILY_TARGET}")
    return _located({k: v for k, v in family.items() if k != "_target_"}, folder)


def _located(family: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    if family.get("codec") is not None:
        family["codec"] = locate(str(family["codec"]), folder)
    if isinstance(family.get("text"), Mapping) and family["text"].get("model"):
        family["text"] = {**family["text"], "model": locate(str(family["text"]["model"]), folder)}
    if isinstance(family.get("style"), Mapping) and family["style"].get("features", "codec") != "codec":
        family["style"] = {**family["style"], "features": locate(str(family["style"]["features"]), folder)}
    return family


def _merge(base: Mapping[str, Any] | None, changes: Mapping[str, Any] | None, key: str) -> dict[str, Any] | None:
    """``base`` updated with the non-null ``changes``; changes to an absent section are an error."""
    changes = {k: v for k, v in (changes or {}).items() if v is not None}
    if base is None:
        if changes:
            raise ValueError(f"family.{key}: the imported model has no {key} section to change ({sorted(changes)})")
        return None
    return {**base, **changes}


def imported_kwargs(export: str | Path, lm: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None,
                    stereo_from_mono: bool = False, **replace: Any) -> dict[str, Any]:
    """The family kwargs of an import (``export``'s config.yaml) with ``lm`` / ``text`` changes merged, made the
    stereo version of that mono model with ``stereo_from_mono`` (``stereo_kwargs``), and the non-null ``replace``
    values (delays, cfg_dropout, attribute_dropout, codec) put in."""
    base = exported_family(export)
    if stereo_from_mono:
        base = stereo_kwargs(base)
    kwargs = dict(base, lm=_merge(base.get("lm") or {}, lm, "lm"), text=_merge(base.get("text"), text, "text"))
    for key, value in replace.items():
        if value is not None:
            kwargs[key] = list(value) if key == "delays" else value
    return kwargs


def stereo_kwargs(mono: Mapping[str, Any], codec: str | None = None) -> dict[str, Any]:
    """The kwargs of the stereo version of the mono MusicGen of kwargs ``mono`` (``stereo_from_mono``): twice the
    codebooks, L and R of codebook ``k`` at ``2k`` and ``2k + 1`` with the mono delay of ``k`` (``[0, 1, 2, 3]`` ->
    ``[0, 0, 1, 1, 2, 2, 3, 3]``), and ``codec`` (None: the token shards' interleaved stereo codec)."""
    n_q = int(mono["n_q"])
    delays = list(mono.get("delays") or range(n_q))
    return {**mono, "n_q": 2 * n_q, "delays": [int(d) for d in delays for _ in range(2)], "codec": codec}


def model_kwargs(family: Mapping[str, Any], folder: Path | None = None) -> dict[str, Any]:
    """A family config section (``MusicGenFamily`` or ``ImportedMusicGenFamily`` kwargs) -> ``MusicGen`` kwargs:
    an import's section expanded (made stereo with ``stereo_from_mono``), training-only keys dropped, relative paths
    resolved against ``folder``."""
    family = {k: v for k, v in family.items() if k not in ("_target_", "optim")}
    stereo = bool(family.pop("stereo_from_mono", False))
    if "export" in family:
        export = locate(str(family.pop("export")), folder)
        family = imported_kwargs(export, **family, stereo_from_mono=stereo)
    elif stereo and family.get("delays") is None:
        n_q = int(family["n_q"])
        if n_q % 2:
            raise ValueError(f"family.stereo_from_mono: n_q={n_q} must be even (L/R codebook pairs)")
        family = {**family, "delays": [d for d in range(n_q // 2) for _ in range(2)]}
    kw = {k: family.get(k) for k in ("n_q", "card", "lm", "text", "melody", "style", "delays", "codec", "semantics")}
    for key, drop in TRAINING_KEYS.items():
        if kw[key] is not None:
            kw[key] = {k: v for k, v in kw[key].items() if k not in drop}
    return _located(kw, folder)


def _at(ref: AudioRef, sample_rate: int, channels: int,
        resampler: Callable[[Tensor, int, int], Tensor] = resample) -> Tensor:
    """``[1, channels, T']`` of a reference at ``sample_rate``."""
    wav = convert_channels(ref.wav.float(), "mono" if channels == 1 else "stereo")
    return resampler(wav, int(ref.sample_rate), sample_rate).unsqueeze(0)


class MusicGen(nn.Module):
    """MusicGen inference model.

    Args:
        n_q, card: codebooks and codebook size of the codec tokens the LM models.
        lm: ``LMConfig`` kwargs, optionally ``preset: tiny|small|medium|large`` plus overrides.
        text: ``TextConditioner`` kwargs (``model``, ``max_length``, ``dropout``) plus ``fuse``: "cross"
            (cross-attention, default) or "prefix" (MusicGen-melody: the zero-padded text states are prepended after
            the melody and attended whole; needs ``semantics.text_padding: attended``); None = no text.
        melody: ``MelodyConditioner`` kwargs (``sample_rate`` of the chroma analysis, ``hop_seconds``, ``argmax``);
            None = no melody.
        style: ``StyleConditioner`` kwargs plus ``features`` ("codec" = the codec's latents, or a local HF audio
            encoder folder), ``layer``, ``trust_remote_code``; None = no style.
        delays: the delay pattern (default ``[0, 1, ..., n_q - 1]``).
        codec: the codec reference the tokens come from, loaded on first use unless one is attached.
        semantics: ``Semantics`` kwargs (an import's source's; default ostinato's).
    """

    def __init__(self, n_q: int, card: int, lm: Mapping[str, Any] | None = None,
                 text: Mapping[str, Any] | None = None, melody: Mapping[str, Any] | None = None,
                 style: Mapping[str, Any] | None = None, delays: Sequence[int] | None = None,
                 codec: str | None = None, semantics: Mapping[str, Any] | None = None):
        super().__init__()
        self.semantics = Semantics(**(semantics or {}))
        self.n_q, self.card = int(n_q), int(card)
        text = None if text is None else dict(text)
        self.text_prefix = text is not None and text.pop("fuse", "cross") == "prefix"
        if self.text_prefix and self.semantics.text_padding != "attended":
            raise ValueError("family.text.fuse=prefix prepends the padded text whole: set "
                             "family.semantics.text_padding=attended")
        self.cfg = lm_config(lm, n_q=self.n_q, card=self.card,
                             cross_attention=text is not None and not self.text_prefix)
        self.lm = CodebookLM(self.cfg)
        self.text: TextConditioner | None = None
        if text is not None:
            kw = dict(text)
            width = self.cfg.dim if self.text_prefix else self.cfg.kv_dim
            if "dim" in kw and kw["dim"] != width:
                raise ValueError(f"family.text.dim={kw['dim']} must equal the LM width it feeds ({width}); "
                                 "leave it out")
            kw["dim"] = width
            self.text = TextConditioner(**kw)
        self.melody: MelodyConditioner | None = None
        if melody is not None:
            kw = dict(melody)
            kw.setdefault("sample_rate", 32000)
            self.melody = MelodyConditioner(dim=self.cfg.dim, **kw)
        self.style: StyleConditioner | None = None
        self.style_source = "codec"
        if style is not None:
            self.style = self._style(dict(style))
        self.pattern = DelayPattern(self.n_q, delays)
        self.codec_ref = None if codec is None else str(codec)

    def _style(self, kw: dict[str, Any]) -> StyleConditioner:
        self.style_source = str(kw.pop("features", "codec"))
        hf_kw = {k: kw.pop(k) for k in ("layer", "trust_remote_code", "normalize", "resampler") if k in kw}
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
        return StyleConditioner(dim=self.cfg.dim, **kw)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], folder: Path | None = None) -> MusicGen:
        """The model of a training config (``cfg["family"]``: ``MusicGenFamily`` / ``ImportedMusicGenFamily``
        kwargs); the codec is ``family.codec`` (an export's own ``codec/``, relative to ``folder``) or the one the
        training token shards record."""
        kw = model_kwargs(cfg.get("family") or {}, folder)
        if kw["codec"] is None:
            kw["codec"] = recorded_codec(cfg)
        return cls(**kw)

    @property
    def device(self) -> torch.device:
        return self.lm.emb[0].weight.device

    # -- the frozen codec -----------------------------------------------------------------------------------
    @property
    def needs_audio_features(self) -> bool:
        return self.melody is not None or self.style is not None

    def attach_codec(self, codec: Codec) -> None:
        """Use ``codec`` (frozen, not a submodule) for decoding and for melody / style features."""
        if codec.n_q < self.n_q or codec.card != self.card:
            raise ValueError(f"the model predicts {self.n_q} x {self.card} codes but the codec has "
                             f"{codec.n_q} x {codec.card}; pass the codec it was trained with (--codec)")
        self.__dict__["_codec"] = codec.eval().requires_grad_(False)

    def set_codec_loader(self, loader: Callable[[str], Codec]) -> None:
        """How ``codec`` loads ``codec_ref`` on first use (codecs of other toolkits are read by ``ostinato.interop``,
        a floor above the models: the caller that may import it hands its loader in)."""
        self.__dict__["_codec_loader"] = loader

    @property
    def codec(self) -> Codec:
        codec = self.__dict__.get("_codec")
        if codec is None:
            if self.codec_ref is None:
                raise ValueError("this MusicGen has no codec: set family.codec (or train on token shards, whose "
                                 "manifest names their codec), or pass --codec")
            loader = self.__dict__.get("_codec_loader")
            if loader is None:
                raise ValueError(f"this MusicGen's codec ({self.codec_ref}) is not attached: load the model with "
                                 "ostinato.load, or call attach_codec(codec)")
            self.attach_codec(loader(self.codec_ref))
            codec = self.__dict__["_codec"]
        if next(codec.parameters()).device != self.device:
            codec.to(self.device)
        return codec

    @property
    def sample_rate(self) -> int:
        return int(self.codec.sample_rate)

    # -- conditioning ---------------------------------------------------------------------------------------
    def condition(self, texts: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
        """``(cond [B, Tc, D], mask [B, Tc])`` for the LM; None, None when there is no text conditioner.

        A null condition (all-False mask) attends to one zero vector instead: with bias-free keys/values that
        adds exactly nothing, where an all-masked softmax would give NaN. With ``semantics.text_padding``
        "attended" every position of the batch's padded length is attended (padding is zero vectors), and the CFG
        null condition attends its zeros too (``null_mask``). A text
        prefix (``text.fuse: prefix``) is no cross-attention condition: see ``text_tokens``.
        """
        if self.text is None or self.text_prefix:
            return None, None
        cond, mask = self.text(list(texts))
        if self.semantics.text_padding == "attended":
            return cond, torch.ones_like(mask)
        attend = mask.clone()
        attend[~mask.any(dim=1), 0] = True
        return cond, attend

    def null_mask(self, mask: Tensor | None) -> Tensor | None:
        """``[B, Tc]``: what cross-attention attends of the CFG null condition (zero states) beside ``mask``, the
        condition's: nothing (None) but under "attended" text padding, where audiocraft tokenizes the null
        condition in the same batch as the texts and attends its zero states at their padded length."""
        if mask is None or self.semantics.text_padding != "attended":
            return None
        return torch.ones_like(mask)

    def text_tokens(self, texts: Sequence[str]) -> Tensor | None:
        """``[B, Tt, dim]``: the texts as prefix tokens (zero vectors past each text and for "", all attended);
        None unless ``text.fuse`` is "prefix"."""
        if self.text is None or not self.text_prefix:
            return None
        return self.text(list(texts))[0]

    def melody_frames(self, n_frames: int, frame_rate: float) -> int:
        """Melody prefix tokens for a window of ``n_frames`` codec frames."""
        assert self.melody is not None
        if self.melody.frames is not None:
            return self.melody.frames
        return max(1, self.melody.num_frames(math.ceil(n_frames / frame_rate * self.melody.sample_rate)))

    def fit_chroma(self, chroma: Tensor, frames: int) -> Tensor:
        """``[B, F, 12]`` looped when shorter than ``frames``, cut when longer."""
        if chroma.shape[1] < frames:
            chroma = chroma.repeat(1, -(-frames // chroma.shape[1]), 1)
        return chroma[:, :frames]

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

    def style_excerpt(self, codes: Tensor, train: bool) -> tuple[list[int], int]:
        """``(start frame per item, length)`` of the style excerpts of ``codes [B, K, T]``: per-item starts in
        training, frame 0 in eval; the length is shared by the batch."""
        assert self.style is not None
        start, length = self.style.excerpt(codes.shape[-1], self.codec.frame_rate, train=train)
        if train and codes.shape[-1] > length:
            return torch.randint(0, codes.shape[-1] - length + 1, (codes.shape[0],)).tolist(), length
        return [start] * codes.shape[0], length

    def style_tokens(self, codes: Tensor, train: bool, wav: Tensor | None = None,
                     excerpt: tuple[list[int], int] | None = None) -> tuple[Tensor, Tensor]:
        """The style excerpts of ``codes [B, K, T]`` (``excerpt``: from ``style_excerpt``, drawn when None) ->
        ``(tokens [B, Ts, dim], penalty)``."""
        assert self.style is not None
        codec = self.codec
        starts, length = excerpt or self.style_excerpt(codes, train)
        cut = torch.stack([c[:, s:s + length] for c, s in zip(codes, starts)])
        piece = None
        if wav is not None:
            hop = codec.hop_length
            piece = torch.stack([w[:, s * hop:(s + length) * hop] for w, s in zip(wav, starts)])
        feats, _ = self.style_features(cut, piece)
        return self.style(feats)

    def prefix(self, style: Tensor | None, melody: Tensor | None, text: Tensor | None = None) -> Tensor | None:
        """``[B, P, dim]``: style tokens, melody tokens, then text tokens (MusicGen-melody's order of
        ``[self_wav, description]``; None when none)."""
        parts = [p for p in (style, melody, text) if p is not None]
        return torch.cat(parts, dim=1) if parts else None

    def _style_prefix(self, style: AudioRef | None, b: int) -> Tensor | None:
        if self.style is None:
            if style is not None:
                raise ValueError("--style given, but this model has no style conditioner (family.style)")
            return None
        codec = self.codec
        if style is None:  # the dropped-style condition the model also trained on
            return torch.zeros(b, self._null_style_tokens(), self.cfg.dim, device=self.device)
        features = self.__dict__.get("_style_features")  # an import resamples as its source (audiocraft) does
        wav = _at(style, codec.sample_rate, codec.channels, resample if features is None else features.resample)
        wav = wav.to(self.device)
        codes = codec.encode(wav, n_q=self.n_q).codes
        self.style.eval()
        tokens, _ = self.style_tokens(codes, train=False, wav=wav)
        return tokens.expand(b, -1, -1)

    def _null_style_tokens(self) -> int:
        assert self.style is not None
        if self.style.null_tokens is not None:
            return self.style.null_tokens
        if self.style_source == "codec":
            frames = int(self.style.eval_excerpt_seconds * self.codec.frame_rate)
        else:
            features: HFAudioFeatures = self.__dict__["_style_features"]
            frames = features.num_frames(round(self.style.eval_excerpt_seconds * features.sample_rate))
        return self.style.num_tokens(frames)

    def _melody_chroma(self, melody: AudioRef, need: int) -> Tensor:
        """``[1, need, 12]``: the reference's chromagram, looped when shorter than the output, cropped when longer."""
        assert self.melody is not None
        chroma = self.melody.features(melody.wav[None].float().to(self.device), int(melody.sample_rate))
        return self.fit_chroma(chroma, need)

    def _melody_prefix(self, melody: AudioRef | Sequence[AudioRef] | None, b: int, total_frames: int,
                       one_window: bool = True) -> Callable[[int, int], Tensor] | None:
        """``(start frame, frames) -> [B, P, dim]``: the melody tokens under a window (audiocraft's windows for
        its chroma: ``_audiocraft_melody``)."""
        if self.melody is None:
            if melody is not None:
                raise ValueError("--melody given, but this model has no melody conditioner (family.melody)")
            return None
        fr, mel = float(self.codec.frame_rate), self.melody
        if melody is None:  # the null melody (of the source's length, when it fixes one)
            return lambda start, n: mel.null_tokens(b, mel.null_frames or self.melody_frames(n, fr))
        need = self.melody_frames(total_frames, fr) + 1
        melodies = list(melody) if isinstance(melody, Sequence) else [melody]
        if len(melodies) not in (1, b):
            raise ValueError(f"{len(melodies)} melodies for {b} prompts: give one melody, or one per prompt")
        if mel.chroma == "audiocraft":
            return self._audiocraft_melody(melodies, b, one_window)
        chroma = torch.cat([self._melody_chroma(m, need) for m in melodies]).expand(b, -1, -1)

        def window(start: int, n: int) -> Tensor:
            first = round(start / fr * mel.frame_rate)
            return mel(chroma[:, first:first + self.melody_frames(n, fr)])

        return window

    def _audiocraft_melody(self, melodies: Sequence[AudioRef], b: int,
                           one_window: bool) -> Callable[[int, int], Tensor]:
        """audiocraft's ``generate_with_chroma``: an output of one window takes the chroma of the whole melody (any
        length, masked past each one's end); past one window, each window takes the melody's waveform looped from
        the window's start for the window's length."""
        fr, mel = float(self.codec.frame_rate), self.melody
        assert mel is not None
        wavs = [mel.resample(m.wav.float().mean(0, keepdim=True), int(m.sample_rate)) for m in melodies]  # [1, T]

        def window(start: int, n: int) -> Tensor:
            pieces = wavs
            if not one_window:
                first, length = int(start / fr * mel.sample_rate), int(n / fr * mel.sample_rate)
                pieces = [w[:, torch.arange(first, first + length) % w.shape[-1]] for w in wavs]
            chroma = mel.batch_features(pieces, mel.sample_rate)
            return mel(chroma).expand(b, -1, -1)

        return window

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, descriptions: Sequence[str], duration: float = 10.0, *,
                 melody: AudioRef | Sequence[AudioRef] | None = None, style: AudioRef | None = None,
                 continuation: AudioRef | None = None, params: GenerationParams | None = None,
                 progress: Progress | None = None, long_form: LongForm | None = None) -> Tensor:
        """One clip per description ("" = no text) -> wav ``[B, C, round(duration * sample_rate)]``.

        ``continuation``: the clips start with this audio (its codes are the prompt) and go on to ``duration``
        seconds in all. ``melody``: one reference for every description, or one per description; ``style``: one
        reference. ``params``: sampling (default ``GenerationParams()``). ``long_form``: see ``LongForm``
        (default: one window).
        """
        self.eval()
        codec = self.codec
        params = params or GenerationParams()
        long_form = long_form or LongForm()
        fr, b = float(codec.frame_rate), len(descriptions)
        # enough frames to cover the clip (DAC's 86.13 Hz rounds 0.5 s down to 43 frames, 17 samples short)
        frames = max(1, -(-round(duration * codec.sample_rate) // codec.hop_length))
        cond, mask = self.condition(list(descriptions))
        null_mask = self.null_mask(mask)
        text_tokens = self.text_tokens(list(descriptions))
        style_tokens = self._style_prefix(style, b)
        one_window = long_form.window is None or round(long_form.window * fr) >= frames
        melody_fn = self._melody_prefix(melody, b, frames, one_window)
        prefix = None
        if style_tokens is not None or melody_fn is not None or text_tokens is not None:
            def prefix(start: int, n: int) -> Tensor | tuple[Tensor, ...]:
                mel = None if melody_fn is None else melody_fn(start, n)
                full = self.prefix(style_tokens, mel, text_tokens)
                if params.cfg_beta is not None and text_tokens is not None:  # double CFG: a style-only row
                    style_only = self.prefix(style_tokens, mel, torch.zeros_like(text_tokens))
                    return full, style_only, torch.zeros_like(full)
                if self.melody is None or self.melody.chroma != "transformers" or mel is None:
                    return full  # the null rows of classifier-free guidance: zeros
                null = self.melody.null_tokens(b, mel.shape[1])
                zeros = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
                return full, self.prefix(zeros(style_tokens), null, zeros(text_tokens))
        prompt = None
        if continuation is not None:
            wav = _at(continuation, codec.sample_rate, codec.channels).to(self.device)
            prompt = codec.encode(wav, n_q=self.n_q).codes.expand(b, -1, -1)
            if prompt.shape[-1] >= frames:
                raise ValueError(f"the continued audio ({prompt.shape[-1] / fr:.2f} s) is not shorter than the "
                                 f"requested duration ({duration:g} s); ask for a longer --seconds")
        window = None if long_form.window is None else max(1, round(long_form.window * fr))
        n_samples = round(duration * codec.sample_rate)
        chain = long_form.mode == "chain" and window is not None and window < frames
        stride = None if long_form.stride is None else max(1, round(long_form.stride * fr))
        head = None
        if prompt is not None and window is not None and prompt.shape[-1] >= window:
            # a prompt longer than a window: its start is kept as is, its last frames are the context
            keep = round(long_form.overlap * fr) if chain else window - (stride or max(1, window // 2))
            keep = max(1, min(keep, window - 1))
            head, prompt = prompt[..., :-keep], prompt[..., -keep:]
            frames -= head.shape[-1]
            if prefix is not None:
                offset, whole = head.shape[-1], prefix
                prefix = lambda start, n: whole(start + offset, n)  # noqa: E731
        if chain:
            overlap = round(long_form.overlap * fr)
            res = generate_chained(self.lm, self.pattern, frames, segment_frames=window, overlap_frames=overlap,
                                   cond=cond, cond_mask=mask, prompt=prompt, params=params, batch_size=b,
                                   progress=progress, prefix=prefix, null_mask=null_mask)
            segments = list(res.segments)
            if head is not None:
                segments[0] = torch.cat([head, segments[0]], dim=-1)
            wavs = [codec.decode(seg) for seg in segments]
            return crossfade(wavs, overlap * codec.hop_length)[..., :n_samples]
        if window is not None:
            params = GenerationParams(**{**params.__dict__, "max_window_frames": window,
                                         "extend_stride_frames": stride})
        codes = generate(self.lm, self.pattern, frames, cond=cond, cond_mask=mask, prompt=prompt, params=params,
                         batch_size=b, progress=progress, prefix=prefix, null_mask=null_mask)
        if head is not None:
            codes = torch.cat([head, codes], dim=-1)
        return codec.decode(codes)[..., :n_samples]
