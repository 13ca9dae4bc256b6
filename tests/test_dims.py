"""Dimensions declared once: ``${manifest:...}`` gives a family the rates, codebook counts and sizes and feature
widths its training data's manifest records (token, array, MuLaN token manifests), and its fallback only where
the data is absent."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ostinato.data.arrays import ArrayManifest, ModelInfo
from ostinato.data.dims import data_dims, read_manifests, register_resolvers
from ostinato.data.manifest import StreamInfo
from ostinato.data.musiclm_tokens import MuLaNTokens
from ostinato.data.tokens import CodecInfo, TokenManifest
from ostinato.store.records import conf_dir

register_resolvers()


@pytest.fixture(autouse=True)
def reading():
    read_manifests()
    yield
    read_manifests(False)


def _tokens(folder: Path, n_q: int, card: int, frame_rate: float = 50.0) -> Path:
    codec = CodecInfo(id="c", hash="0", sample_rate=16000, channels=1, frame_rate=frame_rate, n_q=n_q,
                      card=card)
    TokenManifest(shards=[], codec=codec).save(folder.mkdir(parents=True) or folder)
    return folder


def _family(*overrides: str) -> dict:
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.family, resolve=True)


def test_a_token_family_reads_n_q_and_card_from_its_tokens(tmp_path: Path):
    tokens = _tokens(tmp_path / "tokens", n_q=2, card=32)
    family = _family("experiment=musicgen_tiny", f"data.train={tokens}", "data.valid=null", "data.test=null")
    assert (family["n_q"], family["card"]) == (2, 32)
    assert data_dims(tokens)["codec"] == {"sample_rate": 16000, "channels": 1, "frame_rate": 50.0, "n_q": 2,
                                          "card": 32}
    absent = _family("experiment=musicgen_tiny", f"data.train={tmp_path / 'none'}")
    assert (absent["n_q"], absent["card"]) == (4, 256)  # the fallback: a config composed without its data


def test_musiclm_stages_read_semantic_codec_and_mulan_sizes(tmp_path: Path):
    spec = {"semantic": _tokens(tmp_path / "semantic", 1, 48, 25.0), "codec": _tokens(tmp_path / "codec", 3, 128),
            "mulan": tmp_path / "mulan"}
    MuLaNTokens(["a"], {"semantic": torch.zeros(1, 5, dtype=torch.long), "coarse": torch.zeros(1, 6, dtype=torch.long)},
                {"semantic": 16, "coarse": 24}).save(spec["mulan"])
    splits = [f"data.train.{k}={v}" for k, v in spec.items()] + ["data.valid=null", "data.test=null"]
    coarse = _family("experiment=musiclm_coarse_tiny", *splits)
    assert (coarse["card"], coarse["semantic_card"], coarse["mulan_n_q"], coarse["mulan_card"]) == (128, 48, 6, 24)
    semantic = _family("experiment=musiclm_semantic_tiny", *splits)
    assert (semantic["card"], semantic["mulan_n_q"], semantic["mulan_card"]) == (48, 5, 16)
    fine = _family("experiment=musiclm_fine_tiny", *splits)
    assert (fine["n_q"], fine["card"]) == (3, 128)


def test_array_families_read_widths_and_codebook_sizes(tmp_path: Path):
    model = ModelInfo(id="m", hash="0", kind="k", sample_rate=16000, channels=1)
    latents, codes = tmp_path / "latents", tmp_path / "codes"
    ArrayManifest([], {"latents": StreamInfo(12.5, 24, "float16")}, model).save(latents.mkdir() or latents)
    ArrayManifest([], {n: StreamInfo(r, 1, "int16", 64) for n, r in (("top", 10.0), ("middle", 40.0))},
                  model).save(codes.mkdir() or codes)
    musika = _family("experiment=musika_tiny", f"data.train={latents}", "data.valid=null", "data.test=null")
    assert musika["dimension"] == 24
    top = _family("experiment=jukebox_top_tiny", f"data.train={codes}", "data.valid=null", "data.test=null")
    assert top["card"] == 64


def test_without_a_fallback_a_missing_manifest_is_named(tmp_path: Path):
    cfg = OmegaConf.create({"data": {"train": str(tmp_path / "none")}, "n_q": "${manifest:codec.n_q}"})
    with pytest.raises(Exception, match=r"manifest:codec.n_q.*no manifest at .*none"):
        OmegaConf.to_container(cfg, resolve=True)
    _tokens(tmp_path / "none", 2, 32)
    assert OmegaConf.to_container(cfg, resolve=True)["n_q"] == 2
    cfg.n_q = "${manifest:codec.bogus}"
    with pytest.raises(Exception, match=r"has no 'bogus'"):
        OmegaConf.to_container(cfg, resolve=True)


def test_until_a_run_reads_them_the_fallbacks_stand(tmp_path: Path):
    """dora's XP signature hashes the resolved config: it must not change when the data is written."""
    tokens = _tokens(tmp_path / "tokens", n_q=2, card=32)
    read_manifests(False)
    family = _family("experiment=musicgen_tiny", f"data.train={tokens}")
    assert (family["n_q"], family["card"]) == (4, 256)



def test_manifests_written_before_card_still_load(tmp_path: Path):
    """Codebook size is ``card`` everywhere now; manifests that said ``cardinality`` or ``bins`` still read."""
    import json

    _tokens(tmp_path / "t", 2, 32)
    path = tmp_path / "t" / "manifest.json"
    old = json.loads(path.read_text())
    old["codec"]["cardinality"] = old["codec"].pop("card")
    path.write_text(json.dumps(old))
    assert TokenManifest.load(tmp_path / "t").codec.card == 32 and data_dims(tmp_path / "t")["codec"]["card"] == 32
    model = ModelInfo(id="m", hash="0", kind="k", sample_rate=16000, channels=1)
    (tmp_path / "a").mkdir()
    ArrayManifest([], {"top": StreamInfo(10.0, 1, "int16", 64)}, model).save(tmp_path / "a")
    path = tmp_path / "a" / "manifest.json"
    old = json.loads(path.read_text())
    old["streams"]["top"]["cardinality"] = old["streams"]["top"].pop("card")
    path.write_text(json.dumps(old))
    assert ArrayManifest.load(tmp_path / "a").streams["top"].card == 64
    # MuLaN tokens of the format before array shards (``mulan_tokens.npz``), their codebook size named bins
    (tmp_path / "m").mkdir()
    np.savez(tmp_path / "m" / "mulan_tokens.npz", keys=np.array(["a"], dtype=str),
             tokens_semantic=np.zeros((1, 5), dtype=np.int16))
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({
        "format": "ostinato.mulan-tokens/1", "samples": 1, "source": "", "quantizer": "",
        "namespaces": {"semantic": {"n_q": 5, "bins": 16}}}))
    assert MuLaNTokens.load(tmp_path / "m").card == {"semantic": 16}
    assert data_dims(tmp_path / "m")["mulan"]["semantic"]["card"] == 16
