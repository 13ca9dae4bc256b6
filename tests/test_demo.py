"""`ostinato demo --quick`: the whole demo (corpus, codec, tokens, MusicGen, MuLaN, every generation mode, the
evaluation, the HTML report) in miniature, and its report rendered in headless Chromium."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import chromium, full_page_screenshot, media_duration

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # subprocesses run this checkout, not the installed one


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OSTINATO_DATA": str(root / "data"), "OSTINATO_OUTPUTS": str(root / "outputs"),
           "PYTHONPATH": CHECKOUT, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ostinato.cli", "demo", "--data", str(root / "data" / "demo"), "--outputs",
           str(root / "outputs"), "--quick"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "stdout": proc.stdout}


def test_quick_demo_prints_every_stage_and_its_report(quick_demo: dict) -> None:
    out, root = quick_demo["stdout"], quick_demo["root"]
    for needle in ("== ostinato demo ==", "codec: XP", "musicgen: XP", "validation cross-entropy",
                   "mulan: XP", "R@10 text->audio", "vs chance", "evaluation (evaluation/demo.yaml",
                   "fad", "chroma", "chroma cosine to the originals"):
        assert needle in out, needle
    gaps = next(line for line in out.splitlines() if "each condition nulled alone adds" in line)
    assert all(f" {name} " in gaps for name in ("text", "melody", "style")), gaps
    report = root / "outputs" / "demo" / "report.html"
    assert out.strip().splitlines()[-1] == f"report: {report}" and report.is_file()
    generated = root / "outputs" / "demo" / "generated"
    assert sorted(p.name for p in generated.iterdir()) == sorted(
        ["text", "text_chained", "melody", "style", "continuation", "long"])


def test_demo_report_renders_players_spectrograms_curves_and_metrics(quick_demo: dict) -> None:
    report = quick_demo["root"] / "outputs" / "demo" / "report.html"
    with chromium() as browser:
        browser.get(report.as_uri())
        n_audio = browser.execute_script("return document.querySelectorAll('audio').length")
        # reconstructions (original + reconstruction per test clip) + 3 text clips + one per other mode
        assert n_audio >= 2 + 3 + 5
        durations = [media_duration(browser, "audio", i) for i in range(n_audio)]
        assert all(d > 0.5 for d in durations), durations
        assert durations[-1] == pytest.approx(5.0, abs=0.05)  # the long piece (quick: 5 s), the last section
        images = browser.execute_script(
            "return [...document.images].map(i => [i.className, i.complete, i.naturalWidth, i.naturalHeight])")
        kinds = [c for c, *_ in images]
        assert kinds.count("spectrogram") == n_audio and kinds.count("curve") == 3  # codec, MusicGen, MuLaN
        assert all(done and w > 100 and h > 50 for _, done, w, h in images), images
        cells = browser.execute_script(
            "return [...document.querySelectorAll('table.metrics td')].map(td => td.textContent)")
        assert any("FAD" in c for c in cells) and any("t2a_r10" in c or "R@10" in c for c in cells), cells
        shot = full_page_screenshot(browser, quick_demo["root"] / "report.png")
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] > 1000 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


@pytest.mark.parametrize("model", ["codec", "musicgen", "mulan"])
def test_gpu_preset_composes_validates_and_builds_a_larger_model(model: str, monkeypatch) -> None:
    """The GPU plan cannot run here; its overrides must at least name real keys and build each model."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ostinato import demo
    from ostinato.engine.config import validate
    from ostinato.families.base import plain
    from ostinato.train import conf_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    experiment = {"codec": demo.CODEC_EXPERIMENT, "musicgen": demo.MUSICGEN_EXPERIMENT,
                  "mulan": demo.MULAN_EXPERIMENT}[model]
    assert demo.DemoPlan.make(gpu=True).overrides[model] == demo.GPU_OVERRIDES[model]
    assert demo.DemoPlan.make(gpu=False).overrides == {}
    sizes = {}
    for overrides in ([], demo.GPU_OVERRIDES[model]):
        with initialize_config_dir(conf_dir(), version_base="1.3"):
            cfg = compose("config", overrides=[*experiment, *overrides])
        validate(cfg)
        family = instantiate(cfg.family, optim=plain(cfg.optim), _convert_="all")
        sizes[bool(overrides)] = sum(p.numel() for p in family.parameters() if p.requires_grad)
        assert cfg.trainer.max_steps > 0 and cfg.data.batch_size > 0
    assert sizes[True] >= sizes[False]
    if model == "musicgen":
        assert cfg.trainer.precision == "bf16-mixed" and cfg.family.lm.dim == 512
        assert sizes[True] > 4 * sizes[False]  # the wider, deeper LM
