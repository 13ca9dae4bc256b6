"""ClapBackend: a laion-clap checkpoint and a local RoBERTa folder, loaded with no network, give laion_clap's own
``CLAP_Module`` embeddings.

The checkpoint is a randomly initialised HTSAT-tiny CLAP written in the layout of the released ones (``state_dict``
with DDP ``module.`` prefixes and the ``text_branch.embeddings.position_ids`` buffer). Its text branch is a one-layer
RoBERTa of width 768 (CLAP's text projection is ``Linear(768, 512)``) whose tokenizer is a byte-level BPE trained here
on a few captions: roberta-base's tokenizer is the same kind of tokenizer (same class, special tokens and ids
``<s>=0 <pad>=1 </s>=2``), only with a larger vocabulary, and it cannot be had offline.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from ostinato.metrics.embeddings.clap import ClapBackend, import_laion_clap, quantize_int16, window_starts

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

CAPTIONS = ["a calm piano melody", "loud drums and a distorted bass", "a violin solo in a large hall",
            "electronic dance music with bright synths"]
SR = 48000


class NetworkUsed(RuntimeError):
    pass


def _no_network(*args, **kwargs):
    raise NetworkUsed(f"network access attempted: {args}")


def _forbid_network(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(socket.socket, "connect", _no_network)
    mp.setattr(socket, "create_connection", _no_network)


def _write_text_model(folder: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(str(folder))
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                           intermediate_size=256, max_position_embeddings=80, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    RobertaModel(config).save_pretrained(str(folder))


def _clap_module(text_model: Path):
    """laion_clap's own CLAP_Module (HTSAT-tiny), its two hub look-ups pointed at ``text_model``."""
    import importlib

    import laion_clap.hook as hook
    from transformers import RobertaModel, RobertaTokenizer

    model_module = importlib.import_module(importlib.import_module(hook.create_model.__module__).CLAP.__module__)

    class LocalRobertaModel:
        @staticmethod
        def from_pretrained(name, *a, **k):
            assert name == "roberta-base"
            return RobertaModel.from_pretrained(str(text_model))

    class LocalRobertaTokenizer:
        @staticmethod
        def from_pretrained(name, *a, **k):
            assert name == "roberta-base"
            return RobertaTokenizer.from_pretrained(str(text_model))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(model_module, "RobertaModel", LocalRobertaModel)
        m.setattr(hook, "RobertaTokenizer", LocalRobertaTokenizer)
        return hook.CLAP_Module(enable_fusion=False, device="cpu", amodel="HTSAT-tiny")


@pytest.fixture(scope="module")
def clap_files(tmp_path_factory) -> dict:
    """A random CLAP checkpoint in the released layout, its RoBERTa folder, and laion_clap's CLAP_Module that
    loaded the checkpoint with its own ``load_ckpt``."""
    with pytest.MonkeyPatch.context() as mp:
        _forbid_network(mp)  # laion_clap loads 3 tokenizers from the hub when imported: import_laion_clap stops it
        import_laion_clap()  # installed by `make install`: an ImportError is a broken install, not a skip
        root = tmp_path_factory.mktemp("clap")
        _write_text_model(root / "roberta")
        torch.manual_seed(0)
        reference = _clap_module(root / "roberta")
        with torch.no_grad():  # non-trivial buffers, so that a forgotten buffer shows
            bn = reference.model.audio_branch.bn0
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        state = {f"module.{k}": v.clone() for k, v in reference.model.state_dict().items()}
        state["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]
        checkpoint = root / "630k-random.pt"
        torch.save({"epoch": 1, "name": "random", "state_dict": state}, checkpoint)

        with torch.no_grad():  # scrambled: all must come back from the checkpoint, through laion_clap's load_ckpt
            for t in reference.model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn_like(t))
        reference.load_ckpt(str(checkpoint), verbose=False)
        assert all(torch.equal(v, state[f"module.{k}"]) for k, v in reference.model.state_dict().items())
        return {"checkpoint": checkpoint, "text_model": root / "roberta", "reference": reference}


