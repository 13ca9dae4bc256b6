"""MusicGen conditioned on text + melody + style, trained through `ostinato train`, then generating three training
windows in every mode (text, melody, style, continuation; sliding window and chaining) through the library and
the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

import ostinato
from ostinato.nn.decoding import GenerationParams
from ostinato.generation.musicgen import LongForm, generate_audio
from ostinato.generation.request import AudioInput
from ostinato.interop.codecs import load_codec
from tests.runner import train, xp_folder
from tests.synth import tone, write_tiny_encodec
from tests.test_musicgen_family import write_token_shards

os.environ["HF_HUB_OFFLINE"] = "1"
SEGMENT = 1.0  # training window (s); generation asks for three of them


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict:
    root = tmp_path_factory.mktemp("modes")
    write_tiny_encodec(root / "codec")
    codec = load_codec(root / "codec")
    for i, split in enumerate(("train", "valid", "test")):
        write_token_shards(root / "data" / "demo" / "tokens" / split, [150] * 4, first_index=100 * i)
    run_env = {**env, "OSTINATO_DATA": str(root / "data"), "OSTINATO_OUTPUTS": str(root / "out"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = ["experiment=musicgen_tiny", "family=musicgen_tiny_melody_style", f"family.codec={root / 'codec'}",
           f"family.style.feature_dim={codec.dimension}", "family.lm.num_layers=1", "family.lm.dim=64",
           "family.lm.ffn_dim=128", "family.style.excerpt_seconds=[0.3,0.6]", "family.style.eval_excerpt_seconds=0.5",
           f"data.segment_seconds={SEGMENT}", "data.batch_size=4", "data.eval_batch_size=4",
           "trainer.max_steps=6", "trainer.checkpoint_every_steps=6", "data.batches_per_epoch=6",
           "trainer.limit_val_batches=1", "data.num_workers=0"]
    train(run_env, *run)
    folder = xp_folder(run_env, *run)
    return {"root": root, "folder": folder, "env": run_env, "codec": codec}


def test_training_logs_style_penalty_and_checkpoints_every_conditioner(trained: dict) -> None:
    ckpt = torch.load(trained["folder"] / "checkpoints" / "last.ckpt", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert ckpt["global_step"] == 6
    assert all(k.startswith("model.") for k in keys)  # the wrapper holds the model, and nothing else here
    assert any(k.startswith("model.melody.proj") for k in keys) and any(k.startswith("model.style.rvq") for k in keys)
    assert not any(k.removeprefix("model.").startswith(("text.encoder", "_codec")) for k in keys)  # frozen helpers
    metrics = (trained["folder"] / "csv" / "metrics.csv").read_text()
    assert "train/style_penalty" in metrics and "valid/ce" in metrics
    header = metrics.splitlines()[0].split(",")  # what each condition adds: the batch with it nulled alone
    assert {"valid/ce_no_text", "valid/ce_no_melody", "valid/ce_no_style", "valid/ce_text_only"} <= set(header)


@pytest.fixture(scope="module")
def model(trained: dict):
    module = ostinato.load(trained["folder"])
    return module, trained["codec"]


def _gen(model, seconds: float = 3 * SEGMENT, seed: int = 3, prompts=("a chorale", ""), **kw) -> torch.Tensor:
    module, codec = model
    params = GenerationParams(seed=seed, top_k=20, cfg_scale=kw.pop("cfg", 3.0), cfg_beta=kw.pop("beta", None))
    long_form = kw.pop("long_form", LongForm(window=SEGMENT))
    return generate_audio(module, codec, list(prompts), seconds, params, long_form=long_form, **kw)


def test_every_mode_generates_three_training_windows(model) -> None:
    sr = model[1].sample_rate
    melody = AudioInput(tone(440.0, 1.3, sr), sr)  # shorter than the output: looped
    style = AudioInput(tone(220.0, 2.0, 16000), 16000)  # another rate: resampled
    prompt = AudioInput(tone(330.0, 0.4, sr), sr)
    n = round(3 * SEGMENT * sr)
    base = _gen(model)
    outs = {
        "text": base,
        "melody": _gen(model, melody=melody),
        "style": _gen(model, style=style),
        "continuation": _gen(model, continuation=prompt),
        "all": _gen(model, melody=melody, style=style, continuation=prompt, beta=2.0),
        "chain": _gen(model, melody=melody, long_form=LongForm(mode="chain", window=SEGMENT, overlap=0.25)),
    }
    for name, wav in outs.items():
        assert wav.shape == (2, 1, n), name
        assert torch.isfinite(wav).all() and wav.abs().max() > 0, name
    for name in ("melody", "style", "continuation", "all", "chain"):
        assert not torch.equal(outs[name], base), f"{name} conditioning did not change the output"
    assert torch.equal(_gen(model), base)  # seeded
    assert not torch.equal(_gen(model, cfg=1.0), base)  # CFG changes the output


def test_continuation_starts_with_the_prompt_codes(model) -> None:
    module, codec = model
    sr = codec.sample_rate
    prompt = AudioInput(tone(330.0, 0.4, sr), sr)
    codes = codec.encode(prompt.at(sr, 1), n_q=module.n_q).codes
    from ostinato.nn import decoding as lm_mod

    seen = {}
    real = lm_mod.generate

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen["codes"] = out
        return out

    import ostinato.models.musicgen as mg
    mg.generate, saved = spy, mg.generate
    try:
        _gen(model, continuation=prompt)
    finally:
        mg.generate = saved
    p = codes.shape[-1]
    assert torch.equal(seen["codes"][:, :, :p], codes.expand(2, -1, -1))
    assert seen["codes"].shape[-1] == round(3 * SEGMENT * codec.frame_rate)

    # a prompt longer than the 1 s window: kept whole, its last frames are the context of the next window
    long_prompt = AudioInput(tone(330.0, 1.5, sr), sr)
    codes = codec.encode(long_prompt.at(sr, 1), n_q=module.n_q).codes
    for mode in ("window", "chain"):
        out = _gen(model, continuation=long_prompt, long_form=LongForm(mode=mode, window=SEGMENT, overlap=0.25))
        assert out.shape == (2, 1, round(3 * SEGMENT * sr))
    mg.generate, saved = spy, mg.generate
    try:
        _gen(model, continuation=long_prompt)
    finally:
        mg.generate = saved
    window = round(SEGMENT * codec.frame_rate)
    head = codes.shape[-1] - (window - window // 2)  # the context kept: a window minus the default stride
    full = torch.cat([codes[:, :, :head].expand(2, -1, -1), seen["codes"]], dim=-1)
    assert seen["codes"].shape[-1] == round(3 * SEGMENT * codec.frame_rate) - head
    assert torch.equal(seen["codes"][:, :, :codes.shape[-1] - head], codes[:, :, head:].expand(2, -1, -1))
    assert full.shape[-1] == round(3 * SEGMENT * codec.frame_rate)


def test_cli_every_option_writes_wavs_and_parameters(trained: dict, tmp_path: Path) -> None:
    sr = trained["codec"].sample_rate
    for name, freq in (("melody", 440.0), ("style", 220.0), ("prompt", 330.0)):
        sf.write(tmp_path / f"{name}.wav", tone(freq, 0.8, sr)[0].numpy(), sr)
    (tmp_path / "prompts.txt").write_text("a chorale\n\nan organ piece\n")
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "ostinato.cli", "generate", "--model", str(trained["folder"]),
           "--prompts", str(tmp_path / "prompts.txt"), "--melody", str(tmp_path / "melody.wav"),
           "--style", str(tmp_path / "style.wav"), "--continue", str(tmp_path / "prompt.wav"),
           "--seconds", str(3 * SEGMENT), "--long-form-mode", "chain", "--long-form-overlap", "0.2",
           "--cfg-beta", "1.5",
           "--style-eval-q", "1", "--style-excerpt", "0.4",
           "--seed", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=trained["env"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generating" in proc.stderr  # the progress bar
    for i in range(2):
        wav, rate = sf.read(out / f"{i:03d}.wav")
        assert rate == sr and wav.shape == (round(3 * SEGMENT * sr),)
        meta = json.loads((out / f"{i:03d}.json").read_text())
        assert meta["melody"].endswith("melody.wav") and meta["cfg_beta"] == 1.5
        assert meta["style_eval_q"] == 1 and meta["style_excerpt"] == 0.4
        assert meta["long_form"] == {"mode": "chain", "window": SEGMENT, "stride": None, "overlap": 0.2}
    bad = subprocess.run(cmd[:-2] + ["--melody", str(tmp_path / "missing.wav"), "--out", str(out)],
                         env=trained["env"], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.wav" in bad.stderr


def test_trains_on_audio_shards_tokenized_on_the_fly(trained: dict, tmp_path: Path) -> None:
    from tests.runner import losses
    from tests.synth import write_shards

    for split in ("train", "valid", "test"):
        write_shards(tmp_path / "data" / "demo" / "shards" / split, n_shards=1, per_shard=4, sample_rate=24000,
                     seconds=1.5)
    run_env = {**trained["env"], "OSTINATO_DATA": str(tmp_path / "data"), "OSTINATO_OUTPUTS": str(tmp_path / "out")}
    run = ["experiment=musicgen_tiny", "data=demo", "data.sample_rate=24000", "data.channels=1",
           f"family.codec={trained['root'] / 'codec'}", "family.melody={sample_rate:24000}",
           "family.lm.num_layers=1", "family.lm.dim=64", "family.lm.ffn_dim=128", f"data.segment_seconds={SEGMENT}",
           "data.batch_size=4", "data.eval_batch_size=4", "trainer.max_steps=4", "trainer.checkpoint_every_steps=4",
           "data.batches_per_epoch=4", "trainer.limit_val_batches=1", "data.num_workers=0",
           "trainer.log_every_n_steps=1"]
    train(run_env, *run)
    folder = xp_folder(run_env, *run)
    steps = losses(folder)
    assert len(steps) >= 2 and all(torch.isfinite(torch.tensor([v for _, v in steps])))
    module = ostinato.load(folder)
    assert module.melody is not None and module.codec_ref == str(trained["root"] / "codec")


def test_one_melody_per_prompt_matches_separate_calls(model) -> None:
    module, codec = model
    sr = codec.sample_rate
    melodies = [AudioInput(tone(440.0, 1.0, sr), sr), AudioInput(tone(261.6, 1.0, sr), sr)]
    params = GenerationParams(temperature=0.0, cfg_scale=3.0)
    both = generate_audio(module, codec, ["a chorale", "a reel"], 2 * SEGMENT, params, melody=melodies,
                          long_form=LongForm(window=SEGMENT))
    for i, (prompt, mel) in enumerate(zip(["a chorale", "a reel"], melodies)):
        alone = generate_audio(module, codec, [prompt], 2 * SEGMENT, params, melody=mel,
                               long_form=LongForm(window=SEGMENT))
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one per prompt"):
        generate_audio(module, codec, ["a", "b", "c"], SEGMENT, params, melody=melodies)
