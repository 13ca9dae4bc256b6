"""Semantic tokens (MusicLM family): frame features, k-means over shards, the tokenizer as a token-shard codec."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from ostinato.cli import main
from ostinato.data.audio import encode_flac, load_audio
from ostinato.data.manifest import Manifest, ShardInfo
from ostinato.encoding.semantic import fit_semantic_tokenizer
from ostinato.data.shards import iter_shard_samples
from ostinato.data.sources import iter_raw_samples
from ostinato.data.token_datamodule import TokenDataModule
from ostinato.data.tokens import TokenManifest, iter_token_samples
from ostinato.models.semantic import (LogMelFeatures, MFCCFeatures, SemanticTokenizer, SSLFeatures,
                                  is_semantic_tokenizer)
from ostinato.encoding.tokens import tokenize

ROOT = Path(__file__).resolve().parents[1]
PITCHES = (130.8, 261.6, 523.3, 1046.5)  # C3..C6


def write_tones(folder: Path, sample_rate: int = 16000, corrupt: bool = False) -> Manifest:
    """Two shards, each pitch twice: 1 s from phase 0 in shard 0, 1.4 s from phase 1 in shard 1; with ``corrupt``
    one more sample of undecodable bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, (seconds, phase) in enumerate([(1.0, 0.0), (1.4, 1.0)]):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for p, freq in enumerate(PITCHES):
                t = torch.arange(round(seconds * sample_rate)) / sample_rate
                wav = 0.5 * torch.sin(2 * torch.pi * freq * t + phase)[None]
                meta = {"caption": f"tone {freq}", "pitch": p}
                w.write({"__key__": f"s{s}p{p}", "flac": encode_flac(wav, sample_rate),
                         "json": json.dumps(meta).encode()})
            if corrupt and s == 1:
                w.write({"__key__": "bad", "flac": b"not a flac" * 10, "json": b"{}"})
        n = len(PITCHES) + int(corrupt and s == 1)
        shards.append(ShardInfo(name=name, samples=n, seconds=seconds * n, bytes=(folder / name).stat().st_size))
    m = Manifest(shards=shards, sample_rate=sample_rate, channels=1)
    m.save(folder)
    return m


def dominant_tokens(tok: SemanticTokenizer, folder: Path) -> dict[tuple[int, int], int]:
    """(shard, pitch) -> most frequent token of the clip."""
    out = {}
    for s, shard in enumerate(sorted(folder.glob("*.tar"))):
        for key, wav, sr, meta in iter_shard_samples(shard):
            out[s, meta["pitch"]] = int(tok.tokens(wav[None], sr)[0, 0].mode().values)
    return out


@pytest.fixture(scope="module")
def tones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tones") / "shards"
    write_tones(folder)
    return folder


@pytest.fixture(scope="module")
def hubert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synth import write_tiny_hubert

    return write_tiny_hubert(tmp_path_factory.mktemp("hubert"), do_normalize=True)


