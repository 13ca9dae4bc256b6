"""docs/journeys.md, run as written: the bash blocks marked ``<!-- journey: NAME -->`` of each journey, in one
shell, with tiny values in the variables the page uses for sizes and paths (a real single-node SLURM cluster, a
random transformers MusicGen, a few steps on a CPU). The page and this test cannot drift apart."""
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

from tests.test_musicgen_family import write_token_shards
from tests.test_musicgen_import import hf_musicgen  # noqa: F401  (fixture: a tiny transformers MusicGen folder)
from tests.test_slurm import cluster  # noqa: F401  (fixture: the single-node SLURM cluster, started once)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "journeys.md"
JOURNEYS = ("sweep", "finetune", "eval")


def journey(name: str) -> str:
    """The marked bash blocks of journey ``name``, joined in page order."""
    blocks = re.findall(r"<!-- journey: (\w+) -->\s*```bash\n(.*?)```", DOC.read_text(), re.S)
    script = "\n".join(body for marked, body in blocks if marked == name)
    assert script, f"{DOC}: no ```bash block marked <!-- journey: {name} -->"
    return script


def run_journey(name: str, cwd: Path, timeout: float, **variables: str | Path) -> subprocess.CompletedProcess:
    """Run the journey in bash (stop at the first failing command) with ``variables`` set."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **{k: str(v) for k, v in variables.items()}}
    env.pop("PYTHONPATH", None)  # the journeys run the installed package, as a user's shell does
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + journey(name)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"journey {name!r} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-4000:]}")
    return proc


def test_the_page_marks_the_three_journeys() -> None:
    marked = re.findall(r"<!-- journey: (\w+) -->\s*```bash\n", DOC.read_text())
    assert sorted(set(marked)) == sorted(JOURNEYS)
    readme = (ROOT / "README.md").read_text()
    assert "docs/journeys.md" in readme


# -- 1. a distributed sweep ------------------------------------------------------------------------------------
def test_sweep_journey_runs_a_grid_on_slurm(cluster, tmp_path: Path) -> None:  # noqa: F811
    tokens = tmp_path / "tokens"
    write_token_shards(tokens / "train", [150] * 8)
    write_token_shards(tokens / "valid", [150] * 4, first_index=100)
    out = tmp_path / "outputs"
    proc = run_journey("sweep", tmp_path / "work", timeout=420, OSTINATO_OUTPUTS=out, TOKENS=tokens, GPUS=0,
                       CPUS_PER_GPU=1, MEM_PER_GPU=1, MINUTES=10, PARTITION="debug", TRAINER="default", DIM=32,
                       HEADS=2, LAYERS=1, FFN=64, SEGMENT=0.5, BATCH=4, STEPS=4, CKPT_EVERY=4, INTERVAL=0.05)
    folders = sorted(p.parent for p in (out / "xps").glob("*/job.json"))
    logs = {f.name: (f / "train.log").read_text()[-1500:] for f in folders if (f / "train.log").is_file()}
    assert len(folders) == 2, (folders, proc.stdout[-2000:])
    for folder in folders:
        ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 4, logs
        cfg = ckpt["ostinato_config"]
        assert cfg["family"]["lm"]["num_layers"] == 1 and cfg["data"]["train"] == str(tokens / "train")
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


@pytest.fixture(scope="module")
def finetuned(hf_musicgen, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    _, src = hf_musicgen
    root = tmp_path_factory.mktemp("finetune")
    paths = {"SRC": src, "OG": root / "og", "AUDIO": _audio(root / "audio"), "MINE": root / "mine",
             "TUNED": root / "tuned", "ADAPTERS": root / "adapters", "BACK": root / "back", "GEN": root / "gen",
             "OSTINATO_OUTPUTS": root / "outputs"}
    proc = run_journey("finetune", root / "work", timeout=400, SR=16000, SEGMENT=1, WORKERS=1, BATCH=4, STEPS=2,
                       TRAINER="default", LR=1e-3, LOGGER="csv", DURATION=1.5, RANK=4, **paths)
    return {**paths, "proc": proc}


def test_finetune_journey_imports_tunes_exports_and_generates(finetuned: dict) -> None:
    from safetensors.torch import load_file
    from transformers import MusicgenForConditionalGeneration

    import ostinato
    from ostinato.nn.lora import has_adapters

    og, tuned = finetuned["OG"], finetuned["TUNED"]
    assert (og / "codec").is_dir() and (og / "text_encoder").is_dir()
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
    back = MusicgenForConditionalGeneration.from_pretrained(finetuned["BACK"])
    q = "decoder.model.decoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(back.state_dict()[q], after["lm.layers.0.self_attn.q_proj.weight"], atol=1e-6)


def test_eval_journey_scores_the_tuned_model(finetuned: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = run_journey("eval", tmp_path / "work", timeout=300, MODEL=finetuned["TUNED"],
                       CODEC=finetuned["OG"] / "codec", REFERENCE=finetuned["MINE"] / "shards" / "test",
                       NUM_SAMPLES=4, CLIP_SECONDS=1, BATCH=4, FAD_POINTS=3, EVAL_OUT=out, DEVICE="cpu",
                       OSTINATO_OUTPUTS=tmp_path / "outputs")
    result = json.loads((out / "metrics.json").read_text())
    metrics = result["metrics"]
    assert {"fad", "fad_inf", "per_song_fad_mean"} <= set(metrics) and metrics["fad"] >= 0
    assert result["settings"]["generation"]["cfg_scale"] == 3.0 and result["num_items"] == 4
    assert (out / "report.html").is_file() and len(list((out / "generated").glob("*.wav"))) == 4
    assert f"report: {out / 'report.md'}" in proc.stdout
