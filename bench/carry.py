"""Move a rendered corpus (``ostinato prep corpus``) to a machine without fluidsynth, inside a size budget.

The GPU machine of the device tool takes 64 MiB a call and has no fluidsynth: a corpus is rendered here, its clips
packed as OGG Vorbis (about 22 MB an hour at 24 kHz mono, a fifth of FLAC: libsndfile writes and reads it at any
rate) with their caption sidecars and ``corpus.json``, and unpacked there into the layout that ``prep corpus``
writes (FLAC clips, sidecars, ``corpus.json`` and, with ``--shards``, the WebDataset shards), so ``ostinato demo``
and ``bench/learning_run.py`` find a finished corpus:

    python bench/carry.py pack data/demo .gpu/demo_carry --budget-mb 30        # here
    python bench/carry.py unpack .gpu/demo_carry data/demo --shards           # there

``pack`` keeps whole clips, each split in proportion and every piece's first segment first, until the budget is
spent; ``pack.json`` records the transport, bitrate, hours and clips, and an unpacked ``corpus.json`` records it
under ``options.transport``: results computed from an unpacked corpus say what the audio went through.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid", "test")
PACK_NAME = "pack.json"
LOSSY = {"format": "OGG", "subtype": "VORBIS", "suffix": ".ogg"}
FLAC = {"format": "FLAC", "subtype": "PCM_16", "suffix": ".flac"}


def clip_order(metas: dict[str, dict]) -> list[str]:
    """Clip names in packing order: every piece's first segment, then every piece's second... so that a budget
    that cuts the list keeps as many pieces as it can."""
    return sorted(metas, key=lambda n: (int(metas[n].get("segment", 0)), str(metas[n].get("piece", "")), n))


def choose_clips(sizes: dict[str, list[tuple[str, int]]], budget: int) -> dict[str, list[str]]:
    """Whole clips per split within ``budget`` bytes, each split keeping its share of the total: ``sizes`` maps a
    split to its clips ``(name, bytes)`` in packing order. A split's share is its share of all bytes (that is, of
    the seconds, for clips of one length and bitrate)."""
    total = sum(n for clips in sizes.values() for _, n in clips)
    chosen: dict[str, list[str]] = {}
    for split, clips in sizes.items():
        share = budget * sum(n for _, n in clips) / max(total, 1)
        used, names = 0, []
        for name, n in clips:
            if used + n > share:
                break
            used += n
            names.append(name)
        chosen[split] = names
    return chosen


def _map(fn: Callable[[Any], Any], jobs: list, workers: int) -> list:
    """``fn`` over ``jobs``, in ``workers`` processes (here when 1)."""
    if workers <= 1:
        return [fn(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs, chunksize=8))


def _encode_clip(job: tuple[str, str, dict, float | None]) -> tuple[str, int]:
    import soundfile as sf

    src, dst, fmt, quality = job
    wav, sr = sf.read(src, dtype="float32")
    extra = {} if quality is None else {"compression_level": quality}
    sf.write(dst, wav, sr, format=fmt["format"], subtype=fmt["subtype"], **extra)
    return dst, Path(dst).stat().st_size


def pack(corpus: Path, to: Path, budget_mb: float, transport: str = "lossy", quality: float = 0.8,
         workers: int = 1) -> dict:
    """A rendered corpus (``ostinato prep corpus``: ``audio/{train,valid,test}/*.flac`` + ``.json`` sidecars,
    ``corpus.json``) -> ``to``: as many whole clips per split as ``budget_mb`` holds (split proportions kept), as
    Vorbis (``lossy``, libsndfile compression level ``quality`` in [0, 1]) or FLAC, their sidecars, corpus.json and
    ``pack.json`` (transport, bitrate, hours and clips per split). Returns pack.json's content."""
    if not (corpus / "corpus.json").is_file():
        raise FileNotFoundError(f"--corpus {corpus}: no corpus.json; render one with `ostinato prep corpus`")
    if (to / PACK_NAME).is_file():
        raise FileExistsError(f"--to {to}: already packed ({to / PACK_NAME}); delete it to pack again")
    fmt = LOSSY if transport == "lossy" else FLAC
    staging = to.with_name(to.name + ".all")
    shutil.rmtree(staging, ignore_errors=True)
    jobs, metas = [], {}
    for split in SPLITS:
        folder = corpus / "audio" / split
        split_metas = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
        for name in clip_order(split_metas):
            if (folder / f"{name}.flac").is_file():
                (staging / split).mkdir(parents=True, exist_ok=True)
                jobs.append((str(folder / f"{name}.flac"), str(staging / split / f"{name}{fmt['suffix']}"), fmt,
                             quality if transport == "lossy" else None))
                metas[(split, name)] = split_metas[name]
    sizes_by_path = dict(_map(_encode_clip, jobs, workers))
    sidecars = {key: json.dumps(meta, indent=1) for key, meta in metas.items()}
    sizes = {s: [(Path(dst).stem, sizes_by_path[dst] + len(sidecars[(s, Path(dst).stem)].encode()))
                 for _, dst, _, _ in jobs if Path(dst).parent.name == s] for s in SPLITS}
    budget = int(budget_mb * 2**20) - (corpus / "corpus.json").stat().st_size - 2**14  # 16 KiB: pack.json
    chosen = choose_clips(sizes, budget)
    to.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"transport": transport, "format": fmt["format"], "subtype": fmt["subtype"],
                               "compression_level": quality if transport == "lossy" else None,
                               "source": str(corpus), "clips": {}, "seconds": {}, "bytes": {}}
    for split, names in chosen.items():
        (to / "audio" / split).mkdir(parents=True, exist_ok=True)
        seconds = 0.0
        for name in names:
            shutil.move(str(staging / split / f"{name}{fmt['suffix']}"), to / "audio" / split)
            meta = metas[(split, name)]
            (to / "audio" / split / f"{name}.json").write_text(sidecars[(split, name)])
            seconds += float(meta.get("duration", 0.0))
        summary["clips"][split], summary["seconds"][split] = len(names), seconds
        summary["bytes"][split] = sum(Path(to / "audio" / split / f"{name}{fmt['suffix']}").stat().st_size
                                      for name in names)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copy(corpus / "corpus.json", to / "corpus.json")
    audio_bytes, seconds = sum(summary["bytes"].values()), sum(summary["seconds"].values())
    summary["hours"] = seconds / 3600
    summary["kbps"] = audio_bytes * 8 / max(seconds, 1e-9) / 1000
    summary["source_clips"] = {s: len(v) for s, v in sizes.items()}
    (to / PACK_NAME).write_text(json.dumps(summary, indent=1))
    return summary


def _decode_clip(job: tuple[str, str]) -> None:
    import soundfile as sf

    src, dst = job
    wav, sr = sf.read(src, dtype="float32")
    sf.write(dst + ".tmp", wav, sr, format="FLAC", subtype="PCM_16")
    os.replace(dst + ".tmp", dst)


def unpack(carry: Path, corpus: Path, workers: int, shards: bool = False) -> None:
    """A packed folder -> a normal corpus folder: ``audio/{split}/*.flac`` + sidecars + corpus.json (+ with
    ``shards``, ``shards/{split}`` as ``prep corpus`` writes them)."""
    jobs = []
    for split in SPLITS:
        out = corpus / "audio" / split
        out.mkdir(parents=True, exist_ok=True)
        for src in sorted((carry / "audio" / split).iterdir()):
            if src.suffix == ".json":
                shutil.copy(src, out / src.name)
            elif not (out / f"{src.stem}.flac").is_file():
                jobs.append((str(src), str(out / f"{src.stem}.flac")))
    list(_map(_decode_clip, jobs, workers))
    saved = json.loads((carry / "corpus.json").read_text())
    saved.setdefault("options", {})["transport"] = json.loads((carry / PACK_NAME).read_text())
    (corpus / "corpus.json").write_text(json.dumps(saved, indent=1))
    if shards:  # as `ostinato prep corpus` writes them
        from ostinato.data.shards import build_shards

        options = saved["options"]
        for split in SPLITS:
            build_shards(corpus / "audio" / split, corpus / "shards" / split, sample_rate=options["sample_rate"],
                         channels=options.get("channels", "mono"), workers=workers, overwrite=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("pack", help="a rendered corpus -> a folder to carry")
    a.add_argument("corpus", type=Path)
    a.add_argument("to", type=Path)
    a.add_argument("--budget-mb", type=float, default=55.0, help="MiB the packed folder may take")
    a.add_argument("--transport", choices=["lossy", "flac"], default="lossy")
    a.add_argument("--quality", type=float, default=0.8,
                   help="libsndfile Vorbis compression level in [0, 1] (0.8: ~55 kbps at 32 kHz mono)")
    a.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    b = sub.add_parser("unpack", help="a carried folder -> a corpus folder (FLAC clips, sidecars, corpus.json)")
    b.add_argument("carry", type=Path)
    b.add_argument("corpus", type=Path)
    b.add_argument("--shards", action="store_true", help="also write shards/{train,valid,test} as prep corpus does")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    if args.verb == "pack":
        print(json.dumps(pack(args.corpus, args.to, args.budget_mb, args.transport, args.quality, args.workers),
                         indent=1))
    else:
        unpack(args.carry, args.corpus, args.workers, args.shards)


if __name__ == "__main__":
    main()
