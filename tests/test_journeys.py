"""docs/journeys.md, run as written: the bash blocks marked ``<!-- journey: NAME -->`` of each journey, in one
shell, with tiny values in the variables the page uses for sizes and paths: a real single-node SLURM cluster, random
models in the real shapes (journey 1: the MusicGen-small recipe over 4 x 2048 EnCodec-32k-shaped tokens, shrunk in
width and lengths only; journey 2: a transformers and an audiocraft MusicGen), a few steps on a CPU. The page and
this test cannot drift apart."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from tests.doc_blocks import marked_blocks
from tests.references import write_t5
from tests.test_musicgen_import import audiocraft_checkpoint
from tests.test_musicgen_import import hf_musicgen  # noqa: F401  (fixture: a tiny transformers MusicGen folder)
from tests.test_slurm import cluster  # noqa: F401  (fixture: the single-node SLURM cluster, started once)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "journeys.md"
JOURNEYS = ("sweep", "finetune", "eval")


def journey(name: str) -> str:
    """The marked bash blocks of journey ``name``, joined in page order."""
    script = "\n".join(b.code for b in marked_blocks(DOC, f"journey: {name}") if b.lang == "bash")
    assert script, f"{DOC}: no ```bash block marked <!-- journey: {name} -->"
    return script


def run_journey(name: str, cwd: Path, timeout: float, **variables: str | Path) -> subprocess.CompletedProcess:
    """Run the journey in bash (stop at the first failing command) with ``variables`` set."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **{k: str(v) for k, v in variables.items()}}
    # the installed ``ostinato`` command runs this checkout's package where PYTHONPATH names it (a worktree)
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + journey(name)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"journey {name!r} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-4000:]}")
    return proc


def test_the_page_marks_the_three_journeys() -> None:
    marked = [b.mark.removeprefix("journey: ") for b in marked_blocks(DOC) if b.mark.startswith("journey: ")]
    assert sorted(set(marked)) == sorted(JOURNEYS)
    readme = (ROOT / "README.md").read_text()
    assert "docs/journeys.md" in readme


# -- 1. a distributed sweep ------------------------------------------------------------------------------------
# What shrinks the recipe to a CPU rehearsal (the page quotes this line): width, batch and lengths only.
SHRINK = ('"trainer": "default", "logger": "csv", "family.lm.dim": 32, "family.lm.num_heads": 2, '
          '"family.lm.num_layers": 1, "family.lm.ffn_dim": 64, "data.segment_seconds": 0.5, "data.batch_size": 4, '
          '"data.batches_per_epoch": 2, "data.num_workers": 0, "trainer.max_steps": 4, '
          '"trainer.checkpoint_every_steps": 4, "optim.schedule.warmup_steps": 2')


def _models(folder: Path) -> Path:
    """``$OSTINATO_MODELS`` of the recipe, random and tiny in the real shapes: ``encodec_32khz/`` a transformers
    EncodecModel of EnCodec 32 kHz's layout (hop 640: 50 Hz, 4 codebooks of 2048 at 2.2 kbps) and ``t5-base/`` a
    T5 encoder with its tokenizer."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    codec = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, upsampling_ratios=[8, 5, 4, 4],
                          codebook_size=2048, hidden_size=8, codebook_dim=8, num_lstm_layers=1,
                          target_bandwidths=[2.2], use_causal_conv=False, normalize=False)
    EncodecModel(codec).eval().save_pretrained(folder / "encodec_32khz")
    write_t5(folder / "t5-base")
    return folder


def _my_audio(folder: Path, n: int = 12) -> Path:
    """A user's folder tree of 1.2 s tones (44.1 kHz stereo: prep converts), each with a caption sidecar."""
    t = np.arange(int(1.2 * 44100)) / 44100
    for i in range(n):
        sub = folder / f"album{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        tone = 0.3 * np.sin(2 * np.pi * 110.0 * (1 + i) * t)
        sf.write(sub / f"song{i:02d}.wav", np.stack([tone, tone], 1).astype(np.float32), 44100)
        (sub / f"song{i:02d}.txt").write_text(f"a tone at {110 * (1 + i)} Hz")
    return folder


