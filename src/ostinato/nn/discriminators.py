"""Waveform discriminators for adversarial codec / vocoder training.

Every discriminator maps a waveform batch ``x: [B, C, T]`` to ``(logits, features)``:

- ``logits: list[Tensor]``, one entry per sub-discriminator (a patch of real/fake scores, any shape ``[B, ...]``);
- ``features: list[list[Tensor]]``, for each sub-discriminator the intermediate activations used by the
  feature-matching loss.

``CombinedDiscriminator`` concatenates these lists, so losses never need to know which kinds are in use.

- ``MultiScaleSTFTDiscriminator``: EnCodec's MS-STFT discriminator (2-D convs over complex STFTs at several
  resolutions).
- ``MultiPeriodDiscriminator``: HiFi-GAN's MPD (2-D convs over the waveform folded by a prime period).
- ``MultiScaleDiscriminator``: MelGAN / HiFi-GAN's MSD (grouped 1-D convs over average-pooled waveforms).

All convolutions use weight normalisation (``torch.nn.utils.parametrizations.weight_norm``).

``LatentDiscriminator`` is the exception: Musika's critic of latent windows ``[B, D, W]`` -> logits, a plain tensor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from ostinato.nn.conv import NormConv1d

DiscriminatorOutput = tuple[list[Tensor], list[list[Tensor]]]

__all__ = [
    "DiscriminatorOutput",
    "STFTDiscriminator",
    "MultiScaleSTFTDiscriminator",
    "PeriodDiscriminator",
    "MultiPeriodDiscriminator",
    "ScaleDiscriminator",
    "MultiScaleDiscriminator",
    "CombinedDiscriminator",
    "build_discriminator",
    "DISCRIMINATOR_KINDS",
    "LatentDiscriminator",
]


def _same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return tuple(((k - 1) * d) // 2 for k, d in zip(kernel_size, dilation))  # type: ignore[return-value]


def _wn_conv2d(*args: Any, **kwargs: Any) -> nn.Module:
    return weight_norm(nn.Conv2d(*args, **kwargs))


def _check_waveform(x: Tensor, channels: int) -> None:
    if x.dim() != 3 or x.shape[1] != channels:
        raise ValueError(f"expected a waveform batch [B, {channels}, T], got shape {tuple(x.shape)}")


def _conv_stack(z: Tensor, convs: nn.ModuleList, post: nn.Module, slope: float) -> tuple[Tensor, list[Tensor]]:
    """Leaky-ReLU conv stack then the output conv -> (logits, every activation including the logits)."""
    features: list[Tensor] = []
    for conv in convs:
        z = F.leaky_relu(conv(z), slope)
        features.append(z)
    z = post(z)
    features.append(z)
    return z, features


class DiscriminatorGroup(nn.Module):
    """Sub-discriminators that all see the input: ``self.discriminators`` (a ModuleList), ``self.channels``."""

    channels: int
    discriminators: nn.ModuleList

    @property
    def num_discriminators(self) -> int:
        return len(self.discriminators)

    def inputs(self, x: Tensor) -> list[Tensor]:
        """The waveform each sub-discriminator sees (all the same here; MSD downsamples)."""
        return [x] * len(self.discriminators)

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        _check_waveform(x, self.channels)
        logits, features = [], []
        for disc, xi in zip(self.discriminators, self.inputs(x)):
            logit, feats = disc(xi)
            logits.append(logit)
            features.append(feats)
        return logits, features


class STFTDiscriminator(nn.Module):
    """One resolution of the MS-STFT discriminator.

    The complex STFT of each audio channel (Hann window, ``center=False``) is split into real and imaginary parts,
    giving ``2 * channels`` input planes laid out as ``[B, 2C, frames, freqs]``. A 2-D conv stack follows: one conv,
    ``len(dilations)`` convs dilated along time and strided along frequency, one square conv, then a 1-channel
    output conv. The STFT is computed in fp32 with autocast disabled; the convs run in the parameters' dtype (or
    under autocast when it is active).

    Args:
        channels: audio channels C.
        filters: width of the first conv; layer ``i`` has ``min(filters * filters_scale**i, max_filters)``.
        n_fft, hop_length, win_length: STFT parameters.
        normalized: divide the STFT by the window's L2 norm (torchaudio's ``normalized=True``).
        kernel_size: ``(time, freq)`` kernel of the main convs.
        dilations: time dilation of each strided conv.
        stride: ``(time, freq)`` stride of the dilated convs.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        channels: int = 1,
        filters: int = 32,
        max_filters: int = 1024,
        n_fft: int = 1024,
        hop_length: int = 256,
        win_length: int = 1024,
        filters_scale: int = 1,
        kernel_size: tuple[int, int] = (3, 9),
        dilations: Sequence[int] = (1, 2, 4),
        stride: tuple[int, int] = (1, 2),
        normalized: bool = True,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"win_length ({win_length}) must be <= n_fft ({n_fft})")
        self.channels = channels
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.normalized = normalized
        self.negative_slope = negative_slope
        kernel_size = tuple(kernel_size)  # type: ignore[assignment]
        stride = tuple(stride)  # type: ignore[assignment]

        def width(i: int) -> int:
            return min(filters * filters_scale**i, max_filters)

        convs: list[nn.Module] = [
            _wn_conv2d(2 * channels, width(0), kernel_size, padding=_same_padding(kernel_size))
        ]
        in_chs = width(0)
        for i, dilation in enumerate(dilations):
            out_chs = width(i + 1)
            convs.append(
                _wn_conv2d(
                    in_chs, out_chs, kernel_size, stride=stride, dilation=(dilation, 1),
                    padding=_same_padding(kernel_size, (dilation, 1)),
                )
            )
            in_chs = out_chs
        square = (kernel_size[0], kernel_size[0])
        out_chs = width(len(dilations) + 1)
        convs.append(_wn_conv2d(in_chs, out_chs, square, padding=_same_padding(square)))
        self.convs = nn.ModuleList(convs)
        self.conv_post = _wn_conv2d(out_chs, 1, square, padding=_same_padding(square))

    def spectrogram(self, x: Tensor) -> Tensor:
        """``[B, C, T]`` waveform -> ``[B, 2C, frames, n_fft // 2 + 1]`` fp32 (real parts, then imaginary parts)."""
        b, c, t = x.shape
        if t < self.n_fft:
            raise ValueError(f"input of {t} samples is shorter than n_fft={self.n_fft} (the STFT uses center=False)")
        with torch.autocast(device_type=x.device.type, enabled=False):
            window = torch.hann_window(self.win_length, device=x.device, dtype=torch.float32)
            spec = torch.stft(
                x.reshape(b * c, t).float(), self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                window=window, center=False, return_complex=True,
            )
            if self.normalized:
                spec = spec / window.pow(2).sum().sqrt()
            spec = spec.reshape(b, c, *spec.shape[-2:])  # [B, C, freqs, frames]
            z = torch.cat([spec.real, spec.imag], dim=1)
        return z.transpose(-1, -2)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``x: [B, C, T]`` -> ``(logits [B, 1, frames', freqs'], features)``, ``T >= n_fft``."""
        z = self.spectrogram(x).to(self.conv_post.bias.dtype)
        features: list[Tensor] = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), self.negative_slope)
            features.append(z)
        return self.conv_post(z), features


class MultiScaleSTFTDiscriminator(DiscriminatorGroup):
    """EnCodec's multi-scale STFT discriminator: one ``STFTDiscriminator`` per ``(n_fft, hop, win)`` triple.

    Input ``[B, C, T]`` with ``T >= max(n_ffts)``; returns 5 logits ``[B, 1, frames_i, freqs_i]`` and, per
    resolution, ``len(dilations) + 2`` feature maps with the defaults.
    """

    def __init__(
        self,
        channels: int = 1,
        filters: int = 32,
        max_filters: int = 1024,
        n_ffts: Sequence[int] = (1024, 2048, 512, 256, 128),
        hop_lengths: Sequence[int] = (256, 512, 128, 64, 32),
        win_lengths: Sequence[int] = (1024, 2048, 512, 256, 128),
        filters_scale: int = 1,
        kernel_size: tuple[int, int] = (3, 9),
        dilations: Sequence[int] = (1, 2, 4),
        stride: tuple[int, int] = (1, 2),
        normalized: bool = True,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError("n_ffts, hop_lengths and win_lengths must have the same length")
        self.channels = channels
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(
                channels=channels, filters=filters, max_filters=max_filters, n_fft=n_fft, hop_length=hop,
                win_length=win, filters_scale=filters_scale, kernel_size=kernel_size, dilations=dilations,
                stride=stride, normalized=normalized, negative_slope=negative_slope,
            )
            for n_fft, hop, win in zip(n_ffts, hop_lengths, win_lengths)
        )



class PeriodDiscriminator(nn.Module):
    """HiFi-GAN period discriminator: the waveform ``[B, C, T]`` is right-padded (reflect) to a multiple of
    ``period`` and folded to ``[B, C, T / period, period]``; ``(kernel_size, 1)`` convs with stride ``(stride, 1)``
    then see samples ``period`` apart. Features include the output conv's activation, as in HiFi-GAN.

    Channel widths are ``min(filters * filters_scale**(i + 1), max_filters)`` (32, 128, 512, 1024, 1024 by default).
    """

    def __init__(
        self,
        period: int,
        channels: int = 1,
        n_layers: int = 5,
        kernel_size: int = 5,
        stride: int = 3,
        filters: int = 8,
        filters_scale: int = 4,
        max_filters: int = 1024,
        post_kernel_size: int = 3,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.period = period
        self.negative_slope = negative_slope
        convs: list[nn.Module] = []
        in_chs = channels
        for i in range(n_layers):
            out_chs = min(filters * filters_scale ** (i + 1), max_filters)
            convs.append(
                _wn_conv2d(
                    in_chs, out_chs, (kernel_size, 1), stride=(stride if i < n_layers - 1 else 1, 1),
                    padding=((kernel_size - 1) // 2, 0),
                )
            )
            in_chs = out_chs
        self.convs = nn.ModuleList(convs)
        self.conv_post = _wn_conv2d(in_chs, 1, (post_kernel_size, 1), padding=((post_kernel_size - 1) // 2, 0))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``x: [B, C, T]`` -> ``(logits [B, 1, T', period], features)``."""
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), mode="reflect")
        return _conv_stack(x.reshape(b, c, -1, self.period), self.convs, self.conv_post, self.negative_slope)


