"""Audio classifiers for the label KL divergence (``kld``) -> label logits per clip: a local transformers
audio-classification folder (AST, PaSST exports, wav2vec2/HuBERT classifiers...), or zero-shot tags through a
text-audio embedding backend (CLAP, MuLaN): logits = scale x cosine(clip embedding, tag text embedding)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ostinato.data.audio import convert_channels, resample

__all__ = ["AudioClassifier", "ZeroShotClassifier", "load_classifier"]


class AudioClassifier:
    """``logits(wav [B, C, T], sample_rate) -> [B, L]`` of a ``save_pretrained`` audio-classification model.

    Clips are mixed to mono, resampled to the feature extractor's rate and passed through it and the model, one
    batch at a time, in fp32 without gradients.
    """

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"kld classifier {folder}: expected a transformers save_pretrained folder with "
                                    "config.json and preprocessor_config.json")
        self.source = str(folder.resolve())
        self.extractor = AutoFeatureExtractor.from_pretrained(folder)
        self.model = AutoModelForAudioClassification.from_pretrained(folder).eval().requires_grad_(False)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.num_labels = int(self.model.config.num_labels)
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> AudioClassifier:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def logits(self, wav: Tensor, sample_rate: int) -> Tensor:
        """wav ``[B, C, T]`` -> logits ``[B, L]`` float32."""
        mono = [resample(convert_channels(w.detach().float().cpu(), "mono")[0], sample_rate, self.sample_rate)
                for w in wav]
        inputs = self.extractor([m.numpy() for m in mono], sampling_rate=self.sample_rate, return_tensors="pt",
                                padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.model(**inputs).logits.float()


class ZeroShotClassifier:
    """``logits(wav, sample_rate) -> [B, L]``: ``scale * cos(audio, text(label))`` of a text-audio backend, one
    logit per tag text (CLAP's zero-shot classification; ``scale`` is CLAP's learnt logit scale order, 100)."""

    def __init__(self, backend, labels: list[str], scale: float = 100.0) -> None:
        if not getattr(backend, "has_text", False):
            raise ValueError(f"kld zero-shot classifier: the {backend.name} backend has no text tower; use a "
                             "text-audio backend (clap:...) or an hf:/folder audio classifier")
        self.backend, self.labels, self.scale = backend, list(labels), float(scale)
        self.num_labels = len(self.labels)
        self.source = backend.id()

    def to(self, device: str | torch.device) -> ZeroShotClassifier:
        self.backend = self.backend.to(device)
        return self

    @torch.no_grad()
    def logits(self, wav: Tensor, sample_rate: int) -> Tensor:
        from ostinato.metrics.embeddings import clip_embeddings

        audio = torch.nn.functional.normalize(clip_embeddings(self.backend.embed_audio(wav, sample_rate)).float(),
                                              dim=-1)
        text = torch.nn.functional.normalize(self.backend.embed_text(self.labels).float().to(audio.device), dim=-1)
        return self.scale * audio @ text.T


def load_classifier(spec: str, labels: list[str] | None = None) -> AudioClassifier | ZeroShotClassifier:
    """``hf:/folder`` or ``/folder`` -> ``AudioClassifier``; any other backend spec (``clap:...``) with ``labels``
    -> ``ZeroShotClassifier`` over those tag texts."""
    if labels:
        from ostinato.metrics.embeddings import load_backend

        return ZeroShotClassifier(load_backend(spec), labels)
    path = spec[3:] if spec.startswith("hf:") else spec
    if ":" in path.split("/")[0] and not Path(path).exists():
        raise ValueError(f"kld classifier {spec!r}: use hf:/folder (a transformers audio-classification folder)")
    return AudioClassifier(path)
