"""Text-audio score (CLAP / MuLaN), label KLD and chroma cosine similarity (melody adherence)."""
from __future__ import annotations

import math

import pytest
import torch

from ostinato.metrics.chroma import ChromaCosineSimilarity, loop_to_length
from ostinato.metrics.kld import LabelKLD, label_kl_divergence
from ostinato.metrics.text_audio import TextAudioScore

F64 = torch.float64
SR = 8000  # hop 0.128 s = 1024 samples, n_fft 4096


# --------------------------------------------------------------------------------------------- text-audio score


def test_text_audio_score_known_cosines() -> None:
    e = torch.eye(4)
    for text, want in ((e * 3.0, 1.0), (e.roll(1, dims=1), 0.0), (-2.0 * e, -1.0)):
        metric = TextAudioScore()
        metric.update(e, text)
        out = metric.compute()
        assert out.dtype == F64 and abs(out.item() - want) < 1e-12
    metric = TextAudioScore()
    metric.update(e[:3], e[:3])  # 3 x 1
    metric.update(e[:1], -e[:1])  # 1 x -1
    assert abs(metric.compute().item() - 0.5) < 1e-12  # mean over pairs, not over batches


def test_text_audio_score_is_chunk_independent_and_checks_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    audio, text = torch.randn(37, 16, generator=g), torch.randn(37, 16, generator=g)
    whole, chunks = TextAudioScore(), TextAudioScore()
    whole.update(audio, text)
    for a, t in zip(audio.split(5), text.split(5)):
        chunks.update(a, t)
    want = torch.nn.functional.cosine_similarity(audio.double(), text.double()).mean()
    torch.testing.assert_close(whole.compute(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunks.compute(), whole.compute(), rtol=1e-12, atol=1e-12)
    assert TextAudioScore().to(torch.bfloat16).total.dtype == F64
    with pytest.raises(ValueError, match="equal shape"):
        TextAudioScore().update(audio, text[:, :8])


# --------------------------------------------------------------------------------------------- label KLD


def test_label_kld_zero_for_identical_and_hand_computed() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=g)
    for multilabel in (False, True):
        metric = LabelKLD(multilabel=multilabel)
        metric.update(logits, logits.clone())
        assert metric.compute().item() == 0.0
    # p_reference = (0.8, 0.2), p_generated = (0.5, 0.5).
    want = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    metric = LabelKLD()
    metric.update(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.8, 0.2]]), logits=False)
    assert abs(metric.compute().item() - want) < 1e-5
    # The same as logits; the direction matters (KL(reference || generated), not the reverse).
    metric = LabelKLD()
    metric.update(torch.zeros(1, 2), torch.tensor([[math.log(4.0), 0.0]]))
    assert abs(metric.compute().item() - want) < 1e-5
    reverse = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert abs(reverse - want) > 0.01


def test_label_kld_multilabel_is_mean_bernoulli_kl() -> None:
    gen, ref = torch.tensor([[0.5, 0.9, 0.1]]), torch.tensor([[0.8, 0.9, 0.3]])

    def bernoulli(p: float, q: float) -> float:
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    want = (bernoulli(0.8, 0.5) + 0.0 + bernoulli(0.3, 0.1)) / 3
    metric = LabelKLD(multilabel=True)
    metric.update(gen, ref, logits=False)
    assert abs(metric.compute().item() - want) < 1e-5
    metric = LabelKLD(multilabel=True)
    metric.update(torch.logit(gen.double()), torch.logit(ref.double()))
    assert abs(metric.compute().item() - want) < 1e-5
    with pytest.raises(ValueError, match="sum to 1"):
        LabelKLD().update(gen, ref, logits=False)


