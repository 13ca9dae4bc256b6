"""Embedding backends (codec latents, VGGish, HF encoders), their registry and the reference-statistics cache."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ostinato.data.audio import encode_flac, load_audio, resample
from ostinato.data.sources import iter_raw_samples
from ostinato.metrics.embeddings import (
    EmbeddingBackend,
    clip_embeddings,
    load_backend,
    reference_embeddings,
    reference_stats,
)
from ostinato.metrics.embeddings import vggish as V
from ostinato.metrics.embeddings.registry import BACKENDS, parse_spec
from tests.synth import tone, write_shards

TORCHVGGISH_KEYS = sorted([f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")]
                          + [f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")])


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vggish_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random VGGish state dict in torchvggish's format (keys and shapes of vggish-10086976.pth)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in V.VGGish().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        state[k] = torch.randn(shape, generator=g) * (math.sqrt(2.0 / fan_in) if len(shape) > 1 else 0.01)
    path = tmp_path_factory.mktemp("vggish") / "vggish-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vggish(vggish_pth: Path) -> EmbeddingBackend:
    return load_backend(f"vggish:{vggish_pth}")


@pytest.fixture(scope="module")
def hubert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synth import write_tiny_hubert

    return write_tiny_hubert(tmp_path_factory.mktemp("hubert"))


class Bands(EmbeddingBackend):
    """A cheap real backend for the cache tests: log energy in ``dim`` FFT bands of 25 ms frames, 10 ms hop."""

    name = "bands"
    sample_rate = 16000
    channels = 1
    window_seconds = 0.025
    hop_seconds = 0.01

    def __init__(self, dim: int = 6, offset: float = 1e-4) -> None:
        self.dim, self.offset, self.calls = dim, offset, 0

    def _identity(self) -> dict:
        return {"dim": self.dim, "offset": self.offset}

    def _embed(self, wav: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        if wav.shape[-1] < 400:
            return [wav.new_zeros(0, self.dim)] * wav.shape[0]
        power = torch.fft.rfft(wav[:, 0].unfold(-1, 400, 160), n=512).abs().pow(2)  # [B, F, 257]
        bands = power[..., 1:1 + 256 // self.dim * self.dim].unflatten(-1, (self.dim, -1)).sum(-1)
        return list(torch.log(bands + self.offset).unbind(0))


def _direct_stats(backend: EmbeddingBackend, clips: list[tuple[torch.Tensor, int]], per: str = "frame"):
    frames = [backend.embed_audio(wav[None], sr)[0] for wav, sr in clips]
    x = torch.cat(frames) if per == "frame" else clip_embeddings(frames)
    x = x.double()
    return x.mean(dim=0), torch.cov(x.T), x.shape[0]


def _shard_clips(folder: Path) -> list[tuple[torch.Tensor, int]]:
    clips = []
    for shard in sorted(folder.glob("shard-*.tar")):
        for raw in iter_raw_samples(str(shard)):
            try:
                clips.append(load_audio(raw["flac"]))
            except Exception:
                pass
    return clips


def _entry(cache: Path, kind: str) -> dict:
    (meta,) = [p for p in cache.glob(f"*-{kind}-*.json")]
    return json.loads(meta.read_text())


# ----------------------------------------------------------------------------------------------- VGGish


def test_vggish_state_dict_loads_strictly(vggish_pth: Path, tmp_path: Path) -> None:
    net = V.load_vggish(vggish_pth)
    saved = torch.load(vggish_pth, weights_only=True)
    assert sorted(net.state_dict()) == sorted(saved) == TORCHVGGISH_KEYS
    assert tuple(saved["embeddings.0.weight"].shape) == (4096, 512 * 4 * 6)
    assert torch.equal(net.state_dict()["features.13.weight"], saved["features.13.weight"])
    features = {k: v for k, v in saved.items() if k.startswith("features.")}  # small files for the errors
    torch.save(features, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not a torchvggish state dict.*Missing.*embeddings.4.bias"):
        V.load_vggish(tmp_path / "missing.pth")
    torch.save({**features, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="Unexpected.*extra.weight"):
        V.load_vggish(tmp_path / "extra.pth")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        V.load_vggish(tmp_path / "absent.pth")


@pytest.mark.parametrize("samples", [0, 399, 400, 559, 560, 15_599, 15_600, 16_000, 31_200, 48_000])
def test_vggish_framing_counts(samples: int) -> None:
    expected = max(0, (samples - 400) // 160 + 1) if samples >= 400 else 0
    mel = V.log_mel(torch.randn(2, samples))
    assert mel.shape == (2, expected, 64) and V.num_frames(samples) == expected
    ex = V.examples(mel)
    assert ex.shape == (2, expected // 96, 96, 64) and V.num_examples(samples) == expected // 96
    if ex.shape[1]:
        torch.testing.assert_close(ex[:, -1, -1], mel[:, ex.shape[1] * 96 - 1])  # no overlap, tail dropped


def test_vggish_log_mel_matches_reference_formulas_and_a440() -> None:
    # mel_features.py in numpy float64, written from its formulas: frames, periodic Hann, |rfft 512|, mel-domain
    # triangles, DC row zeroed, log(x + 0.01).
    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    x = np.random.default_rng(0).standard_normal(4000) * 0.3
    n = 1 + (len(x) - 400) // 160
    frames = np.stack([x[i * 160:i * 160 + 400] for i in range(n)])
    hann = 0.5 - 0.5 * np.cos(2 * np.pi / 400 * np.arange(400))
    spec = np.abs(np.fft.rfft(frames * hann, 512))
    bins = mel(np.linspace(0, 8000, 257))
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    weights = np.stack([np.maximum(0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)))
                        for lo, c, hi in zip(edges[:-2], edges[1:-1], edges[2:])], axis=1)
    weights[0] = 0
    reference = np.log(spec @ weights + 0.01)
    ours = V.log_mel(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)

    a440 = V.log_mel(tone(440.0, 1.0, 16000))[0]  # [98, 64]
    expected_band = int(np.argmin(np.abs(edges[1:-1] - mel(440.0))))
    assert expected_band == 8
    assert (a440.argmax(dim=1) == expected_band).all()
    assert a440[:, expected_band].mean() > a440[:, 30:].mean() + 5  # the tone, not broadband energy


def test_vggish_backend_shapes_and_44k_stereo(vggish: EmbeddingBackend) -> None:
    assert (vggish.sample_rate, vggish.channels, vggish.dim) == (16000, 1, 128)
    assert vggish.hop_seconds == pytest.approx(0.96) and vggish.window_seconds == pytest.approx(0.975)
    g = torch.Generator().manual_seed(0)
    lengths = {15_599: 0, 15_600: 1}
    for samples, count in lengths.items():
        out = vggish.embed(torch.randn(1, 1, samples, generator=g) * 0.1)
        assert len(out) == 1 and out[0].shape == (count, 128) and out[0].dtype == torch.float32

    stereo = torch.randn(2, 2, 88_200, generator=g) * 0.1  # 2 s at 44.1 kHz
    frames = vggish.embed_audio(stereo, 44_100)
    assert [f.shape for f in frames] == [(2, 128), (2, 128)]  # 32000 samples -> 198 STFT frames -> 2 examples
    mono16 = resample(stereo.mean(dim=1, keepdim=True), 44_100, 16_000)
    assert torch.equal(vggish.prepare(stereo, 44_100), mono16)
    torch.testing.assert_close(frames[1], vggish.embed(mono16[1:])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(frames[0], frames[1])
    with pytest.raises(ValueError, match=r"\[B, 1, T\].*embed_audio"):
        vggish.embed(stereo)


def test_vggish_activation_and_pca(vggish: EmbeddingBackend, vggish_pth: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(1, 1, 16_000, generator=g) * 0.1
    raw = vggish.embed(wav)[0]
    assert (raw < 0).any()  # no final ReLU by default (fadtk)
    vectors, means = torch.linalg.qr(torch.randn(128, 128, generator=g))[0], torch.randn(128, generator=g) * 0.1
    # torchvggish's PCA release stores numpy arrays in a torch pickle
    torch.save({"pca_eigen_vectors": vectors.double().numpy(), "pca_means": means.double().numpy()[:, None]},
               tmp_path / "pca.pth")
    relu = load_backend({"name": "vggish", "path": str(vggish_pth), "activation": True})
    pca = load_backend(f"vggish:{vggish_pth},pca={tmp_path / 'pca.pth'},quantize=0")
    quant = load_backend(f"vggish:{vggish_pth},pca={tmp_path / 'pca.pth'}")
    torch.testing.assert_close(relu.embed(wav)[0], raw.clamp(min=0))
    torch.testing.assert_close(pca.embed(wav)[0], (raw - means) @ vectors.T, atol=1e-4, rtol=1e-4)
    q = quant.embed(wav)[0]
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 255
    expected = torch.round(((raw - means) @ vectors.T).clamp(-2, 2).add(2) * 255 / 4)
    assert (q - expected).abs().max() <= 1  # rounding ties only
    assert len({vggish.id(), relu.id(), pca.id(), quant.id()}) == 4


# ----------------------------------------------------------------------------------------------- codec, hf


def test_codec_backend_transformers_encodec(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.EncodecConfig(sampling_rate=24000, audio_channels=1, num_filters=8,
                                     upsampling_ratios=[8, 5, 4, 2], codebook_size=64, hidden_size=16,
                                     codebook_dim=16, num_lstm_layers=1, target_bandwidths=[1.8],
                                     use_causal_conv=False, normalize=False)
    model = transformers.EncodecModel(cfg).eval()
    model.save_pretrained(tmp_path / "encodec")
    backend = load_backend(f"codec:{tmp_path / 'encodec'}")
    assert (backend.sample_rate, backend.channels, backend.dim) == (24000, 1, 16)
    assert backend.hop_seconds == pytest.approx(1 / 75)
    wav = torch.randn(2, 1, 8_100, generator=torch.Generator().manual_seed(0)) * 0.1
    frames = backend.embed(wav)
    assert [f.shape for f in frames] == [(26, 16), (26, 16)]  # ceil(8100 / 320) frames at 75 Hz
    with torch.no_grad():
        reference = model.encoder(wav).transpose(1, 2)  # transformers' encoder, before quantization
    torch.testing.assert_close(torch.stack(frames), reference, atol=1e-4, rtol=1e-4)
    assert [f.shape for f in backend.embed_audio(torch.randn(1, 2, 16_000), 48_000)] == [(25, 16)]
    assert str((tmp_path / "encodec").resolve()) in backend.id() and backend.weights in backend.id()


def test_hf_backend_hubert(hubert_folder: Path) -> None:
    from ostinato.nn.style import HFAudioFeatures

    last = load_backend(f"hf:{hubert_folder}")
    first = load_backend(f"hf:{hubert_folder},layer=1")
    assert (first.sample_rate, first.channels, first.dim, first.hop_seconds) == (16000, 1, 32, 0.02)
    assert first.window_seconds == pytest.approx(400 / 16000)
    wav = torch.randn(2, 1, 16_000, generator=torch.Generator().manual_seed(0))
    frames = first.embed(wav)
    assert [f.shape for f in frames] == [(49, 32), (49, 32)]
    torch.testing.assert_close(torch.stack(frames), HFAudioFeatures(str(hubert_folder), layer=1)(wav, 16000))
    assert not torch.allclose(frames[0], last.embed(wav)[0])
    assert last.id() != first.id()
    assert [f.shape for f in first.embed(wav[..., :300])] == [(0, 32), (0, 32)]  # shorter than the conv stem
    assert [f.shape for f in first.embed_audio(torch.randn(1, 2, 22_050), 22_050)] == [(49, 32)]


# ----------------------------------------------------------------------------------------------- registry


def test_load_backend_specs_and_errors(vggish_pth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_spec("vggish:/m/v.pth,pca=/m/p.pth") == {"name": "vggish", "path": "/m/v.pth", "pca": "/m/p.pth"}
    assert parse_spec("codec://sig/abc") == {"name": "codec", "path": "//sig/abc"}
    assert parse_spec("hf:/m/mert,layer=-3,trust_remote_code=true,x=1e-3,y=none,z=v1") == {
        "name": "hf", "path": "/m/mert", "layer": -3, "trust_remote_code": True, "x": 1e-3, "y": None, "z": "v1"}
    known = r"'clap', 'codec', 'encodec', 'hf', 'mulan', 'vggish'"
    with pytest.raises(ValueError, match=r"unknown embedding backend 'openl3'.*" + known):
        load_backend("openl3:/m/x")
    with pytest.raises(ValueError, match="needs a path"):
        load_backend("vggish")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        load_backend(f"vggish:{vggish_pth},pca")
    with pytest.raises(ValueError, match=r"unknown options \['pcaa'\].*'pca'"):
        load_backend(f"vggish:{vggish_pth},pcaa=/x")
    with pytest.raises(ValueError, match="lacks 'name'"):
        load_backend({"path": str(vggish_pth)})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_backend("hf:/nonexistent/folder")

    # "clap" is found by name in ostinato.metrics.embeddings.clap, imported only when asked for.
    assert BACKENDS["clap"] == "ostinato.metrics.embeddings.clap:ClapBackend"
    fake = types.ModuleType("ostinato.metrics.embeddings.clap")

    class ClapBackend:
        def __init__(self, checkpoint, text_model, enable_fusion=False, batch_size=16):
            self.args = (checkpoint, text_model, enable_fusion, batch_size)

    fake.ClapBackend = ClapBackend
    monkeypatch.setitem(sys.modules, "ostinato.metrics.embeddings.clap", fake)
    clap = load_backend("clap:/m/clap.pt,text=/m/roberta,enable_fusion=false,batch_size=4")
    assert isinstance(clap, ClapBackend) and clap.args == ("/m/clap.pt", "/m/roberta", False, 4)
    with pytest.raises(ValueError, match="not both"):
        load_backend("clap:/m/clap.pt,text=/a,text_model=/b")


# ----------------------------------------------------------------------------------------------- cache


def test_reference_stats_cache_hits_and_misses(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, n_shards=2, per_shard=3, seconds=[0.5, 0.3, 0.4, 0.5, 0.6, 0.35])
    cache = tmp_path / "cache"
    backend = Bands()
    mu, sigma, n = reference_stats(backend, str(shards), cache, batch_size=4, progress=False)
    first_calls = backend.calls
    assert first_calls > 0 and mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (6,) and sigma.shape == (6, 6)
    d_mu, d_sigma, d_n = _direct_stats(backend, _shard_clips(shards))
    assert n == d_n == sum(1 + (round(s * 16000) - 400) // 160 for s in [0.5, 0.3, 0.4, 0.5, 0.6, 0.35])
    torch.testing.assert_close(mu, d_mu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sigma, d_sigma, rtol=1e-9, atol=1e-10)

    backend.calls = 0
    again = reference_stats(backend, str(shards), cache, batch_size=2, progress=False)
    assert backend.calls == 0 and torch.equal(again[0], mu) and torch.equal(again[1], sigma) and again[2] == n

    clip = reference_stats(backend, str(shards), cache, per="clip", progress=False)
    c_mu, c_sigma, c_n = _direct_stats(backend, _shard_clips(shards), per="clip")
    assert clip[2] == c_n == 6 and backend.calls > 0
    torch.testing.assert_close(clip[1], c_sigma, rtol=1e-9, atol=1e-10)
    backend.calls = 0
    assert reference_stats(backend, str(shards), cache, max_items=4, progress=False)[2] < n
    assert backend.calls > 0

    other = Bands(offset=1e-3)  # another backend setting: another identity
    reference_stats(other, str(shards), cache, progress=False)
    assert other.calls > 0 and other.id() != backend.id()

    backend.calls = 0
    shard = sorted(shards.glob("shard-*.tar"))[1]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: same bytes, new mtime
    reference_stats(backend, str(shards), cache, progress=False)
    assert backend.calls > 0
    assert len(list(cache.glob("*.json"))) == len(list(cache.glob("*.safetensors"))) == 5
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_reference_stats_recomputes_a_damaged_cache(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, n_shards=1, per_shard=3, seconds=0.3)
    cache = tmp_path / "cache"
    backend = Bands()
    mu, sigma, n = reference_stats(backend, str(shards), cache, progress=False)
    (tensors,) = cache.glob("*.safetensors")
    (meta,) = cache.glob("*.json")
    data = bytearray(tensors.read_bytes())
    data[-8:] = b"\xff" * 8  # flipped values: still parses, the sha256 catches it
    tensors.write_bytes(bytes(data))
    backend.calls = 0
    assert torch.equal(reference_stats(backend, str(shards), cache, progress=False)[1], sigma)
    assert backend.calls > 0
    tensors.write_bytes(tensors.read_bytes()[:40])  # truncated
    backend.calls = 0
    assert torch.equal(reference_stats(backend, str(shards), cache, progress=False)[0], mu)
    assert backend.calls > 0
    meta.write_text("{not json")
    backend.calls = 0
    assert reference_stats(backend, str(shards), cache, progress=False)[2] == n and backend.calls > 0
    backend.calls = 0
    reference_stats(backend, str(shards), cache, progress=False)
    assert backend.calls == 0  # repaired


def test_corrupt_audio_is_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, n_shards=2, per_shard=4, seconds=0.3, corrupt={1, 5})
    cache = tmp_path / "cache"
    backend = Bands()
    with caplog.at_level(logging.WARNING, logger="ostinato.metrics.embeddings.cache"):
        mu, sigma, n = reference_stats(backend, str(shards), cache, progress=False)
    report = _entry(cache, "stats-frame")
    assert (report["corrupt"], report["clips"], report["n"]) == (2, 6, n)
    assert len(report["skipped"]) == 2 and all("cannot decode" in s for s in report["skipped"])
    assert "2 corrupt clips skipped" in caplog.text
    d_mu, d_sigma, d_n = _direct_stats(backend, _shard_clips(shards))
    assert n == d_n == 6 * (1 + (4800 - 400) // 160)
    torch.testing.assert_close(sigma, d_sigma, rtol=1e-9, atol=1e-10)

    # audio files: one garbage file skipped, one too short for a frame counted as empty
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.flac").write_bytes(encode_flac(tone(220, 0.5, 16000), 16000))
    (files / "b.wav").write_bytes(b"RIFF garbage")
    (files / "c.flac").write_bytes(encode_flac(tone(330, 0.01, 16000), 16000))
    with pytest.raises(ValueError, match="at least 2 clips.*1 corrupt, 1 shorter"):
        reference_stats(backend, str(files), None, per="clip", progress=False)


def test_reference_embeddings_files_mixed_rates_and_cache(tmp_path: Path) -> None:
    files = []
    for i, (sr, ch, sec) in enumerate([(16000, 1, 0.5), (44100, 2, 0.5), (16000, 1, 0.7), (16000, 1, 0.5)]):
        path = tmp_path / f"clip{i}.flac"
        path.write_bytes(encode_flac(tone(200 + 50 * i, sec, sr, ch), sr))
        files.append(str(path))
    backend = Bands()
    clips = reference_embeddings(backend, list(reversed(files)), tmp_path / "cache", batch_size=3, progress=False)
    assert len(clips) == 4
    for path, frames in zip(files, clips):  # sorted walk order, equal to one clip at a time
        wav, sr = load_audio(path)
        torch.testing.assert_close(frames, backend.embed_audio(wav[None], sr)[0])
    backend.calls = 0
    cached = reference_embeddings(backend, files, tmp_path / "cache", progress=False)
    assert backend.calls == 0 and all(torch.equal(a, b) for a, b in zip(clips, cached))
    assert _entry(tmp_path / "cache", "embeddings")["names"] == files
    mu, sigma, n = reference_stats(backend, files, None, progress=False)
    x = torch.cat(clips).double()
    assert n == len(x)
    torch.testing.assert_close(sigma, torch.cov(x.T), rtol=1e-9, atol=1e-10)
