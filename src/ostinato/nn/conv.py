"""1-d convolutions with EnCodec's padding rules and optional weight norm / time group norm.

``NormConv1d`` pads its input itself (causal: everything on the left; otherwise centred, the odd sample on the
left) and adds EnCodec's "extra" right padding so that the last window is full: a conv with stride ``s`` maps
``T`` samples to exactly ``ceil(T / s)`` frames, whatever its kernel and dilation. ``NormConvTranspose1d`` maps
``F`` frames to exactly ``F * s`` samples by trimming the fixed padding (causal: ``trim_right_ratio`` of it on the
right). Chained, an encoder with hop ``H`` gives ``ceil(T / H)`` frames and the mirrored decoder ``ceil(T / H) * H``
samples; the caller trims the tail back to ``T``.

The arithmetic is that of audiocraft's ``StreamableConv1d`` / transformers' ``EncodecConv1d`` so that their
weights load 1:1. Parameter names: ``conv.weight`` / ``conv.bias`` (no norm or time_group_norm),
``conv.parametrizations.weight.original0`` (gain g) and ``.original1`` (direction v) with weight norm, and
``norm.weight`` / ``norm.bias`` for the group norm.
"""
from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

Norm = Literal["none", "weight_norm", "time_group_norm"]
NORMS: tuple[str, ...] = ("none", "weight_norm", "time_group_norm")
PAD_MODES: tuple[str, ...] = ("constant", "reflect", "replicate", "circular")


def extra_padding_for_conv1d(length: int, stride: int) -> int:
    """Right padding that makes the last window of a conv (padded by ``kernel - stride``) full.

    With total padding ``k - s`` the number of full windows over ``length + k - s + extra`` samples is
    ``(length + extra) / s``, so the extra padding just rounds ``length`` up to a multiple of the stride.
    """
    return -length % stride


def pad1d(x: Tensor, paddings: tuple[int, int], mode: str = "constant", value: float = 0.0) -> Tensor:
    """``F.pad`` on the last axis of ``x`` [..., T] -> [..., left + T + right] that also reflects short inputs.

    Reflect padding needs ``T > padding``; shorter inputs get zeros appended first, removed after.
    """
    left, right = paddings
    if left < 0 or right < 0:
        raise ValueError(f"paddings must be >= 0, got {paddings}")
    if mode != "reflect":
        return F.pad(x, paddings, mode, value)
    length = x.shape[-1]
    extra = max(0, max(left, right) - length + 1)
    if extra:
        x = F.pad(x, (0, extra))
    padded = F.pad(x, paddings, mode)
    return padded[..., : padded.shape[-1] - extra]


def unpad1d(x: Tensor, paddings: tuple[int, int]) -> Tensor:
    """Remove ``paddings`` = (left, right) samples from the last axis of ``x`` [..., T]."""
    left, right = paddings
    if left < 0 or right < 0 or left + right > x.shape[-1]:
        raise ValueError(f"cannot remove paddings {paddings} from length {x.shape[-1]}")
    return x[..., left: x.shape[-1] - right]


def _normed(conv: nn.Conv1d | nn.ConvTranspose1d, norm: str) -> tuple[nn.Module, nn.Module]:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "weight_norm":
        return weight_norm(conv), nn.Identity()
    if norm == "time_group_norm":
        return conv, nn.GroupNorm(1, conv.out_channels)
    return conv, nn.Identity()


class NormConv1d(nn.Module):
    """Conv1d with EnCodec padding: [B, C_in, T] -> [B, C_out, ceil(T / stride)].

    ``causal``: all padding on the left, so output frame ``f`` only sees samples ``< (f + 1) * stride``.
    ``pad_mode``: how the padding is filled (``"reflect"`` or ``"constant"`` zeros, ...).
    ``norm``: ``"weight_norm"`` (``torch.nn.utils.parametrizations.weight_norm``, dim 0), ``"time_group_norm"``
    (GroupNorm with one group over channels and time, after the conv; not causal in time) or ``"none"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, bias: bool = True, causal: bool = False, norm: Norm | str = "none",
                 pad_mode: str = "reflect") -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if (kernel_size - 1) * dilation + 1 < stride:
            raise ValueError(f"effective kernel size must be >= stride, got kernel {kernel_size}, dilation "
                             f"{dilation}, stride {stride}")
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias)
        self.conv, self.norm = _normed(conv, norm)
        self.causal = causal
        self.pad_mode = pad_mode
        self.stride = stride
        self.effective_kernel_size = (kernel_size - 1) * dilation + 1
        self.padding_total = self.effective_kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C_in, T] -> [B, C_out, ceil(T / stride)]."""
        extra = extra_padding_for_conv1d(x.shape[-1], self.stride)
        if self.causal:
            left, right = self.padding_total, 0
        else:
            right = self.padding_total // 2
            left = self.padding_total - right
        x = pad1d(x, (left, right + extra), mode=self.pad_mode)
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """ConvTranspose1d that trims EnCodec's fixed padding: [B, C_in, F] -> [B, C_out, F * stride].

    Of the ``kernel_size - stride`` surplus samples, a causal layer removes ``ceil(surplus * trim_right_ratio)`` on
    the right and the rest on the left; a non-causal one removes ``surplus // 2`` on the right and the rest on the
    left. The encoder's extra padding is not removed here (the caller trims the final output to length).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = True, causal: bool = False, norm: Norm | str = "none",
                 trim_right_ratio: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= trim_right_ratio <= 1.0:
            raise ValueError(f"trim_right_ratio must be in [0, 1], got {trim_right_ratio}")
        if not causal and trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1.0 only makes sense for causal convolutions")
        if kernel_size < stride:
            raise ValueError(f"kernel_size must be >= stride, got {kernel_size} < {stride}")
        conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.conv, self.norm = _normed(conv, norm)
        self.causal = causal
        self.trim_right_ratio = trim_right_ratio
        self.stride = stride
        self.padding_total = kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C_in, F] -> [B, C_out, F * stride]."""
        y = self.norm(self.conv(x))
        if self.causal:
            right = math.ceil(self.padding_total * self.trim_right_ratio)
        else:
            right = self.padding_total // 2
        return unpad1d(y, (self.padding_total - right, right))

