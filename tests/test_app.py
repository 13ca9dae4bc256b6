"""`ostinato app`: a tiny melody + style MusicGen export served by the real CLI, driven in headless Chromium (type
a prompt, set a duration past the decoding window, click Generate, get a playable wav; unlimited mode until Stop),
and the generation core (``Studio``) in-process."""
from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tests.browser import chromium, media_duration
from tests.synth import tone, write_tiny_encodec
from tests.helpers import free_port

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

ROOT = Path(__file__).resolve().parents[1]
SR, WINDOW = 24000, 1.0
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def write_tiny_musicgen(folder: Path, codec: Path) -> Path:
    """An export folder (model.safetensors + config.yaml) of a random 1-layer MusicGen with text, melody and style
    conditioners over ``codec`` (4 x 256 codes at 75 Hz), trained with 1 s segments."""
    family = {"_target_": "ostinato.families.musicgen.MusicGenFamily", "n_q": 4, "card": 256,
              "lm": {"preset": "tiny", "dim": 32, "num_heads": 2, "num_layers": 1, "ffn_dim": 64},
              "text": {"model": None, "max_length": 16},
              "melody": {"sample_rate": SR, "hop_seconds": 0.128, "argmax": True},
              "style": {"features": "codec", "feature_dim": 16, "width": 32, "num_layers": 1, "num_heads": 2,
                        "n_q": 2, "card": 16, "eval_q": 1, "downsample": 15, "excerpt_seconds": [0.3, 0.6],
                        "eval_excerpt_seconds": 0.5},
              "codec": str(codec)}
    torch.manual_seed(0)
    module = instantiate(OmegaConf.create(family), _convert_="all")
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {"family": family, "data": {"segment_seconds": WINDOW}}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return folder


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("app")
    return write_tiny_musicgen(root / "model", write_tiny_encodec(root / "codec", SR))



@pytest.fixture(scope="module")
def server(export: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(root / "gradio")}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ostinato.cli", "app", "--model", str(export), "--port",
                             str(port), "--out", str(root / "clips"), "--device", "cpu"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, f"`ostinato app` exited ({proc.returncode}):\n{(root / 'server.log').read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.time() < deadline, f"no page at {url} after 120 s:\n{(root / 'server.log').read_text()}"
        time.sleep(0.5)
    yield {"url": url, "clips": root / "clips", "log": root / "server.log"}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _chunks(status: str) -> int:
    """The chunk number of an unlimited run's status ("chunk 12: 6.0 s so far ..."), 0 before the first."""
    match = re.search(r"chunk (\d+):", status)
    return int(match.group(1)) if match else 0