@pytest.fixture(scope="module")
def backend(clap_files) -> ClapBackend:
    with pytest.MonkeyPatch.context() as mp:
        _forbid_network(mp)
        return ClapBackend(clap_files["checkpoint"], clap_files["text_model"], amodel="HTSAT-tiny")


def test_clap_backend_attributes_and_id(backend, clap_files):
    assert (backend.name, backend.has_text, backend.sample_rate, backend.channels, backend.dim) == \
        ("clap", True, 48000, 1, 512)
    assert backend.window_seconds == backend.hop_seconds == 10.0
    assert backend.id() == backend.id() and backend.id().startswith("clap:")
    assert str(clap_files["checkpoint"]) in backend.id() and backend.weights in backend.id()
    assert [f.shape for f in backend.embed(torch.zeros(2, 1, 0))] == [(0, 512), (0, 512)]
    with pytest.raises(ValueError, match="embed_audio"):
        backend.embed(torch.zeros(1, 2, SR))  # stereo goes through embed_audio (channel mean)


def test_clap_audio_matches_laion_clap(backend, clap_files):
    """Two 3 s clips (repeat-padded to 10 s, int16 round trip) and a 15 s clip (windows 0-10 s and 5-15 s)."""
    ref = clap_files["reference"]
    g = torch.Generator().manual_seed(0)
    short = (0.3 * torch.randn(2, 1, 3 * SR, generator=g)).clamp(-1.2, 1.2)  # some samples beyond +-1
    ours = backend.embed(short)
    theirs = torch.from_numpy(ref.get_audio_embedding_from_data(short[:, 0].numpy()))
    assert [f.shape for f in ours] == [(1, 512), (1, 512)]
    print("audio max abs diff (short):", (torch.cat(ours) - theirs).abs().max().item())
    assert (torch.cat(ours) - theirs).abs().max().item() <= 1e-5
    assert torch.allclose(torch.cat(ours).norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)

    long = 0.2 * torch.randn(1, 1, 15 * SR, generator=g)
    (frames,) = backend.embed(long)
    x = long[0, 0].numpy()
    windows = np.stack([x[0:10 * SR], x[5 * SR:15 * SR]])  # the last window ends with the clip
    theirs = torch.from_numpy(ref.get_audio_embedding_from_data(windows))
    assert frames.shape == (2, 512)
    print("audio max abs diff (long):", (frames - theirs).abs().max().item())
    assert (frames - theirs).abs().max().item() <= 1e-5


def test_clap_text_matches_laion_clap(backend, clap_files):
    ours = backend.embed_text(CAPTIONS[:3])
    theirs = torch.from_numpy(clap_files["reference"].get_text_embedding(CAPTIONS[:3]))
    assert ours.shape == (3, 512)
    print("text max abs diff:", (ours - theirs).abs().max().item())
    assert (ours - theirs).abs().max().item() <= 1e-5
    with pytest.raises(TypeError, match="list of strings"):
        backend.embed_text("one caption")


def test_clap_preprocessing_helpers():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 1e-5, 0.123456, 0.99999, 1.5])
    from laion_clap.training.data import float32_to_int16, int16_to_float32

    expected = torch.from_numpy(int16_to_float32(float32_to_int16(x.numpy())))
    assert torch.equal(quantize_int16(x), expected)
    assert window_starts(0, 10) == [] and window_starts(7, 10) == [0] and window_starts(10, 10) == [0]
    assert window_starts(20, 10) == [0, 10] and window_starts(25, 10) == [0, 10, 15]


def test_clap_errors_name_the_file(tmp_path, clap_files):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ClapBackend(tmp_path / "missing.pt", clap_files["text_model"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        ClapBackend(clap_files["checkpoint"], tmp_path)
    (tmp_path / "config.json").write_text((clap_files["text_model"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ClapBackend(clap_files["checkpoint"], tmp_path)