def test_label_kld_non_negative_and_mean_over_pairs() -> None:
    g = torch.Generator().manual_seed(2)
    for multilabel in (False, True):
        gen, ref = torch.randn(200, 7, generator=g) * 4, torch.randn(200, 7, generator=g) * 4
        per_pair = label_kl_divergence(gen, ref, multilabel=multilabel)
        assert (per_pair >= 0).all() and per_pair.shape == (200,)
        metric = LabelKLD(multilabel=multilabel)
        for a, b in zip(gen.split(64), ref.split(64)):
            metric.update(a, b)
        torch.testing.assert_close(metric.compute(), per_pair.mean(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------- chroma


def tone(freq: float, seconds: float, batch: int = 1, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return (amp * torch.sin(2 * math.pi * freq * t)).expand(batch, 1, -1).clone()


A4, C4, E4 = 440.0, 261.63, 329.63


@pytest.mark.parametrize("argmax", [False, True])
def test_chroma_same_tone_and_different_tones(argmax: bool) -> None:
    same = ChromaCosineSimilarity(SR, argmax=argmax)
    same.update(tone(A4, 2.0), tone(A4 / 2, 2.0))  # an octave apart: the same pitch class
    assert same.compute().item() > 0.999
    other = ChromaCosineSimilarity(SR, argmax=argmax)
    other.update(tone(A4, 2.0), tone(C4, 2.0))
    assert other.compute().item() < (1e-9 if argmax else 0.05)
    assert same.count.item() == other.count.item() == 16  # ceil(16000 / 1024) frames


def test_chroma_loops_short_reference() -> None:
    a, c = tone(A4, 1.024), tone(C4, 1.024)  # 8 frames each
    melody = torch.cat([a, c], dim=-1)
    generated = torch.cat([melody, melody], dim=-1)  # the 2.048 s melody played twice
    looped = ChromaCosineSimilarity(SR, argmax=True)
    looped.update(generated, melody)
    assert looped.compute().item() > 0.9  # only frames straddling a note change may differ
    torch.testing.assert_close(loop_to_length(melody[0], generated.shape[-1]), generated[0])
    # A reference longer than the generated audio is cropped.
    cropped = ChromaCosineSimilarity(SR, argmax=True)
    cropped.update(a, melody)
    assert cropped.compute().item() > 0.999 and cropped.count.item() == 8
    # Per-item reference lengths: item 1's valid reference is the A alone, looped under an A-then-C generation.
    lengths = ChromaCosineSimilarity(SR, argmax=True)
    lengths.update(torch.cat([melody, melody]), torch.cat([melody, melody]),
                   reference_lengths=torch.tensor([melody.shape[-1], a.shape[-1]]))
    assert 0.65 < lengths.compute().item() < 0.85  # item 0: ~1; item 1: ~1 on the A half, ~0 on the C half


def test_chroma_ignores_silent_reference_frames_and_padding() -> None:
    # 8 frames of E then 8 of silence; the 4-hop window lets 2 frames past the note change still hear the E.
    silence = torch.zeros(1, 1, int(1.024 * SR))
    melody = torch.cat([tone(E4, 1.024), silence], dim=-1)
    same = ChromaCosineSimilarity(SR, argmax=True)
    same.update(melody.clone(), melody)
    assert same.compute().item() > 0.999 and same.count.item() == 10  # the 6 silent frames are left out
    # Playing on (an A) where the melody rests costs nothing; only the 2 mixed frames (E + A window) may differ.
    plays_on = ChromaCosineSimilarity(SR, argmax=True)
    plays_on.update(torch.cat([tone(E4, 1.024), tone(A4, 1.024)], dim=-1), melody)
    assert plays_on.count.item() == 10 and plays_on.compute().item() >= 0.8 - 1e-9
    # A silent generation under a voiced melody scores 0 on those frames (6 of 16).
    silent_gen = ChromaCosineSimilarity(SR, argmax=True)
    silent_gen.update(melody, tone(E4, 2.048))
    assert silent_gen.count.item() == 16 and abs(silent_gen.compute().item() - 10 / 16) < 1e-6
    # Padding past `lengths` is ignored, whatever it holds.
    padded = torch.cat([tone(E4, 1.024), tone(A4, 1.024)], dim=-1)
    masked = ChromaCosineSimilarity(SR, argmax=True)
    masked.update(padded, tone(E4, 2.048), lengths=torch.tensor([int(1.024 * SR)]))
    assert masked.compute().item() > 0.999 and masked.count.item() == 8


def test_chroma_resamples_and_checks_inputs() -> None:
    metric = ChromaCosineSimilarity(SR, argmax=True)
    t = torch.arange(32000) / 16000
    wav = (0.5 * torch.sin(2 * math.pi * A4 * t))[None, None]
    metric.update(wav, wav.clone(), sample_rate=16000)
    assert metric.compute().item() > 0.999 and metric.count.item() == 16
    assert ChromaCosineSimilarity(SR).to(torch.bfloat16).total.dtype == F64
    with pytest.raises(ValueError, match="no voiced reference frame"):
        empty = ChromaCosineSimilarity(SR)
        empty.update(tone(A4, 1.0), torch.zeros(1, 1, SR))
        empty.compute()
    with pytest.raises(ValueError, match="generated"):
        ChromaCosineSimilarity(SR).update(torch.zeros(1, SR), torch.zeros(1, SR))


def test_diversity_tells_a_steady_buzz_from_different_clips() -> None:
    from ostinato.metrics.diversity import diversity_report

    sr = 8000
    t = torch.arange(sr) / sr
    buzz = torch.stack([torch.sin(2 * math.pi * 110 * t + phase) for phase in (0.0, 1.0, 2.0)])
    tones = torch.stack([torch.sin(2 * math.pi * f * t) * torch.linspace(0, 1, sr) ** k
                         for f, k in ((110, 1), (440, 2), (1500, 0))])
    same = diversity_report(buzz, sr)
    different = diversity_report(tones, sr)
    assert same["pairs"] == 3
    assert same["spectral_sim_mean"] > 0.98  # the phase does not matter
    assert same["waveform_corr_mean"] < 0.7  # ... though the samples differ
    assert different["spectral_sim_max"] < 0.6
    assert abs(diversity_report(buzz[:1].repeat(2, 1), sr)["waveform_corr_max"] - 1) < 1e-9
    with pytest.raises(ValueError, match="at least 2"):
        diversity_report(buzz[:1], sr)
