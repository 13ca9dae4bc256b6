"""Reports of an evaluation folder: ``report.md`` and ``report.html`` from ``metrics.json`` and the wavs beside it.

The folder is self-contained: figures go to ``figures/`` and every link (audio, images) is relative, so the folder
can be moved or served as is.
"""
from __future__ import annotations

import html
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ostinato.fileio import atomic_path, atomic_write_text, read_json

__all__ = ["METRIC_INFO", "NOT_A_SCORE", "format_table", "format_value", "metric_info", "metric_notes", "write_report"]

NOT_A_SCORE = "neither (context)"  # the "better" of a number shown beside the scores: a count, chance, a fit

# metric -> (label, better direction); every name the evaluation suites, the demo and MuLaN retrieval print
METRIC_INFO: dict[str, tuple[str, str]] = {
    "fad": ("FAD", "lower"),
    "fad_inf": ("FAD-inf (extrapolated to N -> inf)", "lower"),
    "fad_inf_slope": ("FAD-inf slope (FAD = FAD-inf + slope / N)", NOT_A_SCORE),
    "fad_inf_r2": ("FAD-inf fit R^2 (near 1: the extrapolation holds)", "higher"),
    "per_song_fad_mean": ("per-song FAD, mean", "lower"),
    "per_song_fad_median": ("per-song FAD, median", "lower"),
    "kad": ("KAD (unbiased MMD^2 x 100, kadtk's scale)", "lower"),
    "text_audio": ("text-audio cosine similarity", "higher"),
    "kld": ("label KL divergence (reference || generated)", "lower"),
    "chroma": ("chroma cosine similarity to the reference", "higher"),
    "mel_distance": ("mel distance (L1 of log10 mel)", "lower"),
    "mel_distance_untrained": ("mel distance of the untrained codec (the starting point)", "lower"),
    "stft_distance": ("multi-scale STFT distance", "lower"),
    "sisnr": ("SI-SNR (dB)", "higher"),
    "loss": ("training loss", "lower"),
    "ce": ("cross-entropy (nats per token)", "lower"),
    "ce_text_only": ("cross-entropy without the melody and style prefix (nats)", "lower"),
    "ce_no_text": ("cross-entropy with the text nulled alone (nats; minus ce: what the text adds)", "lower"),
    "ce_no_melody": ("cross-entropy with the melody nulled alone (nats; minus ce: what the melody adds)", "lower"),
    "ce_no_style": ("cross-entropy with the style nulled alone (nats; minus ce: what the style adds)", "lower"),
    "unigram_entropy": ("unigram entropy of the tokens (nats; a model without context)", NOT_A_SCORE),
    "t2a_r1": ("recall@1, text -> audio", "higher"),
    "a2t_r1": ("recall@1, audio -> text", "higher"),
    "t2a_r10": ("recall@10, text -> audio", "higher"),
    "a2t_r10": ("recall@10, audio -> text", "higher"),
    "chance_r1": ("recall@1 of a random model", NOT_A_SCORE),
    "chance_r10": ("recall@10 of a random model", NOT_A_SCORE),
    "t2a_median_rank": ("median rank, text -> audio (1 = perfect)", "lower"),
    "a2t_median_rank": ("median rank, audio -> text (1 = perfect)", "lower"),
    "chance_median_rank": ("median rank of a random model", NOT_A_SCORE),
    "t2a_r5": ("recall@5, text -> audio", "higher"),
    "a2t_r5": ("recall@5, audio -> text", "higher"),
    "chance_r5": ("recall@5 of a random model", NOT_A_SCORE),
    "t2a_mean_rank": ("mean rank, text -> audio (1 = perfect)", "lower"),
    "a2t_mean_rank": ("mean rank, audio -> text (1 = perfect)", "lower"),
    "chance_mean_rank": ("mean rank of a random model", NOT_A_SCORE),
    "n": ("clips", NOT_A_SCORE),
    "rerank_score_kept": ("MuLaN text-audio cosine of the kept candidates (mean)", "higher"),
    "rerank_score_all": ("MuLaN text-audio cosine of every candidate (mean; what one draw gives)", NOT_A_SCORE),
    "diversity_waveform_corr_mean": ("waveform correlation between clips, mean over pairs (1 = copies)", "lower"),
    "diversity_waveform_corr_max": ("waveform correlation between clips, most similar pair", "lower"),
    "diversity_spectral_sim_mean": ("log-mel cosine between clips, mean over pairs (1 = collapsed)", "lower"),
    "diversity_spectral_sim_max": ("log-mel cosine between clips, most similar pair", "lower"),
    "diversity_pairs": ("pairs of clips the diversity compares", NOT_A_SCORE),
}
_SPLITS = ("train/", "valid/", "test/")


def metric_info(name: str) -> tuple[str, str]:
    """``(label, better)`` of a metric name, also as logged in training (``valid/ce`` -> ``ce``); ``("", "")`` when
    unknown."""
    if name in METRIC_INFO:
        return METRIC_INFO[name]
    bare = name.split("/", 1)[1] if name.startswith(_SPLITS) else name
    if bare in METRIC_INFO:
        label, better = METRIC_INFO[bare]
        return f"{label}, {name.split('/', 1)[0]}", better
    return "", ""


