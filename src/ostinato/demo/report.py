"""The HTML report of ``ostinato demo``: audio players with spectrograms, a metrics table and training curves.

    from ostinato.demo.report import DemoClip, DemoSection, clips_from_folder, read_curves, write_demo_report

    sections = [DemoSection("Text to music", clips_from_folder("outputs/demo/generated/text"), note="10 s"),
                DemoSection("Codec", [DemoClip("outputs/demo/reconstructions/x_original.wav", "original",
                                               text="a test clip")])]
    curves = {"codec": read_curves("outputs/xps/49218716", ["train/loss", "valid/mel_distance"]),
              "MusicGen": read_curves("outputs/xps/c1ed5f19", ["train/ce", "valid/ce"])}
    metrics = {"fad": 1.23, "chroma": 0.61, "codec": {"mel_distance": 0.41}}
    path = write_demo_report("outputs/demo/report.html", sections, metrics, curves)

Layout on disk: ``report.html`` and, with ``media="copy"`` (default), a ``report_files/`` folder beside it holding
copies of the audio files and the PNG figures; every link is relative, so the two can be moved or served
together. ``media="embed"`` puts everything into the one HTML file as ``data:`` URIs instead (bigger: base64 of
every clip). Files are written atomically; the HTML last, so a page on disk never links to a missing figure.
"""
from __future__ import annotations

import base64
import csv
import html
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ostinato.evaluation.report import format_value, metric_info
from ostinato.fileio import atomic_path, atomic_write_text, read_json

__all__ = ["DemoClip", "DemoSection", "clips_from_folder", "curve_panels", "read_curves", "write_demo_report"]

AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg",
               ".opus": "audio/ogg"}
Curve = Sequence[tuple[float, float]]  # (step, value) points


@dataclass
class DemoClip:
    """One audio file of the report: ``wav`` (wav/flac/ogg/mp3), a short ``label`` and an optional ``text``
    (the prompt or what the clip is)."""

    wav: str | Path
    label: str
    text: str = ""


@dataclass
class DemoSection:
    """A titled group of clips (one generation mode, the reconstructions, ...), with an optional ``note``."""

    title: str
    clips: Sequence[DemoClip] = field(default_factory=list)
    note: str = ""


def clips_from_folder(folder: str | Path, label: str | None = None) -> list[DemoClip]:
    """The clips ``ostinato generate`` wrote to ``folder`` (``NNN.wav`` + ``NNN.json``), labelled ``"<label> N"``
    (default: the folder's name) with their prompt and the references they used as text."""
    folder = Path(folder)
    wavs = sorted(folder.glob("[0-9][0-9][0-9].wav"))
    if not wavs:
        raise FileNotFoundError(f"{folder}: no NNN.wav clips (written by `ostinato generate --out {folder}`)")
    clips = []
    for i, wav in enumerate(wavs):
        record = read_json(wav.with_suffix(".json")) if wav.with_suffix(".json").is_file() else {}
        refs = [f"{key}: {Path(str(record[key])).name}" for key in ("melody", "style", "continue") if record.get(key)]
        text = "; ".join([record.get("prompt") or "(no text)"] + refs)
        clips.append(DemoClip(wav, f"{label or folder.name} {i}", text if record else ""))
    return clips


