"""The Jukebox VQ-VAE's codebooks are really used: no level collapses onto a few codes (issue 19 item 5).

The demo preset's top level used to collapse (codebook perplexity 3.7 of 256 after 800 steps). The cause: under
PyTorch's default conv init a SEANet encoder's latents are ~99% bias; at the top level (hop 1024) they differed
between inputs by 0.003 (per-dimension std) around a centre of norm 0.3, while one Adam step moved that centre by
0.01-0.16. Dead-code restarts put codes on this batch's latents, which the next step has already left: every frame
took the code nearest to the moved cloud. ``HierarchicalVQVAE(encoder_gain=1.0)`` starts every encoder conv at
norm 1 with zero bias: the spread is 0.2 and every level's codes stay in use.

Measured (one CPU thread, synthetic melodies): at the preset's own size (256 codes, 16 crops of 0.512 s, lr 1e-3)
the validation perplexity after 100 steps was bottom 207 / middle 1.0 / top 1.0 with PyTorch's init and
164 / 124 / 106 with ``encoder_gain`` 1 (losses 1.03 / 1.27 / 1.39 -> 0.95 / 1.11 / 1.22). Here (64 codes, 8
crops, 40 steps): 13.3 / 3.0 / 1.0 -> 57.8 / 18.3 / 22.4.
"""
from __future__ import annotations

import pytest
import torch

from ostinato.families.jukebox import JukeboxVQVAEFamily
from ostinato.metrics.codebooks import CodePerplexity, codebook_perplexities
from ostinato.models.codec import Codec
from tests.synth import tune

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 24000
SEGMENT = 12288  # conf/experiment/jukebox_vqvae_tiny.yaml: 0.512 s
CARD = 64
# conf/family/jukebox_vqvae_tiny.yaml at a smaller codebook
VQ = dict(ratios=[[4, 4, 4], [8, 8, 4], [8, 8, 4, 4]], card=CARD, dimension=32, n_filters=8, n_residual_layers=1,
          lstm=0, decay=0.9, threshold_ema_dead_code=0.5)
STEPS = 40


def _clips(n: int, seed: int) -> torch.Tensor:
    """[n, 1, 2 s]: melodies of 8 random notes with overtones at random loudness."""
    g = torch.Generator().manual_seed(seed)
    clips = [tune(2.0, torch.randint(40, 84, (8,), generator=g).tolist(), SR)
             * (0.3 + 2 * float(torch.rand((), generator=g))) for _ in range(n)]
    return torch.stack(clips)


def _train(encoder_gain: float | None) -> dict[str, float]:
    """The tiny VQ-VAE trained STEPS Adam steps (the preset's lr and betas) on 8 crops of the preset's length ->
    every level's codebook perplexity over 8 held-out 2 s clips."""
    torch.manual_seed(0)
    family = JukeboxVQVAEFamily(SR, 1, vqvae={**VQ, "encoder_gain": encoder_gain}, commitment_weight=1.0)
    opt = torch.optim.Adam(family.parameters(), 1e-3, betas=(0.5, 0.9))
    train, g = _clips(32, 0), torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(train), (8,), generator=g).tolist()
        off = torch.randint(0, train.shape[-1] - SEGMENT, (8,), generator=g).tolist()
        x = torch.stack([train[i, :, o:o + SEGMENT] for i, o in zip(idx, off)])
        losses, _ = family.level_losses(x)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    family.eval()
    return codebook_perplexities(family.model, _clips(8, 99).split(4))


@pytest.fixture(scope="module")
def perplexities() -> dict[str, dict[str, float]]:
    return {"default init": _train(None), "encoder_gain 1": _train(1.0)}


def test_every_level_of_the_vqvae_uses_its_codebook(perplexities):
    print("validation codebook perplexity per level (bottom, middle, top) after", STEPS, "steps:", perplexities)
    assert all(v > 0.25 * CARD for v in perplexities["encoder_gain 1"].values()), perplexities
    # the old init: the top level (hop 1024) collapses onto a few codes
    assert perplexities["default init"]["perplexity_level2"] < 0.1 * CARD, perplexities


def test_code_perplexity_counts_every_frame_of_every_batch():
    metric = CodePerplexity(4)
    metric.update(torch.tensor([[0, 0], [0, 0]]))
    assert float(metric.compute()) == pytest.approx(1.0)
    metric.update(torch.tensor([1, 2, 3] * 4))
    assert float(metric.compute()) == pytest.approx(4.0)


def test_codebook_perplexities_names_every_rvq_stage_of_a_codec():
    torch.manual_seed(0)
    codec = Codec.build(sample_rate=SR, ratios=[4, 4], n_filters=4, dimension=8, n_q=3, card=16, lstm=0).eval()
    out = codebook_perplexities(codec, [torch.randn(2, 1, 4000), torch.randn(1, 1, 800)])
    assert sorted(out) == ["perplexity_q0", "perplexity_q1", "perplexity_q2"]
    assert all(1.0 <= v <= 16 for v in out.values())


def test_codec_validation_logs_every_stage_perplexity_over_the_valid_frames():
    import lightning as L
    from torch.utils.data import DataLoader

    from ostinato.data.batch import AudioBatch
    from ostinato.families.codec import CodecFamily

    torch.manual_seed(0)
    family = CodecFamily(sample_rate=8000, codec=dict(dimension=8, n_filters=2, ratios=[4, 2], lstm=0, n_q=2, card=16),
                         loss_weights={"adv": 0, "feat": 0}, balancer=False)
    audio = 0.1 * torch.randn(2, 1, 4000)
    audio[1, :, 2000:] = 0  # padding
    family.model(audio)  # k-means init of the codebooks from this batch
    batches = [AudioBatch(audio, torch.tensor([4000, 2000]), ["", ""], [{}, {}])] * 3
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(family, DataLoader(batches, batch_size=None), verbose=False)
    family.eval()
    with torch.no_grad():
        codes = family.model.encode(audio).codes  # 500 frames each; the second item's last 250 are padding
    for k in range(2):
        kept = torch.cat([codes[0, k], codes[1, k, :250]])
        expected = float(CodePerplexity(16).to(torch.float64)(kept))
        assert float(trainer.callback_metrics[f"valid/perplexity_q{k}"]) == pytest.approx(expected, rel=1e-5)
        assert expected > 2  # random codebooks: the frames spread over several codes
