"""``DACCodec``: DAC (descript-audio-codec) as an ostinato ``Codec``, usable wherever a codec is (tokenize,
MusicGen's ``family.codec``, ``ostinato.load``, reconstruction suites).

wav [B, 1, T] --pad right to a hop multiple--> encoder --> latents [B, D, F] --factorized RVQ--> codes [B, K, F]
--decoder--> wav [B, 1, F * hop], F = ceil(T / hop). The public 44.1 kHz model: hop 512 (encoder rates 2, 4, 8, 8),
9 codebooks of 1024 codes, 86.13 frames per second. The padding is DAC's own (``DAC.forward``, ``DAC.compress``);
audiocraft's DAC wrapper encodes unpadded audio, floor(T / hop) frames, of which only the last differs from ours.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ostinato.models.codec import Codec
from ostinato.nn.dac import DACDecoder, DACEncoder, FactorizedRVQ

ARCHITECTURE = "dac"  # ``codec.architecture`` of a config that builds this codec
# ``DACCodec.build`` keys with their defaults: the ``dac`` package's (its 44.1 kHz model); ``sample_rate`` has none
DAC_DEFAULTS: dict[str, Any] = dict(encoder_dim=64, encoder_rates=[2, 4, 8, 8], latent_dim=None, decoder_dim=1536,
                                    decoder_rates=[8, 8, 4, 2], n_q=9, card=1024, codebook_dim=8)


class DACCodec(Codec, architecture=ARCHITECTURE):
    """DAC's encoder, factorized L2-normalised residual VQ and decoder behind ``Codec``'s interface (mono, no
    normalization: DAC's own loudness normalization belongs to its file compressor, not to the model)."""

    def __init__(self, encoder: DACEncoder, decoder: DACDecoder, quantizer: FactorizedRVQ, sample_rate: int) -> None:
        super().__init__(encoder, decoder, quantizer, sample_rate=sample_rate, channels=1)  # type: ignore[arg-type]

    @classmethod
    def build(cls, **kwargs: Any) -> DACCodec:
        """Build from flat keys: ``sample_rate`` (required), the keys of ``DAC_DEFAULTS``, ``channels`` (1 only) and
        ``architecture`` ("dac"). ``latent_dim`` None is ``encoder_dim * 2 ** len(encoder_rates)``; ``codebook_dim``
        is one size or one per codebook. Unknown keys raise ``ValueError``."""
        known = {"sample_rate", "channels", "architecture", "normalize", *DAC_DEFAULTS}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"DACCodec.build: unknown keys {unknown}; known keys: {sorted(known)}")
        if "sample_rate" not in kwargs:
            raise ValueError("DACCodec.build needs sample_rate")
        if int(kwargs.get("channels", 1)) != 1 or kwargs.get("normalize", False):
            raise ValueError("DAC is mono and unnormalized: channels must be 1 and normalize false")
        cfg = {**DAC_DEFAULTS, **{k: v for k, v in kwargs.items() if k in DAC_DEFAULTS}}
        encoder_rates, decoder_rates = [int(r) for r in cfg["encoder_rates"]], [int(r) for r in cfg["decoder_rates"]]
        latent_dim = cfg["latent_dim"] or int(cfg["encoder_dim"]) * 2 ** len(encoder_rates)
        codebook_dim = cfg["codebook_dim"]
        codebook_dim = int(codebook_dim) if isinstance(codebook_dim, int) else [int(d) for d in codebook_dim]
        return cls(DACEncoder(int(cfg["encoder_dim"]), encoder_rates, int(latent_dim)),
                   DACDecoder(int(latent_dim), int(cfg["decoder_dim"]), decoder_rates),
                   FactorizedRVQ(int(latent_dim), int(cfg["n_q"]), int(cfg["card"]), codebook_dim),
                   sample_rate=int(kwargs["sample_rate"]))

    def _describe(self) -> dict[str, Any]:
        enc_rates = [int(m.block[-1].stride[0]) for m in self.encoder.block if hasattr(m, "block")]
        dec_rates = [int(m.block[1].stride[0]) for m in self.decoder.model if hasattr(m, "block")]
        dims: Sequence[int] = self.quantizer.codebook_dims
        return {"architecture": ARCHITECTURE, "sample_rate": self.sample_rate, "channels": 1,
                "encoder_dim": int(self.encoder.block[0].out_channels), "encoder_rates": enc_rates,
                "latent_dim": self.dimension, "decoder_dim": int(self.decoder.model[0].out_channels),
                "decoder_rates": dec_rates, "n_q": self.n_q, "card": self.card,
                "codebook_dim": dims[0] if len(set(dims)) == 1 else list(dims)}

    def _preprocess(self, wav: Tensor) -> tuple[Tensor, Tensor | None]:
        """As DAC does before encoding: zeros on the right up to a multiple of the hop."""
        wav, _ = super()._preprocess(wav)
        return F.pad(wav, (0, -wav.shape[-1] % self.hop_length)), None
