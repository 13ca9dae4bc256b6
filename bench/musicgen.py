"""MusicGen LM benchmarks: training step throughput and KV-cached generation speed (with CFG and a melody/style
prefix), against the uncached reference decoder, for a preset of ``CodebookLM``.

    python bench/musicgen.py --device cpu --preset tiny            # the demo's scale
    python bench/musicgen.py --device cuda --preset small --dtype bf16

Prints a Markdown table (with device, versions and date) for bench/RESULTS.md. GPU comparisons against
transformers' MusicGen belong to bench/musicgen_gpu (issue: GPU performance).
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from ostinato.nn.decoding import GenerationParams, generate
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.transformer import CodebookLM, LMConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY = {"dim": 128, "num_heads": 4, "num_layers": 4, "ffn_dim": 512}  # conf/family/musicgen_tiny.yaml


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium", "large"])
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--n-q", type=int, default=4)
    ap.add_argument("--card", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=150, help="training segment in frames")
    ap.add_argument("--gen-frames", type=int, default=150, help="frames generated per call")
    ap.add_argument("--prefix", type=int, default=24, help="prefix tokens (melody + style)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    overrides = TINY if args.preset == "tiny" else {}
    cfg = LMConfig.preset(args.preset, n_q=args.n_q, card=args.card, **overrides)
    model = CodebookLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    pattern = DelayPattern(args.n_q)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(args.batch, 16, cfg.dim, generator=g).to(device)
    prefix = torch.randn(args.batch, args.prefix, cfg.dim, generator=g).to(device)
    codes = torch.randint(0, args.card, (args.batch, args.n_q, args.frames), generator=g).to(device)
    seq, _ = pattern.build(codes, cfg.card)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step() -> None:
        with autocast:
            logits = model(seq[:, :, :-1], cond, None, prefix=prefix)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 2),
                                                     seq[:, :, 1:].clamp(max=cfg.card - 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    t = timed(train_step, device, args.repeats)
    tokens = args.batch * args.frames
    rows.append(("train step (fwd + bwd + AdamW)", f"B={args.batch}, {args.frames} frames + {args.prefix} prefix",
                 f"{t * 1000:.1f} ms", f"{tokens / t:,.0f} frames/s"))
    model.eval()
    params = GenerationParams(temperature=1.0, top_k=250, cfg_scale=3.0, seed=0)
    for b in (1, args.batch):
        for cached in (True, False):
            n = args.gen_frames if cached else min(args.gen_frames, 50)

            def gen() -> None:
                with autocast:
                    generate(model, pattern, n, cond=cond[:b], prefix=prefix[:b], params=params, use_cache=cached)

            t = timed(gen, device, max(1, args.repeats - 1))
            rows.append((f"generate, CFG, {'KV cache' if cached else 'no cache (reference)'}",
                         f"B={b}, {n} frames + {args.prefix} prefix", f"{t * 1000:.0f} ms",
                         f"{b * n / t:,.0f} frames/s ({b * n / t / 50:.2f}x real time at 50 Hz)"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n### MusicGen LM, preset {args.preset} ({n_params / 1e6:.1f} M params), {args.dtype}, {name}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    print(f"{date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"`python bench/musicgen.py {flags}`\n")
    print("| what | shape | time | throughput |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
