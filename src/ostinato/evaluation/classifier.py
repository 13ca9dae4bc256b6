"""Audio classifiers for the label KL divergence (``kld``): a local transformers audio-classification folder
(AST, PaSST exports, wav2vec2/HuBERT classifiers...) -> label logits per clip."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ostinato.data.audio import convert_channels, resample

__all__ = ["AudioClassifier", "load_classifier"]


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


def load_classifier(spec: str) -> AudioClassifier:
    """``hf:/folder`` or ``/folder`` -> ``AudioClassifier``."""
    path = spec[3:] if spec.startswith("hf:") else spec
    if ":" in path.split("/")[0] and not Path(path).exists():
        raise ValueError(f"kld classifier {spec!r}: use hf:/folder (a transformers audio-classification folder)")
    return AudioClassifier(path)
