"""SEANet encoder and decoder, the convolutional autoencoder of EnCodec.

Encoder [B, C, T] -> [B, D, F] and decoder [B, D, F] -> [B, C, F * hop] with ``hop = prod(ratios)`` and
``F = ceil(T / hop)``: the strides set the frame rate ``sample_rate / hop``. ``C`` is 1 (mono) or 2 (stereo).

Layer order and indices of ``model`` follow audiocraft's ``SEANetEncoder`` / ``SEANetDecoder`` (and
transformers' ``EncodecEncoder.layers``) so that checkpoints map by index:

encoder: conv(C -> n_filters, kernel_size), then per ratio r (in reverse order of ``ratios``):
``n_residual_layers`` residual blocks, activation, conv(stride r, kernel 2r, width x2); then the optional LSTM,
activation, conv(-> D, last_kernel_size).
decoder: conv(D -> n_filters * 2^len(ratios), kernel_size), optional LSTM, then per ratio r: activation,
transposed conv(stride r, kernel 2r, width /2), residual blocks; then activation, conv(-> C, last_kernel_size)
and the optional final activation.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ostinato.nn.conv import NormConv1d, NormConvTranspose1d


def make_activation(name: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """``torch.nn.<name>(**params)``, e.g. ``make_activation("ELU", {"alpha": 1.0})``."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"unknown activation {name!r}: expected the name of a torch.nn module such as 'ELU'")
    return cls(**dict(params or {}))