def read_curves(xp_folder: str | Path, metrics: Sequence[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from an XP's ``csv/metrics.csv`` (Lightning's CSVLogger: one column per
    metric, empty cells where a row logged something else).

    ``metrics``: the columns to read (e.g. ``["train/loss", "valid/loss"]``); None = every ``train/`` and
    ``valid/`` column. A named column that the file lacks is an error that lists the columns it has.
    """
    path = Path(xp_folder) / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; is {xp_folder} an XP folder written by `ostinato train`?")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "step" not in columns:
        raise ValueError(f"{path}: no 'step' column (columns: {', '.join(columns)})")
    wanted = list(metrics) if metrics is not None else [c for c in columns if c.startswith(("train/", "valid/"))]
    missing = [m for m in wanted if m not in columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}; it has {', '.join(columns)}")
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in wanted:
        points = [(int(float(r["step"])), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        curves[name] = [(s, v) for s, v in points if math.isfinite(v)]
    return curves


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in text.lower())
    return "_".join(part for part in keep.split("_") if part)[:40] or "x"


class _Media:
    """Where the report's files go: copied into ``<stem>_files/`` and linked, or embedded as data URIs."""

    def __init__(self, out_html: Path, mode: str) -> None:
        if mode not in ("copy", "embed"):
            raise ValueError(f"media={mode!r}: use 'copy' (files beside the HTML) or 'embed' (data: URIs)")
        self.mode, self.root = mode, out_html.parent
        self.folder = out_html.parent / f"{out_html.stem}_files"
        self.names: set[str] = set()

    def _name(self, stem: str, suffix: str) -> str:
        name, i = f"{stem}{suffix}", 1
        while name in self.names:
            name, i = f"{stem}_{i}{suffix}", i + 1
        self.names.add(name)
        return name

    def audio(self, src: Path, stem: str) -> str:
        mime = AUDIO_TYPES.get(src.suffix.lower())
        if mime is None:
            raise ValueError(f"{src}: not an audio file the report can play (use {', '.join(AUDIO_TYPES)})")
        if self.mode == "embed":
            return f"data:{mime};base64,{base64.b64encode(src.read_bytes()).decode()}"
        dst = self.folder / "audio" / self._name(stem, src.suffix.lower())
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return dst.relative_to(self.root).as_posix()

    def figure(self, fig: Any, stem: str) -> str:
        import io

        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        data = buf.getvalue()
        if self.mode == "embed":
            return f"data:image/png;base64,{base64.b64encode(data).decode()}"
        dst = self.folder / self._name(stem, ".png")
        with atomic_path(dst) as tmp:
            tmp.write_bytes(data)
        return dst.relative_to(self.root).as_posix()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spectrogram(wav_path: Path, title: str):
    from ostinato.data.audio import load_audio
    from ostinato.engine.media import log_mel

    plt = _pyplot()
    wav, sr = load_audio(wav_path)
    seconds = wav.shape[-1] / sr
    fig, ax = plt.subplots(figsize=(min(12.0, 3.0 + seconds / 3), 1.9), dpi=90)
    ax.imshow(log_mel(wav, sr), origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, 80))
    ax.set_xlabel("seconds", fontsize=7)
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
    ax.set_title(title[:90], fontsize=8)
    fig.tight_layout()
    return fig, seconds


PANEL_SPAN = 4.0  # a curve shares a y axis only while the axis spans at most this many times the curve's own range


def _span(points: Curve) -> tuple[float, float]:
    values = [v for _, v in points]
    return min(values), max(values)


def curve_panels(series: Mapping[str, Curve]) -> list[list[str]]:
    """Group the series of one plot into panels with a y axis each, so that no curve is drawn flat.

    A varying curve shares a panel only while the panel's y range stays within ``PANEL_SPAN`` times the curve's own
    (train and valid cross-entropy share; a train loss in the hundreds and a mel distance near 1 do not); a
    constant curve (a chance level) joins the varying panel that its value widens least. Empty series are left out.
    """
    varying = [k for k, p in series.items() if p and _span(p)[0] < _span(p)[1]]
    constant = [k for k, p in series.items() if p and _span(p)[0] == _span(p)[1]]
    panels: list[list[str]] = []

    def union(names: list[str]) -> tuple[float, float]:
        spans = [_span(series[n]) for n in names]
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)

    def fits(names: list[str]) -> bool:
        lo, hi = union(names)
        return all(hi - lo <= PANEL_SPAN * (_span(series[n])[1] - _span(series[n])[0])
                   for n in names if n in varying)

    def place(name: str, home: list[str] | None) -> None:
        if home is None:
            panels.append([name])
        else:
            home.append(name)

    for name in varying:
        place(name, next((p for p in panels if fits(p + [name])), None))
    for name in constant:
        options = [p for p in panels if p[0] in varying and fits(p + [name])]
        home = min(options, key=lambda p: union(p + [name])[1] - union(p + [name])[0], default=None)
        if home is None:
            home = next((p for p in panels if p[0] in constant and union(p) == _span(series[name])), None)
        place(name, home)
    return panels


