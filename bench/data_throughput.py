"""Loader throughput: audio-seconds per second that ``AudioDataModule`` delivers, for several worker counts.

    python bench/data_throughput.py --shards data/demo/shards/train [--workers 0 1 2] [--batches 60]

Prints a Markdown table (and its environment) to paste into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from ostinato.data import AudioDataModule, resolve_shards


def measure(spec: str, workers: int, batches: int, batch_size: int, seconds: float, sample_rate: int) -> float:
    dm = AudioDataModule(train=spec, sample_rate=sample_rate, segment_seconds=seconds, batch_size=batch_size,
                         batches_per_epoch=batches, num_workers=workers, shuffle_buffer=64)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    warm = max(2, workers * 2)
    for _ in range(warm):  # worker start-up and first shard opens are not throughput
        next(it)
    n, start = 0, time.perf_counter()
    for batch in it:
        n += batch.audio.shape[0]
    elapsed = time.perf_counter() - start
    return n * seconds / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="manifest folder or brace spec")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="crop length")
    p.add_argument("--sample-rate", type=int, default=None, help="default: the shards' rate")
    args = p.parse_args()
    torch.set_num_threads(1)
    sr = args.sample_rate or resolve_shards(args.shards).sample_rate or 24000
    print(f"date {date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"thread(s), {__import__('os').cpu_count()} cores, torch {torch.__version__}, python "
          f"{platform.python_version()}")
    print(f"shards {args.shards}, batch {args.batch_size} x {args.seconds} s at {sr} Hz, {args.batches} batches\n")
    print("| workers | audio-s / s | batches / s |")
    print("|---|---|---|")
    for w in args.workers:
        rate = measure(args.shards, w, args.batches, args.batch_size, args.seconds, sr)
        print(f"| {w} | {rate:,.0f} | {rate / (args.batch_size * args.seconds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