class SLSTM(nn.Module):
    """Multi-layer LSTM over time with a residual skip, in conv layout: [B, C, T] -> [B, C, T]."""

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T] -> [B, C, T]."""
        seq = x.permute(2, 0, 1)
        y, _ = self.lstm(seq)
        if self.skip:
            y = y + seq
        return y.permute(1, 2, 0)


class SEANetResnetBlock(nn.Module):
    """Residual unit [B, dim, T] -> [B, dim, T]: ``shortcut(x) + block(x)``.

    ``block`` = act, conv(dim -> dim // compress, kernel k0, dilation d0), act, conv(-> dim, kernel k1, dilation d1)
    (more pairs if longer lists are given). ``true_skip``: identity shortcut, otherwise a 1x1 conv.
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (3, 1), dilations: Sequence[int] = (1, 1),
                 activation: str = "ELU", activation_params: Mapping[str, Any] | None = None,
                 norm: str = "none", causal: bool = False, pad_mode: str = "reflect", compress: int = 2,
                 true_skip: bool = True) -> None:
        super().__init__()
        if len(kernel_sizes) != len(dilations):
            raise ValueError(f"{len(kernel_sizes)} kernel sizes but {len(dilations)} dilations")
        hidden = dim // compress
        layers: list[nn.Module] = []
        last = len(kernel_sizes) - 1
        for i, (kernel_size, dilation) in enumerate(zip(kernel_sizes, dilations)):
            layers += [make_activation(activation, activation_params),
                       NormConv1d(dim if i == 0 else hidden, dim if i == last else hidden, kernel_size,
                                  dilation=dilation, norm=norm, causal=causal, pad_mode=pad_mode)]
        self.block = nn.Sequential(*layers)
        self.shortcut: nn.Module = (nn.Identity() if true_skip else
                                    NormConv1d(dim, dim, 1, norm=norm, causal=causal, pad_mode=pad_mode))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, dim, T] -> [B, dim, T]."""
        return self.shortcut(x) + self.block(x)


def _check_common(channels: int, ratios: Sequence[int], n_blocks: int, disable_norm_outer_blocks: int) -> None:
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if not ratios or any(int(r) < 1 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of positive ints, got {list(ratios)}")
    if not 0 <= disable_norm_outer_blocks <= n_blocks:
        raise ValueError(f"disable_norm_outer_blocks must be in [0, {n_blocks}], got {disable_norm_outer_blocks}")


class SEANetEncoder(nn.Module):
    """SEANet encoder: wav [B, C, T] -> latent [B, dimension, ceil(T / hop_length)].

    ``ratios`` are given in decoder (upsampling) order, as in audiocraft and transformers; the encoder downsamples
    by ``reversed(ratios)``. ``lstm``: number of LSTM layers before the last conv (0: none).
    ``disable_norm_outer_blocks``: the first N blocks (first conv = block 1, stage i = block i + 2) use no norm.
    ``config`` holds the constructor arguments.
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32, n_residual_layers: int = 1,
                 ratios: Sequence[int] = (8, 5, 4, 2), activation: str = "ELU",
                 activation_params: Mapping[str, Any] | None = None, norm: str = "weight_norm",
                 kernel_size: int = 7, last_kernel_size: int = 7, residual_kernel_size: int = 3,
                 dilation_base: int = 2, causal: bool = False, pad_mode: str = "reflect", true_skip: bool = True,
                 compress: int = 2, lstm: int = 2, disable_norm_outer_blocks: int = 0) -> None:
        super().__init__()
        ratios = [int(r) for r in ratios]
        activation_params = dict(activation_params or {})
        self.config: dict[str, Any] = dict(
            channels=channels, dimension=dimension, n_filters=n_filters, n_residual_layers=n_residual_layers,
            ratios=ratios, activation=activation, activation_params=activation_params, norm=norm,
            kernel_size=kernel_size, last_kernel_size=last_kernel_size, residual_kernel_size=residual_kernel_size,
            dilation_base=dilation_base, causal=causal, pad_mode=pad_mode, true_skip=true_skip, compress=compress,
            lstm=lstm, disable_norm_outer_blocks=disable_norm_outer_blocks)
        n_blocks = len(ratios) + 2
        _check_common(channels, ratios, n_blocks, disable_norm_outer_blocks)
        self.channels = channels
        self.dimension = dimension
        self.ratios = ratios
        self.hop_length = math.prod(ratios)
        common = dict(causal=causal, pad_mode=pad_mode)

        mult = 1
        layers: list[nn.Module] = [
            NormConv1d(channels, n_filters, kernel_size,
                       norm="none" if disable_norm_outer_blocks >= 1 else norm, **common)]
        for i, ratio in enumerate(reversed(ratios)):
            block_norm = "none" if disable_norm_outer_blocks >= i + 2 else norm
            width = mult * n_filters
            for j in range(n_residual_layers):
                layers.append(SEANetResnetBlock(
                    width, kernel_sizes=(residual_kernel_size, 1), dilations=(dilation_base ** j, 1),
                    activation=activation, activation_params=activation_params, norm=block_norm,
                    compress=compress, true_skip=true_skip, **common))
            layers += [make_activation(activation, activation_params),
                       NormConv1d(width, width * 2, kernel_size=ratio * 2, stride=ratio, norm=block_norm, **common)]
            mult *= 2
        if lstm:
            layers.append(SLSTM(mult * n_filters, num_layers=lstm))
        layers += [make_activation(activation, activation_params),
                   NormConv1d(mult * n_filters, dimension, last_kernel_size,
                              norm="none" if disable_norm_outer_blocks == n_blocks else norm, **common)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T] -> [B, dimension, ceil(T / hop_length)]."""
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"expected audio [B, {self.channels}, T], got {tuple(x.shape)}")
        return self.model(x)


class SEANetDecoder(nn.Module):
    """SEANet decoder: latent [B, dimension, F] -> wav [B, C, F * hop_length].

    Mirrors ``SEANetEncoder`` (same ``ratios``, applied in the given order). ``trim_right_ratio``: share of the
    transposed convs' surplus trimmed on the right when causal. ``final_activation``: optional ``torch.nn`` module
    name applied last (e.g. "Tanh"). ``disable_norm_outer_blocks``: the last N blocks use no norm.
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32, n_residual_layers: int = 1,
                 ratios: Sequence[int] = (8, 5, 4, 2), activation: str = "ELU",
                 activation_params: Mapping[str, Any] | None = None, final_activation: str | None = None,
                 final_activation_params: Mapping[str, Any] | None = None, norm: str = "weight_norm",
                 kernel_size: int = 7, last_kernel_size: int = 7, residual_kernel_size: int = 3,
                 dilation_base: int = 2, causal: bool = False, pad_mode: str = "reflect", true_skip: bool = True,
                 compress: int = 2, lstm: int = 2, disable_norm_outer_blocks: int = 0,
                 trim_right_ratio: float = 1.0) -> None:
        super().__init__()
        ratios = [int(r) for r in ratios]
        activation_params = dict(activation_params or {})
        self.config: dict[str, Any] = dict(
            channels=channels, dimension=dimension, n_filters=n_filters, n_residual_layers=n_residual_layers,
            ratios=ratios, activation=activation, activation_params=activation_params,
            final_activation=final_activation,
            final_activation_params=dict(final_activation_params) if final_activation_params else None,
            norm=norm, kernel_size=kernel_size, last_kernel_size=last_kernel_size,
            residual_kernel_size=residual_kernel_size, dilation_base=dilation_base, causal=causal,
            pad_mode=pad_mode, true_skip=true_skip, compress=compress, lstm=lstm,
            disable_norm_outer_blocks=disable_norm_outer_blocks, trim_right_ratio=trim_right_ratio)
        n_blocks = len(ratios) + 2
        _check_common(channels, ratios, n_blocks, disable_norm_outer_blocks)
        self.channels = channels
        self.dimension = dimension
        self.ratios = ratios
        self.hop_length = math.prod(ratios)
        common = dict(causal=causal, pad_mode=pad_mode)

        mult = 2 ** len(ratios)
        layers: list[nn.Module] = [
            NormConv1d(dimension, mult * n_filters, kernel_size,
                       norm="none" if disable_norm_outer_blocks == n_blocks else norm, **common)]
        if lstm:
            layers.append(SLSTM(mult * n_filters, num_layers=lstm))
        for i, ratio in enumerate(ratios):
            block_norm = "none" if disable_norm_outer_blocks >= n_blocks - (i + 1) else norm
            width = mult * n_filters
            layers += [make_activation(activation, activation_params),
                       NormConvTranspose1d(width, width // 2, kernel_size=ratio * 2, stride=ratio, norm=block_norm,
                                           causal=causal, trim_right_ratio=trim_right_ratio)]
            for j in range(n_residual_layers):
                layers.append(SEANetResnetBlock(
                    width // 2, kernel_sizes=(residual_kernel_size, 1), dilations=(dilation_base ** j, 1),
                    activation=activation, activation_params=activation_params, norm=block_norm,
                    compress=compress, true_skip=true_skip, **common))
            mult //= 2
        layers += [make_activation(activation, activation_params),
                   NormConv1d(n_filters, channels, last_kernel_size,
                              norm="none" if disable_norm_outer_blocks >= 1 else norm, **common)]
        if final_activation is not None:
            layers.append(make_activation(final_activation, final_activation_params))
        self.model = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """z [B, dimension, F] -> [B, C, F * hop_length]."""
        if z.dim() != 3 or z.shape[1] != self.dimension:
            raise ValueError(f"expected latents [B, {self.dimension}, F], got {tuple(z.shape)}")
        return self.model(z)