def metric_notes(result: dict[str, Any]) -> dict[str, str]:
    """``{metric: note}`` to show beside a value of an evaluation result (``metrics.json``): why FAD-inf or per-song
    FAD was refused, or (a result written before refusals) why FAD-inf is unreliable."""
    metrics = result.get("metrics") or {}
    refusals = (("fad_inf_refused", ("fad_inf",)),
                ("per_song_fad_refused", ("per_song_fad_mean", "per_song_fad_median")))
    notes = {name: result[key] for key, names in refusals if result.get(key) for name in names}
    if notes or metrics.get("fad_inf") is None:
        return notes
    fit = result.get("fad_inf_fit")
    if fit is None:  # a metrics.json written before the flag
        from ostinato.metrics.fad import fad_inf_reliability

        fit = fad_inf_reliability(metrics.get("fad_inf_r2"), int(result.get("num_items") or 0))
    return {"fad_inf": fit["note"]} if fit.get("note") else {}


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(metrics: dict[str, Any], notes: dict[str, str] | None = None) -> str:
    """A plain-text table of the scalar metrics (for the terminal); ``notes`` (``metric_notes``) follow a value."""
    notes = notes or {}
    rows = [(name, format_value(value), metric_info(name)[1] + (f"  ({notes[name]})" if notes.get(name) else ""))
            for name, value in metrics.items()]
    w0 = max([len("metric")] + [len(r[0]) for r in rows])
    w1 = max([len("value")] + [len(r[1]) for r in rows])
    lines = [f"{'metric':<{w0}}  {'value':>{w1}}  better", f"{'-' * w0}  {'-' * w1}  ------"]
    lines += [f"{n:<{w0}}  {v:>{w1}}  {b}" for n, v, b in rows]
    return "\n".join(lines)


def _savefig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _per_song_histogram(values: list[float | None], bins: int, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return False
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.hist(finite, bins=max(1, min(bins, len(finite))), color="#4c72b0", edgecolor="white")
    ax.axvline(float(np.median(finite)), color="#c44e52", linestyle="--", label=f"median {np.median(finite):.3g}")
    ax.set_xlabel("per-song FAD")
    ax.set_ylabel("clips")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)
    return True


def _spectrogram_grid(folder: Path, items: list[dict], labels: tuple[str, str], path: Path,
                      text: str | None = None) -> bool:
    """Rows: items; columns: generated (and reference when present). Log-mel of each clip, the generated one
    titled with its ``text`` (prompt, conditioning) when it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ostinato.data.audio import load_audio
    from ostinato.engine.media import log_mel

    items = [it for it in items if (folder / it["generated"]).is_file()]
    if not items:
        return False
    cols = 2 if any(it.get("reference") for it in items) else 1
    fig, axes = plt.subplots(len(items), cols, figsize=(5 * cols, 1.8 * len(items)), dpi=90, squeeze=False)
    for row, it in enumerate(items):
        for col, key in enumerate(("generated", "reference")[:cols]):
            ax = axes[row][col]
            ax.set_axis_off()
            if not it.get(key) or not (folder / it[key]).is_file():
                continue
            wav, sr = load_audio(folder / it[key])
            ax.imshow(log_mel(wav, sr), origin="lower", aspect="auto", cmap="magma")
            title = f"{labels[col]} {it['index']}" + (f": {it[text]}" if col == 0 and text and it.get(text) else "")
            ax.set_title(title[:70], fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)
    return True


def _labels(result: dict) -> tuple[str, str]:
    return ("reconstruction" if result.get("kind") == "reconstruction" else "generated", "reference")


def _item_rows(result: dict) -> list[dict]:
    per_song = result.get("per_song_fad") or {}
    by_id = dict(zip(per_song.get("ids") or [], per_song.get("fad") or []))
    return [{**it, "per_song_fad": by_id.get(str(it["index"]))} for it in result.get("items", [])]


def write_report(folder: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` of an evaluation folder; returns report.md."""
    folder = Path(folder)
    result = read_json(folder / "metrics.json")
    config = result.get("suite_config") or {}
    max_items = int((config.get("report") or {}).get("max_items", 4))
    figures = {}
    per_song = result.get("per_song_fad")
    if per_song and _per_song_histogram(per_song["fad"], int(per_song.get("bins") or 20),
                                                          folder / "figures" / "per_song_fad.png"):
        figures["per-song FAD histogram"] = "figures/per_song_fad.png"
    rows = _item_rows(result)
    labels = _labels(result)
    text = _text_column(result)
    if _spectrogram_grid(folder, rows[:max_items], labels, folder / "figures" / "spectrograms.png",
                         None if text == "key" else text):
        figures[f"log-mel spectrograms ({labels[0]} | {labels[1]})"] = "figures/spectrograms.png"
    atomic_write_text(folder / "report.md", _markdown(result, rows, figures))
    atomic_write_text(folder / "report.html", _html(result, rows, figures))
    return folder / "report.md"


