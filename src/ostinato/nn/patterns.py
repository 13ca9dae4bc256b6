"""Codebook interleaving patterns for language models over K parallel codebook streams.

A pattern lays ``codes [B, K, T]`` (K codebooks, T frames) out as a sequence ``[B, K, S]`` that a
``CodebookLM`` models step by step: at every step s the model reads the K tokens of step s and predicts the
K tokens of step s + 1. Every pattern starts with one all-special step (step 0, the "BOS" step), as MusicGen
(audiocraft and transformers) does; positions that hold no code are filled with the special token
(``card``, the extra embedding row, also transformers' ``pad_token_id`` / ``bos_token_id``).

* ``DelayPattern(K, delays)``: codebook k, frame t sits at step ``1 + t + delays[k]``; default delays
  ``[0, 1, ..., K-1]``, S = T + max(delays) + 1. This is exactly transformers'
  ``MusicgenForCausalLM.build_delay_pattern_mask`` with ``max_length = S``. Stereo MusicGen uses the delays
  ``[0, 0, 1, 1, ...]`` over the L/R interleaved codebooks (``stereo_delays``).
* ``ParallelPattern(K)``: all codebooks of frame t at step ``1 + t``; S = T + 1.
* ``UnrollPattern(K)``: codebooks flattened in time: codebook k of frame t at step ``1 + t*K + k``;
  S = T*K + 1 (one valid codebook per step).

Training loss belongs on valid positions only: ``build`` returns the ``[K, S]`` mask of valid positions and
``revert_logits`` maps model outputs (step s predicts step s + 1) back to ``[B, K, T, card]``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "CodebookPattern", "DelayPattern", "ParallelPattern", "UnrollPattern",
    "interleave_stereo", "deinterleave_stereo", "stereo_delays",
]


class CodebookPattern(ABC):
    """Base class: a pattern is fully described by ``positions(T)``, the step of every (codebook, frame)."""

    def __init__(self, n_q: int) -> None:
        if n_q < 1:
            raise ValueError(f"n_q must be >= 1, got {n_q}")
        self.n_q = n_q

    @abstractmethod
    def positions(self, n_frames: int) -> Tensor:
        """Sequence step of every code: LongTensor ``[K, T]``, all >= 1 (step 0 is the special BOS step)."""

    @abstractmethod
    def max_steps(self, n_frames: int) -> int:
        """Sequence length S needed to hold T frames (BOS step included)."""

    @abstractmethod
    def frames(self, n_steps: int) -> int:
        """Largest T whose full layout fits in S = ``n_steps`` steps (inverse of ``max_steps``)."""

    def valid_mask(self, n_frames: int, device: torch.device | str | None = None) -> Tensor:
        """Bool ``[K, S]``: True where the sequence holds a real code (not the special token)."""
        pos = self.positions(n_frames).to(device)
        mask = torch.zeros(self.n_q, self.max_steps(n_frames), dtype=torch.bool, device=device)
        mask.scatter_(1, pos, True)
        return mask

    def build(self, codes: Tensor, special: int) -> tuple[Tensor, Tensor]:
        """Lay codes out as a sequence.

        Args:
            codes: ``[B, K, T]`` integer codes.
            special: token id for empty positions (MusicGen: ``card``).
        Returns:
            ``(sequence [B, K, S], mask [K, S] bool)`` where mask marks the positions holding codes.
        """
        b, k, t = codes.shape
        if k != self.n_q:
            raise ValueError(f"expected {self.n_q} codebooks, got {k}")
        pos = self.positions(t).to(codes.device)
        seq = codes.new_full((b, k, self.max_steps(t)), special)
        seq.scatter_(2, pos.unsqueeze(0).expand(b, k, t), codes)
        return seq, self.valid_mask(t, codes.device)

    def revert(self, sequence: Tensor, n_frames: int | None = None, *, shift: int = 0) -> tuple[Tensor, Tensor]:
        """Inverse of ``build``: gather the codes (or per-position vectors) of every (codebook, frame).

        Args:
            sequence: ``[B, K, S]`` tokens or ``[B, K, S, C]`` per-step vectors (e.g. logits).
            n_frames: T; default ``frames(S)`` (the sequence is then complete).
            shift: read step ``p - shift`` for a code at step p (1 for model outputs, where step s predicts s+1).
        Returns:
            ``(values [B, K, T(, C)], mask [K, T] bool)``; mask is False where the needed step lies outside the
            sequence (those values are 0).
        """
        b, k, s = sequence.shape[:3]
        if k != self.n_q:
            raise ValueError(f"expected {self.n_q} codebooks, got {k}")
        t = self.frames(s + shift) if n_frames is None else n_frames
        src = self.positions(t).to(sequence.device) - shift  # [K, T]
        mask = (src >= 0) & (src < s)
        idx = src.clamp(0, max(s - 1, 0))
        extra = sequence.shape[3:]
        index = idx.view(1, k, t, *([1] * len(extra))).expand(b, k, t, *extra)
        out = torch.gather(sequence, 2, index)
        out = out.masked_fill(~mask.view(1, k, t, *([1] * len(extra))), 0)
        return out, mask

    def revert_logits(self, logits: Tensor, n_frames: int | None = None) -> tuple[Tensor, Tensor]:
        """Map model outputs ``[B, K, S, card]`` (step s predicts step s + 1) to ``[B, K, T, card]`` + mask."""
        return self.revert(logits, n_frames, shift=1)


class DelayPattern(CodebookPattern):
    """Codebook k delayed by ``delays[k]`` steps (default ``[0, 1, ..., K-1]``, MusicGen's pattern)."""

    def __init__(self, n_q: int, delays: Sequence[int] | None = None) -> None:
        super().__init__(n_q)
        self.delays = list(range(n_q)) if delays is None else [int(d) for d in delays]
        if len(self.delays) != n_q or min(self.delays) < 0:
            raise ValueError(f"need {n_q} non-negative delays, got {self.delays}")
        self.max_delay = max(self.delays)

    def positions(self, n_frames: int) -> Tensor:
        d = torch.tensor(self.delays, dtype=torch.long)[:, None]
        return 1 + torch.arange(n_frames, dtype=torch.long)[None, :] + d

    def max_steps(self, n_frames: int) -> int:
        return n_frames + self.max_delay + 1

    def frames(self, n_steps: int) -> int:
        return max(n_steps - self.max_delay - 1, 0)


class ParallelPattern(DelayPattern):
    """All codebooks of a frame predicted at the same step (no delay)."""

    def __init__(self, n_q: int) -> None:
        super().__init__(n_q, [0] * n_q)


class UnrollPattern(CodebookPattern):
    """Codebooks flattened in time: frame t, codebook k at step ``1 + t*K + k``."""

    def positions(self, n_frames: int) -> Tensor:
        t = torch.arange(n_frames, dtype=torch.long)[None, :]
        k = torch.arange(self.n_q, dtype=torch.long)[:, None]
        return 1 + t * self.n_q + k

    def max_steps(self, n_frames: int) -> int:
        return n_frames * self.n_q + 1

    def frames(self, n_steps: int) -> int:
        return max((n_steps - 1) // self.n_q, 0)


def stereo_delays(n_q_per_channel: int) -> list[int]:
    """Delays of stereo MusicGen over L/R interleaved codebooks: ``[0, 0, 1, 1, ..., K-1, K-1]``."""
    return [d for d in range(n_q_per_channel) for _ in range(2)]


def interleave_stereo(codes_left: Tensor, codes_right: Tensor) -> Tensor:
    """``[B, K, T]`` x 2 -> ``[B, 2K, T]`` with codebook level k of L at 2k and of R at 2k + 1 (MusicGen stereo)."""
    if codes_left.shape != codes_right.shape:
        raise ValueError(f"shape mismatch {tuple(codes_left.shape)} vs {tuple(codes_right.shape)}")
    b, k, t = codes_left.shape
    return torch.stack([codes_left, codes_right], dim=2).reshape(b, 2 * k, t)


def deinterleave_stereo(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of ``interleave_stereo``: ``[B, 2K, ...]`` -> (left ``[B, K, ...]``, right ``[B, K, ...]``)."""
    if codes.shape[1] % 2:
        raise ValueError(f"stereo codes need an even number of codebooks, got {codes.shape[1]}")
    return codes[:, 0::2], codes[:, 1::2]
