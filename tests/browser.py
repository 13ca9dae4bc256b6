"""Headless Chromium for the tests (Debian's `chromium` and `chromium-driver`, driven by selenium)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(candidates: tuple[str, ...], which: str) -> str | None:
    for path in candidates:
        if Path(path).is_file():
            return path
    return shutil.which(which)


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator["object"]:
    """A selenium WebDriver on headless Chromium; fails with the fix when Chromium or its driver is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise AssertionError(f"selenium is not installed ({e}); run `make install` (it is in the dev extras)") from e
    binary, driver = _first(CHROMIUM_CANDIDATES, "chromium"), _first(DRIVER_CANDIDATES, "chromedriver")
    if binary is None or driver is None:
        raise AssertionError("headless Chromium needs Debian's `chromium` and `chromium-driver` packages: "
                             "`make sysdeps` (or apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    profile = tempfile.mkdtemp(prefix="ostinato-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--autoplay-policy=no-user-gesture-required", f"--window-size={width},{height}",
                f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    try:
        browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    except Exception as e:  # selenium raises SessionNotCreatedException, WebDriverException...
        shutil.rmtree(profile, ignore_errors=True)
        raise AssertionError(f"headless Chromium ({binary}, driver {driver}) did not start: {e}") from e
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def media_duration(browser, css: str, index: int = 0, timeout: float = 30.0) -> float:
    """Load the ``index``-th element matching ``css`` (an <audio>) and return its duration in seconds once the
    browser has read its metadata; a source that cannot be decoded fails with the media error code."""
    script = """
        const [css, index, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
        const el = document.querySelectorAll(css)[index];
        if (!el) { done('no element ' + css + '[' + index + ']'); return; }
        const report = () => done(el.error ? 'media error ' + el.error.code + ' ' + (el.error.message || '')
                                           : el.duration);
        if (el.readyState >= 1 || el.error) { report(); return; }
        el.addEventListener('loadedmetadata', report, {once: true});
        el.addEventListener('error', report, {once: true});
        el.preload = 'metadata';
        el.load();
    """
    browser.set_script_timeout(timeout)
    result = browser.execute_async_script(script, css, index)
    if not isinstance(result, (int, float)):
        raise AssertionError(f"{css}[{index}]: {result}")
    return float(result)


def full_page_screenshot(browser, path: Path) -> Path:
    """A PNG of the whole page (the window is stretched to the document's height first)."""
    width = browser.execute_script("return document.documentElement.scrollWidth")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(max(int(width), 800), min(int(height) + 120, 16000))
    if not browser.save_screenshot(str(path)):
        raise AssertionError(f"Chromium could not write the screenshot {path}")
    return path