# -- features -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_rate", [25, 50])
def test_mel_features_give_ceil_frames(frame_rate):
    for cls, dim in ((MFCCFeatures, 39), (LogMelFeatures, 64)):
        feats = cls(frame_rate=frame_rate)
        assert feats.hop_length == 16000 // frame_rate and feats.dim == dim
        for t in (1, 100, feats.hop_length - 1, feats.hop_length, feats.hop_length + 1, 16000, 16001):
            y = feats(torch.randn(2, 1, t), 16000)
            assert y.shape == (2, math.ceil(t / feats.hop_length), dim) and y.dtype == torch.float32
        x = torch.randn(3, 2, 24000)  # stereo at 24 kHz: mono, resampled to 16000 samples
        y = feats(x, 24000)
        assert y.shape == (3, 16000 // feats.hop_length, dim) and torch.isfinite(y).all()
        assert torch.allclose(y[1:2], feats(x[1:2], 24000), atol=1e-5)  # per item, whatever the batch


def test_ssl_features_pool_a_hubert_layer_to_the_frame_rate(hubert_folder):
    own = SSLFeatures(hubert_folder, layer=1)
    assert (own.sample_rate, own.frame_rate, own.hop_length, own.dim) == (16000, 50.0, 320, 32)
    at25 = SSLFeatures(hubert_folder, layer=1, frame_rate=25)
    lin = SSLFeatures(hubert_folder, layer=1, frame_rate=25, pooling="linear")
    torch.manual_seed(0)
    for t in (1, 320, 641, 3200, 8001):
        x = torch.randn(2, 1, t)
        h50, h25 = own(x, 16000), at25(x, 16000)
        assert h50.shape == (2, math.ceil(t / 320), 32)
        assert h25.shape == lin(x, 16000).shape == (2, math.ceil(t / 640), 32)
        pairs = torch.nn.functional.avg_pool1d(h50.transpose(1, 2), 2, 2, ceil_mode=True).transpose(1, 2)
        assert torch.allclose(h25, pairs, atol=1e-5)
    layer2 = SSLFeatures(hubert_folder, layer=2, frame_rate=25)(x, 16000)
    assert not torch.allclose(layer2, h25)


# -- fitting ----------------------------------------------------------------------------------------------------
def test_kmeans_separates_pitches_is_deterministic_and_round_trips(tones, tmp_path):
    kw = dict(features="mfcc", k=8, batch_frames=64, iterations=4, workers=0, seed=3, progress=False)
    tok = fit_semantic_tokenizer(tones, tmp_path / "tok", **kw)
    assert (tok.n_q, tok.card, tok.frame_rate, tok.hop_length, tok.sample_rate) == (1, 8, 25.0, 640, 16000)
    assert tok.fit_stats["clips"] == 8 and tok.fit_stats["frames"] == 4 * 25 + 4 * 35
    assert len(tok.fit_stats["passes"]) == 4
    dom = dominant_tokens(tok, tones)
    for p in range(len(PITCHES)):
        assert dom[0, p] == dom[1, p], dom  # same pitch (other length, other phase): same token
    assert len({dom[0, p] for p in range(len(PITCHES))}) == len(PITCHES), dom  # each pitch its own

    again = fit_semantic_tokenizer(tones, None, **kw)
    assert torch.equal(again.centroids, tok.centroids) and again.hash == tok.hash
    other = fit_semantic_tokenizer(tones, None, **{**kw, "seed": 4, "init": "random"})
    assert other.hash != tok.hash

    assert is_semantic_tokenizer(tmp_path / "tok") and not is_semantic_tokenizer(tones)
    loaded = SemanticTokenizer.load(tmp_path / "tok")
    wav = torch.randn(3, 1, 12345)
    assert torch.equal(loaded.tokens(wav, 16000), tok.tokens(wav, 16000))
    assert loaded.tokens(wav, 16000).shape == (3, 1, math.ceil(12345 / 640))
    assert loaded.hash == tok.hash and loaded.fit_stats["seed"] == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        fit_semantic_tokenizer(tones, tmp_path / "tok", **kw)


def test_ssl_tokenizer_saves_and_loads(tones, hubert_folder, tmp_path):
    tok = fit_semantic_tokenizer(tones, tmp_path / "tok", features=f"hf:{hubert_folder}", layer=1, frame_rate=25,
                                 k=4, batch_frames=32, iterations=2, workers=0, device="cpu", progress=False)
    cfg = json.loads((tmp_path / "tok" / "semantic_tokenizer.json").read_text())
    assert cfg["features"]["kind"] == "hf" and cfg["features"]["layer"] == 1 and cfg["features"]["frame_rate"] == 25
    wav = torch.randn(2, 1, 16000)
    assert torch.equal(SemanticTokenizer.load(tmp_path / "tok").tokens(wav, 16000), tok.tokens(wav, 16000))
    (hubert_folder / "extra.safetensors").write_bytes(b"0")  # another model in the folder
    try:
        with pytest.raises(ValueError, match="not the one the tokenizer was fitted on"):
            SemanticTokenizer.load(tmp_path / "tok")
    finally:
        (hubert_folder / "extra.safetensors").unlink()


# -- CLI: prep semantic + tokenize --semantic -------------------------------------------------------------------
def test_cli_prep_semantic_then_tokenize_into_token_shards(tmp_path):
    shards = tmp_path / "shards"
    write_tones(shards, sample_rate=24000, corrupt=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "ostinato.cli"]
    fit = subprocess.run(cli + ["prep", "semantic", str(shards), str(tmp_path / "tok"), "--k", "8", "--frame-rate",
                                "50", "--batch-frames", "128", "--iterations", "2", "--seed", "1", "--workers", "0"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "8 centroids" in fit.stdout and "1 skipped" in fit.stdout
    tok = SemanticTokenizer.load(tmp_path / "tok")
    out = tmp_path / "tokens"
    run = subprocess.run(cli + ["tokenize", str(shards), str(out), "--semantic", str(tmp_path / "tok"),
                                "--workers", "1", "--batch-size", "3"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = TokenManifest.load(out)
    c = manifest.codec
    assert (c.n_q, c.card, c.frame_rate, c.sample_rate, c.channels, c.hash) == (1, 8, 50.0, 16000, 1, tok.hash)
    assert manifest.total_samples == 8 and manifest.source["skipped"] == 1
    audio = {raw["__key__"]: load_audio(raw["flac"]) for shard in sorted(shards.glob("*.tar"))
             for raw in iter_raw_samples(str(shard)) if raw["__key__"] != "bad"}
    for shard in manifest.shards:
        for key, codes, meta in iter_token_samples(str(out / shard.name)):
            wav, sr = audio[key]
            assert codes.shape == (1, math.ceil(wav.shape[-1] * 16000 / sr / 320)) == (1, meta["frames"]["codes"])
            assert torch.equal(codes, tok.tokens(wav[None], sr)[0])

    dm = TokenDataModule(out, segment_seconds=0.8, batch_size=2, batches_per_epoch=2, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.codes.shape == (2, 1, 40) and int(batch.codes.max()) < 8

    # resume: a run that stopped after the first shard redoes only the second
    first, second = (out / s.name for s in manifest.shards)
    mtime = first.stat().st_mtime_ns
    for p in (second, second.with_suffix(".json"), out / "manifest.json"):
        p.unlink()
    resumed = tokenize(str(tmp_path / "tok"), str(shards), out, workers=0, progress=False)
    assert first.stat().st_mtime_ns == mtime and second.is_file()
    assert resumed.total_frames == manifest.total_frames and resumed.source["skipped"] == 1


def test_tokenize_takes_exactly_one_of_codec_and_semantic(tmp_path, capsys):
    for extra in ([], ["--codec", "x", "--semantic", "y"]):
        with pytest.raises(SystemExit) as e:
            main(["tokenize", "shards", str(tmp_path / "out"), *extra])
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["tokenize", "shards", str(tmp_path / "out"), "--semantic", str(tmp_path)])
    assert "ostinato prep semantic" in capsys.readouterr().err
