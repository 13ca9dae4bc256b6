"""Audio samples on disk and in the experiment loggers: wav files and mel-spectrogram images."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from ostinato.fileio import write_wav

log = logging.getLogger(__name__)


def log_mel(wav: torch.Tensor, sample_rate: int, n_mels: int = 80) -> np.ndarray:
    """[C, T] -> [n_mels, frames] log10 mel power of the channel mean (for pictures, not for losses)."""
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=1024, hop_length=256, n_mels=n_mels)
    spec = mel(wav.float().mean(0).cpu())
    return torch.log10(spec.clamp_min(1e-5)).numpy()


def save_mel_png(wav: torch.Tensor, sample_rate: int, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.5), dpi=100)
    ax.imshow(log_mel(wav, sample_rate), origin="lower", aspect="auto", cmap="magma")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_audio(loggers: list[Any], folder: Path, waves: dict[str, torch.Tensor], sample_rate: int, step: int,
              captions: list[str] | None = None) -> list[Path]:
    """Write ``{name}_{i}.wav`` and ``.png`` for each [B, C, T] tensor, and send them to wandb/TensorBoard."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, batch in waves.items():
        for i, wav in enumerate(batch.detach().float().cpu()):
            wav = wav.clamp(-1, 1)
            stem = folder / f"{name}_{i}"
            write_wav(stem.with_suffix(".wav"), wav, sample_rate)
            caption = (captions[i] if captions and i < len(captions) else "") or name
            save_mel_png(wav, sample_rate, stem.with_suffix(".png"), title=f"{name}: {caption}"[:120])
            written.append(stem.with_suffix(".wav"))
            for logger in loggers:
                _send(logger, f"samples/{name}_{i}", wav, sample_rate, stem.with_suffix(".png"), step, caption)
    return written


def _send(logger: Any, tag: str, wav: torch.Tensor, sr: int, png: Path, step: int, caption: str) -> None:
    kind = type(logger).__name__
    if kind == "WandbLogger":
        import wandb

        logger.experiment.log({f"{tag}/audio": wandb.Audio(wav.mean(0).numpy(), sample_rate=sr, caption=caption),
                               f"{tag}/mel": wandb.Image(str(png), caption=caption)}, step=step)
    elif kind == "TensorBoardLogger":
        logger.experiment.add_audio(f"{tag}/audio", wav.mean(0, keepdim=True), step, sample_rate=sr)
        mel = log_mel(wav, sr)
        mel = (mel - mel.min()) / max(float(mel.max() - mel.min()), 1e-6)
        logger.experiment.add_image(f"{tag}/mel", mel[None, ::-1].copy(), step)
