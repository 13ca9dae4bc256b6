"""HF self-supervised audio encoders (HuBERT, wav2vec2, MERT) as embeddings, through ``HFAudioFeatures``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ostinato.metrics.embeddings.base import EmbeddingBackend, as_bool

VERSION = 1  # bump when what ``_embed`` computes changes: invalidates cached statistics


class HFBackend(EmbeddingBackend):
    """Hidden states [F, dim] of a local HF audio encoder folder, mono at the folder's rate (16 kHz for HuBERT /
    wav2vec2, 24 kHz for MERT), with the folder's ``do_normalize``; one frame per conv hop (20 ms for these).

    Args:
        path: folder saved with ``save_pretrained`` plus its ``preprocessor_config.json``.
        layer: hidden state index (0 = the projected conv features; None = the last layer).
        trust_remote_code: MERT ships its modelling code in the folder and needs it.
    """

    name = "hf"

    def __init__(self, path: str | Path, layer: int | str | None = None,
                 trust_remote_code: bool | int | str = False) -> None:
        from ostinato.interop.codecs import weights_hash
        from ostinato.nn.style import HFAudioFeatures

        folder = Path(path).expanduser().resolve()
        self.layer = None if layer in (None, "", "none", "None") else int(layer)
        self.features = HFAudioFeatures(str(folder), layer=self.layer,
                                        trust_remote_code=as_bool(trust_remote_code))
        self.source = str(folder)
        self.model = self.features.model
        self.sample_rate = self.features.sample_rate
        self.channels = 1
        self.dim = self.features.dim
        self.hop_seconds = 1.0 / self.features.frame_rate
        self.window_seconds = self.features.min_samples / self.sample_rate  # receptive field of the conv stem
        self.weights = weights_hash(self.model)

    def _identity(self) -> dict[str, Any]:
        return {"version": VERSION, "source": self.source, "weights": self.weights, "layer": self.layer,
                "sample_rate": self.sample_rate, "normalize": self.features.normalize}

    def _embed(self, wav: Tensor) -> list[Tensor]:
        if wav.shape[-1] < self.features.min_samples:
            return [wav.new_zeros(0, self.dim) for _ in range(wav.shape[0])]
        return list(self.features(wav, self.sample_rate).unbind(0))
