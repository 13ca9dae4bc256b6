"""Issue 16, generation and evaluation: every bad argument and fault of `ostinato generate`, `eval`, `app` ends in
one line naming the flag (or file) and the fix, exit code 2, checked before any model loads, and nothing
half-written; an export finds its codec from any working directory."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ostinato.cli import main
from ostinato.nn.decoding import GenerationParams
from tests.synth import tone, write_shards, write_tiny_encodec
from tests.disks import tmpfs
from tests.test_app import SR, write_tiny_musicgen

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MusicGen export over a transformers EnCodec, and an ostinato codec export (codec_tiny, untrained)."""
    root = tmp_path_factory.mktemp("models")
    encodec = write_tiny_encodec(root / "encodec", SR)
    musicgen = write_tiny_musicgen(root / "musicgen", encodec)
    codec = root / "codec_export"
    family = OmegaConf.load(ROOT / "conf" / "family" / "codec_tiny.yaml")
    torch.manual_seed(0)
    module = instantiate(family, _convert_="all")
    codec.mkdir()
    save_file({k: v.contiguous() for k, v in module.model.state_dict().items()}, str(codec / "model.safetensors"))
    (codec / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"family": family})))
    wav = tmp_path_factory.mktemp("audio") / "tone.wav"
    sf.write(wav, tone(440, 0.5, SR)[0].numpy(), SR)
    return {"musicgen": musicgen, "encodec": encodec, "codec": codec, "wav": wav, "root": root}


def wrapper_state(export: Path) -> dict[str, torch.Tensor]:
    """A training checkpoint's state dict of an export's model: the wrapper holds it under ``model.``."""
    from safetensors.torch import load_file

    return {f"model.{k}": v for k, v in load_file(export / "model.safetensors").items()}


