"""MusicGen-Style conditioner: shapes, the RVQ bottleneck in train / eval, gradients, excerpts, a learning probe,
the frozen HF audio encoder and the codec-latent features."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ostinato.data.audio import resample
from ostinato.nn.quantization import ResidualVectorQuantizer
from ostinato.nn.style import HFAudioFeatures, StyleConditioner, codec_latent_features

FEAT, DIM, N_Q, EVAL_Q, DS = 8, 16, 4, 2, 5


def _conditioner(seed: int = 0, **kwargs) -> StyleConditioner:
    torch.manual_seed(seed)
    args = dict(width=32, num_layers=2, num_heads=4, n_q=N_Q, card=16, eval_q=EVAL_Q, downsample=DS)
    args.update(kwargs)
    return StyleConditioner(FEAT, DIM, **args)


def _features(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, FEAT, generator=torch.Generator().manual_seed(seed))


def _warm(cond: StyleConditioner, steps: int = 3) -> None:
    """A few training forwards: k-means init of the codebooks, BatchNorm running statistics."""
    cond.train()
    with torch.no_grad():
        for i in range(steps):
            cond(_features(4, 30, seed=100 + i))


@pytest.mark.parametrize("t", [1, 5, 7, 23, 30])
def test_shapes_for_several_lengths(t: int) -> None:
    cond = _conditioner()
    for training in (True, False):
        cond.train(training)
        tokens, penalty = cond(_features(3, t))
        assert tokens.shape == (3, math.ceil(t / DS), DIM) == (3, cond.num_tokens(t), DIM)
        assert penalty.dim() == 0 and torch.isfinite(penalty)


def test_mask_ignores_padding() -> None:
    cond = _conditioner()
    _warm(cond)
    cond.eval()
    feats = _features(2, 23)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 12:] = False
    padded, _ = cond(feats, mask=mask)
    alone, _ = cond(feats[1:, :12])
    n = cond.num_tokens(12)
    assert alone.shape[1] == n == 3
    torch.testing.assert_close(padded[1:, :n], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[:1], cond(feats[:1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no valid frame"):
        cond(feats, mask=torch.zeros(2, 23, dtype=torch.bool))


def test_eval_uses_eval_q_codebooks() -> None:
    cond = _conditioner()
    used: list[int] = []
    cond.rvq.register_forward_hook(lambda module, args, out: used.append(out.codes.shape[1]))
    _warm(cond, steps=1)
    cond(_features(2, 30), n_q=3)
    assert used == [N_Q, 3]
    cond.eval()
    feats = _features(2, 30)
    default, _ = cond(feats)
    assert used[-1] == EVAL_Q
    torch.testing.assert_close(default, cond(feats, n_q=EVAL_Q)[0])
    assert not torch.allclose(default, cond(feats, n_q=N_Q)[0], atol=1e-4)
    assert not torch.allclose(default, cond(feats, n_q=1)[0], atol=1e-4)
    with pytest.raises(ValueError, match="n_q"):
        cond(feats, n_q=N_Q + 1)


def test_codebooks_update_in_training_not_in_eval() -> None:
    cond = _conditioner()
    _warm(cond, steps=1)
    before = {k: v.clone() for k, v in cond.state_dict().items()}
    cond(_features(4, 30, seed=7))
    embed = "rvq.layers.0.codebook.embed"
    assert not torch.equal(before[embed], cond.state_dict()[embed])
    assert int(cond.rvq.steps) == int(before["rvq.steps"]) + 1
    cond.eval()
    snapshot = {k: v.clone() for k, v in cond.state_dict().items()}
    cond(_features(4, 30, seed=8))
    for name, value in cond.state_dict().items():
        assert torch.equal(value, snapshot[name]), name


def test_gradients_pass_the_bottleneck() -> None:
    cond = _conditioner()
    _warm(cond, steps=1)
    feats = _features(4, 30).requires_grad_(True)
    tokens, penalty = cond(feats)
    assert torch.isfinite(penalty) and float(penalty.detach()) > 0
    tokens.pow(2).mean().backward()  # no penalty: gradients to the transformer come through straight-through only
    trainable = [("input_proj", cond.input_proj), ("transformer", cond.transformer), ("output_proj", cond.output_proj)]
    for prefix, module in trainable:
        for name, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{prefix}.{name}"
            assert param.grad.abs().sum() > 0, f"{prefix}.{name}"
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_ema_excluded_names_the_rvq_buffers() -> None:
    cond = _conditioner()
    excluded = cond.ema_excluded(prefix="style.")
    names = {f"style.{k}" for k in cond.state_dict()}
    assert set(excluded) <= names
    assert "style.rvq.layers.0.codebook.embed" in excluded and "style.rvq.steps" in excluded
    assert not any(".norm." in n or "transformer" in n for n in excluded)
    assert len(excluded) == 4 * N_Q + 1


def test_excerpt_train_and_eval() -> None:
    cond = _conditioner()
    rate, frames = 50.0, 1000

    def draws(seed: int) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(seed)
        return [cond.excerpt(frames, rate, generator=g) for _ in range(300)]

    out = draws(0)
    assert out == draws(0) and out != draws(1)
    for start, length in out:
        assert int(1.5 * rate) <= length <= int(4.5 * rate)
        assert 0 <= start and start + length <= frames
    lengths, starts = [o[1] for o in out], [o[0] for o in out]
    assert min(lengths) < 100 and max(lengths) > 200  # spans the interval
    assert min(starts) < 100 and max(starts) > 700
    # Items shorter than the excerpt are used whole.
    assert cond.excerpt(40, rate, generator=torch.Generator().manual_seed(0)) == (0, 40)
    assert cond.excerpt(frames, rate, train=False) == (0, 150) == cond.excerpt(frames, rate, train=False)
    assert cond.excerpt(100, rate, train=False) == (0, 100)
    with pytest.raises(ValueError, match="shorter than one frame"):
        cond.excerpt(frames, 0.2, train=False)
    with pytest.raises(ValueError, match="at least one"):
        cond.excerpt(0, rate)


def test_defaults_and_constructor_errors() -> None:
    cond = StyleConditioner(FEAT, DIM)  # audiocraft's defaults
    assert (cond.width, cond.n_q, cond.rvq.card, cond.eval_q, cond.downsample) == (512, 6, 1024, 3, 15)
    assert len(cond.transformer.layers) == 8 and cond.excerpt_seconds == (1.5, 4.5)
    with pytest.raises(ValueError, match="eval_q=4 must be in"):
        StyleConditioner(FEAT, DIM, n_q=3, eval_q=4)
    with pytest.raises(ValueError, match="excerpt_seconds"):
        StyleConditioner(FEAT, DIM, excerpt_seconds=(3.0, 1.0))
    with pytest.raises(ValueError, match=r"features \[B, T, 8\]"):
        _conditioner()(torch.randn(2, 10, FEAT + 1))


def test_probe_separates_two_styles() -> None:
    """Two styles with the same mean and different spread per frame: only a nonlinear summary tells them apart,
    which the conditioner must learn through its quantized bottleneck."""
    cond = _conditioner(seed=3)
    probe = torch.nn.Linear(DIM, 2)
    opt = torch.optim.Adam([*cond.parameters(), *probe.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 2
        scale = torch.where(labels == 0, 0.5, 1.5)[:, None, None]
        return torch.randn(n, 20, FEAT, generator=g) * scale, labels

    losses = []
    cond.train()
    for _ in range(100):
        feats, labels = batch(16)
        tokens, penalty = cond(feats)
        loss = F.cross_entropy(probe(tokens.mean(dim=1)), labels)
        opt.zero_grad()
        (loss + penalty).backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)
    cond.eval()
    with torch.no_grad():
        feats, labels = batch(64)
        accuracy = (probe(cond(feats)[0].mean(dim=1)).argmax(-1) == labels).float().mean()
    assert accuracy >= 0.9


# ----- frozen features -----

@pytest.fixture(scope="module")
def hubert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synth import write_tiny_hubert

    return write_tiny_hubert(tmp_path_factory.mktemp("hubert"))


def test_hf_features_shape_and_parity(hubert_folder: Path) -> None:
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    enc = HFAudioFeatures(str(hubert_folder))
    assert (enc.sample_rate, enc.dim, enc.frame_rate) == (16000, 32, 50.0)
    wav = torch.randn(2, 1, 16000, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    feats = enc(wav, 16000)
    assert feats.shape == (2, 49, 32) and enc.num_frames(16000) == 49
    assert feats.dtype == torch.float32 and not feats.requires_grad
    # Same as the reference pipeline: the folder's feature extractor then the model.
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(hubert_folder)
    inputs = extractor(list(wav.detach()[:, 0].numpy()), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ref = HubertModel.from_pretrained(hubert_folder).eval()(inputs["input_values"]).last_hidden_state
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4)
    first = HFAudioFeatures(str(hubert_folder), layer=0)(wav, 16000)
    assert first.shape == feats.shape and not torch.allclose(first, feats)
    with pytest.raises(ValueError, match="layer=3"):
        HFAudioFeatures(str(hubert_folder), layer=3)
    with pytest.raises(ValueError, match="shorter than one frame"):
        enc(wav[..., :300], 16000)


def test_hf_features_resample_and_mono(hubert_folder: Path) -> None:
    enc = HFAudioFeatures(str(hubert_folder))
    g = torch.Generator().manual_seed(1)
    wav24 = torch.randn(2, 1, 24000, generator=g)
    feats = enc(wav24, 24000)
    assert feats.shape == (2, 49, 32)
    torch.testing.assert_close(feats, enc(resample(wav24, 24000, 16000), 16000))
    stereo = torch.randn(2, 2, 16000, generator=g)
    mono = enc(stereo, 16000)
    torch.testing.assert_close(mono, enc(stereo.mean(dim=1, keepdim=True), 16000))
    assert not torch.allclose(mono, enc(stereo[:, :1], 16000))


def test_hf_features_folder_errors(hubert_folder: Path, tmp_path: Path) -> None:
    from transformers import HubertModel

    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFAudioFeatures(str(tmp_path / "missing"))
    bare = tmp_path / "bare"
    HubertModel.from_pretrained(hubert_folder).save_pretrained(bare)  # no preprocessor_config.json
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        HFAudioFeatures(str(bare))


def test_codec_latent_features() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=FEAT, n_q=3, card=16, kmeans_init=False)
    codes = torch.randint(0, 16, (2, 3, 25))
    feats = codec_latent_features(rvq.decode, codes)
    assert feats.shape == (2, 25, FEAT) and feats.dtype == torch.float32 and not feats.requires_grad
    torch.testing.assert_close(feats, rvq.decode(codes).transpose(1, 2))
    assert not torch.allclose(feats, codec_latent_features(rvq.decode, codes[:, :2]))  # more codebooks, more detail
    tokens, _ = _conditioner().eval()(feats)
    assert tokens.shape == (2, 5, DIM)
    with pytest.raises(ValueError, match=r"codes \[B, K, T\]"):
        codec_latent_features(rvq.decode, codes[:, 0])
