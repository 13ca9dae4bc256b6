"""The demo's HTML report: written from small synthetic clips, metrics and an XP's metrics.csv, then opened in
headless Chromium, which plays its audio, draws its figures and takes a screenshot."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from ostinato.demo.report import DemoClip, DemoSection, clips_from_folder, read_curves, write_demo_report
from tests.browser import chromium, full_page_screenshot, media_duration

SR = 16000


def _tone(path: Path, freq: float, seconds: float, fmt: str = "WAV") -> Path:
    t = np.arange(int(seconds * SR)) / SR
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t * (1 + 0.2 * t)).astype(np.float32), SR, format=fmt)
    return path


def _xp(folder: Path) -> Path:
    """An XP folder whose csv/metrics.csv has the CSVLogger's layout (sparse columns, lr rows)."""
    (folder / "csv").mkdir(parents=True)
    with open(folder / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr-AdamW/decay", "step", "train/loss", "valid/loss"])
        for step in range(0, 50, 5):
            w.writerow(["", 1e-3, step, "", ""])
            w.writerow([step // 10, "", step, 2.0 / (1 + step), ""])
            if step % 10 == 0:
                w.writerow([step // 10, "", step, "", 2.5 / (1 + step)])
    return folder


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    clips = tmp_path / "clips"
    clips.mkdir()
    sections = [
        DemoSection("Text to music", [DemoClip(_tone(clips / "a.wav", 220, 2.0), "text 0", "A baroque chorale"),
                                      DemoClip(_tone(clips / "b.wav", 330, 3.0), "text 1", "An irish reel")],
                    note="two prompts, 2 s and 3 s"),
        DemoSection("Codec reconstructions", [DemoClip(_tone(clips / "c.flac", 440, 1.5, "FLAC"), "original")]),
    ]
    curves = {"codec": read_curves(_xp(tmp_path / "xp"), ["train/loss", "valid/loss"])}
    metrics = {"fad": 1.25, "chroma": 0.5, "codec": {"mel_distance": 0.75, "sisnr": -3.0}}
    return {"sections": sections, "curves": curves, "metrics": metrics}


def test_read_curves_reads_sparse_columns_and_names_missing_ones(tmp_path: Path) -> None:
    xp = _xp(tmp_path / "xp")
    curves = read_curves(xp)
    assert set(curves) == {"train/loss", "valid/loss"}
    assert curves["train/loss"][:2] == [(0, 2.0), (5, 2.0 / 6)] and len(curves["valid/loss"]) == 5
    with pytest.raises(ValueError, match=r"no column valid/ce; it has epoch, .*train/loss"):
        read_curves(xp, ["valid/ce"])
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        read_curves(tmp_path)


@pytest.mark.parametrize("media", ["copy", "embed"])
def test_report_renders_players_plots_and_metrics_in_chromium(inputs: dict, tmp_path: Path, media: str) -> None:
    out = write_demo_report(tmp_path / "site" / "report.html", inputs["sections"], inputs["metrics"],
                            inputs["curves"], summary=["trained in 3 min"], media=media)
    assert out == tmp_path / "site" / "report.html" and out.is_file()
    files = tmp_path / "site" / "report_files"
    if media == "copy":
        assert len(list((files / "audio").iterdir())) == 3 and len(list(files.glob("*.png"))) == 4
        page = out.read_text()
        assert "data:" not in page and str(tmp_path / "clips") not in page  # relative links into report_files/
    else:
        assert not files.exists()
    with chromium() as browser:
        browser.get(out.as_uri())
        assert browser.title == "ostinato demo"
        n_audio = browser.execute_script("return document.querySelectorAll('audio').length")
        assert n_audio == 3
        durations = [media_duration(browser, "audio", i) for i in range(n_audio)]
        assert durations == pytest.approx([2.0, 3.0, 1.5], abs=0.05)
        images = browser.execute_script(
            "return [...document.images].map(i => [i.className, i.complete, i.naturalWidth, i.naturalHeight])")
        assert sorted(c for c, *_ in images) == ["curve"] + ["spectrogram"] * 3
        assert all(done and w > 100 and h > 50 for _, done, w, h in images), images
        cells = browser.execute_script(
            "return [...document.querySelectorAll('table.metrics td')].map(td => td.textContent)")
        assert "1.25" in cells and "0.75" in cells and any("FAD" in c for c in cells)
        assert "trained in 3 min" in browser.page_source
        shot = full_page_screenshot(browser, tmp_path / f"report_{media}.png")
        bottom = browser.execute_script("return document.querySelectorAll('audio')[2].getBoundingClientRect().bottom")
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= bottom and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # the whole page, drawn


def test_clips_from_a_generate_folder(tmp_path: Path) -> None:
    out = tmp_path / "melody"
    out.mkdir()
    for i, prompt in enumerate(["a reel", ""]):
        _tone(out / f"{i:03d}.wav", 200, 0.5)
        (out / f"{i:03d}.json").write_text(f'{{"prompt": "{prompt}", "melody": "/data/theme.wav", "style": null}}')
    clips = clips_from_folder(out)
    assert [(c.wav, c.label, c.text) for c in clips] == [
        (out / "000.wav", "melody 0", "a reel; melody: theme.wav"),
        (out / "001.wav", "melody 1", "(no text); melody: theme.wav")]
    with pytest.raises(FileNotFoundError, match="no NNN.wav clips"):
        clips_from_folder(tmp_path / "clips")


def test_report_names_a_missing_clip(inputs: dict, tmp_path: Path) -> None:
    sections = [DemoSection("Melody", [DemoClip(tmp_path / "nope.wav", "melody 0")])]
    with pytest.raises(FileNotFoundError, match=r"'Melody', clip 'melody 0': .*nope.wav does not exist"):
        write_demo_report(tmp_path / "r.html", sections, {}, {})
    with pytest.raises(ValueError, match="media='inline'"):
        write_demo_report(tmp_path / "r.html", inputs["sections"], {}, {}, media="inline")
