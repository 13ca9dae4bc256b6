"""Jukebox's building blocks: a hierarchical VQ-VAE and the conditioners of its priors.

``HierarchicalVQVAE``: three independent VQ-VAEs over the same waveform, as in Jukebox, each a SEANet encoder,
one codebook (``ResidualVectorQuantizer`` with ``n_q = 1``: EMA codebook, k-means init, dead-code replacement)
and a SEANet decoder, i.e. an ostinato ``Codec`` with a single codebook. Their hops are in the ratio 1 : 4 : 16
(Jukebox: 8, 32, 128 samples at 44.1 kHz), so every top code covers 4 middle codes and 16 bottom codes::

    wav [B, C, T] --level l--> codes [B, 1, ceil(T / hop_l)] --level l decoder--> wav [B, C, T]

Level names, from the finest: ``bottom``, ``middle``, ``top``.

Prior conditioners (prefixes of a ``CodebookLM``):

* ``MetadataConditioner``: one embedding per metadata field (genre, composer, ...). Values are hashed into
  ``buckets`` rows per field (a stable CRC-32 of the lower-cased text), so no vocabulary has to be built or stored
  and any value, seen in training or not, maps to a row; row 0 is "unknown / dropped".
* ``UpperConditioner``: the codes of the level above, embedded, refined by residual convolutions at their own rate,
  upsampled by nearest repetition (``ratio``) and a convolution: one vector per frame of the level being modelled.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.models.codec import Codec, CodecOutput

__all__ = ["LEVELS", "HierarchicalVQVAE", "MetadataConditioner", "UpperConditioner", "parse_metadata"]

LEVELS = ("bottom", "middle", "top")


class HierarchicalVQVAE(nn.Module):
    """Three single-codebook VQ-VAEs (bottom, middle, top) with hops in the ratio 1 : 4 : 16.

    Args:
        sample_rate, channels: the audio.
        ratios: SEANet ratios per level, bottom first; ``prod(ratios[l])`` is level l's hop.
        bins: codebook size (Jukebox: 2048); dimension: code vector size (Jukebox: 64).
        level_ratio: required hop ratio between consecutive levels (4).
        Any other key is a ``Codec.from_config`` key shared by the three levels (``n_filters``, ``lstm``, ...).
    ``config`` holds the constructor arguments.
    """

    def __init__(self, sample_rate: int, channels: int = 1,
                 ratios: Sequence[Sequence[int]] = ((2, 2, 2), (4, 4, 2), (4, 4, 4, 2)), bins: int = 2048,
                 dimension: int = 64, level_ratio: int = 4, **codec: Any) -> None:
        super().__init__()
        ratios = [[int(r) for r in level] for level in ratios]
        if len(ratios) != len(LEVELS):
            raise ValueError(f"ratios must give {len(LEVELS)} levels (bottom, middle, top), got {len(ratios)}")
        self.config: dict[str, Any] = dict(sample_rate=sample_rate, channels=channels, ratios=ratios, bins=bins,
                                           dimension=dimension, level_ratio=level_ratio, **codec)
        for bad in ("n_q", "q_dropout"):
            if bad in codec:
                raise ValueError(f"family.vqvae.{bad}: every level has exactly one codebook; leave it out")
        codec = {"lstm": 0, **codec}
        self.levels = nn.ModuleList([
            Codec.from_config(sample_rate=sample_rate, channels=channels, ratios=r, n_q=1, bins=bins,
                              dimension=dimension, q_dropout=False, **codec) for r in ratios])
        hops = self.hop_lengths
        for lo, hi, name in zip(hops[:-1], hops[1:], LEVELS[1:]):
            if hi != lo * level_ratio:
                raise ValueError(f"family.vqvae.ratios: the {name} hop {hi} must be {level_ratio} x the hop below "
                                 f"({lo}); hops are {dict(zip(LEVELS, hops))} (Jukebox: 8, 32, 128)")
        self.sample_rate, self.channels, self.bins, self.level_ratio = int(sample_rate), int(channels), int(
            bins), int(level_ratio)

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


def _hash(text: str, buckets: int) -> int:
    return zlib.crc32(" ".join(str(text).lower().split()).encode("utf-8")) % buckets + 1


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
        """Per item and field the hashed row (0 where the field is missing, empty or dropped): ``[B, fields]``."""
        out = torch.zeros(len(metas), len(self.fields), dtype=torch.long)
        for i, meta in enumerate(metas):
            for j, name in enumerate(self.fields):
                value = meta.get(name)
                if isinstance(value, (list, tuple)):
                    value = ", ".join(str(v) for v in value)
                if value is None or str(value).strip() == "":
                    continue
                if dropout > 0 and float(torch.rand((), generator=generator)) < dropout:
                    continue
                out[i, j] = _hash(str(value), self.buckets)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        """ids [B, fields] -> [B, fields, dim]."""
        offsets = torch.arange(len(self.fields), device=ids.device) * (self.buckets + 1)
        return self.emb(ids.to(self.emb.weight.device) + offsets.to(self.emb.weight.device))


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
    """Codes of the level above ``[B, 1, F_up]`` (``bins`` = padding / invalid) -> ``[B, F_up * ratio, dim]``."""

    def __init__(self, bins: int, dim: int, ratio: int = 4, layers: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.bins, self.ratio = int(bins), int(ratio)
        self.emb = nn.Embedding(self.bins + 1, dim)
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
            codes = codes.masked_fill(~ok, self.bins)
        x = self.emb(codes.clamp(0, self.bins)).transpose(1, 2)  # [B, dim, F_up]
        for block in self.blocks:
            x = x + block(F.gelu(x))
        x = x.repeat_interleave(self.ratio, dim=-1)
        x = x + self.up(F.gelu(x))
        return self.norm(x.transpose(1, 2))
