"""Jukebox's building blocks: a hierarchical VQ-VAE and the conditioners of its priors.

``HierarchicalVQVAE``: three independent VQ-VAEs over the same waveform, as in Jukebox, each a SEANet encoder,
one codebook (``ResidualVectorQuantizer`` with ``n_q = 1``: EMA codebook, k-means init, dead-code replacement)
and a SEANet decoder, i.e. an ostinato ``Codec`` with a single codebook. Their hops are in the ratio 1 : 4 : 16
(Jukebox: 8, 32, 128 samples at 44.1 kHz), so every top code covers 4 middle codes and 16 bottom codes::

    wav [B, C, T] --level l--> codes [B, 1, ceil(T / hop_l)] --level l decoder--> wav [B, C, T]

Level names, from the finest: ``bottom``, ``middle``, ``top``.

Prior conditioners of a ``CodebookLM``:

* ``MetadataConditioner``: one embedding per metadata field (genre, composer, ...). Values are hashed into
  ``buckets`` rows per field, twice (stable CRC-32s of the lower-cased text, unsalted and salted), and the two rows
  summed, so no vocabulary has to be built or stored and any value, seen in training or not, maps to a pair of
  rows; row 0 is "unknown / dropped". With one hash two of the demo's 24 genres shared a row in 1024 ("march",
  "scottish strathspey"), and the prior could not tell them apart; two values now meet only if both hashes
  collide (about 1 in a million for a pair). The LM's prefix.
* ``UpperConditioner``: the codes of the level above, embedded, refined by residual convolutions at their own rate,
  upsampled by nearest repetition (``ratio``) and a convolution: one vector per frame of the level being modelled,
  added (as in Jukebox) to the LM's input at the step that predicts that frame. In a prefix the condition of frame t
  would sit a whole window back, a distance the LM has to learn to attend to before the upper codes mean anything,
  and the upsamplers barely used them.

``LevelPrior``: one level's ``CodebookLM`` with those conditions; ``Jukebox``: the VQ-VAE and the three priors,
``generate(prompts or metadata, duration)`` samples top -> middle -> bottom codes and decodes the bottom ones.
"""
from __future__ import annotations

import inspect
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.data.manifest import StreamInfo
from ostinato.models.codec import Codec, CodecOutput
from ostinato.nn.decoding import GenerationParams, Progress, generate
from ostinato.nn.init import unit_gain_
from ostinato.nn.patterns import ParallelPattern
from ostinato.nn.transformer import CodebookLM, lm_config

__all__ = ["LEVELS", "UPPER", "HierarchicalVQVAE", "MetadataConditioner", "UpperConditioner", "LevelPrior", "Jukebox",
           "parse_metadata"]

LEVELS = ("bottom", "middle", "top")
UPPER = {"bottom": "middle", "middle": "top", "top": None}  # the level whose codes condition each prior
PRIORS = ("top", "middle", "bottom")  # sampling order


