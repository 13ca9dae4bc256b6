"""``Codec``: SEANet encoder + residual vector quantizer + SEANet decoder (EnCodec).

wav [B, C, T] --encoder--> latents [B, D, F] --quantizer--> codes [B, K, F] --decoder--> wav [B, C, F * hop]
with ``hop = prod(ratios)``, ``F = ceil(T / hop)`` and frame rate ``sample_rate / hop``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.nn.quantization import ResidualVectorQuantizer
from ostinato.nn.seanet import SEANetDecoder, SEANetEncoder

# Keys of ``Codec.build`` with their defaults (``sample_rate`` has none): EnCodec's SEANet + RVQ, non-causal.
SEANET_DEFAULTS: dict[str, Any] = dict(
    dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2], activation="ELU",
    activation_params={"alpha": 1.0}, norm="weight_norm", kernel_size=7, last_kernel_size=7,
    residual_kernel_size=3, dilation_base=2, causal=False, pad_mode="reflect", true_skip=True, compress=2, lstm=2,
    disable_norm_outer_blocks=0)
DECODER_ONLY_DEFAULTS: dict[str, Any] = dict(trim_right_ratio=1.0, final_activation=None,
                                             final_activation_params=None)
QUANTIZER_DEFAULTS: dict[str, Any] = dict(
    n_q=8, card=1024, decay=0.99, kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2.0,
    commitment_weight=1.0, q_dropout=False, epsilon=1e-5)
CODEC_DEFAULTS: dict[str, Any] = dict(channels=1, normalize=False)


@dataclass
class EncodedAudio:
    """Output of ``Codec.encode``: codes [B, K, F] int64 and, when the codec normalizes, scale [B, 1] (else None)."""

    codes: Tensor
    scale: Tensor | None = None


@dataclass
class CodecOutput:
    """Output of ``Codec.forward``.

    recon: [B, C, T] reconstruction (same length as the input); codes: [B, K, F]; penalty: scalar commitment
    loss; metrics: detached scalars (``n_q``, ``bandwidth_kbps``, per-codebook ``perplexity_q{k}`` and, in
    training, ``replaced_q{k}``); scale: [B, 1] with ``normalize`` else None.
    """

    recon: Tensor
    codes: Tensor
    penalty: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    scale: Tensor | None = None


class Codec(nn.Module):
    """EnCodec-style neural audio codec.

    ``normalize``: divide the input by its RMS (over time, of the channel mean) before encoding and multiply the
    decoder output by it (transformers' ``normalize`` / audiocraft's ``renormalize``); ``encode`` then also returns
    the scale, which ``decode`` needs.

    ``config`` is a plain dict such that ``Codec.build(**codec.config)`` rebuilds the same architecture.
    Other architectures subclass it with their name (``class DACCodec(Codec, architecture="dac")``), and
    ``Codec.build(architecture=NAME, ...)`` builds them.
    """

    architectures: ClassVar[dict[str, type[Codec]]] = {}

    def __init_subclass__(cls, architecture: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if architecture is not None:
            Codec.architectures[architecture] = cls

    def __init__(self, encoder: SEANetEncoder, decoder: SEANetDecoder, quantizer: ResidualVectorQuantizer,
                 sample_rate: int, channels: int, normalize: bool = False) -> None:
        super().__init__()
        if encoder.hop_length != decoder.hop_length:
            raise ValueError(f"encoder hop {encoder.hop_length} != decoder hop {decoder.hop_length}")
        if not encoder.dimension == quantizer.dimension == decoder.dimension:
            raise ValueError(f"latent sizes differ: encoder {encoder.dimension}, quantizer {quantizer.dimension}, "
                             f"decoder {decoder.dimension}")
        if not encoder.channels == decoder.channels == channels:
            raise ValueError(f"channels differ: codec {channels}, encoder {encoder.channels}, "
                             f"decoder {decoder.channels}")
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.normalize = bool(normalize)
        self.config: dict[str, Any] = self._describe()

    # ----- construction -----

    @classmethod
    def from_config(cls, cfg: dict[str, Any], folder: Path | None = None) -> Codec:
        """The codec of a codec training config: ``cfg["family"]`` holds ``sample_rate``, ``channels`` and the
        ``codec`` keys of ``build``."""
        family = cfg["family"]
        audio = {k: family[k] for k in ("sample_rate", "channels") if k in family}
        return cls.build(**audio, **(family.get("codec") or {}))

    @classmethod
    def build(cls, **kwargs: Any) -> Codec:
        """Build SEANet encoder/decoder + RVQ from flat keyword arguments (e.g. a Hydra config node).

        Required: ``sample_rate``. Optional, with defaults: ``channels`` (1), ``normalize`` (False), the SEANet
        keys of ``SEANET_DEFAULTS`` shared by encoder and decoder, the decoder keys of ``DECODER_ONLY_DEFAULTS``,
        the quantizer keys of ``QUANTIZER_DEFAULTS`` and ``encoder`` / ``decoder``: dicts of SEANet keys that
        override the shared ones for one side only. Unknown keys raise ``ValueError``.
        ``architecture``: "seanet" (the default, all of the above) or "dac" (``models.dac.DACCodec.build``'s keys).
        """
        architecture = kwargs.pop("architecture", "seanet")
        if architecture != "seanet":
            other = Codec.architectures.get(architecture)
            if other is None:
                raise ValueError(f"codec.architecture {architecture!r}: 'seanet' (EnCodec) or one of "
                                 f"{sorted(Codec.architectures)}")
            return other.build(architecture=architecture, **kwargs)
        known = {"sample_rate", "encoder", "decoder", *CODEC_DEFAULTS, *SEANET_DEFAULTS, *DECODER_ONLY_DEFAULTS,
                 *QUANTIZER_DEFAULTS}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"Codec.build: unknown keys {unknown}; known keys: {sorted(known)}")
        if "sample_rate" not in kwargs:
            raise ValueError("Codec.build needs sample_rate")
        cfg = {**CODEC_DEFAULTS, **kwargs}
        shared = {k: cfg.get(k, v) for k, v in SEANET_DEFAULTS.items()}
        shared["channels"] = cfg["channels"]
        enc_over = dict(cfg.get("encoder") or {})
        dec_over = dict(cfg.get("decoder") or {})
        for side, over, allowed in (("encoder", enc_over, set(SEANET_DEFAULTS)),
                                    ("decoder", dec_over, set(SEANET_DEFAULTS) | set(DECODER_ONLY_DEFAULTS))):
            bad = sorted(set(over) - allowed)
            if bad:
                raise ValueError(f"Codec.build: unknown {side} override keys {bad}")
        if "dimension" in enc_over or "dimension" in dec_over:
            raise ValueError("dimension is shared by encoder, quantizer and decoder; set it at the top level")
        decoder_only = {k: cfg.get(k, v) for k, v in DECODER_ONLY_DEFAULTS.items()}
        encoder = SEANetEncoder(**{**shared, **enc_over})
        decoder = SEANetDecoder(**{**shared, **decoder_only, **dec_over})
        quantizer = ResidualVectorQuantizer(dimension=shared["dimension"],
                                            **{k: cfg.get(k, v) for k, v in QUANTIZER_DEFAULTS.items()})
        return cls(encoder, decoder, quantizer, sample_rate=cfg["sample_rate"], channels=cfg["channels"],
                   normalize=cfg["normalize"])

    def _describe(self) -> dict[str, Any]:
        enc, dec = dict(self.encoder.config), dict(self.decoder.config)
        shared = {k: enc[k] for k in SEANET_DEFAULTS if enc[k] == dec[k]}
        config: dict[str, Any] = {"sample_rate": self.sample_rate, "channels": self.channels,
                                  "normalize": self.normalize, **shared}
        config.update({k: dec[k] for k in DECODER_ONLY_DEFAULTS})
        config.update({k: v for k, v in self.quantizer.config.items() if k != "dimension"})
        enc_over = {k: enc[k] for k in SEANET_DEFAULTS if k not in shared}
        dec_over = {k: dec[k] for k in SEANET_DEFAULTS if k not in shared}
        if enc_over:
            config["encoder"] = enc_over
            config["decoder"] = dec_over
        return config

    # ----- properties -----

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame (product of the ratios)."""
        return self.encoder.hop_length

    @property
    def frame_rate(self) -> float:
        """Latent frames per second: sample_rate / hop_length."""
        return self.sample_rate / self.hop_length

    @property
    def n_q(self) -> int:
        """Number of codebooks."""
        return self.quantizer.n_q

    @property
    def card(self) -> int:
        """Codebook size (codes are in [0, card))."""
        return self.quantizer.card

    @property
    def dimension(self) -> int:
        """Latent size D."""
        return self.quantizer.dimension

    def num_frames(self, num_samples: int) -> int:
        """F for an input of ``num_samples`` samples: ceil(T / hop_length)."""
        return -(-num_samples // self.hop_length)

    def bandwidth_kbps(self, n_q: int | None = None) -> float:
        """Bit rate in kbps with ``n_q`` codebooks (all by default)."""
        return self.quantizer.bits_per_frame(n_q) * self.frame_rate / 1000

    def ema_excluded(self, prefix: str = "") -> list[str]:
        """State-dict names (under ``prefix``) of buffers that a weight EMA must leave alone: the codebooks
        (already EMAs of the data, reset by k-means and dead-code replacement) and the step counter."""
        return self.quantizer.ema_excluded(prefix=f"{prefix}quantizer.")

    # ----- codec -----

    def _preprocess(self, wav: Tensor) -> tuple[Tensor, Tensor | None]:
        if wav.dim() != 3 or wav.shape[1] != self.channels:
            raise ValueError(f"expected audio [B, {self.channels}, T], got {tuple(wav.shape)}")
        if not self.normalize:
            return wav, None
        volume = wav.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
        scale = volume + 1e-8
        return wav / scale, scale.view(-1, 1)

    @staticmethod
    def _postprocess(wav: Tensor, scale: Tensor | None) -> Tensor:
        return wav if scale is None else wav * scale.view(-1, 1, 1)

    def forward(self, wav: Tensor, n_q: int | None = None) -> CodecOutput:
        """wav [B, C, T] -> CodecOutput(recon [B, C, T], codes [B, K, F], penalty [], metrics, scale).

        In training the quantizer updates its codebooks (and, with q_dropout, samples K); ``n_q`` caps K.
        """
        length = wav.shape[-1]
        x, scale = self._preprocess(wav)
        q = self.quantizer(self.encoder(x), n_q=n_q)
        recon = self.decoder(q.quantized)
        recon = recon[..., :length] if recon.shape[-1] >= length else F.pad(recon, (0, length - recon.shape[-1]))
        metrics = dict(q.metrics)
        metrics["bandwidth_kbps"] = metrics["n_q"] * (self.quantizer.bits_per_frame(1) * self.frame_rate / 1000)
        return CodecOutput(self._postprocess(recon, scale), q.codes, q.penalty, metrics, scale)

    def encode(self, wav: Tensor, n_q: int | None = None) -> EncodedAudio:
        """wav [B, C, T] -> EncodedAudio(codes [B, K, ceil(T / hop)] int64, scale [B, 1] or None); K = n_q or all."""
        x, scale = self._preprocess(wav)
        return EncodedAudio(self.quantizer.encode(self.encoder(x), n_q=n_q), scale)

    def decode(self, codes: Tensor, scale: Tensor | None = None) -> Tensor:
        """codes [B, K, F] (+ scale [B, 1] from ``encode`` when normalizing) -> wav [B, C, F * hop_length].

        Without ``scale`` the output stays at the normalized level. Trim it to the original length where known.
        """
        return self._postprocess(self.decoder(self.quantizer.decode(codes)), scale)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Continuous latents [B, D, F] (e.g. quantized ones) -> wav [B, C, F * hop_length], no rescaling."""
        return self.decoder(latents)