def _header(result: dict) -> list[tuple[str, str]]:
    settings = result.get("settings") or {}
    where = f", {result['suite_file']}" if result.get("suite_file") else ""
    clips = f"{result.get('num_items')} x {format_value(result.get('seconds'))} s at {result.get('sample_rate')} Hz"
    out = [("suite", f"{result['suite']} ({result.get('kind')}){where}"),
           ("model", str(result.get("model"))), ("codec", str(result.get("codec"))), ("clips", clips),
           ("date", str(result.get("date"))),
           ("ranks", f"{result.get('world_size')} ({result.get('device')}), {result.get('elapsed_seconds')} s")]
    if "generation" in settings:
        gen = ", ".join(f"{k}={v}" for k, v in settings["generation"].items() if v is not None)
        out.append(("generation", gen + f"; melody from reference: {settings.get('melody_from_reference')}"))
    rerank = result.get("rerank")
    if rerank:
        out.append(("reranking", f"each clip is the best of {rerank['candidates']} candidates for its prompt by "
                                 f"{rerank['by']} (rerank_score_kept vs rerank_score_all below)"))
    versions = result.get("versions") or {}
    out.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return out


def _text_column(result: dict) -> str | None:
    """The clips table's text: the reference clip's key (a codec), the prompt (text to music), what conditioned a
    clip (a Jukebox's metadata); None for clips that nothing conditioned (Musika, an unconditioned Jukebox)."""
    if result.get("kind") == "reconstruction":
        return "key"
    column = "conditioning" if result.get("kind") == "unconditional" else "prompt"
    return column if any(it.get(column) for it in result.get("items", [])) else None


def _markdown(result: dict, rows: list[dict], figures: dict[str, str]) -> str:
    lines = [f"# Evaluation: {result['suite']} on {Path(str(result['model'])).name}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _header(result)]
    lines += ["", "## Metrics", "", "| metric | value | better |", "|---|---:|---|"]
    notes = metric_notes(result)
    for name, value in result["metrics"].items():
        label, better = metric_info(name)
        note = f" ({notes[name]})" if name in notes else ""
        lines.append(f"| {label or name} (`{name}`) | {format_value(value)}{note} | {better} |")
    for title, src in figures.items():
        lines += ["", f"## {title[0].upper() + title[1:]}", "", f"![{title}]({src})"]
    text, labels, per_song = _text_column(result), _labels(result), "per_song_fad" in result
    head = ["#", *([text] if text else []), labels[0], labels[1]] + (["per-song FAD"] if per_song else [])
    lines += ["", "## Clips", "", "| " + " | ".join(head) + " |",
              "|---:|" + "---|" * (len(head) - 1 - per_song) + ("---:|" if per_song else "")]
    for it in rows:
        ref = f"[wav]({it['reference']})" if it.get("reference") else ""
        cells = [str(it["index"]), *([str(it.get(text) or "").replace("|", "\\|")] if text else []),
                 f"[wav]({it['generated']})", ref]
        cells += [format_value(it.get("per_song_fad"))] if per_song else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _html(result: dict, rows: list[dict], figures: dict[str, str]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Evaluation: {e(result['suite'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}td.n{text-align:right}"
             "audio{height:28px;width:220px}</style></head><body>",
             f"<h1>Evaluation: {e(result['suite'])} on {e(Path(str(result['model'])).name)}</h1><ul>"]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in _header(result)]
    parts.append("</ul><h2>Metrics</h2><table><tr><th>metric</th><th>value</th><th>better</th></tr>")
    notes = metric_notes(result)
    for name, value in result["metrics"].items():
        label, better = metric_info(name)
        note = f" <small class='note'>({e(notes[name])})</small>" if name in notes else ""
        parts.append(f"<tr><td>{e(label or name)} (<code>{e(name)}</code>)</td>"
                     f"<td class='n'>{e(format_value(value))}{note}</td><td>{e(better)}</td></tr>")
    parts.append("</table>")
    for title, src in figures.items():
        parts.append(f"<h2>{e(title[0].upper() + title[1:])}</h2><img src='{e(src)}' alt='{e(title)}'>")
    text, labels, per_song = _text_column(result), _labels(result), "per_song_fad" in result
    head = ["#", *([text] if text else []), labels[0], labels[1]] + (["per-song FAD"] if per_song else [])
    parts.append("<h2>Clips</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for it in rows:
        ref = f"<audio controls preload='none' src='{e(it['reference'])}'></audio>" if it.get("reference") else ""
        fad = f"<td class='n'>{e(format_value(it.get('per_song_fad')))}</td>" if per_song else ""
        cell = f"<td>{e(str(it.get(text) or ''))}</td>" if text else ""
        parts.append(f"<tr><td class='n'>{it['index']}</td>{cell}"
                     f"<td><audio controls preload='none' src='{e(it['generated'])}'></audio></td><td>{ref}</td>"
                     f"{fad}</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ostinato", "torch", "torchaudio", "torchmetrics", "transformers", "lightning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
