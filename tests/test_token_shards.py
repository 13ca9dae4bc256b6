"""Token shards are array shards of one ``codes`` stream with their codec in the manifest, and MuLaN tokens array
shards of one stream per namespace; token shards written in the earlier format (``<key>.npy``,
``ostinato.token-shards/1``) still read, through every reader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from ostinato.data.array_shards import ARRAY_FORMAT, TOKEN_FORMAT, ArrayManifest, ModelInfo
from ostinato.data.arrays import ArrayDataModule
from ostinato.data.dims import data_dims
from ostinato.data.manifest import StreamInfo
from ostinato.data.musiclm_tokens import MuLaNTokens, MusicLMTokenDataModule
from ostinato.data.token_datamodule import TokenDataModule
from ostinato.data.tokens import CodecInfo, TokenManifest, TokenShard, encode_codes, iter_token_samples
from ostinato.fileio import read_json

CODEC = CodecInfo(id="synthetic", hash="0", sample_rate=24000, channels=1, frame_rate=75.0, n_q=4, card=64)
SEM = CodecInfo(id="semantic", hash="1", sample_rate=16000, channels=1, frame_rate=25.0, n_q=1, card=32)


def _codes(info: CodecInfo, i: int, seconds: float = 1.0) -> torch.Tensor:
    """[n_q, F]: frame t of item i holds (t + i) % card."""
    frames = round(seconds * info.frame_rate)
    return ((torch.arange(frames) + i) % info.card)[None].repeat(info.n_q, 1)


def write_tokens(folder: Path, info: CodecInfo, n: int = 4, legacy: bool = False) -> Path:
    """``n`` items in one token shard, in the array format or (``legacy``) the format written before it."""
    folder.mkdir(parents=True)
    entry = "npy" if legacy else "codes.npy"
    with wds.TarWriter(str(folder / "shard-000000.tar")) as w:
        for i in range(n):
            codes = _codes(info, i)
            frames = codes.shape[-1] if legacy else {"codes": codes.shape[-1]}
            meta = {"caption": f"clip {i}", "frames": frames, "frame_rate": info.frame_rate}
            w.write({"__key__": f"s{i:05d}", entry: encode_codes(codes), "json": json.dumps(meta).encode()})
    shards = [TokenShard("shard-000000.tar", n, n * round(info.frame_rate))]
    if legacy:  # the manifest ``ostinato tokenize`` wrote before token shards were array shards
        (folder / "manifest.json").write_text(json.dumps({
            "format": TOKEN_FORMAT, "shards": [vars(s) for s in shards],
            "codec": {**{k: v for k, v in vars(info).items() if k != "card"}, "cardinality": info.card},
            "source": {}, "total_samples": n, "total_frames": shards[0].frames}))
    else:
        TokenManifest(shards=shards, codec=info).save(folder)
    return folder


def test_token_manifest_is_an_array_manifest_with_one_codes_stream(tmp_path):
    folder = write_tokens(tmp_path / "t", CODEC)
    d = read_json(folder / "manifest.json")
    assert d["format"] == ARRAY_FORMAT and list(d["streams"]) == ["codes"] and d["codec"]["card"] == 64
    as_arrays = ArrayManifest.load(folder)
    assert as_arrays.streams == {"codes": StreamInfo(75.0, 4, "int16", 64)} and as_arrays.codec == CODEC
    assert as_arrays.model == ModelInfo("synthetic", "0", "codec", 24000, 1) and as_arrays.total_frames == 300
    assert data_dims(folder)["codec"] == {"sample_rate": 24000, "channels": 1, "frame_rate": 75.0, "n_q": 4,
                                          "card": 64}
    # array shards without a codec are no token shards
    ArrayManifest([], {"latents": StreamInfo(12.5, 8, "float16")},
                  ModelInfo("m", "0", "musika_autoencoder", 24000, 1)).save(tmp_path / "latents")
    with pytest.raises(ValueError, match="no codec tokens"):
        TokenManifest.load(tmp_path / "latents")


@pytest.mark.parametrize("legacy", [False, True])
def test_token_shards_read_alike_in_either_format(tmp_path, legacy):
    folder = write_tokens(tmp_path / "t", CODEC, legacy=legacy)
    manifest = TokenManifest.load(folder)
    assert manifest.codec == CODEC and manifest.total_samples == 4 and manifest.total_frames == 300
    samples = list(iter_token_samples(str(folder / manifest.shards[0].name)))
    assert [k for k, _, _ in samples] == [f"s{i:05d}" for i in range(4)]
    assert all(torch.equal(c, _codes(CODEC, i)) for i, (_, c, _) in enumerate(samples))

    tokens = TokenDataModule(folder, folder, segment_seconds=0.4, batch_size=2, batches_per_epoch=2, num_workers=0)
    tokens.setup("fit")
    assert tokens.codec == CODEC and list(tokens.streams) == ["codes"]
    batch = next(iter(tokens.val_dataloader()))
    assert batch.codes.shape == (2, 4, 30) and batch.lengths.tolist() == [30, 30]
    assert torch.equal(batch.codes[1], _codes(CODEC, 1)[:, :30])
    assert all(b.codes.shape == (2, 4, 30) for b in tokens.train_dataloader())

    arrays = ArrayDataModule(valid=folder, segment_seconds=0.4, batch_size=2, num_workers=0)  # the same reader
    arrays.setup("validate")
    batch = next(iter(arrays.val_dataloader()))
    assert torch.equal(batch.arrays["codes"][1], _codes(CODEC, 1)[:, :30])


def test_musiclm_joins_legacy_and_array_token_shards(tmp_path):
    spec = {"semantic": str(write_tokens(tmp_path / "semantic", SEM, legacy=True)),
            "codec": str(write_tokens(tmp_path / "codec", CODEC))}
    dm = MusicLMTokenDataModule(valid=spec, segment_seconds=0.4, batch_size=2, num_workers=0)
    dm.setup("validate")
    assert dm.semantic == SEM and dm.codec == CODEC
    batch = next(iter(dm.val_dataloader()))
    assert batch.semantic.shape == (2, 1, 10) and batch.codes.shape == (2, 4, 30)
    assert torch.equal(batch.semantic[1], _codes(SEM, 1)[:, :10])
    assert torch.equal(batch.codes[1], _codes(CODEC, 1)[:, :30])


def test_mulan_tokens_are_array_shards(tmp_path):
    keys = ["a", "b", "c"]
    tokens = MuLaNTokens(keys, {"semantic": torch.tensor([[1, 2], [3, 4], [5, 6]]), "coarse": torch.zeros(3, 3).long()},
                         {"semantic": 8, "coarse": 16}, source="mulan-ref", quantizer="q.safetensors")
    tokens.save(tmp_path / "m")
    manifest = ArrayManifest.load(tmp_path / "m")
    assert manifest.model.kind == "mulan" and manifest.model.id == "mulan-ref" and manifest.total_samples == 3
    assert manifest.streams["semantic"] == StreamInfo(0.0, 2, "int16", 8)
    assert data_dims(tmp_path / "m") == {"mulan": {"semantic": {"n_q": 2, "card": 8}, "coarse": {"n_q": 3, "card": 16}}}
    loaded = MuLaNTokens.load(tmp_path / "m")
    assert loaded.keys == keys and loaded.card == tokens.card and loaded.quantizer == "q.safetensors"
    assert all(torch.equal(loaded.tokens[ns], t) for ns, t in tokens.tokens.items())
    with pytest.raises(ValueError, match="not MuLaN tokens"):
        MuLaNTokens.load(write_tokens(tmp_path / "t", CODEC))