def test_the_page_quotes_the_rehearsal() -> None:
    assert f"SHRINK='{SHRINK}'" in " ".join(DOC.read_text().split())


def test_sweep_journey_runs_the_recipe_on_real_tokens_on_slurm(cluster, tmp_path: Path) -> None:  # noqa: F811
    data, out = tmp_path / "data", tmp_path / "outputs"
    proc = run_journey("sweep", tmp_path / "work", timeout=600, OSTINATO_OUTPUTS=out,
                       OSTINATO_MODELS=_models(tmp_path / "models"), OSTINATO_DATA=data,
                       AUDIO=_my_audio(tmp_path / "music"), HOLDOUT_EVERY=4, SEGMENT=0.5, WORKERS=1,
                       FILES_PER_SHARD=2, NODES=1, TASKS=2, SRUN_RESOURCES="--overcommit",
                       PARTITION="debug", TOKENIZE_MINUTES=10, TOKENIZE_WORKERS=0, GPUS=0, CPUS_PER_GPU=1,
                       MEM_PER_GPU=1, MINUTES=10, SHRINK=SHRINK, INTERVAL=0.05)
    tokens = data / "encodec32k" / "tokens"
    counts = {}
    for split in ("train", "valid", "test"):
        files = sorted(p.name for p in (data / "encodec32k" / "audio" / split).iterdir())
        counts[split] = sum(name.endswith(".wav") for name in files)
        assert len(files) == 2 * counts[split], files  # every song with its caption
        manifest = json.loads((tokens / split / "manifest.json").read_text())
        codec = manifest["codec"]
        assert (codec["n_q"], codec["card"], codec["frame_rate"], codec["sample_rate"]) == (4, 2048, 50, 32000)
        assert manifest["total_samples"] == 2 * counts[split]  # two 0.5 s segments of each 1.2 s song
        assert len(manifest["shards"]) >= 2  # shared by the two srun tasks
    assert counts == {"train": 6, "valid": 3, "test": 3}
    assert "the last part to finish writes the manifest" in proc.stdout  # one of the two parts
    folders = sorted(p.parent for p in (out / "xps").glob("*/job.json"))
    logs = {f.name: (f / "train.log").read_text()[-1500:] for f in folders if (f / "train.log").is_file()}
    assert len(folders) == 2, (folders, proc.stdout[-2000:])
    recipe = yaml.safe_load((ROOT / "conf" / "experiment" / "recipe_musicgen_small.yaml").read_text())
    for folder in folders:
        ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 4, logs
        cfg = ckpt["ostinato_config"]
        fam = cfg["family"]
        assert (fam["n_q"], fam["card"]) == (4, 2048) and fam["lm"]["num_layers"] == 1
        assert fam["text"]["model"] == str(tmp_path / "models" / "t5-base")
        assert cfg["data"]["train"] == str(tokens / "train")
        # the recipe's structure, not the CPU demo's: what SHRINK leaves alone comes from the recipe
        for key in ("cfg_dropout", "attribute_dropout"):
            assert fam[key] == recipe["family"][key]
        assert cfg["ema"] == {**cfg["ema"], **recipe["ema"]} and cfg["ema"]["decay"] == 0.99
        for key in ("name", "betas", "weight_decay"):
            assert cfg["optim"][key] == recipe["optim"][key]
        assert cfg["optim"]["schedule"]["name"] == "cosine" and cfg["trainer"]["validate_first"] is False
        assert cfg["data"]["min_segment_ratio"] == 0.8 and cfg["trainer"]["log_every_n_steps"] == 25
        emb = [v for k, v in ckpt["state_dict"].items() if k.endswith("lm.emb.0.weight")]
        assert emb and emb[0].shape == (2048 + 1, 32), [e.shape for e in emb]  # 2048 codes + the special one
    assert sorted(torch.load(f / "checkpoints" / "last.ckpt", weights_only=True)["ostinato_config"]["optim"]["lr"]
                  for f in folders) == [1e-4, 3e-4]
    table = proc.stdout[proc.stdout.rindex("opt.lr") - 2000:]  # the last table: `--no_monitoring`
    rows = [line for line in table.splitlines() if "opt.lr=" in line][-2:]
    assert len(rows) == 2 and all(" COM " in row and " 4 " in row for row in rows), table