def _curve_figure(title: str, series: Mapping[str, Curve]):
    """One figure per plot title; one panel (own y axis) per group of ``curve_panels``."""
    plt = _pyplot()
    panels = curve_panels(series)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 3.6 * len(panels), 3.0), dpi=90, squeeze=False)
    for ax, names in zip(axes[0], panels):
        for label in names:
            steps, values = zip(*series[label])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _metric_rows(metrics: Mapping[str, Any], notes: Mapping[str, str]
                 ) -> tuple[list[tuple[str, str, str, str]], dict[str, Mapping]]:
    rows, groups = [], {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            groups[name] = value
            continue
        label, better = metric_info(name)
        shown = format_value(value) + (f" ({notes[name]})" if notes.get(name) else "")
        rows.append((name, label, shown, better))
    return rows, groups


def _metrics_html(metrics: Mapping[str, Any], notes: Mapping[str, str]) -> list[str]:
    e, parts = html.escape, []

    def table(title: str | None, values: Mapping[str, Any]) -> None:
        rows, groups = _metric_rows(values, notes)
        if rows:
            if title:
                parts.append(f"<h3>{e(title)}</h3>")
            parts.append("<table class='metrics'><tr><th>metric</th><th>value</th><th>better</th></tr>")
            for name, label, value, better in rows:
                shown = f"{e(label)} (<code>{e(name)}</code>)" if label else f"<code>{e(name)}</code>"
                parts.append(f"<tr><td>{shown}</td><td class='n'>{e(value)}</td><td>{e(better)}</td></tr>")
            parts.append("</table>")
        for name, sub in groups.items():
            table(f"{title}: {name}" if title else name, sub)

    table(None, metrics)
    return parts or ["<p>No metrics.</p>"]


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 12px;color:#222}"
         "table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
         "td.n{text-align:right}.clip{border:1px solid #ddd;border-radius:6px;padding:8px;margin:8px 0}"
         ".clip p{margin:2px 0 6px;font-size:13px;color:#444}.clip img{max-width:100%;display:block}"
         "audio{display:block;width:100%;max-width:600px}.curves img{margin:4px;border:1px solid #eee}")


def write_demo_report(out_html: str | Path, sections: Sequence[DemoSection], metrics: Mapping[str, Any],
                      curves: Mapping[str, Mapping[str, Curve]], *, title: str = "ostinato demo",
                      summary: Sequence[str] = (), media: str = "copy", notes: Mapping[str, str] | None = None) -> Path:
    """Write the demo's HTML report and return its path.

    Args:
        out_html: the page to write (``.../report.html``); its folder is created.
        sections: titled groups of clips; each clip gets an ``<audio controls>`` player and a log-mel
            spectrogram (PNG). A missing audio file is an error naming it.
        metrics: ``{name: value}`` shown as a table (labels and better-direction of
            ``ostinato.evaluation.report.metric_info``); a value that is itself a mapping
            becomes its own table titled by its key (``{"evaluation": {...}, "codec": {...}}``).
        curves: ``{plot title: {series label: [(step, value), ...]}}``, one PNG per title, its series on panels
            with a y axis each where their scales differ (``curve_panels``); ``read_curves`` reads an XP folder.
        title: the page title; summary: lines shown under it (what ran, timings).
        media: "copy" (audio and PNGs in ``<stem>_files/`` beside the page, relative links) or "embed"
            (``data:`` URIs: one file).
        notes: ``{metric name: note}`` shown beside its value in any table (an unreliable FAD-inf).
    """
    out_html = Path(out_html)
    for section in sections:
        for clip in section.clips:
            if not Path(clip.wav).is_file():
                raise FileNotFoundError(f"report section {section.title!r}, clip {clip.label!r}: {clip.wav} "
                                        f"does not exist")
    out = _Media(out_html, media)
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if summary:
        parts.append("<ul class='summary'>" + "".join(f"<li>{e(line)}</li>" for line in summary) + "</ul>")
    parts.append("<h2>Metrics</h2>")
    parts += _metrics_html(metrics, notes or {})
    parts.append("<h2>Training curves</h2><div class='curves'>")
    plotted = 0
    for name, series in curves.items():
        if any(series.values()):
            src = out.figure(_curve_figure(name, series), f"curve_{_slug(name)}")
            parts.append(f"<img class='curve' src='{e(src)}' alt='training curves: {e(name)}'>")
            plotted += 1
    parts.append("</div>" if plotted else "<p>No training curves.</p></div>")
    for section in sections:
        parts.append(f"<h2>{e(section.title)}</h2>")
        if section.note:
            parts.append(f"<p>{e(section.note)}</p>")
        for clip in section.clips:
            wav = Path(clip.wav)
            stem = f"{_slug(section.title)}_{_slug(clip.label)}"
            fig, seconds = _spectrogram(wav, clip.label)
            png = out.figure(fig, f"spec_{stem}")
            audio = out.audio(wav, stem)
            text = f"<p>{e(clip.text)}</p>" if clip.text else ""
            parts.append(f"<div class='clip'><b>{e(clip.label)}</b> <small>({seconds:.1f} s)</small>{text}"
                         f"<audio controls preload='metadata' src='{e(audio)}'></audio>"
                         f"<img class='spectrogram' src='{e(png)}' alt='log-mel spectrogram of {e(clip.label)}'>"
                         f"</div>")
    parts.append("</body></html>")
    atomic_write_text(out_html, "\n".join(parts) + "\n")
    return out_html
