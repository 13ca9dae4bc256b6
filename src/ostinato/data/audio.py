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
from ostinato.nn.resample import resample  # noqa: F401  (data.audio.resample: the name the data code uses)

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


def truncation_note(path: str | Path, decoded_frames: int) -> str | None:
    """Why the file at ``path`` looks cut short, or None: a WAV whose data chunk claims more bytes than the file
    holds, an Ogg stream without its end-of-stream page, or fewer decoded frames than the header announces.
    libsndfile quietly decodes what is there in all three cases."""
    path = Path(path)
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - an unreadable header was reported by the decoder already
        return None
    rate = info.samplerate
    suffix = path.suffix.lower()
    if suffix == ".wav":
        claimed = _wav_claimed_frames(path, info.channels)
        if claimed is not None and claimed > decoded_frames:
            return (f"its header claims {claimed / rate:.3f} s but the file holds {decoded_frames / rate:.3f} s "
                    "(cut short?)")
    elif suffix in (".ogg", ".oga", ".opus") and not _ogg_has_end(path):
        return (f"the Ogg stream has no end-of-stream page: only {decoded_frames / rate:.3f} s decode "
                "(cut short?)")
    elif info.frames > decoded_frames:
        return f"its header says {info.frames / rate:.3f} s but {decoded_frames / rate:.3f} s decode (cut short?)"
    return None


def _wav_claimed_frames(path: Path, channels: int) -> int | None:
    """Frames the ``data`` chunk of a RIFF/WAVE file declares, or None when it cannot tell."""
    with open(path, "rb") as f:
        if f.read(4) != b"RIFF" or f.read(4) == b"" or f.read(4) != b"WAVE":
            return None
        block = None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            chunk, size = head[:4], int.from_bytes(head[4:], "little")
            if chunk == b"fmt ":
                fmt = f.read(size + size % 2)
                block = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else None
            elif chunk == b"data":
                if not block or size in (0, 0xFFFFFFFF):  # unknown block size, or a streaming placeholder
                    return None
                return size // block
            else:
                f.seek(size + size % 2, 1)


def _ogg_has_end(path: Path) -> bool:
    """Whether the last Ogg page of the file is complete and flagged end-of-stream."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read()
    start = tail.rfind(b"OggS")
    if start < 0 or len(tail) - start < 27:
        return False
    page = tail[start:]
    segments = page[26]
    if len(page) < 27 + segments:
        return False
    body = sum(page[27:27 + segments])
    return bool(page[5] & 0x04) and len(page) >= 27 + segments + body


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
