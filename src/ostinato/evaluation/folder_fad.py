"""FAD between two sets of audio, what ``ostinato fad REF GEN`` runs: one row per embedding, one JSON protocol.

Each side is an audio folder (recursive), a shard set (a folder with ``manifest.json``) or a statistics file of the
embedding cache (``<backend>-stats-<per>-<key>.safetensors`` with its ``.json``; REF only, or GEN when nothing but FAD
is asked). Embeddings and statistics go through the one cache (``metrics/embeddings/cache.py``), keyed by content.

What is refused rather than printed: FAD-inf from fewer than ``FAD_INF_MIN_ITEMS`` clips or a fit with R^2 below
``FAD_INF_MIN_R2`` (``fad_inf_refusal``), per-song FAD when a song has fewer frames than ``D + 1``
(``per_song_refusal``). The reason stands in the table and in the JSON in place of the number.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.errors import UserError

__all__ = ["compare_folders", "format_fad_table", "weights_sha256"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".th")
STATS_SUFFIXES = (".safetensors", ".json")


def weights_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a weights file, or of a folder's weight files (``WEIGHT_SUFFIXES``, recursive, name + bytes in
    sorted order); None when ``path`` is neither (e.g. a hub name)."""
    path = Path(path).expanduser()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _side_kind(flag: str, path: str) -> str:
    """``"stats"`` for a cache statistics file, ``"audio"`` for a folder, shard set or audio file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or folder; give an audio folder, a shard folder "
                                "(manifest.json) or a statistics file (.safetensors of the eval cache)")
    if p.is_file() and p.suffix in STATS_SUFFIXES:
        return "stats"
    return "audio"


def _backend(spec: str, device: str) -> Any:
    from ostinato.metrics.embeddings import load_backend

    try:
        return load_backend(spec).to(device)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        raise UserError(f"--embedding {spec}: {e}".split("\n")[0]) from e


def _stats_file(flag: str, path: str, backend: Any, per: str) -> tuple[Tensor, Tensor, int, dict[str, Any]]:
    from ostinato.metrics.embeddings.cache import load_stats_file

    mu, sigma, n, meta = load_stats_file(path)
    if meta.get("backend") != backend.id():
        raise UserError(f"{flag} {path}: computed with {str(meta.get('backend'))[:80]}..., not with this "
                        f"--embedding ({backend.id()[:80]}...); give audio, or statistics of the same embedding")
    if meta.get("per") != per:
        raise UserError(f"{flag} {path}: {meta.get('per')} statistics, not {per}; pass --per {meta.get('per')}")
    return mu, sigma, n, meta


def _embeddings(flag: str, path: str, backend: Any, cache: Path,
                progress: bool) -> tuple[list[Tensor], dict[str, Any]]:
    """Per clip ``[F_i, D]`` frames of an audio side, and what the JSON says of the side."""
    from ostinato.fileio import read_json
    from ostinato.metrics.embeddings.cache import cache_entry, reference_embeddings

    try:
        entry, hit = cache_entry(backend, path, cache, kind="embeddings")
        clips = reference_embeddings(backend, path, cache, progress=progress)
    except FileNotFoundError as e:
        raise UserError(f"{flag} {e}; give a folder with audio files or shards") from e
    if len(clips) < 2:
        raise UserError(f"{flag} {path}: {len(clips)} clip(s) with at least one {backend.name} frame (unreadable "
                        "files are skipped, see the log); give at least 2 readable clips longer than "
                        f"{backend.window_seconds or 0:.3g} s")
    meta = read_json(entry.with_suffix(".json"))
    return clips, {"source": str(path), "kind": "audio", "clips": len(clips), "corrupt_skipped": meta.get("corrupt"),
                   "from_cache": hit}


def _stats(flag: str, path: str, backend: Any, per: str, cache: Path,
           progress: bool) -> tuple[tuple[Tensor, Tensor, int], dict[str, Any]]:
    """``(mu, sigma, n)`` of an audio side through the statistics cache, and what the JSON says of the side."""
    from ostinato.fileio import read_json
    from ostinato.metrics.embeddings.cache import cache_entry, reference_stats

    try:
        entry, hit = cache_entry(backend, path, cache, kind="stats", per=per)
        mu, sigma, n = reference_stats(backend, path, cache, per=per, progress=progress)
    except FileNotFoundError as e:
        raise UserError(f"{flag} {e}; give a folder with audio files or shards") from e
    except ValueError as e:  # fewer than 2 frames or clips
        raise UserError(f"{flag} {e}") from e
    meta = read_json(entry.with_suffix(".json"))
    return (mu, sigma, n), {"source": str(path), "kind": "audio", "n": n, "clips": meta.get("clips"),
                            "corrupt_skipped": meta.get("corrupt"), "from_cache": hit, "stats_file": str(entry)}


def _rows(clips: list[Tensor], per: str) -> Tensor:
    return torch.cat(clips) if per == "frame" else torch.stack([c.mean(0) for c in clips])


def _kad(ref_clips: list[Tensor], gen_clips: list[Tensor], bootstrap: int, seed: int,
         level: float) -> dict[str, Any]:
    """KAD (``ostinato.metrics.kad``, kadtk's conventions) between the clip embeddings (frame means) of the two
    sides, with a bootstrap interval over the GEN clips (the bandwidth fixed at the reference's)."""
    from ostinato.metrics.kad import KADTK_SCALE, bootstrap_kad, kernel_audio_distance

    x = torch.stack([c.double().mean(0) for c in ref_clips])
    y = torch.stack([c.double().mean(0) for c in gen_clips])
    kad, bandwidth = kernel_audio_distance(x, y)
    out: dict[str, Any] = {"kad": float(kad), "statistics": "clip", "bandwidth": float(bandwidth),
                           "bandwidth_from": "reference", "scale": KADTK_SCALE, "n_ref": len(x), "n_gen": len(y)}
    if bootstrap > 0:  # kernel sums once, then O(clips^2) per replicate (1,000 over 5,000 clips: seconds)
        ci = bootstrap_kad(x, list(y[:, None]), bootstrap, seed=seed, level=level, bandwidth=bandwidth)
        out["bootstrap"] = {k: v for k, v in ci.items() if k != "bandwidth"}
    return out


def compare_folders(ref: str, gen: str, embeddings: Sequence[str], *, per: str = "frame", per_song: bool = False,
                    inf: bool = False, inf_protocol: str = "ostinato", kad: bool = False, bootstrap: int = 0,
                    seed: int = 0, level: float = 0.95, device: str = "cpu", cache: str | os.PathLike | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """FAD of GEN against REF under each embedding spec (``load_backend``), with the protocol that produced it.

    Returns ``{"ref", "gen", "rows": [one dict per embedding], "versions", "date"}``; a row holds ``fad``, its
    ``bootstrap`` interval, ``fad_inf`` / ``per_song_fad`` (or their ``refused`` reason), ``kad`` and ``protocol``
    (backend id, weights hashes, sample rate, windowing, statistics, N per side).
    """
    from ostinato.evaluation.report import versions
    from ostinato.evaluation.scoring import cache_dir
    from ostinato.metrics.fad import (FAD_INF_PROTOCOLS, bootstrap_fad, frechet_distance, gaussian_stats,
                                      per_song_refusal)

    if per not in ("frame", "clip"):
        raise UserError(f"--per {per}: use frame or clip")
    if inf_protocol not in FAD_INF_PROTOCOLS:
        raise UserError(f"--inf-protocol {inf_protocol}: use one of {', '.join(FAD_INF_PROTOCOLS)}")
    if not embeddings:
        raise UserError("--embedding: give at least one, e.g. --embedding codec:/models/codec")
    cache_path = Path(cache) if cache is not None else cache_dir()
    kinds = {"REF": _side_kind("REF", ref), "GEN": _side_kind("GEN", gen)}
    needs_gen_embeddings = per_song or inf or kad or bootstrap > 0
    if kinds["GEN"] == "stats" and needs_gen_embeddings:
        raise UserError(f"GEN {gen}: a statistics file has no embeddings, which --per-song, --inf, --kad and "
                        "--bootstrap resample; give GEN as audio")
    if kinds["REF"] == "stats" and kad:
        raise UserError(f"REF {ref}: a statistics file has no embeddings, which --kad needs; give REF as audio")
    rows = []
    for spec in embeddings:
        backend = _backend(spec, device)
        row: dict[str, Any] = {"embedding": spec}
        sides: dict[str, dict[str, Any]] = {}
        clips: dict[str, list[Tensor]] = {}
        stats: dict[str, tuple[Tensor, Tensor, int]] = {}
        for flag, path in (("REF", ref), ("GEN", gen)):
            if kinds[flag] == "stats":
                mu, sigma, n, meta = _stats_file(flag, path, backend, per)
                stats[flag] = (mu, sigma, n)
                sides[flag] = {"source": str(path), "kind": "statistics file", "n": n, "clips": meta.get("clips"),
                               "from_cache": True}
                continue
            if (flag == "GEN" and needs_gen_embeddings) or (flag == "REF" and kad):
                clips[flag], side = _embeddings(flag, path, backend, cache_path, progress)
                rows_ = _rows(clips[flag], per)
                mu, sigma = gaussian_stats(rows_)
                stats[flag] = (mu, sigma, len(rows_))
                sides[flag] = {**side, "n": len(rows_)}
            else:
                stats[flag], sides[flag] = _stats(flag, path, backend, per, cache_path, progress)
        (mu_r, sigma_r, n_r), (mu_g, sigma_g, n_g) = stats["REF"], stats["GEN"]
        row["fad"] = float(frechet_distance(mu_r, sigma_r, mu_g, sigma_g))
        singular = [f"{flag} N={s['n']} < D={backend.dim}" for flag, s in sides.items() if s["n"] < backend.dim]
        row["notes"] = ([f"singular covariance ({', '.join(singular)}): FAD is strongly biased; use more "
                         f"{per}s"] if singular else [])
        if bootstrap > 0:
            per_clip = clips["GEN"] if per == "frame" else [c.mean(0, keepdim=True) for c in clips["GEN"]]
            row["bootstrap"] = bootstrap_fad(stats["REF"], per_clip, bootstrap, seed=seed, level=level)
        if inf:
            row["fad_inf"] = _fad_inf(backend.dim, stats["REF"], _rows(clips["GEN"], per), len(clips["GEN"]),
                                      inf_protocol, seed)
        if per_song:
            counts = [len(c) for c in clips["GEN"]]
            refused = per_song_refusal(counts, backend.dim)
            if refused:
                row["per_song_fad"] = {"refused": refused, "rule": f"every song >= D + 1 = {backend.dim + 1} frames"}
            else:
                fads = [float(frechet_distance(mu_r, sigma_r, *gaussian_stats(c))) for c in clips["GEN"]]
                row["per_song_fad"] = {"mean": sum(fads) / len(fads), "median": float(torch.tensor(fads).median()),
                                       "fad": fads, "frames": counts,
                                       "rule": f"every song >= D + 1 = {backend.dim + 1} frames"}
        if kad:
            row["kad"] = _kad(clips["REF"], clips["GEN"], bootstrap, seed, level)
        spec_path = str(spec).partition(":")[2].split(",")[0]
        row["protocol"] = {
            "backend": backend.name, "backend_id": backend.id(), "weights": getattr(backend, "weights", None),
            "weights_sha256": weights_sha256(spec_path) if spec_path else None,
            "sample_rate": backend.sample_rate, "channels": backend.channels, "dim": backend.dim,
            "window_seconds": backend.window_seconds, "hop_seconds": backend.hop_seconds,
            "statistics": per, "n_ref": n_r, "n_gen": n_g, "sides": sides,
            "fad": "Frechet distance of Gaussians (float64, unbiased covariances, eigh square root)",
        }
        rows.append(row)
    return {"ref": str(ref), "gen": str(gen), "rows": rows, "versions": versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _fad_inf(dim: int, reference: tuple[Tensor, Tensor, int], gen_rows: Tensor, num_clips: int, protocol: str,
             seed: int) -> dict[str, Any]:
    """FAD-inf of ``gen_rows [N, D]`` (from ``num_clips`` clips), or its refusal reason."""
    from ostinato.metrics.fad import FADTK_STEPS, FADInf, fad_inf_refusal

    metric = FADInf(dim, reference=reference, num_points=FADTK_STEPS if protocol == "fadtk" else 15, seed=seed,
                    protocol=protocol)
    min_n = metric.default_min_n(len(gen_rows))
    out: dict[str, Any] = {"protocol": protocol, "num_points": metric.num_points, "min_n": min_n, "seed": seed,
                           "with_replacement": protocol == "fadtk", "clips": num_clips}
    if len(gen_rows) <= min_n:
        return {**out, "refused": f"FAD-inf refused: {len(gen_rows)} embeddings <= the smallest subset "
                                  f"min_n={min_n} ({protocol} protocol); score more clips"}
    metric.update(gen_rows)
    value = metric.compute()
    r2 = float(value["r2"])
    reason = fad_inf_refusal(r2 if torch.isfinite(value["r2"]) else None, num_clips)
    if reason:
        return {**out, "refused": reason, "r2": r2}
    return {**out, "fad_inf": float(value["fad_inf"]), "slope": float(value["slope"]), "r2": r2,
            "n": [int(n) for n in value["n"].tolist()], "fad": [float(f) for f in value["fad"].tolist()]}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_fad_table(result: dict[str, Any]) -> str:
    """The terminal table of ``compare_folders``: one row per embedding, then each refusal or note on its line."""
    head = ["embedding", "stats", "N ref", "N gen", "FAD", "CI", "FAD-inf", "per-song FAD", "KAD"]
    body, lines = [], []
    for row in result["rows"]:
        p = row["protocol"]
        ci = row.get("bootstrap")
        inf = row.get("fad_inf")
        song = row.get("per_song_fad")
        body.append([
            row["embedding"], p["statistics"], str(p["n_ref"]), str(p["n_gen"]), _cell(row["fad"]),
            f"[{ci['low']:.4g}, {ci['high']:.4g}] ({ci['level']:.0%}, {ci['resamples']} resamples)" if ci else "-",
            "-" if inf is None else (f"refused ({inf['protocol']})" if "refused" in inf else
                                     f"{inf['fad_inf']:.4g} ({inf['protocol']}, R^2 {inf['r2']:.3f})"),
            "-" if song is None else ("refused" if "refused" in song else f"median {song['median']:.4g}"),
            "-" if "kad" not in row else _cell(row["kad"]["kad"]) + (
                f" [{row['kad']['bootstrap']['low']:.4g}, {row['kad']['bootstrap']['high']:.4g}]"
                if "bootstrap" in row["kad"] else "")])
        for what in (inf, song):
            if what and "refused" in what:
                lines.append(f"{row['embedding']}: {what['refused']}")
        lines += [f"{row['embedding']}: {note}" for note in row.get("notes", [])]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(out + lines)