# -- 2. fine-tuning a pretrained MusicGen, 3. an evaluation benchmark --------------------------------------------
def _audio(folder: Path) -> Path:
    """train/ valid/ test/ folders of 2 s tones at 16 kHz, each with a caption sidecar."""
    for s, (split, n) in enumerate((("train", 4), ("valid", 2), ("test", 2))):
        (folder / split).mkdir(parents=True)
        for i in range(n):
            freq = 110.0 * (1 + i + 4 * s)
            t = np.arange(32000) / 16000
            sf.write(folder / split / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
            (folder / split / f"tone{i}.txt").write_text(f"a sine tone at {freq:g} Hz")
    return folder


def _source(kind: str, hf_musicgen, folder: Path) -> dict[str, str | Path]:  # noqa: F811
    """The pretrained MusicGen as its toolkit ships it, and the journey's variables for it: transformers' folder,
    or audiocraft's ``state_dict.bin`` written by audiocraft's own exporter (with its T5 and EnCodec beside it)."""
    model, hf_folder = hf_musicgen
    if kind == "transformers":
        return {"SRC": hf_folder, "FORMAT": "transformers"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        _, t5, encodec = audiocraft_checkpoint(hf_musicgen, folder, monkeypatch)
    return {"SRC": folder / "state_dict.bin", "IMPORT_FLAGS": f"--text-encoder {t5} --codec {encodec}",
            "FORMAT": "audiocraft"}


@pytest.fixture(scope="module")
def journeys_2(hf_musicgen, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """Journey 2 from a source kind, run once per kind in this module (journey 3 scores the transformers one)."""
    done: dict[str, dict] = {}

    def run(kind: str) -> dict:
        if kind not in done:
            root = tmp_path_factory.mktemp(f"finetune_{kind}")
            paths = {"OG": root / "og", "AUDIO": _audio(root / "audio"), "MINE": root / "mine",
                     "TUNED": root / "tuned", "ADAPTERS": root / "adapters", "BACK": root / "back",
                     "GEN": root / "gen", "OSTINATO_OUTPUTS": root / "outputs",
                     **_source(kind, hf_musicgen, root / "source")}
            proc = run_journey("finetune", root / "work", timeout=400, SR=16000, SEGMENT=1, WORKERS=1, BATCH=4,
                               STEPS=2, TRAINER="default", LR=1e-3, LOGGER="csv", DURATION=1.5, RANK=4, **paths)
            done[kind] = {**paths, "kind": kind, "proc": proc}
        return done[kind]
    return run


@pytest.fixture(scope="module", params=["transformers", "audiocraft"])
def finetuned(journeys_2, request: pytest.FixtureRequest) -> dict:
    return journeys_2(request.param)


def test_finetune_journey_imports_tunes_exports_and_generates(finetuned: dict) -> None:
    from safetensors.torch import load_file

    import ostinato
    from ostinato.nn.lora import has_adapters

    og, tuned = finetuned["OG"], finetuned["TUNED"]
    assert (og / "codec").is_dir() and (og / "text_encoder").is_dir()
    source = yaml.safe_load((og / "config.yaml").read_text())["family"]["semantics"]
    assert source["text_padding"] == ("attended" if finetuned["kind"] == "audiocraft" else "masked"), source
    for split in ("train", "valid"):
        manifest = json.loads((finetuned["MINE"] / "tokens" / split / "manifest.json").read_text())
        assert manifest["codec"]["sample_rate"] == 16000
    xp = next((finetuned["OSTINATO_OUTPUTS"] / "xps").iterdir())
    log = (xp / "train.log").read_text()
    assert re.search(rf"continue_from: \d+ tensors loaded from {re.escape(str(og))}", log), log[-2000:]
    ckpt = torch.load(xp / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["lora"]["rank"] == 4
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])  # LoRA: the adapters alone
    before, after = load_file(og / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(re.search(r"_attn\.(q|k|v|out)_proj\.weight$", k) for k in changed), changed
    wav, sr = sf.read(finetuned["GEN"] / "000.wav")
    assert sr == 16000 and wav.shape == (24000,) and np.abs(wav).max() > 0
    kept, merged = ostinato.load(finetuned["ADAPTERS"]), ostinato.load(tuned)
    assert has_adapters(kept) and not has_adapters(merged)
    codes = torch.randint(0, merged.card, (1, merged.n_q, 5))
    with torch.no_grad():
        cond, mask = merged.condition(["a sine tone"])
        assert (kept.lm(codes, cond, mask) - merged.lm(codes, cond, mask)).abs().max() <= 1e-5
    q = after["lm.layers.0.self_attn.q_proj.weight"]
    if finetuned["kind"] == "transformers":  # handed back: what transformers loads holds the tuned weights
        from transformers import MusicgenForConditionalGeneration

        back = MusicgenForConditionalGeneration.from_pretrained(finetuned["BACK"]).state_dict()
        assert torch.allclose(back["decoder.model.decoder.layers.0.self_attn.q_proj.weight"], q, atol=1e-6)
    else:  # audiocraft's files: the LM (q, k, v packed in in_proj_weight) and the codec
        best = torch.load(finetuned["BACK"] / "state_dict.bin", weights_only=True)["best_state"]
        packed = best["transformer.layers.0.self_attn.mha.in_proj_weight"]
        assert torch.allclose(packed[:q.shape[0]], q, atol=1e-6)
        assert (finetuned["BACK"] / "compression_state_dict.bin").is_file()


def _within(point: float, ci: dict) -> bool:
    """``point`` in the bootstrap interval, up to rounding (with 4 clips an end can be the point itself)."""
    slack = 1e-6 * abs(point)
    return ci["low"] - slack <= point <= ci["high"] + slack


def test_eval_journey_scores_the_tuned_model(journeys_2, tmp_path: Path) -> None:
    finetuned = journeys_2("transformers")
    out = tmp_path / "eval"
    proc = run_journey("eval", tmp_path / "work", timeout=300, MODEL=finetuned["TUNED"],
                       CODEC=finetuned["OG"] / "codec", REFERENCE=finetuned["MINE"] / "shards" / "test",
                       NUM_SAMPLES=4, CLIP_SECONDS=1, BATCH=4, FAD_POINTS=3, EVAL_OUT=out, DEVICE="cpu",
                       OSTINATO_OUTPUTS=tmp_path / "outputs", REF_AUDIO=finetuned["AUDIO"],
                       EMBEDDING=f"codec:{finetuned['OG'] / 'codec'}", BOOTSTRAP=20, FAD_OUT=tmp_path / "fad.json")
    result = json.loads((out / "metrics.json").read_text())
    metrics = result["metrics"]
    assert {"fad", "fad_inf", "per_song_fad_mean"} <= set(metrics) and metrics["fad"] >= 0
    assert result["settings"]["generation"]["cfg_scale"] == 3.0 and result["num_items"] == 4
    assert (out / "report.html").is_file() and len(list((out / "generated").glob("*.wav"))) == 4
    assert f"report: {out / 'report.md'}" in proc.stdout
    # two folders: the 8 clips of the user's audio against the 4 the eval wrote
    row = json.loads((tmp_path / "fad.json").read_text())["rows"][0]
    sides = row["protocol"]["sides"]
    assert (sides["REF"]["clips"], sides["GEN"]["clips"]) == (8, 4) and row["fad"] > 0
    assert _within(row["fad"], row["bootstrap"]) and row["bootstrap"]["resamples"] == 20
    kad = row["kad"]
    assert (kad["n_ref"], kad["n_gen"]) == (8, 4) and _within(kad["kad"], kad["bootstrap"])
    assert f"protocol: {tmp_path / 'fad.json'}" in proc.stdout
