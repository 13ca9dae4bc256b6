"""``InterleavedStereoCodec``: a mono codec applied to the left and the right channel, codebooks interleaved.

Stereo MusicGen (audiocraft's ``InterleaveStereoCompressionModel``, transformers' ``audio_channels: 2``) models
``2K`` codebooks over a ``K``-codebook mono codec: codebook level ``k`` of the left channel at ``2k``, of the right at
``2k + 1`` (``nn.patterns.interleave_stereo``). Decoding runs the mono decoder on each channel's codes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ostinato.models.codec import Codec, EncodedAudio
from ostinato.nn.patterns import deinterleave_stereo, interleave_stereo

__all__ = ["InterleavedStereoCodec"]


class InterleavedStereoCodec(nn.Module):
    """A mono ``Codec`` on each channel of stereo audio: ``wav [B, 2, T]`` <-> ``codes [B, 2K, F]`` (L/R interleaved).

    It answers what token shards, generation and evaluation ask of a codec (``sample_rate``, ``channels`` = 2,
    ``n_q`` = 2K, ``card``, ``hop_length``, ``frame_rate``, ``encode``, ``decode``); its state dict is the mono
    codec's under ``mono.``.
    """

    def __init__(self, mono: Codec) -> None:
        super().__init__()
        if int(mono.channels) != 1:
            raise ValueError(f"an interleaved stereo codec wraps a mono codec; this one has {mono.channels} channels")
        self.mono = mono

    @property
    def sample_rate(self) -> int:
        return int(self.mono.sample_rate)

    @property
    def channels(self) -> int:
        return 2

    @property
    def n_q(self) -> int:
        """Codebooks after interleaving: twice the mono codec's."""
        return 2 * int(self.mono.n_q)

    @property
    def card(self) -> int:
        return int(self.mono.card)

    @property
    def hop_length(self) -> int:
        return int(self.mono.hop_length)

    @property
    def frame_rate(self) -> float:
        return float(self.mono.frame_rate)

    @property
    def normalize(self) -> bool:
        return bool(self.mono.normalize)

    def num_frames(self, num_samples: int) -> int:
        return self.mono.num_frames(num_samples)

    def bandwidth_kbps(self, n_q: int | None = None) -> float:
        """Bit rate of both channels with ``n_q`` interleaved codebooks (all by default)."""
        per_channel = None if n_q is None else self._mono_n_q(n_q)
        return 2 * self.mono.bandwidth_kbps(per_channel)

    def _mono_n_q(self, n_q: int) -> int:
        if n_q % 2:
            raise ValueError(f"n_q={n_q}: a stereo codec's codebooks come in L/R pairs; give an even number")
        return n_q // 2

    def encode(self, wav: Tensor, n_q: int | None = None) -> EncodedAudio:
        """``wav [B, 2, T]`` -> ``EncodedAudio(codes [B, n_q, F], scale [B, 2] or None)``; ``n_q`` even (all by
        default)."""
        if wav.dim() != 3 or wav.shape[1] != 2:
            raise ValueError(f"expected stereo audio [B, 2, T], got {tuple(wav.shape)}")
        per_channel = None if n_q is None else self._mono_n_q(n_q)
        left = self.mono.encode(wav[:, :1], n_q=per_channel)
        right = self.mono.encode(wav[:, 1:], n_q=per_channel)
        scale = None if left.scale is None else torch.cat([left.scale, right.scale], dim=1)
        return EncodedAudio(interleave_stereo(left.codes, right.codes), scale)

    def decode(self, codes: Tensor, scale: Tensor | None = None) -> Tensor:
        """``codes [B, 2K', F]`` (+ ``scale [B, 2]`` from ``encode``) -> ``wav [B, 2, F * hop_length]``."""
        left, right = deinterleave_stereo(codes)
        scales = (None, None) if scale is None else (scale[:, :1], scale[:, 1:])
        return torch.cat([self.mono.decode(left, scales[0]), self.mono.decode(right, scales[1])], dim=1)

    def forward(self, wav: Tensor, n_q: int | None = None) -> Tensor:
        """Reconstruction ``[B, 2, T]`` of ``wav [B, 2, T]`` through the codes."""
        encoded = self.encode(wav, n_q)
        return self.decode(encoded.codes, encoded.scale)[..., :wav.shape[-1]]
