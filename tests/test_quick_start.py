"""``ostinato.load`` of a tiny MusicGen export (what the README's Python quick start loads; tests/test_readme.py runs
that block as written against ``self_contained_export``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import torch
import yaml

from ostinato.models.musicgen import MusicGen
from tests.synth import write_tiny_encodec
from tests.test_app import SR, write_tiny_musicgen


def self_contained_export(folder: Path) -> Path:
    """A tiny MusicGen export whose codec sits inside it, recorded by a relative path (it travels)."""
    codec = write_tiny_encodec(folder.parent / "encodec", SR)
    write_tiny_musicgen(folder, codec)
    shutil.move(str(codec), str(folder / "codec"))
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["family"]["codec"] = "codec"
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_load_returns_the_plain_model(tmp_path: Path) -> None:
    import ostinato

    model = ostinato.load(self_contained_export(tmp_path / "x"))
    assert type(model) is MusicGen and not isinstance(model, L.LightningModule) and not model.training
    assert not any(isinstance(m, L.LightningModule) for m in model.modules())
    assert model.codec_ref == str(tmp_path / "x" / "codec") and model.sample_rate == SR


def test_a_checkpoint_from_before_the_split_still_loads(tmp_path: Path) -> None:
    """A MusicGen checkpoint written when the wrapper was the model (keys ``lm.*``, not ``model.lm.*``)."""
    import ostinato
    from safetensors.torch import load_file

    export = self_contained_export(tmp_path / "x")
    cfg = yaml.safe_load((export / "config.yaml").read_text())
    cfg["family"]["codec"] = str(export / "codec")
    weights = load_file(export / "model.safetensors")
    torch.save({"state_dict": weights, "ostinato_config": cfg}, tmp_path / "old.ckpt")
    model = ostinato.load(tmp_path / "old.ckpt")
    assert type(model) is MusicGen
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
