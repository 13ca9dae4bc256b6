"""The building blocks of DAC (descript-audio-codec, Kumar et al. 2023): Snake activations, weight-normed
convolutions, and a residual VQ whose codebooks are factorized (looked up in a low-dimensional projection) and
L2-normalised (nearest by cosine).

Written here, not imported: the ``dac`` package needs ``descript-audiotools``, which pins protobuf<3.20 against
this project's protobuf 7 and pulls in tensorboard and IPython.

The modules nest as the ``dac`` package's do, so a DAC checkpoint's tensor names are ours, with weight norm's
``weight_g`` / ``weight_v`` as ``parametrizations.weight.original0`` / ``original1``.

Shapes: audio [B, 1, T] with T a multiple of ``hop_length``; latents [B, D, F] (F = T / hop_length); codes [B, K, F].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ostinato.nn.quantization import QuantizedResult, perplexity

DILATIONS = (1, 3, 9)  # of the three residual units of every encoder and decoder block


def wn_conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1, dilation: int = 1,
            padding: int = 0) -> nn.Conv1d:
    return weight_norm(nn.Conv1d(c_in, c_out, kernel_size, stride=stride, dilation=dilation, padding=padding))


def wn_conv_transpose(c_in: int, c_out: int, kernel_size: int, stride: int, padding: int) -> nn.ConvTranspose1d:
    return weight_norm(nn.ConvTranspose1d(c_in, c_out, kernel_size, stride=stride, padding=padding))


class Snake1d(nn.Module):
    """x + sin(alpha x)^2 / alpha per channel: [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """Snake, dilated conv (kernel 7), Snake, conv 1, plus the input: [B, C, T] -> [B, C, T]."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(Snake1d(dim), wn_conv(dim, dim, 7, dilation=dilation, padding=3 * dilation),
                                   Snake1d(dim), wn_conv(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        crop = (x.shape[-1] - y.shape[-1]) // 2
        return (x[..., crop:-crop] if crop > 0 else x) + y


def _strided(stride: int) -> dict[str, int]:
    return {"kernel_size": 2 * stride, "stride": stride, "padding": math.ceil(stride / 2)}


class EncoderBlock(nn.Module):
    """Three residual units at ``dim // 2`` channels, then a strided conv: [B, dim/2, T] -> [B, dim, T / stride]."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*(ResidualUnit(dim // 2, d) for d in DILATIONS), Snake1d(dim // 2),
                                   wn_conv(dim // 2, dim, **_strided(stride)))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    """A transposed conv, then three residual units: [B, c_in, F] -> [B, c_out, F * stride] (even strides)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(Snake1d(c_in), wn_conv_transpose(c_in, c_out, **_strided(stride)),
                                   *(ResidualUnit(c_out, d) for d in DILATIONS))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DACEncoder(nn.Module):
    """audio [B, 1, T] -> latents [B, latent_dim, T / prod(rates)]; channels double at every block."""

    def __init__(self, dim: int, rates: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [wn_conv(1, dim, 7, padding=3)]
        for stride in rates:
            dim *= 2
            layers.append(EncoderBlock(dim, int(stride)))
        layers += [Snake1d(dim), wn_conv(dim, latent_dim, 3, padding=1)]
        self.block = nn.Sequential(*layers)
        self.hop_length = math.prod(int(r) for r in rates)
        self.dimension, self.channels = int(latent_dim), 1

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DACDecoder(nn.Module):
    """latents [B, latent_dim, F] -> audio [B, 1, F * prod(rates)] in [-1, 1]; channels halve at every block."""

    def __init__(self, latent_dim: int, dim: int, rates: Sequence[int]) -> None:
        super().__init__()
        if any(int(r) % 2 for r in rates):
            raise ValueError(f"decoder_rates {list(rates)}: odd strides lose a sample per block; use even ones")
        layers: list[nn.Module] = [wn_conv(latent_dim, dim, 7, padding=3)]
        for i, stride in enumerate(rates):
            layers.append(DecoderBlock(dim // 2**i, dim // 2 ** (i + 1), int(stride)))
        layers += [Snake1d(dim // 2 ** len(rates)), wn_conv(dim // 2 ** len(rates), 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.hop_length = math.prod(int(r) for r in rates)
        self.dimension, self.channels = int(latent_dim), 1

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class FactorizedCodebook(nn.Module):
    """One DAC codebook: ``in_proj`` to ``codebook_dim``, nearest L2-normalised entry, ``out_proj`` back."""

    def __init__(self, dimension: int, card: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = wn_conv(dimension, codebook_dim, 1)
        self.out_proj = wn_conv(codebook_dim, dimension, 1)
        self.codebook = nn.Embedding(card, codebook_dim)

    def nearest(self, low: Tensor) -> Tensor:
        """Projected latents [B, d, F] -> codes [B, F]: the largest cosine, as -|a - b|^2 of unit vectors expanded
        in DAC's own order so that imported codebooks give its codes exactly."""
        x = F.normalize(low.transpose(1, 2).reshape(-1, low.shape[1]))
        book = F.normalize(self.codebook.weight)
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(1)[1].view(low.shape[0], low.shape[2])

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B, F] -> the (unnormalised) entries [B, codebook_dim, F]."""
        return F.embedding(codes, self.codebook.weight).transpose(1, 2)


class FactorizedRVQ(nn.Module):
    """DAC's residual VQ: latents [B, D, F] <-> codes [B, K, F], K <= n_q. Its codebooks learn by gradient (no EMA,
    no k-means): ``forward``'s penalty is the commitment plus the codebook loss."""

    def __init__(self, dimension: int, n_q: int, card: int, codebook_dim: int | Sequence[int]) -> None:
        super().__init__()
        dims = [int(codebook_dim)] * n_q if isinstance(codebook_dim, int) else [int(d) for d in codebook_dim]
        if len(dims) != n_q:
            raise ValueError(f"codebook_dim {list(dims)}: one per codebook, n_q={n_q}")
        self.quantizers = nn.ModuleList(FactorizedCodebook(dimension, card, d) for d in dims)
        self.dimension, self.n_q, self.card, self.codebook_dims = int(dimension), int(n_q), int(card), dims

    def bits_per_frame(self, n_q: int | None = None) -> float:
        return (n_q or self.n_q) * math.log2(self.card)

    def ema_excluded(self, prefix: str = "") -> list[str]:
        return []

    def _check_n_q(self, n_q: int | None) -> int:
        n_q = self.n_q if n_q is None else int(n_q)
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q={n_q}: this quantizer has {self.n_q} codebooks")
        return n_q

    def forward(self, z: Tensor, n_q: int | None = None) -> QuantizedResult:
        """latents [B, D, F] -> QuantizedResult(quantized [B, D, F] straight-through, codes [B, K, F], penalty)."""
        quantized, residual, codes = torch.zeros_like(z), z, []
        penalty = z.new_zeros(())
        for vq in self.quantizers[:self._check_n_q(n_q)]:
            low = vq.in_proj(residual)
            index = vq.nearest(low)
            entry = vq.lookup(index)
            penalty = penalty + F.mse_loss(low, entry.detach()) + F.mse_loss(entry, low.detach())
            # low + (entry - low) rather than entry: DAC's residuals carry this rounding, and later codes follow it
            step = vq.out_proj(low + (entry - low).detach())
            quantized, residual = quantized + step, residual - step
            codes.append(index)
        codes_t = torch.stack(codes, dim=1)
        metrics = {"n_q": torch.tensor(float(len(codes)))}
        for k, index in enumerate(codes):
            metrics[f"perplexity_q{k}"] = perplexity(torch.bincount(index.flatten(), minlength=self.card).float())
        return QuantizedResult(quantized, codes_t, penalty, metrics)

    def encode(self, z: Tensor, n_q: int | None = None) -> Tensor:
        """latents [B, D, F] -> codes [B, K, F] int64 (K = n_q or all)."""
        return self.forward(z, n_q).codes

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, F] -> latents [B, D, F]: the sum of the first K codebooks' projected entries."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_q:
            raise ValueError(f"expected codes [B, K <= {self.n_q}, F], got {tuple(codes.shape)}")
        return sum(vq.out_proj(vq.lookup(codes[:, k])) for k, vq in enumerate(self.quantizers[:codes.shape[1]]))
