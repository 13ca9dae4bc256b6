"""Issue 16, import: audiocraft files as audiocraft's own exporters write them (an ``xp.cfg`` with dora's
``/checkpoint/${oc.env:USER}/...``) import where no USER is set, and a source that is no MusicGen is one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ostinato.cli import main
from ostinato.interop.codecs import load_codec
from ostinato.interop.encodec import export_audiocraft_encodec, load_audiocraft_encodec
from tests.synth import write_tiny_encodec
from tests.disks import tmpfs
from tests.test_musicgen_import import audiocraft_checkpoint, hf_musicgen  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

# what audiocraft's solvers put in every xp.cfg; the model never reads it, and USER is unset in containers and CI
DORA = {"dir": "/checkpoint/${oc.env:USER}/experiments/audiocraft/outputs", "exclude": ["device"]}


@pytest.fixture
def no_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USER", raising=False)


def test_compression_state_dict_imports_without_user(tmp_path: Path, no_user) -> None:
    codec = load_codec(write_tiny_encodec(tmp_path / "encodec"))
    path = export_audiocraft_encodec(codec, tmp_path / "compression_state_dict.bin")
    package = torch.load(path, weights_only=True)
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.dora = DORA
    torch.save({**package, "xp.cfg": OmegaConf.to_yaml(cfg)}, path)
    loaded = load_audiocraft_encodec(path)
    wav = 0.1 * torch.randn(1, 1, 2400)
    with torch.no_grad():
        assert torch.equal(loaded.encode(wav).codes, codec.encode(wav).codes)


def test_state_dict_imports_without_user(hf_musicgen, tmp_path: Path, no_user, capsys,  # noqa: F811
                                         monkeypatch) -> None:
    lm, t5, encodec = audiocraft_checkpoint(hf_musicgen, tmp_path, monkeypatch)
    package = torch.load(tmp_path / "state_dict.bin", weights_only=True)
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.dora = DORA
    torch.save({**package, "xp.cfg": OmegaConf.to_yaml(cfg)}, tmp_path / "state_dict.bin")
    main(["import", str(tmp_path / "state_dict.bin"), str(tmp_path / "out"), "--text-encoder", str(t5), "--codec",
          str(encodec)])
    assert "audiocraft" in capsys.readouterr().out
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "out" / "model.safetensors")  # parity: tests/test_audiocraft_parity.py
    assert torch.equal(weights["lm.heads.0.weight"], lm.linears[0].weight)


def test_an_interpolation_the_importer_reads_names_the_key(tmp_path: Path, no_user) -> None:
    codec = load_codec(write_tiny_encodec(tmp_path / "encodec"))
    path = export_audiocraft_encodec(codec, tmp_path / "compression_state_dict.bin")
    package = torch.load(path, weights_only=True)
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.sample_rate = "${oc.env:USER}"
    torch.save({**package, "xp.cfg": OmegaConf.to_yaml(cfg)}, path)
    with pytest.raises(ValueError, match=r"xp\.cfg.*sample_rate.*USER"):
        load_audiocraft_encodec(path)


def fails(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_import_of_a_folder_that_is_no_musicgen(tmp_path: Path, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    line = fails(capsys, "import", str(tmp_path / "src"), str(tmp_path / "out"))
    assert str(tmp_path / "src") in line and "state_dict.bin" in line and "config.json" in line
    assert "give the folder save_pretrained wrote" in line  # and the fix
    assert not (tmp_path / "out").exists()
    line = fails(capsys, "import", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert "missing: no such file or folder; give a transformers MusicGen folder" in line


def test_import_of_a_file_that_is_not_a_checkpoint(tmp_path: Path, capsys) -> None:
    (tmp_path / "state_dict.bin").write_bytes(b"not a torch file")
    line = fails(capsys, "import", str(tmp_path / "state_dict.bin"), str(tmp_path / "out"))
    assert "state_dict.bin" in line and "not" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_import_into_an_existing_folder_names_the_flag(tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "src").mkdir()
    line = fails(capsys, "import", str(tmp_path / "src"), str(tmp_path / "out"))
    assert "--overwrite" in line


def test_import_flags_that_name_nothing(hf_musicgen, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    _, folder = hf_musicgen
    line = fails(capsys, "import", str(folder), str(tmp_path / "out"), "--codec", str(tmp_path / "nocodec"))
    assert f"--codec {tmp_path / 'nocodec'}" in line and "no such" in line
    audiocraft_checkpoint(hf_musicgen, tmp_path, monkeypatch)
    capsys.readouterr()  # transformers' saving progress
    line = fails(capsys, "import", str(tmp_path / "state_dict.bin"), str(tmp_path / "out"), "--text-encoder",
                 str(tmp_path / "not"))
    assert f"--text-encoder {tmp_path / 'not'}" in line and "no such" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize("mount", ["size=64k,ro", "size=64k"], ids=["read-only", "full"])
def test_import_into_a_read_only_or_full_disk_leaves_nothing(hf_musicgen, tmp_path: Path, capsys,  # noqa: F811
                                                              mount) -> None:
    _, folder = hf_musicgen
    with tmpfs(tmp_path / "disk", mount) as disk:
        line = fails(capsys, "import", str(folder), str(disk / "out"))
        assert line.startswith(f"ostinato: error: {disk / 'out'}: ")
        assert ("read-only file system" if "ro" in mount else "no space left on device") in line
        assert list(disk.iterdir()) == []
