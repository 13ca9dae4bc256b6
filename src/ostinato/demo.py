"""``ostinato demo`` (what ``make demo`` runs): the embedded default end to end on this machine.

demo corpus -> tiny codec (trained, exported) -> reconstructions -> token shards. Each step is skipped when its
output already exists, so a second run only prints the summary.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf
import torch

CODEC_EXPERIMENT = ["experiment=codec_tiny"]


def _run(args: list[str]) -> None:
    print(f"$ ostinato {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "ostinato.cli", *args], check=True)


def _history(folder: Path) -> list[dict]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _reconstructions(codec, shards: Path, out: Path, count: int = 3) -> list[Path]:
    from ostinato.data.shards import iter_shard_samples

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in sorted(shards.glob("*.tar")):
        for key, wav, sr, meta in iter_shard_samples(shard):
            if len(written) >= 2 * count:
                return written
            with torch.no_grad():
                recon = codec(wav[None]).recon[0]
            for name, audio in (("original", wav), ("reconstruction", recon)):
                path = out / f"{key}_{name}.wav"
                sf.write(path, audio.clamp(-1, 1).T.numpy(), sr)
                written.append(path)
    return written


def run_demo(data: Path, outputs: Path) -> None:
    from ostinato.interop.codecs import load_codec
    from ostinato.train import main as train_main

    start = time.time()
    _run(["prep", "corpus", "--out", str(data)])  # returns the existing corpus (and its summary) when done
    xp = train_main.get_xp(CODEC_EXPERIMENT)
    t0 = time.time()
    _run(["train", *CODEC_EXPERIMENT])
    codec_minutes = (time.time() - t0) / 60
    export = outputs / "exports" / "codec_tiny"
    _run(["export", str(xp.folder), str(export)])
    codec = load_codec(export)
    recon = _reconstructions(codec, data / "shards" / "test", outputs / "demo" / "reconstructions")
    for split in ("train", "valid", "test"):
        if not (data / "tokens" / split / "manifest.json").is_file():
            _run(["tokenize", str(data / "shards" / split), str(data / "tokens" / split), "--codec", str(export)])

    history = _history(Path(xp.folder))
    before = next((h["valid"]["mel_distance"] for h in history if h.get("epoch") == -1), None)
    after = next((h["valid"]["mel_distance"] for h in reversed(history) if "valid" in h), None)
    print("\n== ostinato demo ==")
    print(f"codec: XP {xp.sig} ({xp.folder}), exported to {export}; training took {codec_minutes:.1f} min")
    if before is not None and after is not None:
        print(f"  validation mel distance: untrained {before:.3f} -> trained {after:.3f} "
              f"({after / before:.2f} of the untrained value)")
    print(f"  reconstructions: {recon[0].parent} ({len(recon) // 2} originals + reconstructions)")
    print(f"tokens: {data / 'tokens'}/{{train,valid,test}} ({codec.n_q} x {codec.cardinality} codes at "
          f"{codec.frame_rate:g} Hz)")
    print(f"total {(time.time() - start) / 60:.1f} min")