class MultiPeriodDiscriminator(DiscriminatorGroup):
    """HiFi-GAN's MPD: one ``PeriodDiscriminator`` per period; ``kwargs`` go to each of them."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), channels: int = 1, **kwargs: Any) -> None:
        super().__init__()
        self.channels = channels
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels=channels, **kwargs) for p in periods)


class ScaleDiscriminator(nn.Module):
    """MelGAN scale discriminator: a wide reflect-padded input conv, grouped strided 1-D convs (kernel
    ``10 * s + 1``, stride ``s``, groups ``in_channels // 4``) for each downsampling factor ``s``, a narrow conv
    and a 1-channel output conv. Features include the output conv's activation.
    """

    def __init__(
        self,
        channels: int = 1,
        filters: int = 16,
        max_filters: int = 1024,
        kernel_sizes: tuple[int, int] = (5, 3),
        downsample_scales: Sequence[int] = (4, 4, 4, 4),
        negative_slope: float = 0.2,
        use_spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        self.negative_slope = negative_slope
        first_kernel = kernel_sizes[0] * kernel_sizes[1]
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.ReflectionPad1d((first_kernel - 1) // 2), norm(nn.Conv1d(channels, filters, first_kernel))
            )
        ]
        in_chs = filters
        for s in downsample_scales:
            out_chs = min(in_chs * s, max_filters)
            kernel = 10 * s + 1
            groups = max(in_chs // 4, 1)
            while in_chs % groups or out_chs % groups:
                groups -= 1
            layers.append(
                norm(nn.Conv1d(in_chs, out_chs, kernel, stride=s, padding=(kernel - 1) // 2, groups=groups))
            )
            in_chs = out_chs
        out_chs = min(in_chs * 2, max_filters)
        layers.append(norm(nn.Conv1d(in_chs, out_chs, kernel_sizes[0], padding=(kernel_sizes[0] - 1) // 2)))
        self.convs = nn.ModuleList(layers)
        self.conv_post = norm(nn.Conv1d(out_chs, 1, kernel_sizes[1], padding=(kernel_sizes[1] - 1) // 2))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``x: [B, C, T]`` -> ``(logits [B, 1, T / prod(downsample_scales)], features)``."""
        return _conv_stack(x, self.convs, self.conv_post, self.negative_slope)


class MultiScaleDiscriminator(DiscriminatorGroup):
    """MelGAN / HiFi-GAN MSD: ``scales`` ``ScaleDiscriminator``s, the ``i``-th seeing the waveform average-pooled
    ``i`` times by ``AvgPool1d(4, 2, padding=2)``. ``first_spectral_norm=True`` gives HiFi-GAN's spectral norm on
    the full-rate discriminator; ``kwargs`` go to each ``ScaleDiscriminator``.
    """

    def __init__(
        self, scales: int = 3, channels: int = 1, first_spectral_norm: bool = False, **kwargs: Any
    ) -> None:
        super().__init__()
        self.channels = channels
        self.discriminators = nn.ModuleList(
            ScaleDiscriminator(channels=channels, use_spectral_norm=first_spectral_norm and i == 0, **kwargs)
            for i in range(scales)
        )
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def inputs(self, x: Tensor) -> list[Tensor]:
        out = [x]
        for _ in range(len(self.discriminators) - 1):
            out.append(self.pool(out[-1]))
        return out


class CombinedDiscriminator(nn.Module):
    """Runs several multi-discriminators on the same input and concatenates their ``(logits, features)``.

    Args:
        discriminators: a name -> module mapping or a list (named ``"0"``, ``"1"``, ...). Each module maps
            ``[B, C, T]`` to ``(list[Tensor], list[list[Tensor]])``.
    """

    def __init__(self, discriminators: Mapping[str, nn.Module] | Sequence[nn.Module]) -> None:
        super().__init__()
        if not isinstance(discriminators, Mapping):
            discriminators = {str(i): d for i, d in enumerate(discriminators)}
        if not discriminators:
            raise ValueError("CombinedDiscriminator needs at least one discriminator")
        self.discriminators = nn.ModuleDict(discriminators)

    @property
    def names(self) -> list[str]:
        """One name per entry of the returned lists, e.g. ``["msstft.0", ..., "mpd.4"]`` (for logging)."""
        names = []
        for key, disc in self.discriminators.items():
            n = getattr(disc, "num_discriminators", 1)
            names.extend(f"{key}.{i}" for i in range(n))
        return names

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        """``x: [B, C, T]`` -> concatenated ``(logits, features)`` of all discriminators, in insertion order."""
        logits: list[Tensor] = []
        features: list[list[Tensor]] = []
        for disc in self.discriminators.values():
            lg, ft = disc(x)
            logits.extend(lg)
            features.extend(ft)
        return logits, features


DISCRIMINATOR_KINDS: dict[str, type[nn.Module]] = {
    "msstft": MultiScaleSTFTDiscriminator,
    "mpd": MultiPeriodDiscriminator,
    "msd": MultiScaleDiscriminator,
}


def build_discriminator(
    kinds: Sequence[str] = ("msstft",), channels: int = 1, **kwargs_per_kind: Mapping[str, Any]
) -> CombinedDiscriminator:
    """Build a ``CombinedDiscriminator`` from kind names in ``{"msstft", "mpd", "msd"}``.

    Example: ``build_discriminator(("msstft", "mpd"), channels=2, msstft={"filters": 16}, mpd={"periods": (2, 3)})``.
    Keyword arguments are keyed by kind; each value is passed to that kind's constructor.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in DISCRIMINATOR_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown discriminator kinds {unknown or kinds}; choose from {sorted(DISCRIMINATOR_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"duplicate discriminator kinds in {list(kinds)}")
    stray = sorted(set(kwargs_per_kind) - set(kinds))
    if stray:
        raise ValueError(f"keyword arguments for kinds not in {list(kinds)}: {stray}")
    return CombinedDiscriminator(
        {k: DISCRIMINATOR_KINDS[k](channels=channels, **dict(kwargs_per_kind.get(k) or {})) for k in kinds}
    )


class LatentDiscriminator(nn.Module):
    """D(latents [B, dimension, W]) -> logits [B, 1, W / 2^len(strides)...]: strided 1-D convolutions with
    LeakyReLU (a patch discriminator over time).

    ``minibatch_std``: group size of StyleGAN's minibatch standard deviation (0: off). Before the last two
    convolutions, each item gets one more channel: the standard deviation over its group of items, averaged over
    channels and time. A generator whose windows do not depend on their noise gives a std near 0 where real windows
    give a large one, so the critic sees the collapse that item-by-item scores cannot.
    """

    def __init__(self, dimension: int = 64, channels: Sequence[int] = (128, 256, 256), kernel_size: int = 5,
                 norm: str = "none", minibatch_std: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [NormConv1d(dimension, channels[0], 3, norm=norm)]
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.LeakyReLU(0.2), NormConv1d(a, b, kernel_size, stride=2, norm=norm)]
        self.minibatch_std = int(minibatch_std)
        self.split = len(layers) + 1  # the last two convolutions (the head) see the group std, when on
        extra = 1 if self.minibatch_std > 0 else 0
        layers += [nn.LeakyReLU(0.2), NormConv1d(channels[-1] + extra, channels[-1], 3, norm=norm), nn.LeakyReLU(0.2),
                   NormConv1d(channels[-1], 1, 3, norm=norm)]
        self.model = nn.Sequential(*layers)
        self.dimension = int(dimension)

    def _group_std(self, x: Tensor) -> Tensor:
        """x [B, C, T] -> [B, 1, T]: per item, the std over its group of ``minibatch_std`` items (the largest
        divisor of B not above it), averaged over channels and time."""
        b = x.shape[0]
        group = max(g for g in range(1, min(self.minibatch_std, b) + 1) if b % g == 0)
        if group < 2:
            return x.new_zeros(b, 1, x.shape[-1])
        y = x.float().view(group, b // group, *x.shape[1:])  # item i sits in group i % (B / group)
        std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2))  # [B / group]
        return std.repeat(group)[:, None, None].expand(b, 1, x.shape[-1]).to(x.dtype)

    def forward(self, latents: Tensor) -> Tensor:
        if latents.dim() != 3 or latents.shape[1] != self.dimension:
            raise ValueError(f"expected latents [B, {self.dimension}, W], got {tuple(latents.shape)}")
        x = self.model[:self.split](latents)
        if self.minibatch_std > 0:
            x = torch.cat([x, self._group_std(x)], dim=1)
        return self.model[self.split:](x)
