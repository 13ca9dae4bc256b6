"""What ``generate`` asks of any family: ``GenerationRequest`` (prompts, duration, sampling, reference audio and
the family's own parts), built by the CLI, read by each family's ``generate_clips(request, progress)``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ostinato.data.audio import AudioDecodeError, convert_channels, load_audio, resample
from ostinato.errors import UserError
from ostinato.nn.decoding import GenerationParams


@dataclass
class AudioInput:
    """A reference recording: ``wav [C, T]`` at ``sample_rate``."""

    wav: Tensor
    sample_rate: int

    def at(self, sample_rate: int, channels: int) -> Tensor:
        """``[1, channels, T']`` at ``sample_rate``."""
        wav = convert_channels(self.wav.float(), "mono" if channels == 1 else "stereo")
        return resample(wav, self.sample_rate, sample_rate).unsqueeze(0)


def read_audio_input(path: str | None, option: str) -> AudioInput | None:
    """A reference recording from a file; a folder, a missing file or undecodable bytes are refused in one line
    that names ``option``."""
    if path is None:
        return None
    if Path(path).is_dir():
        raise UserError(f"{option} {path}: is a folder; give an audio file (wav, flac, ogg, mp3)")
    if not Path(path).is_file():
        raise UserError(f"{option} {path}: no such file; check the path")
    try:
        wav, sr = load_audio(path)
    except AudioDecodeError as e:
        raise UserError(f"{option} {path}: not audio that can be decoded; give a wav, flac, ogg or mp3 file "
                        f"({str(e).removeprefix(f'{path}: ')})") from e
    return AudioInput(wav, sr)


@dataclass
class GenerationRequest:
    """One ``generate`` run. ``prompts``: one text per clip (``""`` = unconditional); ``melody`` / ``style`` /
    ``continuation``: decoded reference audio, their paths in ``inputs`` (for the clips' records). The rest are
    the family's own parts and settings; a family ignores what it does not take (the CLI refuses it first)."""

    prompts: list[str]
    duration: float = 10.0
    params: GenerationParams = field(default_factory=GenerationParams)
    model: str | None = None
    codec: str | None = None
    trust: bool = False
    device: str = "cpu"
    melody: AudioInput | None = None
    style: AudioInput | None = None
    continuation: AudioInput | None = None
    inputs: dict[str, str | None] = field(default_factory=dict)
    # MusicGen
    window: float | None = None
    long_form: str = "window"
    extend_stride: float | None = None
    overlap: float = 2.0
    style_eval_q: int | None = None
    style_excerpt: float | None = None
    # MusicLM
    semantic: str | None = None
    coarse: str | None = None
    fine: str | None = None
    mulan: str | None = None
    quantizer: str | None = None
    semantic_tokenizer: str | None = None
    num_candidates: int = 1
    # Musika
    truncation: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