def _wait(browser, predicate, what: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    status = browser.execute_script("return document.querySelector('#status')?.innerText")
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; status: {status}")


def _fetch_wav(browser, href: str) -> tuple[np.ndarray, int]:
    """The bytes the browser gets for ``href``, decoded here."""
    browser.set_script_timeout(30)
    data = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer()).then(buf => {
            let s = ''; const b = new Uint8Array(buf);
            for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
            done(btoa(s));
        }).catch(e => done('error: ' + e));""", href)
    assert not data.startswith("error"), data
    raw = base64.b64decode(data)
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE", raw[:16]
    wav, sr = sf.read(io.BytesIO(raw), dtype="float32")
    return wav, sr


def _play_in_page(browser, href: str) -> float:
    """Duration of ``href`` as a fresh <audio> element of the page reads it."""
    browser.execute_script("const a = document.createElement('audio'); a.className = 'probe'; a.src = arguments[0];"
                           "document.body.appendChild(a);", href)
    n = browser.execute_script("return document.querySelectorAll('audio.probe').length")
    return media_duration(browser, "audio.probe", n - 1)


def _href(browser, css: str) -> str | None:
    links = browser.find_elements("css selector", css)
    return links[0].get_attribute("href") if links else None


def test_generate_in_chromium_gives_playable_audio(server: dict) -> None:
    from selenium.webdriver.common.keys import Keys

    with chromium() as browser:
        browser.get(server["url"])
        _wait(browser, lambda: browser.find_elements("css selector", "#generate"), "the page")
        for name in ("melody", "style", "continuation", "cfg_beta"):  # this model has every conditioner
            assert browser.find_element("css selector", f"#{name}").is_displayed(), name
        browser.find_element("css selector", "#prompt textarea").send_keys("A baroque chorale for organ")
        duration = browser.find_element("css selector", "#duration input")
        duration.clear()
        duration.send_keys("2", Keys.TAB)  # past the 1 s decoding window: three sliding windows
        seed = browser.find_element("css selector", "#seed input")
        seed.clear()
        seed.send_keys("7", Keys.TAB)
        browser.find_element("css selector", "#generate").click()
        href = _wait(browser, lambda: _href(browser, "#download a.download-link"), "the generated wav")
        assert _href(browser, "#output a.download-link") == href  # the player's download button: the same file
        wav, sr = _fetch_wav(browser, href)
        assert sr == SR and wav.shape == (2 * SR,) and np.abs(wav).max() > 0
        assert _play_in_page(browser, href) == pytest.approx(2.0, abs=0.02)
        assert _wait(browser, lambda: browser.find_element("css selector", "#output time#duration").text,
                     "the player's duration") == "0:02"
        assert "2 s in" in browser.find_element("css selector", "#status").text
        # offline: every script, style sheet and font came from the app itself
        origins = browser.execute_script(
            "return [...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).origin))]")
        assert origins == [server["url"].rstrip("/")], origins
    saved = sorted(server["clips"].glob("*.wav"))
    assert len(saved) == 1 and saved[0].with_suffix(".json").is_file()
    assert sf.read(saved[0])[0].shape == wav.shape and '"seed": 7' in saved[0].with_suffix(".json").read_text()


def test_unlimited_grows_until_stop(server: dict) -> None:
    with chromium() as browser:
        browser.get(server["url"])
        _wait(browser, lambda: browser.find_elements("css selector", "#generate"), "the page")
        browser.find_element("css selector", "#stop").click()
        _wait(browser, lambda: "nothing to stop" in browser.find_element("css selector", "#status").text, "idle")
        browser.find_element("css selector", "#unlimited input").click()
        browser.find_element("css selector", "#generate").click()
        _wait(browser, lambda: _chunks(browser.find_element("css selector", "#status").text) >= 3, "three chunks")
        chunk = _href(browser, "#output a.download-link")
        assert _play_in_page(browser, chunk) > 0.3  # the player follows the newest chunk
        browser.find_element("css selector", "#stop").click()
        _wait(browser, lambda: "stopped:" in browser.find_element("css selector", "#status").text, "the stop")
        href = _wait(browser, lambda: _href(browser, "#download a.download-link"), "the whole piece")
        wav, sr = _fetch_wav(browser, href)
        status = browser.find_element("css selector", "#status").text
    seconds = float(status.split("stopped: ")[1].split(" s")[0])
    assert sr == SR and abs(wav.shape[0] / SR - seconds) < 0.06 and seconds > 1.4
    pieces = [p for p in server["clips"].glob("*.wav") if "_chunk" not in p.stem]
    piece = max(pieces, key=lambda p: p.stat().st_mtime)
    n_chunks = len(list(server["clips"].glob(f"{piece.stem}_chunk*.wav")))
    time.sleep(2.0)  # stopped: no chunk comes after
    assert len(list(server["clips"].glob(f"{piece.stem}_chunk*.wav"))) == n_chunks >= 3


# -- the generation core, in-process ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def studio(export: Path, tmp_path_factory: pytest.TempPathFactory):
    from ostinato.app import Studio

    return Studio(str(export), out=tmp_path_factory.mktemp("studio"), device="cpu")


def test_studio_modes_and_errors(studio, tmp_path: Path) -> None:
    from ostinato.app import Request, Stopped

    ref = tmp_path / "ref.wav"
    sf.write(ref, tone(330.0, 0.6, SR)[0].numpy(), SR)
    calls = []
    path, seed = studio.generate(Request(prompt="a reel", seconds=2.2, long_form="chain", seed=3, melody=str(ref),
                                         style=str(ref), continuation=str(ref), cfg_beta=1.0),
                                 progress=lambda done, total: calls.append((done, total)))
    wav, sr = sf.read(path)
    assert seed == 3 and sr == SR and wav.shape == (round(2.2 * SR),)
    assert calls and calls[-1][0] == calls[-1][1]  # the progress reached its total
    again, _ = studio.generate(Request(prompt="a reel", seconds=2.2, long_form="chain", seed=3, melody=str(ref),
                                       style=str(ref), continuation=str(ref), cfg_beta=1.0))
    assert again != path and np.array_equal(sf.read(again)[0], wav)  # seeded
    with pytest.raises(ValueError, match="not shorter than the requested duration"):
        studio.generate(Request(seconds=0.3, continuation=str(ref)))
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="the melody upload: .*bad.wav"):
        studio.generate(Request(seconds=1.0, melody=str(tmp_path / "bad.wav")))

    context, new = studio.chunk_plan(Request())
    gen = studio.unlimited(Request(prompt="a chorale", seed=1, continuation=str(ref)), session="s")
    lengths = [sf.info(str(next(gen)[1])).frames for _ in range(3)]
    lead = round(0.6 * SR)
    assert lengths == [lead + context + new, lead + context + 2 * new, lead + context + 3 * new]
    studio.stop("s")
    with pytest.raises(Stopped):
        studio.generate(Request(seconds=1.0), session="s")