def fails(capsys: pytest.CaptureFixture, *argv: str, loaded: bool = False) -> str:
    """Run ``ostinato ARGV`` in-process; it must exit 2 with one line on stderr, which is returned. ``loaded``:
    the fault comes after models loaded (their loading bars may come first; the error is the last line)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    if not loaded:
        assert len(err.splitlines()) == 1, err  # one line: no usage block, no progress bar
    return err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------- generate: numbers

@pytest.mark.parametrize("flag, value, words", [
    ("--seconds", "0", "--seconds: must be > 0"),
    ("--seconds", "-3", "--seconds: must be > 0"),
    ("--temperature", "-1", "--temperature: must be >= 0"),
    ("--top-k", "-5", "--top-k: must be >= 0"),
    ("--top-p", "1.5", "--top-p: must be in [0, 1]"),
    ("--top-p", "-0.1", "--top-p: must be in [0, 1]"),
    ("--cfg-scale", "-2", "--cfg-scale: must be >= 0"),
    ("--rerank", "0", "--rerank: must be >= 1"),
    ("--seconds", "ten", "--seconds: not a number"),
    ("--long-form-window", "0", "--long-form-window: must be > 0"),
    ("--long-form-overlap", "-1", "--long-form-overlap: must be >= 0"),
])
def test_generate_refuses_out_of_range_numbers_before_loading(capsys, tmp_path, flag, value, words) -> None:
    # the model does not exist: the argument is refused first, so nothing loads
    line = fails(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out",
                 str(tmp_path / "out"), flag, value)
    assert words in line and value in line
    assert not (tmp_path / "out").exists()


def test_generation_params_check_their_ranges() -> None:
    for bad, words in (({"temperature": -1}, "temperature"), ({"top_k": -5}, "top_k"), ({"top_p": 2}, "top_p"),
                       ({"cfg_scale": -1}, "cfg_scale"), ({"backend": "warp"}, "backend")):
        with pytest.raises(ValueError, match=words):
            GenerationParams(**bad)
    GenerationParams(temperature=0, top_k=0, top_p=1.0, cfg_scale=0)  # the edges are valid


def test_generate_refuses_an_empty_prompt(capsys, tmp_path) -> None:
    line = fails(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "", "--out", str(tmp_path / "o"))
    assert "--prompt" in line and "empty" in line and "no --prompt" in line and "--unconditional N" in line


def test_unconditional_clips_beside_prompts_are_asked_for_by_count(capsys, tmp_path) -> None:
    import argparse

    from ostinato.cli import _prompts

    args = argparse.Namespace(prompt=["a jig"], prompts=None, unconditional=2)
    assert _prompts(args) == ["a jig", "", ""]
    line = fails(capsys, "generate", "--model", str(tmp_path / "nope"), "--unconditional", "0", "--out",
                 str(tmp_path / "o"))
    assert "--unconditional" in line and ">= 1" in line


def test_generate_refuses_a_missing_or_empty_prompts_file(capsys, tmp_path) -> None:
    args = ["generate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    line = fails(capsys, *args, "--prompts", str(tmp_path / "missing.txt"))
    assert "--prompts" in line and "missing.txt" in line
    (tmp_path / "empty.txt").write_text("\n  \n")
    line = fails(capsys, *args, "--prompts", str(tmp_path / "empty.txt"))
    assert "--prompts" in line and "no prompt" in line


@pytest.mark.parametrize("family", ["musicgen", "musiclm", "musika", "jukebox"])
def test_every_family_checks_arguments_before_loading(capsys, tmp_path, family) -> None:
    line = fails(capsys, "generate", "--family", family, "--model", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o"), "--seconds", "-1")
    assert "--seconds" in line


@pytest.mark.parametrize("flag", ["--melody", "--style", "--continue"])
def test_generate_audio_inputs_are_checked_before_loading(capsys, tmp_path, flag) -> None:
    args = ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")]
    line = fails(capsys, *args, flag, str(tmp_path / "missing.wav"))
    assert flag in line and "missing.wav" in line and "no such file" in line
    (tmp_path / "notes.txt").write_text("not audio")
    line = fails(capsys, *args, flag, str(tmp_path / "notes.txt"))
    assert flag in line and "notes.txt" in line and "audio" in line
    line = fails(capsys, *args, flag, str(tmp_path))
    assert flag in line and "folder" in line


# ------------------------------------------------------------------------------------------ generate: the model

def test_generate_with_a_codec_as_model_says_it_is_a_codec(capsys, models, tmp_path) -> None:
    line = fails(capsys, "generate", "--model", str(models["codec"]), "--prompt", "x", "--out", str(tmp_path / "o"),
                 "--seconds", "0.1")
    assert "is a codec" in line and str(models["codec"]) in line and "musicgen" in line
    assert "{" not in line and "not found" not in line


def test_generate_into_a_file_or_a_read_only_folder(capsys, models, tmp_path) -> None:
    args = ["generate", "--model", str(models["musicgen"]), "--prompt", "x", "--seconds", "0.1", "--seed", "0"]
    (tmp_path / "file").write_text("x")
    line = fails(capsys, *args, "--out", str(tmp_path / "file"))
    assert "--out" in line and "not a folder" in line
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        line = fails(capsys, *args, "--out", str(ro / "clips"))
        assert str(ro) in line and "read-only" in line


def test_generate_on_a_full_disk_leaves_no_half_written_clip(capsys, models, tmp_path) -> None:
    with tmpfs(tmp_path / "full", "size=16k") as full:  # 2 s at 24 kHz is ~96 kB of wav: it cannot fit
        line = fails(capsys, "generate", "--model", str(models["musicgen"]), "--prompt", "x", "--seconds", "2",
                     "--seed", "0", "--out", str(full / "clips"), loaded=True)
        assert f"{full / 'clips' / '000.wav'}: no space left on device" in line
        assert sorted(p.name for p in (full / "clips").iterdir()) == []


def test_an_export_finds_its_codec_from_any_folder(models, tmp_path, monkeypatch, capsys) -> None:
    """The codec recorded by the token shards as a path relative to where `tokenize` ran: the export must still
    generate from another working directory with no --codec."""
    work = tmp_path / "work"
    write_shards(work / "shards", n_shards=1, per_shard=2, sample_rate=SR, seconds=0.3)
    (work / "encodec").symlink_to(models["encodec"], target_is_directory=True)
    monkeypatch.chdir(work)
    main(["tokenize", "shards", "tokens", "--codec", "encodec", "--device", "cpu", "--workers", "1"])
    cfg = OmegaConf.to_container(OmegaConf.load(models["musicgen"] / "config.yaml"))
    cfg["family"]["codec"] = None  # the codec of the token shards
    cfg["data"]["train"] = str(work / "tokens")
    torch.save({"state_dict": wrapper_state(models["musicgen"]), "ostinato_config": cfg},
               work / "last.ckpt")
    main(["export", "last.ckpt", "export"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["generate", "--model", str(work / "export"), "--prompt", "x", "--seconds", "0.2", "--seed", "0",
          "--out", "clips", "--quiet"])
    assert (elsewhere / "clips" / "000.wav").is_file()
    assert yaml.safe_load((work / "export" / "config.yaml").read_text())["family"]["codec"] == "codec"
    (work / "export").rename(tmp_path / "moved")  # the export records its codec relative to itself: it travels
    main(["generate", "--model", str(tmp_path / "moved"), "--prompt", "x", "--seconds", "0.2", "--seed", "0",
          "--out", "clips2", "--quiet"])
    assert (elsewhere / "clips2" / "000.wav").is_file()


def test_generate_keeps_an_earlier_runs_clips_unless_told(models, tmp_path, capsys) -> None:
    args = ["generate", "--model", str(models["musicgen"]), "--seconds", "0.1", "--seed", "0", "--quiet",
            "--out", str(tmp_path / "clips")]
    main([*args, "--prompt", "a", "--prompt", "b", "--prompt", "c"])
    first = (tmp_path / "clips" / "000.wav").read_bytes()
    capsys.readouterr()  # the first run's loading bars
    line = fails(capsys, *args, "--prompt", "d")  # refused before the model loads: one line
    assert "--out" in line and "already holds 6 clip files (000.json" in line and "--overwrite" in line
    assert (tmp_path / "clips" / "000.wav").read_bytes() == first
    main([*args, "--prompt", "d", "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == ["000.json", "000.wav"]  # no stale b, c
    assert json.loads((tmp_path / "clips" / "000.json").read_text())["prompt"] == "d"


# -------------------------------------------------------------------------------------------------------- eval

def test_eval_refuses_zero_samples(capsys, tmp_path) -> None:
    line = fails(capsys, "eval", "demo", "--model", str(tmp_path / "nope"), "--num-samples", "0")
    assert "--num-samples" in line and ">= 1" in line


def test_eval_unknown_suite_lists_the_suites(capsys, tmp_path) -> None:
    line = fails(capsys, "eval", "dmeo", "--model", str(tmp_path / "nope"))
    assert "dmeo" in line and "did you mean demo" in line and "codec_demo" in line


def test_eval_bad_set_key_names_the_closest(capsys, tmp_path) -> None:
    line = fails(capsys, "eval", "demo", "--model", str(tmp_path / "nope"), "--set", "num_sample=2")
    assert "num_sample" in line and "did you mean num_samples" in line


def test_eval_reconstruction_of_a_musicgen_says_it_is_a_musicgen(capsys, models, tmp_path) -> None:
    write_shards(tmp_path / "shards", n_shards=1, per_shard=2, sample_rate=SR, seconds=0.3)
    line = fails(capsys, "eval", "codec_demo", "--model", str(models["musicgen"]), "--out", str(tmp_path / "eval"),
                 "--set", f"reference={tmp_path / 'shards'}", "--quiet", loaded=True)
    assert "is a MusicGen" in line and "codec" in line and str(models["encodec"]) in line


# --------------------------------------------------------------------------------------------------------- app

def test_app_port_out_of_range(capsys, tmp_path) -> None:
    line = fails(capsys, "app", "--model", str(tmp_path / "nope"), "--port", "70000")
    assert "--port" in line and "70000" in line and "65535" in line


def test_app_port_in_use(capsys, models) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = fails(capsys, "app", "--model", str(models["musicgen"]), "--port", str(port), "--device", "cpu")
    assert f"--port {port}" in line and "in use" in line


def test_the_cli_in_a_process_is_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("ostinato: error: --prompt '': an empty prompt")


@pytest.mark.parametrize("verb", [["generate", "--prompt", "x", "--out", "o"], ["eval", "demo"], ["app"],
                                  ["generate", "--family", "musika", "--out", "o"]])
def test_a_model_that_is_nothing_names_the_flag_and_what_it_takes(capsys, tmp_path, monkeypatch, verb) -> None:
    monkeypatch.chdir(tmp_path)
    line = fails(capsys, *verb, "--model", "nope")
    assert "--model nope: no such file, folder or XP signature" in line and "export" in line


def test_eval_into_a_file_names_out_before_loading(capsys, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    line = fails(capsys, "eval", "demo", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "file"))
    assert "--out" in line and "not a folder" in line


def test_other_families_print_no_progress_bar_before_an_error(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--family", "musiclm", "--out", str(tmp_path / "o"), "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err.splitlines()[-1]] and "--semantic" in err


def test_every_wav_writer_fails_on_a_full_disk_naming_the_file_and_leaving_nothing(tmp_path) -> None:
    """eval's clips, the app's, generate's, the demo's and the training samples share ``ostinato.fileio.write_wav``:
    ENOSPC names the file, no temp file stays."""
    import errno

    from ostinato.errors import user_message
    from ostinato.fileio import write_wav

    with tmpfs(tmp_path / "full", "size=16k") as full:
        with pytest.raises(OSError) as e:
            write_wav(full / "000.wav", tone(440, 2.0, SR), SR)
        assert e.value.errno == errno.ENOSPC
        assert user_message(e.value) == f"{full / '000.wav'}: no space left on device; free some space or write " \
                                        "elsewhere"
        assert list(full.iterdir()) == []


def test_a_codec_that_is_nothing_names_the_flag(capsys, models, tmp_path) -> None:
    line = fails(capsys, "generate", "--model", str(models["musicgen"]), "--codec", str(tmp_path / "nocodec"),
                 "--prompt", "x", "--out", str(tmp_path / "o"))
    assert f"--codec {tmp_path / 'nocodec'}: no such file" in line and "EncodecModel" in line


def test_app_host_that_is_no_address(capsys, tmp_path) -> None:
    line = fails(capsys, "app", "--model", str(tmp_path / "nope"), "--host", "no.such.host.invalid")
    assert "--host no.such.host.invalid" in line and "127.0.0.1" in line


def test_eval_sampling_setting_out_of_range_names_the_suite_key(capsys, tmp_path) -> None:
    line = fails(capsys, "eval", "demo", "--model", str(tmp_path / "nope"), "--set", "generation.top_p=2")
    assert "demo.yaml: generation (set by --set): top_p=2: must be in [0, 1]" in line


def test_musiclm_stage_that_is_nothing_names_its_flag(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = fails(capsys, "generate", "--family", "musiclm", "--semantic", "s", "--coarse", "c", "--fine", "f",
                 "--prompt", "x", "--out", "o")
    assert "--semantic s: no such file, folder or XP signature" in line and "semantic stage" in line


def test_eval_text_to_music_with_a_codec_says_it_is_a_codec(capsys, models, tmp_path) -> None:
    write_shards(tmp_path / "shards", n_shards=1, per_shard=2, sample_rate=SR, seconds=0.3)
    line = fails(capsys, "eval", "demo", "--model", str(models["codec"]), "--out", str(tmp_path / "eval"),
                 "--set", f"reference={tmp_path / 'shards'}", "--quiet")
    assert f"--model {models['codec']} is a codec" in line and "codec_demo" in line


def test_eval_on_a_full_disk_is_one_line_and_leaves_no_half_written_file(capsys, models, tmp_path) -> None:
    write_shards(tmp_path / "shards", n_shards=1, per_shard=2, sample_rate=SR, seconds=0.5)
    with tmpfs(tmp_path / "full", "size=32k") as full:
        line = fails(capsys, "eval", "codec_demo", "--model", str(models["encodec"]), "--out", str(full / "eval"),
                     "--set", f"reference={tmp_path / 'shards'}", "--set", f"embedding=codec:{models['encodec']}",
                     "--num-samples", "2", "--set", "seconds=0.5", "--quiet", loaded=True)
        assert f"{full / 'eval'}" in line and "no space left on device" in line
        leftovers = [p for p in (full / "eval").rglob("*") if p.is_file()]
        assert not [p for p in leftovers if p.name.endswith(".tmp")], leftovers


@pytest.mark.parametrize("flags, words", [
    (["--long-form-window", "0.5", "--long-form-stride", "0.8"],
     "stride 0.8 s must be > 0 and at most the window (0.5 s): lower --long-form-stride or raise --long-form-window"),
    (["--long-form-mode", "chain", "--long-form-window", "0.5", "--long-form-overlap", "0.5"],
     "overlap 0.5 s must be >= 0 and shorter than the window (0.5 s): lower --long-form-overlap"),
])
def test_long_form_settings_that_cannot_work_name_the_flags(capsys, models, tmp_path, flags, words) -> None:
    line = fails(capsys, "generate", "--model", str(models["musicgen"]), "--prompt", "x", "--seconds", "1.2",
                 "--out", str(tmp_path / "o"), *flags, loaded=True)
    assert words in line
    assert not (tmp_path / "o").exists()


def test_token_shards_record_their_codec_so_an_xp_generates_from_any_folder(models, tmp_path, monkeypatch) -> None:
    """`tokenize --codec RELATIVE`: the manifest records where the codec is, not how it was spelled, so a MusicGen
    trained on those shards (here its checkpoint, not an export) generates from another folder with no --codec."""
    import json

    work = tmp_path / "work"
    write_shards(work / "shards", n_shards=1, per_shard=2, sample_rate=SR, seconds=0.3)
    (work / "encodec").symlink_to(models["encodec"], target_is_directory=True)
    monkeypatch.chdir(work)
    main(["tokenize", "shards", "tokens", "--codec", "encodec", "--device", "cpu", "--workers", "1"])
    assert json.loads((work / "tokens" / "manifest.json").read_text())["codec"]["id"] == str(models["encodec"])
    cfg = OmegaConf.to_container(OmegaConf.load(models["musicgen"] / "config.yaml"))
    cfg["family"]["codec"] = None
    cfg["data"]["train"] = str(work / "tokens")
    torch.save({"state_dict": wrapper_state(models["musicgen"]), "ostinato_config": cfg},
               work / "last.ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["generate", "--model", str(work / "last.ckpt"), "--prompt", "x", "--seconds", "0.2", "--seed", "0",
          "--out", "clips", "--quiet"])
    assert (elsewhere / "clips" / "000.wav").is_file()


@pytest.mark.parametrize("verb", [["eval", "demo"], ["app"]])
def test_a_device_that_is_none_is_one_line_before_loading(capsys, tmp_path, verb) -> None:
    line = fails(capsys, *verb, "--model", str(tmp_path / "nope"), "--device", "gpu")
    assert "--device: not a device: 'gpu'; use auto, cpu, cuda or cuda:N" in line
    if not torch.cuda.is_available():
        line = fails(capsys, *verb, "--model", str(tmp_path / "nope"), "--device", "cuda")
        assert "--device: cuda: no GPU is visible" in line


def test_app_out_that_is_a_file(capsys, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    line = fails(capsys, "app", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "file"))
    assert "--out" in line and "not a folder" in line
