"""Move a rendered corpus (``ostinato prep corpus``) to a machine without fluidsynth inside a size budget.

The GPU machine of the device tool takes 64 MiB a call and has no fluidsynth: a corpus is rendered here, its clips
are packed as OGG Vorbis (about 22 MB an hour at 24 kHz mono, a fifth of FLAC) with their caption sidecars and
``corpus.json``, and unpacked there into the same layout (FLAC clips + WebDataset shards) that ``prep corpus``
writes, so ``ostinato demo`` and the bench scripts find a finished corpus.

    python bench/carry.py pack data/demo .gpu/demo_carry              # here
    python bench/carry.py unpack .gpu/demo_carry data/demo            # there

``--budget-mb`` keeps whole clips, split by split in proportion, until the budget is spent; the kept hours are
printed and written to ``carry.json``. The lossy transport is stated there too: results computed from an unpacked
corpus say so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import soundfile as sf

SPLITS = ("train", "valid", "test")
VORBIS_QUALITY = 0.7  # soundfile's compression_level for Vorbis: 0 best quality .. 1 smallest


def pack(corpus: Path, out: Path, budget_mb: float | None = None, transport: str = "vorbis") -> dict:
    """corpus/{corpus.json, audio/SPLIT/*.flac + *.json} -> out/ (clips as .ogg or .flac, sidecars, corpus.json)."""
    if not (corpus / "corpus.json").is_file():
        raise SystemExit(f"{corpus}: no corpus.json; render one with `ostinato prep corpus --out {corpus}`")
    if out.exists():
        shutil.rmtree(out)
    clips = {s: sorted((corpus / "audio" / s).glob("*.flac")) for s in SPLITS}
    total = sum(len(v) for v in clips.values())
    budget = None if budget_mb is None else budget_mb * 1e6
    used, kept_seconds, kept = 0, 0.0, {s: 0 for s in SPLITS}
    # round-robin over splits in proportion to their sizes, so a budget cut keeps every split
    order = sorted(((i / len(v), s, p) for s, v in clips.items() for i, p in enumerate(v)), key=lambda t: t[0])
    for _, split, src in order:
        audio, sr = sf.read(src, dtype="float32")
        dest = out / "audio" / split / (src.stem + (".ogg" if transport == "vorbis" else ".flac"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if transport == "vorbis":
            sf.write(dest, audio, sr, format="OGG", subtype="VORBIS", compression_level=VORBIS_QUALITY)
        else:
            shutil.copyfile(src, dest)
        size = dest.stat().st_size
        if budget is not None and used + size > budget:
            dest.unlink()
            break
        used += size
        kept_seconds += len(audio) / sr
        kept[split] += 1
        sidecar = src.with_suffix(".json")
        if sidecar.is_file():
            shutil.copyfile(sidecar, dest.with_suffix(".json"))
    shutil.copyfile(corpus / "corpus.json", out / "corpus.json")
    info = {"transport": transport, "vorbis_quality": VORBIS_QUALITY if transport == "vorbis" else None,
            "clips": kept, "clips_in_corpus": total, "hours": kept_seconds / 3600, "megabytes": used / 1e6}
    (out / "carry.json").write_text(json.dumps(info, indent=1))
    return info


def unpack(carried: Path, out: Path, workers: int | None = None) -> dict:
    """out/ <- the FLAC clips, sidecars and corpus.json of a packed corpus, plus shards/SPLIT like `prep corpus`."""
    from ostinato.data.shards import build_shards

    info = json.loads((carried / "carry.json").read_text())
    options = json.loads((carried / "corpus.json").read_text())["options"]
    for split in SPLITS:
        folder = out / "audio" / split
        folder.mkdir(parents=True, exist_ok=True)
        for src in sorted((carried / "audio" / split).glob("*")):
            if src.suffix == ".json":
                shutil.copyfile(src, folder / src.name)
            elif src.suffix in (".ogg", ".flac"):
                audio, sr = sf.read(src, dtype="float32")
                sf.write(folder / (src.stem + ".flac"), audio, sr, format="FLAC")
    corpus = json.loads((carried / "corpus.json").read_text())
    corpus.setdefault("options", {})["transport"] = info  # what the clips went through on their way here
    (out / "corpus.json").write_text(json.dumps(corpus, indent=1))
    for split in SPLITS:
        build_shards(out / "audio" / split, out / "shards" / split, sample_rate=options["sample_rate"],
                     channels=options["channels"], workers=workers or os.cpu_count() or 1, overwrite=True)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("pack", help="a rendered corpus -> a folder to carry")
    a.add_argument("corpus", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--budget-mb", type=float, default=None, help="keep whole clips until this many MB")
    a.add_argument("--transport", choices=["vorbis", "flac"], default="vorbis")
    b = sub.add_parser("unpack", help="a carried folder -> a corpus folder with FLAC clips and shards")
    b.add_argument("carried", type=Path)
    b.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.verb == "pack":
        info = pack(args.corpus, args.out, args.budget_mb, args.transport)
    else:
        info = unpack(args.carried, args.out)
    print(json.dumps(info), file=sys.stderr)


if __name__ == "__main__":
    main()
