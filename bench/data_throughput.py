"""Loader throughput: what ``AudioDataModule`` (audio-seconds per second) or ``TokenDataModule`` (codec frames per
second) delivers, for several worker counts.

    python bench/data_throughput.py --shards data/demo/shards/train [--workers 0 1 2] [--batches 60]
    python bench/data_throughput.py --synth /tmp/shards --workers 4 8 --seconds 30 --consume 200000
        # on a machine without data/: writes demo-like audio shards (32 kHz tones, FLAC) and MusicGen-like token
        # shards (4 x 2048 codes at 50 Hz) first, then measures both loaders on 30 s crops

``--consume FRAMES_PER_S``: what the training step takes (frames per second at the token frame rate); the
tables then give each loader's throughput as a multiple of it. Prints Markdown tables for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ostinato.data import AudioDataModule, resolve_shards  # noqa: E402

FRAME_RATE, N_Q, CARD = 50.0, 4, 2048


def measure(dm, workers: int, batches: int) -> tuple[int, float]:
    """(items delivered after warm-up, seconds)."""
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(max(2, workers * 2)):  # worker start-up and first shard opens are not throughput
        next(it)
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch.lengths)
    return n, time.perf_counter() - start


def write_token_shards(folder: Path, n_shards: int, per_shard: int, frames: int) -> None:
    import webdataset as wds

    from ostinato.data.tokens import CodecInfo, TokenManifest, TokenShard, encode_codes

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shards = []
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for j in range(per_shard):
                i = s * per_shard + j
                codes = torch.randint(0, CARD, (N_Q, frames), generator=g)
                meta = {"caption": f"clip {i}", "genre": "synthetic", "index": i, "frames": frames,
                        "frame_rate": FRAME_RATE}
                w.write({"__key__": f"s{i:05d}", "codes.npy": encode_codes(codes), "json": json.dumps(meta).encode()})
        shards.append(TokenShard(name=name, samples=per_shard, frames=per_shard * frames))
    codec = CodecInfo(id="synthetic", hash="0", sample_rate=32000, channels=1, frame_rate=FRAME_RATE, n_q=N_Q,
                      card=CARD)
    TokenManifest(shards=shards, codec=codec).save(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="audio manifest folder or brace spec")
    p.add_argument("--tokens", default=None, help="token shard folder")
    p.add_argument("--synth", default=None, help="write audio + token shards here first and measure those")
    p.add_argument("--synth-items", type=int, default=64, help="items per synthetic set (each 2 x --seconds)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="crop length")
    p.add_argument("--sample-rate", type=int, default=None, help="default: the shards' rate")
    p.add_argument("--consume", type=float, default=0.0, help="training frames / s to compare with")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.synth:
        from tests.synth import write_shards

        root = Path(args.synth)
        t = time.perf_counter()
        per_shard = 8
        write_shards(root / "audio", n_shards=max(1, args.synth_items // per_shard), per_shard=per_shard,
                     sample_rate=32000, seconds=2 * args.seconds)
        write_token_shards(root / "tokens", max(1, args.synth_items // per_shard), per_shard,
                           int(2 * args.seconds * FRAME_RATE))
        print(f"synthesized {args.synth_items} audio and token items of {2 * args.seconds:.0f} s in "
              f"{time.perf_counter() - t:.0f} s")
        args.shards, args.tokens = str(root / "audio"), str(root / "tokens")
    print(f"date {date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"thread(s), {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}")
    if args.shards:
        sr = args.sample_rate or resolve_shards(args.shards).sample_rate or 24000
        print(f"\naudio shards {args.shards}, batch {args.batch_size} x {args.seconds} s at {sr} Hz (FLAC decoded in "
              f"the workers), {args.batches} batches\n")
        print("| workers | audio-s / s | batches / s | x training consumption |")
        print("|---|---|---|---|")
        for w in args.workers:
            dm = AudioDataModule(train=args.shards, sample_rate=sr, segment_seconds=args.seconds,
                                 batch_size=args.batch_size, batches_per_epoch=args.batches, num_workers=w,
                                 shuffle_buffer=64)
            n, dt = measure(dm, w, args.batches)
            rate = n * args.seconds / dt
            ratio = f"{rate * FRAME_RATE / args.consume:.1f}x" if args.consume else "-"
            print(f"| {w} | {rate:,.0f} | {n / args.batch_size / dt:.1f} | {ratio} |", flush=True)
    if args.tokens:
        from ostinato.data.token_datamodule import TokenDataModule

        print(f"\ntoken shards {args.tokens}, batch {args.batch_size} x {args.seconds} s, {args.batches} batches\n")
        print("| workers | frames / s | batches / s | x training consumption |")
        print("|---|---|---|---|")
        for w in args.workers:
            dm = TokenDataModule(train=args.tokens, segment_seconds=args.seconds, batch_size=args.batch_size,
                                 batches_per_epoch=args.batches, num_workers=w, shuffle_buffer=64)
            n, dt = measure(dm, w, args.batches)
            rate = n * args.seconds * FRAME_RATE / dt
            ratio = f"{rate / args.consume:.1f}x" if args.consume else "-"
            print(f"| {w} | {rate:,.0f} | {n / args.batch_size / dt:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
