"""Chroma features for melody conditioning: pitch classes of real signals, framing, silence, resampling."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ostinato.nn.chroma import MelodyConditioner, chroma_filterbank, chromagram

SR = 32000
HOP = 4096  # audiocraft's 0.128 s at 32 kHz
FLUIDSYNTH = Path("/usr/bin/fluidsynth")
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")


def midi_hz(note: int) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def harmonic(freq: float, seconds: float, sr: int = SR, n_harmonics: int = 6, amp: float = 0.3) -> torch.Tensor:
    """A sawtooth-like tone, ``[T]``: partial k has amplitude 1 / k."""
    t = torch.arange(round(seconds * sr), dtype=torch.float64) / sr
    wav = sum(torch.sin(2 * math.pi * k * freq * t) / k for k in range(1, n_harmonics + 1) if k * freq < sr / 2)
    return (amp * wav / wav.abs().max()).float()


def sine(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * sr), dtype=torch.float64) / sr
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def classes(chroma: torch.Tensor) -> torch.Tensor:
    """``[F, 12]`` -> strongest class per frame, -1 for all-zero frames."""
    return torch.where(chroma.abs().sum(-1) > 0, chroma.argmax(-1), torch.full_like(chroma[:, 0], -1).long())


def test_filterbank_assigns_bins_to_nearest_pitch_class():
    fb = chroma_filterbank(SR, 16384)
    assert fb.shape == (12, 8193) and fb.dtype == torch.float32
    assert set(fb.sum(0).unique().tolist()) == {0.0, 1.0}
    hz = SR / 16384
    assert fb[:, 0].sum() == 0 and fb[:, int(30 / hz)].sum() == 0  # DC and below fmin are dropped
    for note, cls in [(69, 9), (60, 0), (64, 4), (67, 7), (71, 11), (81, 9), (45, 9)]:
        assert fb[:, round(midi_hz(note) / hz)].argmax() == cls
    assert torch.equal(chroma_filterbank(SR, 16384), fb)  # cached copy is not shared with the caller
    fb[0] = 5
    assert chroma_filterbank(SR, 16384).max() == 1


@pytest.mark.parametrize("make", [sine, harmonic])
@pytest.mark.parametrize("note,cls", [(69, 9), (60, 0), (57, 9), (67, 7)])
def test_single_notes_give_their_pitch_class(make, note, cls):
    chroma = chromagram(make(midi_hz(note), 1.5)[None], SR, HOP)[0]
    assert chroma.shape == (math.ceil(1.5 * SR / HOP), 12)
    assert set(chroma.sum(-1).tolist()) == {1.0}
    assert (classes(chroma) == cls).all()


def test_soft_chroma_is_inf_normalised():
    chroma = chromagram(harmonic(440.0, 1.0)[None], SR, HOP, argmax=False)[0]
    assert torch.allclose(chroma.amax(-1), torch.ones(chroma.shape[0]))
    assert (chroma >= 0).all() and (chroma.argmax(-1) == 9).all()
    assert (chroma[:, 4] > 0.01).all()  # the 3rd harmonic (E) is present but weaker


def test_arpeggio_in_time():
    notes = [(60, 0), (64, 4), (67, 7)]
    wav = torch.cat([harmonic(midi_hz(n), 0.5) for n, _ in notes])
    got = classes(chromagram(wav[None], SR, HOP)[0])
    centres = torch.arange(got.numel()) * HOP / SR
    for i, (_, cls) in enumerate(notes):
        inside = (centres > 0.5 * i + 0.04) & (centres < 0.5 * (i + 1) - 0.04)
        assert inside.sum() >= 3
        assert (got[inside] == cls).all(), (i, got.tolist())


def test_g_major_chord_with_harmonics():
    wav = sum(harmonic(midi_hz(n), 1.0) for n in (55, 59, 62))
    chroma = chromagram(wav[None], SR, HOP, argmax=False)[0]
    assert set(chroma.argmax(-1).tolist()) <= {7, 11, 2}
    mean = chroma.mean(0)
    others = [c for c in range(12) if c not in (7, 11, 2)]
    assert mean[[7, 11, 2]].min() > mean[others].max()


def test_silence_and_tone_after_silence():
    assert chromagram(torch.zeros(2, 3 * SR), SR, HOP).abs().sum() == 0
    noise = 10 ** (-80 / 20) * torch.randn(1, SR, generator=torch.Generator().manual_seed(0))
    assert chromagram(noise, SR, HOP).abs().sum() == 0  # -80 dBFS is below the -60 dB gate
    quiet = sine(440.0, 1.0, amp=10 ** (-70 / 20))[None]
    assert chromagram(quiet, SR, HOP).abs().sum() == 0
    assert (classes(chromagram(quiet, SR, HOP, silence_db=-90.0)[0]) == 9).all()

    wav = torch.cat([torch.zeros(SR), sine(440.0, 1.0)])
    got = classes(chromagram(wav[None], SR, HOP)[0])
    n_fft = 16384
    starts = torch.arange(got.numel()) * HOP - n_fft // 2
    before = starts + n_fft <= SR  # the window ends before the tone starts
    centred_in_tone = torch.arange(got.numel()) * HOP >= SR
    assert before.sum() >= 4 and centred_in_tone.sum() >= 6
    assert (got[before] == -1).all()
    assert (got[centred_in_tone] == 9).all()
    assert ((got == -1) | (got == 9)).all()


@pytest.mark.parametrize("length", [1, 100, HOP - 1, HOP, HOP + 1, 3 * HOP, 5 * HOP + 17, 40000])
def test_frame_count(length):
    wav = torch.randn(2, 2, length, generator=torch.Generator().manual_seed(length))
    assert chromagram(wav, SR, HOP).shape == (2, math.ceil(length / HOP), 12)
    cond = MelodyConditioner(8, SR)
    assert cond.num_frames(length) == math.ceil(length / HOP)
    assert cond.features(wav).shape == (2, cond.num_frames(length), 12)


def test_conditioner_settings():
    cond = MelodyConditioner(16, SR)
    assert cond.hop_length == 4096 and cond.n_fft == 16384 and cond.frame_rate == pytest.approx(7.8125)
    cond = MelodyConditioner(16, 24000)
    assert cond.hop_length == 3072 and cond.n_fft == 16384
    assert MelodyConditioner(16, 16000, hop_seconds=0.05, n_fft=2048).n_fft == 2048


def test_stereo_equals_mono_and_channel_average():
    a4 = harmonic(440.0, 1.0)
    assert torch.equal(chromagram(a4[None, None], SR, HOP), chromagram(a4.expand(1, 2, -1), SR, HOP))
    assert torch.equal(chromagram(a4[None, None], SR, HOP), chromagram(a4[None], SR, HOP))
    # the channels are averaged, so a loud A in one channel wins over a quiet C in the other
    mixed = torch.stack([a4, 0.2 * harmonic(midi_hz(60), 1.0)])[None]
    assert (classes(chromagram(mixed, SR, HOP)[0]) == 9).all()


def test_batch_independence():
    cond = MelodyConditioner(8, SR, argmax=False)
    gen = torch.Generator().manual_seed(1)
    items = [harmonic(midi_hz(60), 1.0), sine(523.0, 1.0), 0.3 * torch.randn(SR, generator=gen),
             torch.zeros(SR)]
    batch = cond.features(torch.stack(items)[:, None])
    for i, item in enumerate(items):
        alone = cond.features(item[None, None])
        assert torch.allclose(batch[i : i + 1], alone, atol=1e-5)
    assert torch.equal(cond.features(torch.stack(items)[:, None]), batch)  # deterministic


def test_resampling_path():
    cond = MelodyConditioner(8, 24000)
    wav = harmonic(440.0, 1.0, sr=16000)[None, None]
    chroma = cond.features(wav, sample_rate=16000)
    assert chroma.shape == (1, cond.num_frames(24000), 12)  # 1 s at the conditioner's rate
    assert (classes(chroma[0]) == 9).all()
    wav = harmonic(midi_hz(64), 1.0, sr=48000)[None, None]
    assert (classes(cond.features(wav, sample_rate=48000)[0]) == 4).all()


def test_forward_shape_and_gradients():
    cond = MelodyConditioner(32, SR)
    chroma = cond.features(harmonic(440.0, 1.0)[None, None].expand(2, 1, -1))
    assert not chroma.requires_grad and chroma.dtype == torch.float32
    out = cond(chroma)
    assert out.shape == (2, chroma.shape[1], 32)
    out.square().sum().backward()
    assert cond.proj.weight.grad is not None and cond.proj.weight.grad[:, 9].abs().sum() > 0
    assert cond.proj.weight.grad[:, 0].abs().sum() == 0  # C never fires for an A tone
    assert cond.proj.bias.grad is not None and cond.proj.bias.grad.abs().sum() > 0


def _write_midi(path: Path, note: int, seconds: float, program: int = 0) -> None:
    import mido

    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=500000, time=0))  # 120 bpm: 960 ticks per second
    track.append(mido.Message("program_change", program=program, time=0))
    track.append(mido.Message("note_on", note=note, velocity=100, time=0))
    track.append(mido.Message("note_off", note=note, velocity=0, time=round(960 * seconds)))
    track.append(mido.MetaMessage("end_of_track", time=0))
    mid.save(str(path))


def test_fluidsynth_piano_a3(tmp_path: Path):
    assert FLUIDSYNTH.is_file() and SOUNDFONT.is_file(), "fluidsynth and FluidR3_GM are installed here and in CI"
    _write_midi(tmp_path / "a3.mid", note=57, seconds=1.0)
    out = tmp_path / "a3.wav"
    subprocess.run([str(FLUIDSYNTH), "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.8", "-r", str(SR), "-T", "wav",
                    "-O", "s16", "-F", str(out), str(SOUNDFONT), str(tmp_path / "a3.mid")],
                   check=True, capture_output=True, timeout=60)
    audio, sr = sf.read(str(out), dtype="float32", always_2d=True)
    assert sr == SR and audio.shape[0] >= SR
    wav = torch.from_numpy(np.ascontiguousarray(audio.T))[None]  # [1, C, T]
    cond = MelodyConditioner(8, SR)
    got = classes(cond.features(wav)[0])
    note_frames = got[: cond.num_frames(SR)]
    assert (note_frames == 9).float().mean() >= 0.9, got.tolist()
    assert torch.bincount(got[got >= 0], minlength=12).argmax() == 9
    soft = chromagram(wav, SR, HOP, argmax=False)[0, : cond.num_frames(SR)]
    assert (soft.topk(2, dim=-1).values[:, 1] < 0.5).all()  # A3 dominates clearly, not by a hair
