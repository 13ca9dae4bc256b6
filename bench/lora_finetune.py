"""Full fine-tuning (AdamW) vs LoRA of a MusicGen-medium-sized LM: peak GPU memory and step time.

The LM is MusicGen-medium's (1.5B: dim 1536, 48 layers, 24 heads, FFN 6144, 4 x 2048 codes) with
cross-attention on 768-wide T5-like states given as random tensors (no text encoder is downloaded). A step is
ostinato's training step on the LM: the delay pattern, ``masked_lm_losses`` (families/codebook_lm.py), backward,
AdamW. bf16 autocast in both modes; full fine-tuning keeps fp32 weights (AdamW's master copy), LoRA keeps the
frozen base in ``--lora-base`` (bf16 by default: it never steps) and its adapters in fp32.

    python bench/lora_finetune.py                                   # on the GPU: batch 4 x 30 s at 50 Hz
    python bench/lora_finetune.py --device cpu --tiny               # a smoke run anywhere
    python bench/lora_finetune.py --profile                         # + GPU kernel time of one step (gpu_s)

Prints one JSON line per mode and a Markdown table row per mode (for bench/RESULTS.md); ``--json PATH`` appends
the JSON lines to a file. A mode that runs out of memory is reported as such.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import date
from typing import Any

import torch

from ostinato.families.codebook_lm import masked_lm_losses
from ostinato.nn.lora import DEFAULT_TARGETS, LoRA, add_adapters
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.transformer import CodebookLM, LMConfig

MEDIUM = dict(dim=1536, num_heads=24, num_layers=48, ffn_dim=6144, n_q=4, card=2048, cond_dim=768)
TINY = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128, n_q=4, card=64, cond_dim=32)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer LM, batch 2 x 0.4 s, 1 + 2 steps")
    ap.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    ap.add_argument("--batch", type=int, default=None, help="items per step (default 4; tiny 2)")
    ap.add_argument("--seconds", type=float, default=None, help="segment length (default 30; tiny 0.4)")
    ap.add_argument("--frame-rate", type=float, default=50.0)
    ap.add_argument("--text-tokens", type=int, default=32, help="length of the cross-attention states")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="LoRA targets (comma-separated)")
    ap.add_argument("--lora-base", default="bf16", choices=sorted(DTYPES), help="dtype of LoRA's frozen base")
    ap.add_argument("--checkpointing", action="store_true", help="recompute activations in the backward pass")
    ap.add_argument("--warmup", type=int, default=None, help="steps before timing (default 3; tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    ap.add_argument("--json", default=None, help="append the JSON lines to this file")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, one step under torch.profiler: its GPU kernel time (gpu_s)")
    args = ap.parse_args(argv)
    defaults = dict(batch=2, seconds=0.4, warmup=1, steps=2) if args.tiny else dict(batch=4, seconds=30.0,
                                                                                   warmup=3, steps=10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build(args: argparse.Namespace, mode: str, device: torch.device) -> tuple[CodebookLM, list[torch.nn.Parameter]]:
    """The LM (random weights, built on ``device``) and what its optimizer steps."""
    sizes = TINY if args.tiny else MEDIUM
    cfg = LMConfig(**sizes, cross_attention=True, checkpointing=args.checkpointing)
    with torch.device(device):
        lm = CodebookLM(cfg)
    if mode == "lora":
        lm.requires_grad_(False).to(DTYPES[args.lora_base])
        add_adapters(lm, LoRA(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(","))))
    return lm, [p for p in lm.parameters() if p.requires_grad]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(lm: CodebookLM, opt: torch.optim.Optimizer, pattern: DelayPattern, codes: torch.Tensor,
         lengths: torch.Tensor, cond: torch.Tensor, autocast: torch.autocast) -> torch.Tensor:
    """One training step; returns the per-codebook CE ``[K]``."""
    with autocast:
        ce, _ = masked_lm_losses(lm, pattern, codes, lengths, cond=cond)
    ce.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ce


def profiled_gpu_seconds(run: Any, device: torch.device) -> float:
    """The summed GPU kernel time of one ``run()``: against the step's wall time it says whether the GPU or the
    host (Python, kernel launches) bounds a step."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def run_mode(args: argparse.Namespace, mode: str, device: torch.device) -> dict[str, Any]:
    """Warm-up + timed steps of one mode -> a result record (``oom`` when it did not fit)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    record: dict[str, Any] = {"mode": mode, "batch": args.batch, "seconds": args.seconds,
                              "frames": round(args.seconds * args.frame_rate), "tiny": args.tiny,
                              "checkpointing": args.checkpointing}
    if mode == "lora":
        record.update(rank=args.rank, alpha=args.alpha, targets=args.targets, lora_base=args.lora_base)
    try:
        lm, params = build(args, mode, device)
        record["params"] = sum(p.numel() for p in lm.parameters())
        record["trainable"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        cfg = lm.cfg
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, cfg.card, (args.batch, cfg.n_q, record["frames"]), generator=g).to(device)
        lengths = torch.full((args.batch,), record["frames"], device=device)
        cond = torch.randn(args.batch, args.text_tokens, cfg.kv_dim, generator=g).to(device)
        pattern = DelayPattern(cfg.n_q)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        times = []
        for step in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            ce = train_step(lm, opt, pattern, codes, lengths, cond, autocast)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        record["step_s"] = statistics.median(times)
        record["loss"] = float(ce.mean().detach())
        if args.profile and device.type == "cuda":
            record["gpu_s"] = profiled_gpu_seconds(lambda: train_step(lm, opt, pattern, codes, lengths, cond, autocast),
                                                   device)
    except torch.OutOfMemoryError:
        record["oom"] = True
    if device.type == "cuda":
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        record["device"] = torch.cuda.get_device_name(device)
    else:
        record["peak_gib"], record["device"] = None, platform.processor() or platform.machine()
    record.update(torch=torch.__version__, date=str(date.today()))
    return record


def markdown_row(r: dict[str, Any]) -> str:
    """| mode | trainable / params | batch x seconds | peak GiB | step s (GPU kernel s) | device |"""
    peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
    step = "OOM" if r.get("oom") else f"{r['step_s']:.3f}" + (f" ({r['gpu_s']:.3f})" if "gpu_s" in r else "")
    mode = r["mode"] + (f" (rank {r['rank']}, {r['targets']})" if r["mode"] == "lora" else "")
    trainable = f"{r.get('trainable', 0):,} / {r.get('params', 0):,}"
    return f"| {mode} | {trainable} | {r['batch']} x {r['seconds']:g} s | {peak} | {step} | {r['device']} |"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    device = torch.device(args.device)
    records = []
    for mode in args.modes.split(","):
        if mode not in ("full", "lora"):
            raise SystemExit(f"--modes: {mode!r} is not full or lora")
        record = run_mode(args, mode, device)
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    print("| mode | trainable / params | batch x length | peak GiB | step s, median (GPU kernel s) | device |")
    print("|---|---|---|---|---|---|")
    for record in records:
        print(markdown_row(record))
    return records


if __name__ == "__main__":
    main()