def _kwargs(fn: Callable[..., Any], family: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a training config's ``family`` that ``fn`` takes (the wrapper's own keys are left out)."""
    names = set(inspect.signature(fn).parameters)
    return {k: v for k, v in family.items() if k in names}


class HierarchicalVQVAE(nn.Module):
    """Three single-codebook VQ-VAEs (bottom, middle, top) with hops in the ratio 1 : 4 : 16.

    Args:
        sample_rate, channels: the audio.
        ratios: SEANet ratios per level, bottom first; ``prod(ratios[l])`` is level l's hop.
        card: codebook size (Jukebox: 2048); dimension: code vector size (Jukebox: 64).
        level_ratio: required hop ratio between consecutive levels (4).
        encoder_gain: every encoder convolution starts with this norm per output channel and a zero bias, so that
            the latents depend on the input (null: PyTorch's default init, under which a top level's latents are
            ~99% bias and differ between inputs by 1% of their size: the codebook then sees a point cloud narrower
            than one optimizer step moves it, and every frame takes the same code).
        Any other key is a ``Codec.build`` key shared by the three levels (``n_filters``, ``lstm``, ...).
    ``config`` holds the constructor arguments.
    """

    def __init__(self, sample_rate: int, channels: int = 1,
                 ratios: Sequence[Sequence[int]] = ((2, 2, 2), (4, 4, 2), (4, 4, 4, 2)), card: int = 2048,
                 dimension: int = 64, level_ratio: int = 4, encoder_gain: float | None = 1.0,
                 **codec: Any) -> None:
        super().__init__()
        ratios = [[int(r) for r in level] for level in ratios]
        if len(ratios) != len(LEVELS):
            raise ValueError(f"ratios must give {len(LEVELS)} levels (bottom, middle, top), got {len(ratios)}")
        self.config: dict[str, Any] = dict(sample_rate=sample_rate, channels=channels, ratios=ratios, card=card,
                                           dimension=dimension, level_ratio=level_ratio,
                                           encoder_gain=encoder_gain, **codec)
        for bad in ("n_q", "q_dropout"):
            if bad in codec:
                raise ValueError(f"family.vqvae.{bad}: every level has exactly one codebook; leave it out")
        codec = {"lstm": 0, **codec}
        self.levels = nn.ModuleList([
            Codec.build(sample_rate=sample_rate, channels=channels, ratios=r, n_q=1, card=card,
                              dimension=dimension, q_dropout=False, **codec) for r in ratios])
        hops = self.hop_lengths
        for lo, hi, name in zip(hops[:-1], hops[1:], LEVELS[1:]):
            if hi != lo * level_ratio:
                raise ValueError(f"family.vqvae.ratios: the {name} hop {hi} must be {level_ratio} x the hop below "
                                 f"({lo}); hops are {dict(zip(LEVELS, hops))} (Jukebox: 8, 32, 128)")
        self.sample_rate, self.channels, self.card, self.level_ratio = int(sample_rate), int(channels), int(
            card), int(level_ratio)
        if encoder_gain is not None:
            for codec_ in self.levels:
                unit_gain_(codec_.encoder, float(encoder_gain))

    array_kind = "jukebox_vqvae"  # what ``ostinato encode`` records of the arrays it writes

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], folder: Path | None = None) -> HierarchicalVQVAE:
        """The VQ-VAE of a ``JukeboxVQVAEFamily`` training config (``family.sample_rate``, ``channels``, ``vqvae``)."""
        family = cfg["family"]
        return cls(**_kwargs(cls.__init__, family), **(family.get("vqvae") or {}))

    @property
    def hop_lengths(self) -> list[int]:
        """Samples per code, bottom first."""
        return [c.hop_length for c in self.levels]

    @property
    def frame_rates(self) -> dict[str, float]:
        """Codes per second of each level."""
        return {name: c.frame_rate for name, c in zip(LEVELS, self.levels)}

    def level(self, name: str) -> Codec:
        if name not in LEVELS:
            raise ValueError(f"unknown level {name!r}; levels are {', '.join(LEVELS)}")
        return self.levels[LEVELS.index(name)]

    def forward(self, wav: Tensor) -> dict[str, CodecOutput]:
        """wav [B, C, T] -> per level ``CodecOutput`` (recon [B, C, T], codes [B, 1, F_l], penalty, metrics)."""
        return {name: codec(wav) for name, codec in zip(LEVELS, self.levels)}

    def encode(self, wav: Tensor) -> dict[str, Tensor]:
        """wav [B, C, T] -> per level codes [B, 1, ceil(T / hop_l)] int64."""
        return {name: codec.encode(wav).codes for name, codec in zip(LEVELS, self.levels)}

    def decode(self, codes: Tensor, level: str = "bottom") -> Tensor:
        """codes [B, 1, F] of ``level`` -> wav [B, C, F * hop_level]."""
        return self.level(level).decode(codes)

    def ema_modules(self, prefix: str) -> list[str]:
        """Submodule names a weight EMA may average: every level's encoder and decoder (codebooks keep their own
        EMA)."""
        return [f"{prefix}.levels.{i}.{part}" for i in range(len(LEVELS)) for part in ("encoder", "decoder")]

    def array_streams(self) -> dict[str, StreamInfo]:
        """The array shards ``ostinato encode`` writes: one int16 code stream per level, top first."""
        rates = self.frame_rates
        return {name: StreamInfo(rate=rates[name], channels=1, dtype="int16", card=self.card)
                for name in reversed(LEVELS)}

    def encode_arrays(self, wav: Tensor) -> dict[str, Tensor]:
        """wav [B, C, T] -> {"top": [B, 1, F_top], "middle": ..., "bottom": ...} int64 codes."""
        codes = self.encode(wav)
        return {name: codes[name] for name in reversed(LEVELS)}


HASH_SALTS = (b"", b"ostinato metadata #2")  # one row per salt, summed


def _hash(text: str, buckets: int, salt: bytes = b"") -> int:
    return zlib.crc32(salt + " ".join(str(text).lower().split()).encode("utf-8")) % buckets + 1


class MetadataConditioner(nn.Module):
    """Metadata fields -> ``[B, len(fields), dim]`` prefix embeddings (see the module docstring)."""

    def __init__(self, dim: int, fields: Sequence[str] = ("genre", "composer"), buckets: int = 1024) -> None:
        super().__init__()
        self.fields, self.buckets = [str(f) for f in fields], int(buckets)
        if not self.fields:
            raise ValueError("family.metadata.fields is empty: name at least one field (genre, composer, ...)")
        self.emb = nn.Embedding(len(self.fields) * (self.buckets + 1), dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def ids(self, metas: Sequence[Mapping[str, Any]], dropout: float = 0.0,
            generator: torch.Generator | None = None) -> Tensor:
        """Per item and field the hashed rows, one per salt (0 where the field is missing, empty or dropped):
        ``[B, fields, 2]``."""
        out = torch.zeros(len(metas), len(self.fields), len(HASH_SALTS), dtype=torch.long)
        for i, meta in enumerate(metas):
            for j, name in enumerate(self.fields):
                value = meta.get(name)
                if isinstance(value, (list, tuple)):
                    value = ", ".join(str(v) for v in value)
                if value is None or str(value).strip() == "":
                    continue
                if dropout > 0 and float(torch.rand((), generator=generator)) < dropout:
                    continue
                out[i, j] = torch.tensor([_hash(str(value), self.buckets, salt) for salt in HASH_SALTS])
        return out

    def forward(self, ids: Tensor) -> Tensor:
        """ids [B, fields, 2] -> [B, fields, dim] (the sum of the rows)."""
        offsets = torch.arange(len(self.fields), device=ids.device) * (self.buckets + 1)
        rows = ids.to(self.emb.weight.device) + offsets.to(self.emb.weight.device)[:, None]
        return self.emb(rows).sum(dim=2)


def parse_metadata(text: str, fields: Sequence[str]) -> dict[str, str]:
    """``"genre: baroque chorale, composer: Johann Sebastian Bach"`` (``:`` or ``=``, any separators) -> a dict of
    the known ``fields``; text naming no field is an error that lists them."""
    names = "|".join(re.escape(f) for f in sorted(fields, key=len, reverse=True))
    matches = list(re.finditer(rf"(?i)\b({names})\s*[:=]\s*", text))
    if not matches and text.strip():
        raise ValueError(f"prompt {text!r} names no metadata field; write e.g. "
                         f"\"{fields[0]}: ..., {fields[-1]}: ...\" with fields {', '.join(fields)}")
    out: dict[str, str] = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        value = text[m.end(): nxt.start() if nxt is not None else len(text)]
        key = next(f for f in fields if f.lower() == m.group(1).lower())
        out[key] = value.strip().strip(",;.").strip()
    return out


class UpperConditioner(nn.Module):
    """Codes of the level above ``[B, 1, F_up]`` (``card`` = padding / invalid) -> ``[B, F_up * ratio, dim]``."""

    def __init__(self, card: int, dim: int, ratio: int = 4, layers: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.card, self.ratio = int(card), int(ratio)
        self.emb = nn.Embedding(self.card + 1, dim)
        nn.init.normal_(self.emb.weight, std=0.02)
        pad = kernel_size // 2
        self.blocks = nn.ModuleList([nn.Conv1d(dim, dim, kernel_size, padding=pad) for _ in range(layers)])
        self.up = nn.Conv1d(dim, dim, kernel_size, padding=pad)
        self.norm = nn.LayerNorm(dim)

    def forward(self, codes: Tensor, lengths: Tensor | None = None) -> Tensor:
        """codes [B, 1, F_up] (frames past ``lengths`` become padding) -> [B, F_up * ratio, dim]."""
        codes = codes[:, 0].to(self.emb.weight.device)
        if lengths is not None:
            ok = torch.arange(codes.shape[-1], device=codes.device)[None] < lengths.to(codes.device)[:, None]
            codes = codes.masked_fill(~ok, self.card)
        x = self.emb(codes.clamp(0, self.card)).transpose(1, 2)  # [B, dim, F_up]
        for block in self.blocks:
            x = x + block(F.gelu(x))
        x = x.repeat_interleave(self.ratio, dim=-1)
        x = x + self.up(F.gelu(x))
        return self.norm(x.transpose(1, 2))


class LevelPrior(nn.Module):
    """A Jukebox prior over one level's codes: a single-codebook ``CodebookLM`` whose prefix holds the metadata
    embeddings and (upsamplers) whose input at the step predicting frame t gets the codes of the level above,
    upsampled to this level's rate, at frame t.

    Args:
        level: ``top`` (the top-level prior) or ``middle`` / ``bottom`` (upsamplers, conditioned on the level above).
        card: codebook size of the VQ-VAE.
        lm: ``LMConfig`` kwargs, optionally ``preset: tiny|small|...`` plus overrides.
        metadata: ``MetadataConditioner`` keys (``fields``, ``buckets``) or None for no metadata.
        conditioner: ``UpperConditioner`` keys (``layers``, ``kernel_size``) for the upsamplers.
        level_ratio: frames of this level per frame of the level above (4 for hops 8 : 32 : 128).
    Buffers, set by the training wrapper from the data: ``codes_per_second`` (this level's frame rate) and
    ``window_frames`` (frames per training window = per generation window).
    """

    def __init__(self, level: str, card: int, lm: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None, conditioner: Mapping[str, Any] | None = None,
                 level_ratio: int = 4) -> None:
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"family.level={level!r}: use top, middle or bottom")
        self.level, self.upper = level, UPPER[level]
        self.card, self.level_ratio = int(card), int(level_ratio)
        self.cfg = lm_config(lm, n_q=1, card=self.card, cross_attention=False)
        self.lm = CodebookLM(self.cfg)
        self.pattern = ParallelPattern(1)
        self.prefix_modules = nn.ModuleDict()
        if metadata is not None:
            keys = {k: v for k, v in metadata.items() if k != "dropout"}  # dropout: a training key
            self.prefix_modules["metadata"] = MetadataConditioner(self.cfg.dim, **keys)
        if self.upper is not None:
            self.prefix_modules["upper"] = UpperConditioner(self.card, self.cfg.dim, ratio=self.level_ratio,
                                                            **(conditioner or {}))
        self.register_buffer("codes_per_second", torch.zeros(()))
        self.register_buffer("window_frames", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], folder: Path | None = None) -> LevelPrior:
        """The prior of a ``JukeboxPrior`` training config (``family.level``, ``card``, ``lm``, ``metadata``, ...)."""
        return cls(**_kwargs(cls.__init__, cfg["family"]))

    @property
    def frame_rate(self) -> float:
        """Codes per second of this level."""
        return float(self.codes_per_second)

    @property
    def window(self) -> int:
        """Frames per training window (= per generation window); 0 before training has set it."""
        return int(self.window_frames)

    @property
    def metadata_fields(self) -> list[str]:
        return list(self.prefix_modules["metadata"].fields) if "metadata" in self.prefix_modules else []

    def metadata_prefix(self, metas: Sequence[Mapping[str, Any]], field_dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> Tensor | None:
        """``[B, fields, dim]`` metadata embeddings (each field left out with ``field_dropout``); None without
        metadata conditioning."""
        if "metadata" not in self.prefix_modules:
            return None
        module = self.prefix_modules["metadata"]
        return module(module.ids(metas, field_dropout, generator))

    def upper_condition(self, upper: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Codes of the level above ``[B, 1, F_up]`` -> ``[B, F_up * level_ratio, dim]``: row t is added to the
        LM's input at the step that predicts frame t (``step_cond``)."""
        return self.prefix_modules["upper"](upper, lengths)

    def decoding_steps(self, n_frames: int) -> int:
        """Steps ``generate`` reports for ``n_frames``: windows of ``window`` frames advancing by half a window."""
        window = self.window
        if not window or n_frames <= window:
            return n_frames
        stride = max(1, window // 2)
        total, have = window, window
        while have < n_frames:
            add = min(stride, n_frames - have)
            total += window - stride + add
            have += add
        return total

    @torch.no_grad()
    def generate(self, n_frames: int, metas: Sequence[Mapping[str, Any]], upper: Tensor | None = None,
                 params: GenerationParams | None = None, progress: Progress | None = None) -> Tensor:
        """Codes ``[B, 1, n_frames]``, one item per metadata dict, given (upsamplers) the codes of the level above
        ``upper [B, 1, n_frames / level_ratio]``. Outputs longer than ``window`` slide half a window per step; each
        window's condition is the part of ``upper`` under it. ``params.cfg_scale`` guides by the metadata (the null
        condition zeroes the metadata and keeps the upper codes)."""
        params = params or GenerationParams()
        window = self.window or None
        params = replace(params, max_window_frames=window, cfg_beta=None,
                         extend_stride_frames=None if window is None else max(1, window // 2))
        device = self.codes_per_second.device
        step_cond = None
        if self.upper is not None:
            if upper is None:
                raise ValueError(f"the {self.level} prior samples given the {self.upper} codes: pass upper")
            if upper.shape[-1] * self.level_ratio < n_frames:
                raise ValueError(f"{n_frames} {self.level} frames need {-(-n_frames // self.level_ratio)} "
                                 f"{self.upper} frames, got {upper.shape[-1]}")
            condition = self.upper_condition(upper.to(device))

            def step_cond(start: int, n: int) -> Tensor:
                return condition[:, start:start + n]

        return generate(self.lm, self.pattern, n_frames, prefix=self.metadata_prefix(metas), batch_size=len(metas),
                        params=params, progress=progress, step_cond=step_cond)


class Jukebox(nn.Module):
    """The VQ-VAE and its three priors: metadata -> top codes -> middle codes -> bottom codes -> audio.

    ``refs``: where each part was loaded from (``top``, ``middle``, ``bottom``, ``vqvae``), for the clips' records.
    """

    def __init__(self, vqvae: HierarchicalVQVAE, priors: Mapping[str, LevelPrior],
                 refs: Mapping[str, str] | None = None) -> None:
        super().__init__()
        for part in PRIORS:
            prior = priors.get(part)
            if prior is None or prior.level != part:
                got = "none" if prior is None else f"the {prior.level} prior"
                raise ValueError(f"the {part} prior is missing from the bundle (given {got})")
        rates = vqvae.frame_rates
        for part in PRIORS:
            prior = priors[part]
            if abs(prior.frame_rate - rates[part]) > 1e-6 or prior.card != vqvae.card:
                raise ValueError(f"the {part} prior was trained on {prior.card} codes at {prior.frame_rate:g} Hz but "
                                 f"the VQ-VAE gives {vqvae.card} at {rates[part]:g} Hz: pass the VQ-VAE it was "
                                 "trained with (--codec)")
        self.vqvae = vqvae
        self.priors = nn.ModuleDict({part: priors[part] for part in PRIORS})
        self.refs = dict(refs or {})

    @property
    def sample_rate(self) -> int:
        return self.vqvae.sample_rate

    @property
    def channels(self) -> int:
        return self.vqvae.channels

    @property
    def fields(self) -> list[str]:
        """The metadata fields a prompt may name (the top prior's)."""
        return self.priors["top"].metadata_fields

    def metadata(self, prompts: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Prompts (``"genre: ..., composer: ..."``) or metadata dicts -> metadata dicts; none: one unconditioned
        item."""
        if not prompts:
            return [{}]
        if any(isinstance(p, str) and p.strip() for p in prompts) and not self.fields:
            raise ValueError("this Jukebox prior has no metadata conditioning (family.metadata: null); drop --prompt")
        return [dict(p) if not isinstance(p, str) else parse_metadata(p, self.fields) if p.strip() else {}
                for p in prompts]

    @torch.no_grad()
    def generate_codes(self, metas: Sequence[Mapping[str, Any]], duration: float,
                       params: GenerationParams | None = None, progress: Progress | None = None) -> dict[str, Tensor]:
        """Per level codes ``[B, 1, F_level]`` for ``duration`` seconds, one item per metadata dict.

        ``params.cfg_scale`` guides every level by the metadata (an upsampler's null condition keeps its upper codes);
        level i is seeded ``seed + i``.
        """
        params = params or GenerationParams(cfg_scale=3.0)
        frames = {"top": max(1, math.ceil(duration * self.priors["top"].frame_rate))}
        for part in PRIORS[1:]:
            prior = self.priors[part]
            frames[part] = frames[prior.upper] * prior.level_ratio
        steps = {part: self.priors[part].decoding_steps(frames[part]) for part in PRIORS}
        total, done = sum(steps.values()), 0
        codes: dict[str, Tensor] = {}
        for i, part in enumerate(PRIORS):
            prior = self.priors[part]

            def report(d: int, _t: int, before: int = done) -> None:
                if progress is not None:
                    progress(before + d, total)

            level = replace(params, seed=None if params.seed is None else params.seed + i)
            upper = None if prior.upper is None else codes[prior.upper]
            codes[part] = prior.generate(frames[part], metas, upper, level, report)
            done += steps[part]
        return codes

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | Mapping[str, Any]], duration: float,
                 params: GenerationParams | None = None, progress: Progress | None = None) -> Tensor:
        """Waveforms ``[B, C, round(duration * sample_rate)]``, one per prompt (``"genre: ..., composer: ..."``) or
        metadata dict (none: one unconditioned clip); ``params`` default to ``cfg_scale=3``."""
        codes = self.generate_codes(self.metadata(prompts), duration, params, progress)
        wav = self.vqvae.decode(codes["bottom"].to(next(self.vqvae.parameters()).device), "bottom")
        return wav[..., :round(duration * self.sample_rate)]
