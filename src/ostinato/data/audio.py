"""Audio primitives shared by every data path: decode, resample, channel policy, loudness, FLAC bytes.

Waveforms are float32 tensors shaped [C, T] (channels first) in [-1, 1].
"""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aiff", ".aif")
ChannelPolicy = Literal["mono", "stereo", "keep"]


class AudioDecodeError(RuntimeError):
    """A file or byte string that is not decodable audio."""


def load_audio(source: str | Path | bytes) -> tuple[torch.Tensor, int]:
    """Decode a file path or encoded bytes -> (wav [C, T] float32, sample_rate).

    libsndfile (through soundfile) reads wav, flac, ogg/vorbis, opus and mp3 without ffmpeg.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(f"{name}: cannot decode audio ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{name}: decoded to zero samples")
    if not np.isfinite(data).all():
        raise AudioDecodeError(f"{name}: decoded audio contains NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def audio_info(path: str | Path) -> tuple[int, int, float]:
    """(sample_rate, channels, duration_seconds) from the header only; raises AudioDecodeError."""
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioDecodeError(f"{path}: cannot read audio header ({type(e).__name__}: {e})") from e
    return int(info.samplerate), int(info.channels), float(info.duration)


def resample(wav: torch.Tensor, from_sr: int, to_sr: int) -> torch.Tensor:
    """The one resampler of ostinato: torchaudio's windowed-sinc (Hann, 6 zero crossings). [..., T] -> [..., T']."""
    if from_sr == to_sr:
        return wav
    return AF.resample(wav, int(from_sr), int(to_sr))


def convert_channels(wav: torch.Tensor, policy: ChannelPolicy | int) -> torch.Tensor:
    """[C, T] -> [C', T]: 'mono' averages, 'stereo' duplicates mono or keeps the first two, 'keep' is a no-op.

    An int is the target channel count (1 or 2).
    """
    if policy == "keep":
        return wav
    target = {"mono": 1, "stereo": 2}.get(policy, policy) if isinstance(policy, str) else int(policy)
    if target not in (1, 2):
        raise ValueError(f"channel policy must be 'mono', 'stereo', 'keep', 1 or 2, got {policy!r}")
    c = wav.shape[0]
    if c == target:
        return wav
    if target == 1:
        return wav.mean(dim=0, keepdim=True)
    if c == 1:
        return wav.expand(2, -1).clone()
    return wav[:2]


@lru_cache(maxsize=8)
def _meter(sample_rate: int):
    import pyloudnorm

    return pyloudnorm.Meter(sample_rate)


def normalize_loudness(wav: torch.Tensor, sample_rate: int, target_lufs: float = -14.0,
                       peak: float = 0.99) -> torch.Tensor:
    """Scale [C, T] to an integrated loudness of ``target_lufs`` (ITU-R BS.1770 via pyloudnorm), capped so the
    peak stays below ``peak``. Silence and clips shorter than the 400 ms gating block are returned unchanged."""
    if wav.shape[-1] < int(0.4 * sample_rate) or wav.abs().max() == 0:
        return wav
    loudness = _meter(sample_rate).integrated_loudness(wav.T.double().numpy())
    if not np.isfinite(loudness):
        return wav
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    max_gain = peak / float(wav.abs().max())
    return wav * float(min(gain, max_gain))


def encode_flac(wav: torch.Tensor, sample_rate: int, bits: int = 16) -> bytes:
    """[C, T] float -> FLAC bytes (16 or 24 bit PCM). Values are clipped to [-1, 1)."""
    subtype = {16: "PCM_16", 24: "PCM_24"}[bits]
    buf = io.BytesIO()
    data = wav.detach().cpu().float().clamp(-1.0, 1.0).T.numpy()
    sf.write(buf, data, int(sample_rate), format="FLAC", subtype=subtype)
    return buf.getvalue()


def flac_precision(bits: int = 16) -> float:
    """Largest round-trip error of ``encode_flac`` -> ``load_audio`` for in-range input (one quantisation step)."""
    return 1.0 / (2 ** (bits - 1))
