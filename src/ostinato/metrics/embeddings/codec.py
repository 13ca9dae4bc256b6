"""Codec latents as embeddings: the encoder output before quantization, one frame per codec frame."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ostinato.metrics.embeddings.base import EmbeddingBackend
from ostinato.models.codec import Codec

VERSION = 1  # bump when what ``_embed`` computes changes: invalidates cached statistics


class CodecBackend(EmbeddingBackend):
    """Continuous latents [F, D] of an EnCodec-style ``Codec`` (F = ceil(T / hop), at ``codec.frame_rate``).

    With ``normalize`` codecs the input is RMS-normalised first, as the codec itself does before encoding.

    Args:
        codec: a loaded ``Codec`` or a reference for ``ostinato.interop.codecs.load_codec`` (ostinato export / XP,
            transformers EncodecModel folder, audiocraft ``compression_state_dict.bin``).
        source: where the codec came from (for ``id``) when ``codec`` is already loaded.
    """

    name = "codec"

    def __init__(self, codec: Codec | str | Path, source: str | None = None) -> None:
        from ostinato.interop.codecs import weights_hash

        if isinstance(codec, Codec):
            self.source = source or "<in-memory codec>"
        else:
            from ostinato.interop.codecs import load_codec

            path = Path(str(codec)).expanduser()
            self.source = str(path.resolve()) if path.exists() else str(codec)
            codec = load_codec(str(path) if path.exists() else str(codec))
        self.model = self.codec = codec.eval().requires_grad_(False)
        self.sample_rate = codec.sample_rate
        self.channels = codec.channels
        self.dim = codec.dimension
        # One latent frame per hop; its receptive field is wider than the hop (the SEANet kernels and LSTM).
        self.hop_seconds = self.window_seconds = codec.hop_length / codec.sample_rate
        self.weights = weights_hash(codec)

    def _identity(self) -> dict[str, Any]:
        return {"version": VERSION, "source": self.source, "weights": self.weights, "sample_rate": self.sample_rate,
                "channels": self.channels, "normalize": self.codec.normalize}

    def _embed(self, wav: Tensor) -> list[Tensor]:
        x, _ = self.codec._preprocess(wav)
        latents = self.codec.encoder(x)  # [B, D, F]
        return list(latents.transpose(1, 2).contiguous().unbind(0))
