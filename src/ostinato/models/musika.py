"""Musika's building blocks: a spectrogram autoencoder with a bounded continuous latent, and a latent GAN whose
generator reads a global style vector and a field of positional coordinates.

Autoencoder (``SpectralAutoencoder``)::

    wav [B, C, T] --STFT (n_fft = 4 hop, hann, "same" padding)--> normalised log|X| [B, C * (n_fft/2 + 1), T / hop]
        --SEANet encoder over frames (ratios)--> tanh --> latents [B, D, T / (hop * prod(ratios))]
        --SEANet decoder--> [B, C * (n_fft + 2), T / hop]: normalised log-magnitude and phase per bin
        --ISTFT ("same" padding, overlap-add normalised by the window envelope)--> wav [B, C, T]

Log-magnitudes are floored at ``log_floor`` (-60 dB) and normalised per bin, ``(log(|X| + floor) - mean_bin) /
scale``, both as the encoder's input and as the decoder's magnitude output, so the decoder can also be trained
directly on the input spectrogram (``AutoencoderOutput.logmag`` vs ``.target``), which teaches it magnitudes far
faster than waveform losses alone. ``mean_bin`` (the average log-spectrum) and ``scale`` (one std around it) are
fitted to the first training batch (``fit_spectrum_``), as a codebook's k-means is, so that at the start the
encoder reads a centred input and the decoder's zero output is the average spectrum. Why: with fixed statistics
(``log_mean`` / ``log_std``, what an unfitted model uses) the demo's spectra normalise to a mean near -1 over 481
bins; the decoder's first hundreds of steps then go to lowering its level, with an L1 gradient of the same sign for
every clip, which the network follows fastest through the encoder: its first conv turns into a level detector whose
units sit in the ELU's flat end (91 % of them after 25 steps) or, without the saturation loss, its latents into the
tanh's (all of them after 10 steps), and for hundreds of steps every clip reconstructs to one average spectrum.

The decoder works at the STFT frame rate and the waveform comes from an inverse FFT, which is what makes Musika
fast on a CPU: no layer runs at the audio rate. Latents are bounded in [-1, 1] (tanh) so the GAN has a fixed range.

Latent coordinates (Musika's "latent coordinate system"): random anchor vectors are placed every
``anchor_spacing`` coordinate steps and interpolated in between (along great circles, at constant speed), so the
coordinate field is continuous along time. The generator
is a fully convolutional network over that field (nearest upsampling + convolutions, FiLM modulation by the
style vector, no normalisation over time), hence translation-equivariant: a window computed with ``halo``
coordinate steps of context on both sides and cropped is *exactly* the corresponding part of the whole field
computed at once. Generating many windows in parallel and concatenating them therefore has no seams by
construction; training on windows at random phases relative to the anchors teaches every position, joins included.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.data.manifest import MANIFEST_NAME, StreamInfo
from ostinato.fileio import read_json
from ostinato.nn.conv import NormConv1d
from ostinato.nn.decoding import Progress
from ostinato.nn.seanet import SEANetDecoder, SEANetEncoder

__all__ = ["stft_logmag", "istft_same", "AutoencoderOutput", "SpectralAutoencoder", "MusikaGenerator", "Musika",
           "coordinate_field", "window_coordinates", "truncated_normal", "recorded_autoencoder"]



# -- spectral front end / back end ------------------------------------------------------------------------------
def _window(n_fft: int, device: torch.device) -> Tensor:
    return torch.hann_window(n_fft, periodic=True, device=device, dtype=torch.float32)


def stft_logmag(wav: Tensor, n_fft: int, hop: int, eps: float = 1e-5) -> Tensor:
    """wav [B, C, T] (T a multiple of hop) -> log-magnitudes [B, C * (n_fft // 2 + 1), T // hop].

    "Same" framing: reflect-pad ``(n_fft - hop) // 2`` on both sides, no centring, so frame ``f`` is centred on
    samples ``[f * hop, (f + 1) * hop)`` and there are exactly ``T / hop`` frames.
    """
    b, c, t = wav.shape
    pad = (n_fft - hop) // 2
    x = F.pad(wav.reshape(b * c, 1, t).float(), (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(x, n_fft, hop_length=hop, window=_window(n_fft, wav.device), center=False,
                      return_complex=True)
    return torch.log(spec.abs() + eps).reshape(b, c * (n_fft // 2 + 1), -1)


def istft_same(spec: Tensor, n_fft: int, hop: int) -> Tensor:
    """Complex spectrogram [B, n_fft // 2 + 1, F] -> wav [B, F * hop], the inverse of ``stft_logmag``'s framing.

    ``torch.istft`` wants a non-zero window envelope everywhere, which "same" padding does not give at the edges;
    this is the overlap-add written out (Vocos' ``ISTFT(padding="same")``).
    """
    frames = spec.shape[-1]
    window = _window(n_fft, spec.device)
    x = torch.fft.irfft(spec, n=n_fft, dim=1, norm="backward") * window[None, :, None]
    size = (frames - 1) * hop + n_fft
    y = F.fold(x, output_size=(1, size), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
    env = F.fold(window.square()[None, :, None].expand(1, -1, frames), output_size=(1, size),
                 kernel_size=(1, n_fft), stride=(1, hop))[0, 0, 0]
    pad = (n_fft - hop) // 2
    return y[:, pad:size - pad] / env[pad:size - pad].clamp_min(1e-11)


@dataclass
class AutoencoderOutput:
    """``SpectralAutoencoder.forward``: recon [B, C, T]; latents [B, D, L]; the decoder's normalised
    log-magnitudes ``logmag`` and the input's ``target``, both [B, C * bins, L * frame_ratio]; ``pre`` [B, D, L],
    the encoder's output before the tanh (``latents = tanh(pre)``)."""

    recon: Tensor
    latents: Tensor
    logmag: Tensor
    target: Tensor
    pre: Tensor


class SpectralAutoencoder(nn.Module):
    """Musika-style autoencoder: wav [B, C, T] <-> latents [B, dimension, T / hop_length] in [-1, 1].

    Args:
        sample_rate, channels: the audio.
        hop: STFT hop (even); ``n_fft = 4 * hop`` as in Musika.
        dimension: latent size D.
        n_filters, ratios, n_residual_layers, ...: the SEANet encoder / decoder over STFT frames (``ratios``
            compress time further: latent hop = ``hop * prod(ratios)``); any key of ``SEANetEncoder`` passes.
        log_floor: the log-magnitude floor. log_mean, log_std: the normalisation until ``fit_spectrum_`` replaces
            them by the data's per-bin mean and its scale (on the first training forward; see the module docstring).
        max_log_magnitude: clamp of the predicted (natural) log-magnitude, keeping ``exp`` finite.
    ``config`` holds the constructor arguments (``SpectralAutoencoder(**ae.config)`` rebuilds it).
    """

    def __init__(self, sample_rate: int, channels: int = 1, hop: int = 256, dimension: int = 64,
                 n_filters: int = 64, ratios: Sequence[int] = (4, 4), n_residual_layers: int = 1,
                 kernel_size: int = 7, last_kernel_size: int = 3, residual_kernel_size: int = 3,
                 dilation_base: int = 2, activation: str = "ELU", norm: str = "weight_norm", lstm: int = 0,
                 log_floor: float = 1e-3, log_mean: float = -3.0, log_std: float = 3.0,
                 max_log_magnitude: float = 6.0) -> None:
        super().__init__()
        if hop % 2:
            raise ValueError(f"hop must be even (n_fft - hop is split over both sides), got {hop}")
        self.config: dict[str, Any] = dict(
            sample_rate=sample_rate, channels=channels, hop=hop, dimension=dimension, n_filters=n_filters,
            ratios=[int(r) for r in ratios], n_residual_layers=n_residual_layers, kernel_size=kernel_size,
            last_kernel_size=last_kernel_size, residual_kernel_size=residual_kernel_size,
            dilation_base=dilation_base, activation=activation, norm=norm, lstm=lstm, log_floor=log_floor,
            log_mean=log_mean, log_std=log_std, max_log_magnitude=max_log_magnitude)
        self.sample_rate, self.channels, self.hop, self.n_fft = int(sample_rate), int(channels), int(hop), 4 * int(hop)
        self.dimension, self.max_log_magnitude = int(dimension), float(max_log_magnitude)
        self.log_floor, self.log_mean, self.log_std = float(log_floor), float(log_mean), float(log_std)
        self.bins = self.n_fft // 2 + 1
        seanet = dict(dimension=dimension, n_filters=n_filters, ratios=list(ratios), activation=activation,
                      n_residual_layers=n_residual_layers, kernel_size=kernel_size, last_kernel_size=last_kernel_size,
                      residual_kernel_size=residual_kernel_size, dilation_base=dilation_base, norm=norm, lstm=lstm,
                      pad_mode="reflect", causal=False)
        self.encoder = SEANetEncoder(channels=self.channels * self.bins, **seanet)
        self.decoder = SEANetDecoder(channels=self.channels * 2 * self.bins, **seanet)
        self.frame_ratio = self.encoder.hop_length
        self.register_buffer("spectrum_mean", torch.full((self.channels * self.bins,), self.log_mean))
        self.register_buffer("spectrum_scale", torch.tensor(self.log_std))
        self.register_buffer("spectrum_fitted", torch.tensor(False))

    array_kind = "musika_autoencoder"  # what ``ostinato encode`` records as the writer of its latent arrays

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], folder: Path | None = None) -> SpectralAutoencoder:
        """The autoencoder of a Musika autoencoder training config (``cfg["family"]``: ``sample_rate``,
        ``channels`` and the ``autoencoder`` keys)."""
        family = cfg["family"]
        audio = {k: family[k] for k in ("sample_rate", "channels") if k in family}
        return cls(**audio, **(family.get("autoencoder") or {}))

    def array_streams(self) -> dict[str, StreamInfo]:
        """The array stream ``ostinato encode`` writes: ``latents``, float16 [D, F] at ``frame_rate``."""
        return {"latents": StreamInfo(rate=self.frame_rate, channels=self.dimension, dtype="float16")}

    def encode_arrays(self, wav: Tensor) -> dict[str, Tensor]:
        """wav [B, C, T] -> {"latents": [B, D, ceil(T / hop_length)]}."""
        return {"latents": self.encode(wav)}

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame: ``hop * prod(ratios)``."""
        return self.hop * self.frame_ratio

    @property
    def frame_rate(self) -> float:
        """Latent frames per second."""
        return self.sample_rate / self.hop_length

    def _pad(self, wav: Tensor) -> Tensor:
        return F.pad(wav, (0, -wav.shape[-1] % self.hop_length))

    def _logmag(self, wav: Tensor) -> Tensor:
        if wav.dim() != 3 or wav.shape[1] != self.channels:
            raise ValueError(f"expected audio [B, {self.channels}, T], got {tuple(wav.shape)}")
        return stft_logmag(self._pad(wav), self.n_fft, self.hop, eps=self.log_floor)

    @torch.no_grad()
    def fit_spectrum_(self, wav: Tensor) -> None:
        """Set the normalisation to ``wav [B, C, T]``'s (rank 0's batch under DDP, so all ranks agree): the mean
        log-magnitude of every bin over items and frames, and the std of the log-magnitudes around it."""
        logmag = self._logmag(wav).float()
        mean = logmag.mean(dim=(0, 2))
        packed = torch.cat([mean, (logmag - mean[:, None]).std().clamp_min(1e-3)[None]])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(packed, src=0)
        self.spectrum_mean.copy_(packed[:-1])
        self.spectrum_scale.copy_(packed[-1])
        self.spectrum_fitted.fill_(True)

    def features(self, wav: Tensor) -> Tensor:
        """wav [B, C, T] -> normalised log-magnitudes [B, C * bins, ceil(T / hop_length) * frame_ratio]."""
        return (self._logmag(wav) - self.spectrum_mean[:, None]) / self.spectrum_scale

    def denormalise(self, logmag: Tensor) -> Tensor:
        """Normalised log-magnitudes [B, C * bins, F] (``features``, ``AutoencoderOutput.logmag``) -> natural ones."""
        return logmag * self.spectrum_scale + self.spectrum_mean[:, None]

    def encode(self, wav: Tensor) -> Tensor:
        """wav [B, C, T] -> latents [B, D, ceil(T / hop_length)] in [-1, 1]."""
        return torch.tanh(self.encoder(self.features(wav)))

    def synthesize(self, out: Tensor) -> Tensor:
        """Decoder output [B, C * 2 * bins, F] (normalised log-magnitude, phase) -> wav [B, C, F * hop]."""
        b, _, frames = out.shape
        out = out.float().reshape(b, self.channels, 2, self.bins, frames)
        logmag = self.denormalise(out[:, :, 0].reshape(b, -1, frames)).reshape(b * self.channels, self.bins, frames)
        magnitude = torch.exp(logmag.clamp(max=self.max_log_magnitude))
        phase = out[:, :, 1].reshape(b * self.channels, self.bins, frames)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return istft_same(spec, self.n_fft, self.hop).reshape(b, self.channels, frames * self.hop)

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, D, L] -> wav [B, C, L * hop_length]."""
        return self.synthesize(self.decoder(latents))

    def decode_chunked(self, latents: Tensor, chunk: int = 256, context: int | None = None,
                       progress: Any = None) -> Tensor:
        """``decode`` in chunks of ``chunk`` latent frames with ``context`` frames on both sides (default: enough
        for the decoder's receptive field and the STFT overlap), for long outputs: memory stays bounded and the
        result matches ``decode`` of the whole (up to float rounding)."""
        context = self.decoder_context() if context is None else context
        total = latents.shape[-1]
        parts = []
        for start in range(0, total, chunk):
            end = min(total, start + chunk)
            lo, hi = max(0, start - context), min(total, end + context)
            wav = self.decode(latents[..., lo:hi])
            parts.append(wav[..., (start - lo) * self.hop_length:(end - lo) * self.hop_length])
            if progress is not None:
                progress(end, total)
        return torch.cat(parts, dim=-1)

    def decoder_context(self) -> int:
        """Latent frames of context that make chunked decoding match whole decoding: the decoder's one-sided
        receptive field (every convolution at its own rate) plus the STFT overlap, rounded up."""
        reach, scale = 0.0, 1  # one-sided receptive field in latent frames; STFT frames per latent frame so far
        for m in self.decoder.model.modules():
            if isinstance(m, nn.ConvTranspose1d):
                scale *= m.stride[0]
                reach += m.kernel_size[0] / scale
            elif isinstance(m, nn.Conv1d):
                reach += (m.kernel_size[0] - 1) * m.dilation[0] / 2 / scale
        reach += self.n_fft / self.hop / self.frame_ratio
        return int(math.ceil(reach)) + 1

    def forward(self, wav: Tensor) -> AutoencoderOutput:
        """wav [B, C, T] -> ``AutoencoderOutput`` (reconstruction [B, C, T], latents, decoded and input spectra)."""
        length = wav.shape[-1]
        if self.training and not bool(self.spectrum_fitted):
            self.fit_spectrum_(wav)
        target = self.features(wav)
        pre = self.encoder(target)
        z = torch.tanh(pre)
        out = self.decoder(z)
        b, _, frames = out.shape
        logmag = out.reshape(b, self.channels, 2, self.bins, frames)[:, :, 0].reshape(b, -1, frames)
        return AutoencoderOutput(self.synthesize(out)[..., :length], z, logmag, target, pre)


# -- latent GAN -------------------------------------------------------------------------------------------------
def truncated_normal(shape: Sequence[int], bound: float | None, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """N(0, 1) samples restricted to ``[-bound, bound]`` (None: untruncated), Musika's truncation trick.

    Drawn by inverting the CDF of one uniform per value, so the i-th value depends only on the i-th draw: a
    longer request extends a shorter one with the same generator state.
    """
    u = torch.rand(*shape, generator=generator, dtype=torch.float64)
    lo = 0.0 if bound is None or bound <= 0 else float(torch.special.ndtr(torch.tensor(-float(bound),
                                                                                       dtype=torch.float64)))
    p = (lo + u * (1 - 2 * lo)).clamp(1e-12, 1 - 1e-12)
    return torch.special.ndtri(p).float().to(device)


def coordinate_field(anchors: Tensor, spacing: int, start: int, length: int) -> Tensor:
    """Coordinates at steps ``start .. start + length - 1`` of the field through ``anchors [B, C, N]`` placed every
    ``spacing`` steps (anchor k at step k * spacing): ``[B, C, length]``.

    Between anchors a and b at fraction s the direction moves along the great circle from a to b (slerp) and the
    norm from |a| to |b| linearly, so the field passes through every anchor, keeps the typical norm of a Gaussian
    vector and moves at a constant speed inside each segment (random anchors are nearly orthogonal in high
    dimension, so at nearly the same speed in every segment): no position along the field is special.
    """
    steps = torch.arange(start, start + length, device=anchors.device)
    k = torch.div(steps, spacing, rounding_mode="floor")
    if int(k.min()) < 0 or int(k.max()) + 1 >= anchors.shape[-1]:
        raise ValueError(f"steps [{start}, {start + length}) need anchors 0..{int(k.max()) + 1}, "
                         f"have {anchors.shape[-1]}")
    s = ((steps - k * spacing).to(anchors.dtype) / spacing)[None, None]
    a, b = anchors[..., k], anchors[..., k + 1]
    na, nb = a.norm(dim=1, keepdim=True).clamp_min(1e-8), b.norm(dim=1, keepdim=True).clamp_min(1e-8)
    cos = ((a / na) * (b / nb)).sum(dim=1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6)
    theta = torch.acos(cos)
    direction = (torch.sin((1 - s) * theta) * a / na + torch.sin(s * theta) * b / nb) / torch.sin(theta)
    return direction * ((1 - s) * na + s * nb)


class _FiLMBlock(nn.Module):
    """Residual block [B, C, T] -> [B, C, T]: two convolutions, each followed by a FiLM of the style and a
    LeakyReLU. No normalisation over time (it would make windows depend on each other)."""

    def __init__(self, channels: int, style_dim: int, kernel_size: int, dilation: int, norm: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList([NormConv1d(channels, channels, kernel_size, dilation=dilation, norm=norm,
                                               pad_mode="constant") for _ in range(2)])
        self.film = nn.Linear(style_dim, 4 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        film = self.film(style)[:, :, None].chunk(4, dim=1)
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h) * (1 + film[2 * i]) + film[2 * i + 1]
            h = F.leaky_relu(h, 0.2)
        return x + h


class MusikaGenerator(nn.Module):
    """G(style [B, S], coordinates [B, Cc, Lc]) -> latents [B, dimension, Lc * upsample] in [-1, 1].

    The coordinates live on a coarse grid, ``upsample = prod(up_ratios)`` latent frames per step. Layers:
    a 1x1 projection, ``blocks`` FiLM residual blocks (dilations cycling through ``dilations``) at the coarse rate,
    then per up ratio a nearest upsampling, a convolution and ``blocks_per_up`` blocks, and a last convolution +
    tanh. ``halo``: coarse steps of context a window needs on each side for an exact crop (see module docstring).
    """

    def __init__(self, dimension: int = 64, coord_dim: int = 64, style_dim: int = 64, channels: int = 256,
                 up_ratios: Sequence[int] = (2, 2), up_channels: Sequence[int] | None = None, blocks: int = 3,
                 blocks_per_up: int = 1, kernel_size: int = 3, dilations: Sequence[int] = (1, 2, 4),
                 norm: str = "weight_norm") -> None:
        super().__init__()
        up_ratios = [int(r) for r in up_ratios]
        up_channels = [int(c) for c in (up_channels or [max(channels // 2 ** (i + 1), 32)
                                                        for i in range(len(up_ratios))])]
        if len(up_channels) != len(up_ratios):
            raise ValueError(f"up_channels {up_channels} must have one entry per up ratio {up_ratios}")
        self.dimension, self.coord_dim, self.style_dim = int(dimension), int(coord_dim), int(style_dim)
        self.up_ratios = up_ratios
        self.upsample = math.prod(up_ratios)
        self.proj = NormConv1d(coord_dim, channels, 1, norm=norm)
        self.style_mlp = nn.Sequential(nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2),
                                       nn.Linear(style_dim, style_dim))
        self.coarse = nn.ModuleList([_FiLMBlock(channels, style_dim, kernel_size, dilations[i % len(dilations)], norm)
                                     for i in range(blocks)])
        self.ups = nn.ModuleList()
        width = channels
        for ratio, out in zip(up_ratios, up_channels):
            stage = nn.ModuleDict({
                "conv": NormConv1d(width, out, kernel_size, norm=norm, pad_mode="constant"),
                "blocks": nn.ModuleList([_FiLMBlock(out, style_dim, kernel_size, dilations[i % len(dilations)], norm)
                                         for i in range(blocks_per_up)])})
            self.ups.append(stage)
            width = out
        self.out = NormConv1d(width, dimension, kernel_size, norm=norm, pad_mode="constant")
        self.halo = self._halo()

    def _halo(self) -> int:
        reach = 0.0  # one-sided receptive field in coarse steps
        scale = 1
        convs: list[tuple[nn.Module, int]] = [(b, 1) for b in self.coarse]
        for ratio, stage in zip(self.up_ratios, self.ups):
            scale *= ratio
            convs += [(stage["conv"], scale)] + [(b, scale) for b in stage["blocks"]]
        convs.append((self.out, scale))
        for module, at in convs:
            for m in module.modules():
                if isinstance(m, nn.Conv1d):
                    reach += (m.kernel_size[0] - 1) * m.dilation[0] / 2 / at
        return int(math.ceil(reach)) + 1

    def forward(self, coords: Tensor, style: Tensor) -> Tensor:
        """coords [B, coord_dim, Lc], style [B, style_dim] -> [B, dimension, Lc * upsample]."""
        if coords.dim() != 3 or coords.shape[1] != self.coord_dim:
            raise ValueError(f"expected coordinates [B, {self.coord_dim}, L], got {tuple(coords.shape)}")
        s = self.style_mlp(style)
        x = F.leaky_relu(self.proj(coords), 0.2)
        for block in self.coarse:
            x = block(x, s)
        for ratio, stage in zip(self.up_ratios, self.ups):
            x = F.interpolate(x, scale_factor=ratio, mode="nearest")
            x = F.leaky_relu(stage["conv"](x), 0.2)
            for block in stage["blocks"]:
                x = block(x, s)
        return torch.tanh(self.out(x))

    def windows(self, coords: Tensor, style: Tensor) -> Tensor:
        """Windows given with ``halo`` coordinate steps of context on each side, ``coords [N, coord_dim, L + 2 halo]``
        and ``style [N, style_dim]`` -> their latents without the context, ``[N, dimension, L * upsample]``."""
        cut = self.halo * self.upsample
        out = self(coords, style)
        return out[..., cut:out.shape[-1] - cut]


def window_coordinates(anchors: Tensor, spacing: int, starts: Sequence[int], length: int, halo: int) -> Tensor:
    """The coordinates of windows ``[start, start + length)`` (coordinate steps of the field through ``anchors
    [B, Cc, A]``) with ``halo`` steps of context on each side: ``[B * len(starts), Cc, length + 2 halo]``, batch
    item-major (all windows of item 0 first)."""
    rows = [coordinate_field(anchors, spacing, s - halo, length + 2 * halo) for s in starts]
    return torch.stack(rows, dim=1).flatten(0, 1)


def recorded_autoencoder(cfg: Mapping[str, Any], folder: Path | None = None) -> str | None:
    """The autoencoder a Musika GAN's training config names: ``family.autoencoder`` (relative to the export
    ``folder`` when it lies there), else the model that wrote its training latents (their manifest's
    ``model.id``), else None."""
    ref = (cfg.get("family") or {}).get("autoencoder")
    if ref:
        beside = Path(folder) / str(ref) if folder is not None and not Path(str(ref)).is_absolute() else None
        return str(beside) if beside is not None and beside.exists() else str(ref)
    train = (cfg.get("data") or {}).get("train")
    manifest = Path(str(train)) / MANIFEST_NAME if isinstance(train, (str, Path)) else None
    if manifest is None or not manifest.is_file():
        return None
    return str(read_json(manifest)["model"]["id"])


class Musika(nn.Module):
    """Musika for inference: the latent generator, its window geometry, and the autoencoder that decodes.

    ``generate(duration)`` -> wav [B, C, T]. A piece gets one style vector and one chain of coordinate anchors;
    window ``i`` covers coordinate steps ``[i L, (i + 1) L)`` of that field (``L = window / generator.upsample``).
    Windows are generated in batches with the generator's halo and cropped, which makes them exactly the
    corresponding parts of the whole field (``MusikaGenerator`` is translation-equivariant), so the concatenation
    has no seams; the latents are decoded in overlapping chunks (``SpectralAutoencoder.decode_chunked``).

    The autoencoder is frozen and not part of the state dict: ``attach`` one, or give ``autoencoder_ref``
    (anything ``ostinato.load`` takes), loaded on first use. ``latent_rate`` (a buffer) is the frame rate of
    the latents the generator was trained on (0: unknown), checked against the autoencoder's.
    """

    def __init__(self, generator: MusikaGenerator, window: int, anchor_spacing: int | None = None,
                 autoencoder_ref: str | None = None) -> None:
        super().__init__()
        self.generator = generator
        self.window = int(window)
        if self.window % generator.upsample:
            raise ValueError(f"family.window={window} must be a multiple of the generator's upsampling "
                             f"{generator.upsample} (prod of family.generator.up_ratios)")
        self.coarse_window = self.window // generator.upsample
        self.anchor_spacing = int(anchor_spacing or self.coarse_window)
        self.autoencoder_ref = autoencoder_ref
        self.register_buffer("latent_rate", torch.zeros(()))
        object.__setattr__(self, "_autoencoder", None)  # not a submodule: outside the state dict and optimizers

    @classmethod
    def build(cls, dimension: int, window: int, generator: Mapping[str, Any] | None = None,
              anchor_spacing: int | None = None, autoencoder: str | None = None) -> Musika:
        """From the family's keys: ``dimension`` (latent size D), ``window`` (latent frames per window),
        ``generator`` (``MusikaGenerator`` keys), ``anchor_spacing``, ``autoencoder`` (a reference)."""
        return cls(MusikaGenerator(dimension=dimension, **dict(generator or {})), window, anchor_spacing,
                   autoencoder)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], folder: Path | None = None) -> Musika:
        """The model of a Musika GAN training config; its autoencoder is ``recorded_autoencoder(cfg, folder)``."""
        family = cfg["family"]
        keys = {k: family[k] for k in ("dimension", "window", "generator", "anchor_spacing") if k in family}
        return cls.build(**keys, autoencoder=recorded_autoencoder(cfg, folder))

    # -- the autoencoder ------------------------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        return self.generator.dimension

    @property
    def frame_rate(self) -> float:
        """Latent frames per second of the training latents (0 when unknown)."""
        return float(self.latent_rate)

    def attach(self, autoencoder: SpectralAutoencoder, ref: str | None = None) -> Musika:
        """Decode with ``autoencoder`` (frozen, moved to this model's device)."""
        if not isinstance(autoencoder, SpectralAutoencoder):
            raise ValueError(f"{ref or 'the autoencoder'} holds a {type(autoencoder).__name__}, not a Musika "
                             "autoencoder (family musika_autoencoder_*)")
        if self.frame_rate and abs(self.frame_rate - autoencoder.frame_rate) > 1e-6:
            raise ValueError(f"the GAN was trained on latents at {self.frame_rate:g} Hz but the autoencoder's are "
                             f"at {autoencoder.frame_rate:g} Hz; pass the autoencoder it was trained with (--codec)")
        if autoencoder.dimension != self.dimension:
            raise ValueError(f"the GAN makes {self.dimension}-dim latents but the autoencoder decodes "
                             f"{autoencoder.dimension}-dim ones; pass the autoencoder it was trained with (--codec)")
        device = self.latent_rate.device
        object.__setattr__(self, "_autoencoder", autoencoder.to(device).eval().requires_grad_(False))
        if ref is not None:
            self.autoencoder_ref = ref
        return self

    @property
    def autoencoder(self) -> SpectralAutoencoder:
        """The attached autoencoder, loaded from ``autoencoder_ref`` on first use."""
        if self._autoencoder is None:
            if self.autoencoder_ref is None:
                raise ValueError("no autoencoder recorded for this Musika (family.autoencoder or array shards); "
                                 "pass one (--codec)")
            from ostinato.models import load

            self.attach(load(self.autoencoder_ref))
        return self._autoencoder

    def _apply(self, fn: Any, recurse: bool = True) -> Musika:
        super()._apply(fn, recurse)
        if self._autoencoder is not None:
            self._autoencoder._apply(fn, recurse)
        return self

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, D, L] -> wav [B, C, L * autoencoder.hop_length]."""
        return self.autoencoder.decode(latents)

    # -- noise and windows ---------------------------------------------------------------------------------------
    def sample_noise(self, batch: int, rng: torch.Generator | None = None,
                     truncation: float | None = None) -> tuple[Tensor, Tensor]:
        """Coordinates of one window per item at a random phase relative to its anchors, with the generator's
        halo, and style vectors: ``([B, coord_dim, coarse_window + 2 halo], [B, style_dim])``."""
        g, device = self.generator, self.latent_rate.device
        h, spacing = g.halo, self.anchor_spacing
        n_anchors = (spacing + self.coarse_window + 2 * h) // spacing + 2
        rows = []
        for _ in range(batch):
            anchors = truncated_normal((1, g.coord_dim, n_anchors), truncation, rng).to(device)
            phase = int(torch.randint(0, spacing, (1,), generator=rng))
            rows.append(window_coordinates(anchors, spacing, [phase + h], self.coarse_window, h))
        style = truncated_normal((batch, g.style_dim), truncation, rng).to(device)
        return torch.cat(rows), style

    def random_windows(self, batch: int, rng: torch.Generator | None = None) -> Tensor:
        """``batch`` windows at random phases: latents ``[B, D, window]``."""
        coords, style = self.sample_noise(batch, rng)
        return self.generator.windows(coords, style)

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, n_frames: int, batch: int = 1, truncation: float | None = 2.0, seed: int | None = None,
                batch_windows: int = 64, progress: Progress | None = None,
                independent_windows: bool = False) -> Tensor:
        """``[batch, D, n_frames]`` latents. ``truncation``: anchors and style from a normal truncated at
        +-truncation (Musika's default 2; None: untruncated); ``seed`` seeds a private generator (None: the global
        RNG); ``batch_windows`` windows per generator forward.

        ``independent_windows``: every window gets its own anchors and style, as if generated separately; this
        breaks the continuity across joins and exists to show what the shared coordinate field buys.
        """
        g = self.generator
        device = self.latent_rate.device
        h, length, spacing = g.halo, self.coarse_window, self.anchor_spacing
        n_windows = max(1, math.ceil(n_frames / self.window))
        rng = None if seed is None else torch.Generator().manual_seed(int(seed))
        if independent_windows:
            span = length + 2 * h
            style = truncated_normal((batch * n_windows, g.style_dim), truncation, rng)
            anchors = truncated_normal((batch * n_windows, span // spacing + 3, g.coord_dim), truncation, rng)
            coords = torch.cat([window_coordinates(a.T[None], spacing, [h], length, h) for a in anchors])
        else:  # style first, then the anchors in time order: a shorter piece is the start of a longer one
            n_anchors = (n_windows * length + 2 * h) // spacing + 2
            style = truncated_normal((batch, g.style_dim), truncation, rng).repeat_interleave(n_windows, dim=0)
            anchors = truncated_normal((batch, n_anchors, g.coord_dim), truncation, rng).transpose(1, 2)
            coords = window_coordinates(anchors, spacing, [h + i * length for i in range(n_windows)], length, h)
        was_training = g.training
        g.eval()
        try:
            outs = []
            step = max(1, int(batch_windows))
            for s in range(0, coords.shape[0], step):
                outs.append(g.windows(coords[s:s + step].to(device), style[s:s + step].to(device)))
                if progress is not None:
                    progress(min(s + step, coords.shape[0]), coords.shape[0])
        finally:
            g.train(was_training)
        windows = torch.cat(outs).view(batch, n_windows, g.dimension, self.window)
        return windows.permute(0, 2, 1, 3).reshape(batch, g.dimension, n_windows * self.window)[..., :n_frames]

    @torch.no_grad()
    def generate(self, duration: float, batch: int = 1, truncation: float | None = 2.0, seed: int | None = None,
                 progress: Progress | None = None, batch_windows: int = 64, decode_chunk: int = 512,
                 independent_windows: bool = False) -> Tensor:
        """``[batch, C, round(duration * sample_rate)]`` waveforms of ``duration`` seconds (see ``latents`` for
        the sampling settings; ``decode_chunk``: latent frames per decoding chunk). ``progress(done, total)``
        covers both the latent windows and the decoding chunks."""
        ae = self.autoencoder
        n_frames = math.ceil(duration * ae.frame_rate)
        n_windows = max(1, math.ceil(n_frames / self.window)) * batch
        total = n_windows + math.ceil(n_frames / decode_chunk)

        def on_windows(done: int, _: int) -> None:
            if progress is not None:
                progress(done, total)

        def on_chunk(done: int, _: int) -> None:
            if progress is not None:
                progress(n_windows + math.ceil(done / decode_chunk), total)

        z = self.latents(n_frames, batch, truncation, seed, batch_windows, on_windows, independent_windows)
        wav = ae.decode_chunked(z.to(next(ae.parameters()).device), decode_chunk, progress=on_chunk)
        return wav[..., :round(duration * ae.sample_rate)]
