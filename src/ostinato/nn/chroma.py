"""Chroma features for melody conditioning, as in MusicGen-melody.

A chromagram folds the power spectrum of each frame onto 12 pitch classes (C = 0, C# = 1, ..., B = 11, A440
tuning). MusicGen-melody quantizes every frame to a one-hot vector of its strongest pitch class (audiocraft's
``ChromaExtractor(argmax=True)``), projects it to the LM width and prepends it to the LM input sequence.

Written in plain torch because torchaudio 2.11 dropped its chroma transform and librosa is not a dependency.

Design:

* Filterbank: hard assignment. FFT bin ``k`` (frequency ``f_k >= fmin``) goes entirely to the pitch class nearest
  to ``f_k`` (rounded on the semitone scale); bins below ``fmin`` (and DC) are dropped. With the large FFTs used here
  (``n_fft >= 4 * hop``, about 2 Hz per bin at 32 kHz) a bin is narrower than a semitone down to ~C1, so nothing
  is smeared over neighbouring classes, and the result is the same on every device.
* Framing: frame ``f`` is a periodic-Hann window of ``n_fft`` samples centred at ``f * hop``; the signal is
  zero-padded (not reflected: that would invent notes around a short clip) so that there are exactly
  ``ceil(T / hop)`` frames for any ``T >= 1``.
* Silence: a frame is all-zero when the Hann-weighted RMS of its window is below ``silence_db`` dBFS (RMS 1 = 0 dB).
  The RMS comes from the same power spectrum via Parseval, so the gate sees exactly what the chroma sees.

``source_chromagram`` is the other extractor, that of the released MusicGen-melody models (audiocraft's
``ChromaExtractor``, transformers' ``MusicgenMelodyFeatureExtractor``): a reflect-padded centred STFT (``T // hop + 1``
frames), librosa's Gaussian chroma filterbank, max-normalised with a floor of 1e-6 and always one-hot (silence is
pitch class C). An imported melody model records it as ``melody.chroma`` ("audiocraft" or "transformers"): the
weights were trained on it.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

__all__ = ["chroma_filterbank", "chromagram", "default_n_fft", "source_chromagram", "MelodyConditioner",
           "CHROMAS"]

C4_HZ = 440.0 * 2.0 ** (-9 / 12)  # the pitch class of C is bin 0


def default_n_fft(hop_length: int) -> int:
    """The power of two ``>= 4 * hop_length`` (16384 for audiocraft's hop of 4096 at 32 kHz)."""
    return 1 << max(0, math.ceil(math.log2(4 * hop_length)))


@functools.lru_cache(maxsize=16)
def _filterbank(sample_rate: int, n_fft: int, n_chroma: int, fmin: float) -> Tensor:
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    keep = freqs >= max(fmin, 1e-6)
    pitch = n_chroma * torch.log2(freqs.clamp_min(1e-6) / C4_HZ)
    cls = torch.round(pitch).long().remainder(n_chroma)
    fb = torch.zeros(n_chroma, freqs.numel(), dtype=torch.float32)
    fb[cls[keep], torch.nonzero(keep).squeeze(1)] = 1.0
    return fb


def chroma_filterbank(sample_rate: int, n_fft: int, n_chroma: int = 12, fmin: float = 32.7) -> Tensor:
    """Fixed 0/1 matrix mapping FFT power bins to pitch classes.

    Returns ``[n_chroma, n_fft // 2 + 1]`` float32; each column is one-hot (the bin's nearest pitch class, A440
    tuning, C = row 0) or all-zero for bins below ``fmin`` (default C1).
    """
    if n_fft < 2 or sample_rate <= 0 or n_chroma < 1:
        raise ValueError(f"bad filterbank settings: sample_rate={sample_rate}, n_fft={n_fft}, n_chroma={n_chroma}")
    return _filterbank(int(sample_rate), int(n_fft), int(n_chroma), float(fmin)).clone()


def _frames_power(wav: Tensor, hop_length: int, n_fft: int) -> Tensor:
    """``[N, T]`` -> one-sided power spectrum ``[N, ceil(T / hop), n_fft // 2 + 1]``, frame f centred at f * hop."""
    length = wav.shape[-1]
    n_frames = -(-length // hop_length)
    left = n_fft // 2
    total = (n_frames - 1) * hop_length + n_fft
    padded = nn.functional.pad(wav, (left, max(0, total - left - length)))[..., :total]
    window = torch.hann_window(n_fft, periodic=True, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(padded, n_fft=n_fft, hop_length=hop_length, window=window, center=False, return_complex=True)
    return spec.abs().square().transpose(1, 2)


def chromagram(wav: Tensor, sample_rate: int, hop_length: int, n_fft: int | None = None, *, argmax: bool = True,
               silence_db: float = -60.0) -> Tensor:
    """Chroma of ``wav`` ``[B, C, T]`` (channels averaged) or ``[B, T]`` -> ``[B, ceil(T / hop_length), 12]``.

    Each frame is normalised to max 1 (inf-norm); with ``argmax`` it becomes the one-hot of its strongest pitch
    class. Frames whose windowed RMS is below ``silence_db`` dBFS are all-zero. ``n_fft`` defaults to
    ``default_n_fft(hop_length)``. Runs on ``wav``'s device, float32, no gradient needed.
    """
    if wav.dim() == 3:
        wav = wav.mean(dim=1)
    if wav.dim() != 2 or wav.shape[-1] < 1:
        raise ValueError(f"expected wav [B, C, T] or [B, T] with T >= 1, got {tuple(wav.shape)}")
    if hop_length < 1:
        raise ValueError(f"hop_length must be >= 1, got {hop_length}")
    n_fft = default_n_fft(hop_length) if n_fft is None else int(n_fft)
    wav = wav.float()
    power = _frames_power(wav, hop_length, n_fft)  # [B, F, K]
    fb = _filterbank(int(sample_rate), n_fft, 12, 32.7).to(wav.device)
    chroma = power @ fb.t()  # [B, F, 12]

    # Parseval on the one-sided spectrum: sum_k |X_k|^2 = n_fft * sum_n (w_n x_n)^2.
    weights = torch.full((power.shape[-1],), 2.0, device=wav.device)
    weights[0] = 1.0
    if n_fft % 2 == 0:
        weights[-1] = 1.0
    window = torch.hann_window(n_fft, periodic=True, device=wav.device)
    mean_square = (power @ weights) / (n_fft * window.square().sum())
    voiced = mean_square >= 10.0 ** (silence_db / 10.0)  # [B, F]

    peak = chroma.amax(dim=-1, keepdim=True)
    chroma = chroma / peak.clamp_min(torch.finfo(chroma.dtype).tiny)
    if argmax:
        chroma = nn.functional.one_hot(chroma.argmax(dim=-1), 12).to(chroma.dtype)
    return chroma * (voiced & (peak.squeeze(-1) > 0)).unsqueeze(-1).to(chroma.dtype)


@functools.lru_cache(maxsize=8)
def _librosa_filterbank(sample_rate: int, n_fft: int) -> Tensor:
    from librosa import filters

    return torch.from_numpy(filters.chroma(sr=sample_rate, n_fft=n_fft, tuning=0, n_chroma=12)).float()


def source_chromagram(wav: Tensor, sample_rate: int, hop_length: int, n_fft: int) -> Tensor:
    """MusicGen-melody's own chroma of ``wav`` ``[B, C, T]`` (channels averaged) or ``[B, T]`` ->
    one-hot ``[B, max(T, n_fft) // hop_length + 1, 12]`` (see the module docstring)."""
    if wav.dim() == 3:
        wav = wav.mean(dim=1)
    wav = wav.float()
    if wav.shape[-1] < n_fft:  # a short (or nullified) reference is centred in one window
        pad = n_fft - wav.shape[-1]
        wav = nn.functional.pad(wav, (pad // 2, pad - pad // 2))
    window = torch.hann_window(n_fft, periodic=True, device=wav.device)
    spec = torch.stft(wav, n_fft=n_fft, hop_length=hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = (spec.abs() / window.square().sum().sqrt()).square()  # [B, K, F]
    chroma = torch.einsum("ck,bkf->bfc", _librosa_filterbank(int(sample_rate), int(n_fft)).to(wav.device), power)
    chroma = nn.functional.normalize(chroma, p=float("inf"), dim=-1, eps=1e-6)
    return nn.functional.one_hot(chroma.argmax(dim=-1), 12).to(chroma.dtype)


CHROMAS = ("ostinato", "audiocraft", "transformers")


class MelodyConditioner(nn.Module):
    """Chromagram of a reference audio, projected to the LM width (to be prepended to the LM input).

    ``features`` turns audio into the (untrained, deterministic) chroma; ``forward`` applies the trainable
    projection, so the chroma can be computed once in the data pipeline and stored.

    ``chroma``: "ostinato" (``chromagram``), or an imported model's source: "audiocraft" (``source_chromagram``;
    the frames from ``ceil(T / hop)`` on are masked: all-zero chroma rows, projected to zero vectors, as
    audiocraft's ``WaveformConditioner`` masks them; the null melody is such frames) or "transformers"
    (``source_chromagram``, every row projected; the null melody is pitch class C). ``frames``: a fixed prefix
    length (transformers' ``chroma_length``): the chroma is looped or cut to it. ``stems``: "mix", the chroma of the
    whole reference (audiocraft's melody models take that of its demucs vocals + other stems; ostinato has no
    demucs).
    """

    def __init__(self, dim: int, sample_rate: int, hop_seconds: float = 0.128, n_fft: int | None = None,
                 argmax: bool = True, chroma: str = "ostinato", frames: int | None = None,
                 stems: str = "mix") -> None:
        super().__init__()
        if chroma not in CHROMAS:
            raise ValueError(f"family.melody.chroma={chroma!r}: use one of {', '.join(CHROMAS)}")
        if stems != "mix":  # audiocraft separates vocals + other with demucs first; ostinato has no demucs
            raise ValueError(f"family.melody.stems={stems!r}: only mix (the chroma of the whole melody) is supported")
        self.sample_rate = int(sample_rate)
        self.hop_length = max(1, round(hop_seconds * sample_rate))
        self.n_fft = default_n_fft(self.hop_length) if n_fft is None else int(n_fft)
        self.argmax = argmax
        self.chroma = chroma
        self.frames = None if frames is None else int(frames)
        self.proj = nn.Linear(12, dim)

    def null(self, b: int, frames: int) -> Tensor:
        """The null (absent) melody's chroma ``[b, frames, 12]``: zeros, or pitch class C for "transformers"."""
        chroma = torch.zeros(b, frames, 12, device=self.proj.weight.device)
        if self.chroma == "transformers":
            chroma[..., 0] = 1.0
        return chroma

    def null_tokens(self, b: int, frames: int) -> Tensor:
        """``[b, frames, dim]``: the prefix of the null (absent) melody, what melody dropout trains on and what
        generation without a melody (or a CFG null row) feeds: zero vectors, or the projection of pitch class C for
        "transformers" (its source's null). Not ``forward`` of a zero chroma: that is the projection's bias."""
        if self.chroma == "transformers":
            return self(self.null(b, frames))
        return torch.zeros(b, frames, self.proj.out_features, device=self.proj.weight.device,
                           dtype=self.proj.weight.dtype)

    @property
    def null_frames(self) -> int | None:
        """Prefix length of the null melody when the source fixes it (the chroma of one sample); None = that of
        the window."""
        if self.chroma == "ostinato":
            return self.frames
        return self.frames or self.num_frames(1)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        if self.chroma != "ostinato":
            return max(int(num_samples), self.n_fft) // self.hop_length + 1
        return -(-int(num_samples) // self.hop_length)

    @torch.no_grad()
    def features(self, wav: Tensor, sample_rate: int | None = None, lengths: Tensor | None = None) -> Tensor:
        """``[B, C, T]`` or ``[B, T]`` at ``sample_rate`` (default: the conditioner's) -> chroma ``[B, F, 12]``.

        ``lengths [B]``: samples of each zero-padded item ("audiocraft" masks its frames from ``ceil(length /
        hop)`` on, as its ``WaveformConditioner`` does; default: the whole of ``T``).
        """
        ratio = 1.0
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            ratio = self.sample_rate / int(sample_rate)
            wav = self.resample(wav.float(), int(sample_rate))
        if self.chroma == "ostinato":
            return chromagram(wav, self.sample_rate, self.hop_length, self.n_fft, argmax=self.argmax)
        chroma = source_chromagram(wav, self.sample_rate, self.hop_length, self.n_fft)
        if self.chroma == "audiocraft":
            if lengths is None:
                lengths = torch.full((wav.shape[0],), wav.shape[-1], device=wav.device)
            else:
                lengths = lengths.to(wav.device).double() * ratio
            valid = torch.ceil(lengths / self.hop_length)  # [B]
            frame = torch.arange(chroma.shape[1], device=wav.device)
            chroma = chroma * (frame[None] < valid[:, None]).unsqueeze(-1).to(chroma.dtype)
        return chroma

    def resample(self, wav: Tensor, sample_rate: int) -> Tensor:
        """``[..., T]`` at ``sample_rate`` -> the analysis rate, with the source's resampler: audiocraft's
        ``convert_audio`` (julius), transformers' feature extractor's (torchaudio, rolloff 0.945, 24 zero
        crossings), else ostinato's."""
        import torchaudio.functional as AF

        from ostinato.nn.resample import resample, resample_audiocraft

        if self.chroma == "audiocraft":
            return resample_audiocraft(wav, sample_rate, self.sample_rate)
        if self.chroma == "transformers":
            return AF.resample(wav, sample_rate, self.sample_rate, rolloff=0.945, lowpass_filter_width=24)
        return resample(wav, sample_rate, self.sample_rate)

    def batch_features(self, wavs: list[Tensor], sample_rate: int) -> Tensor:
        """Chroma ``[B, F, 12]`` of references ``[C, T_i]`` as the source computes a batch of them: zero-padded
        to the longest (and masked past each one's end for "audiocraft")."""
        longest = max(w.shape[-1] for w in wavs)
        padded = torch.stack([nn.functional.pad(w.float().mean(0), (0, longest - w.shape[-1])) for w in wavs])
        lengths = torch.tensor([w.shape[-1] for w in wavs])
        return self.features(padded.to(self.proj.weight.device), sample_rate, lengths)

    def forward(self, chroma: Tensor) -> Tensor:
        """``[B, F, 12]`` -> ``[B, F, dim]`` (audiocraft's masked frames, all-zero rows, -> zero vectors)."""
        out = self.proj(chroma.to(self.proj.weight.dtype))
        if self.chroma == "audiocraft":
            out = out * chroma.ne(0).any(dim=-1, keepdim=True).to(out.dtype)
        return out
