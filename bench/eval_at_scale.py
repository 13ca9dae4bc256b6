"""Evaluation at benchmark scale on one GPU (issue 20, item 5): MusicGen small's decoding speed at batch 128 and
the whole evaluation pipeline for 5,000 clips, with random weights (the speed does not depend on them).

    python bench/eval_at_scale.py decode --out $OUT/decode.md            # steps/s per attention variant, profile
    python bench/eval_at_scale.py e2e --tokenizer DIR --out $OUT/e2e.md  # ostinato eval of 5,000 clips, stage shares
    python bench/eval_at_scale.py decode e2e --tiny --device cpu --tokenizer DIR   # the same code paths, toy sizes

``decode``: the LM of MusicGen small (1024 wide, 24 layers, 16 heads, 4 x 2048 codes) with cross-attention to 32
conditioning states, CFG 3, top-k 250, 10 s (500 frames, 503 steps of the delay pattern), graph backend in bf16,
batch 128 (256 rows with CFG): the whole cache attended every step (how it was) against the filled part rounded
up to 64 positions with each attention kernel; a torch.profiler table of the fastest; graph replay's tokens
against the eager step's (greedy, batch 2).

``e2e``: a random transformers ``MusicgenForConditionalGeneration`` of musicgen-small's shapes (T5-base text
encoder, EnCodec 32 kHz) goes through ``ostinato import``; then ``run_suite`` (what ``ostinato eval`` runs) on
5,000 captions: 10 s clips at batch 128, VGGish frame embeddings (random weights in torchvggish's layout) against
a reference of synthetic 10 s clips, FAD and KAD; ``stage_shares`` of its ``metrics.json``. ``--tokenizer``: a
folder with a BERT-style tokenizer (the MiniLM one: its ids fit T5's vocabulary), since nothing is downloaded.

Writes Markdown (device, versions, date, command) to ``--out`` as each section finishes.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from ostinato.nn.decoding import GenerationParams, generate  # noqa: E402
from ostinato.nn.patterns import DelayPattern  # noqa: E402
from ostinato.nn.transformer import CodebookLM, LMConfig  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WORDS = ("calm", "upbeat", "dark", "bright", "slow", "fast", "piano", "guitar", "strings", "drums", "jazz", "folk",
         "ambient", "techno", "waltz", "ballad", "with a melody", "in a minor key", "for a film", "with choir")


def header(args: argparse.Namespace, device: torch.device) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import transformers

    return [f"- date {date.today()}, device {name}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, python {platform.python_version()}",
            f"- command: `python bench/eval_at_scale.py {' '.join(sys.argv[1:])}`", ""]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(out: Path | None, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text)


# -- decoding speed ------------------------------------------------------------------------------------------------
def decode_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    small = {} if not args.tiny else {"dim": 64, "num_heads": 4, "num_layers": 2, "ffn_dim": 128}
    card = 64 if args.tiny else 2048
    torch.manual_seed(0)
    cfg = LMConfig.preset("small", n_q=4, card=card, **small)
    model = CodebookLM(cfg).to(device).eval()
    pattern = DelayPattern(4)
    b, frames = args.batch, args.frames
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(b, 32, cfg.kv_dim, generator=g).to(device)
    mask = torch.ones(b, 32, dtype=torch.bool, device=device)
    steps = frames + pattern.n_q - 1
    backend = "graph" if device.type == "cuda" else "static"
    dtype = "bf16" if device.type == "cuda" else "fp32"
    variants = [("whole cache every step, bmm (before)", 0, "bmm"), ("filled part / 64, bmm", 64, "bmm"),
                ("filled part / 64, auto (bmm or sdpa per length)", 64, "auto")]
    rows, best = [], None
    for label, bucket, attention in variants:
        params = GenerationParams(cfg_scale=3.0, top_k=250, seed=0, backend=backend, dtype=dtype, kv_bucket=bucket,
                                  attention=attention)
        try:
            t0 = time.perf_counter()
            generate(model, pattern, frames, cond=cond, cond_mask=mask, params=params)  # captures its graphs
            sync(device)
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                generate(model, pattern, frames, cond=cond, cond_mask=mask, params=params)
                sync(device)
                times.append(time.perf_counter() - t0)
        except RuntimeError as e:  # one variant failing must not cost the others' numbers
            rows.append(f"| {label} | failed: {str(e).splitlines()[0][:150]} | | | | |")
            model.__dict__.pop("_ostinato_fast_decoders", None)
            continue
        sec = min(times)
        dec = next(reversed(model.__dict__["_ostinato_fast_decoders"].values()))
        kernels = sorted(set(dec.chosen.values()))
        rows.append(f"| {label} | {sec:.3f} | {steps / sec:.0f} | {b * frames / cfg_frame_rate() / sec:.0f} | "
                    f"{first:.1f} | {', '.join(kernels)} |")
        if best is None or sec < best[0]:
            best = (sec, label, params)
        del dec
        model.__dict__.pop("_ostinato_fast_decoders", None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [f"### Decoding at batch {b}: MusicGen small LM, CFG 3, top-k 250, {frames} frames ({steps} steps), "
             f"{backend} backend, {dtype}", "",
             "| attention | s per batch | steps/s | audio s per s | first call s (captures) | kernels |",
             "|---|---:|---:|---:|---:|---|", *rows, ""]
    assert best is not None
    lines += [f"fastest: {best[1]}, {steps / best[0]:.0f} steps/s (target 450 on an H200)", ""]
    for extra in (lambda: parity_lines(model, pattern, device, dtype, best[2]),
                  lambda: profile_lines(model, pattern, frames, cond, mask, best[2], device) if args.profile else []):
        try:
            lines += extra()
        except Exception as e:  # noqa: BLE001  (the timings above are what matters; say what failed)
            lines += [f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", ""]
    return lines


def cfg_frame_rate() -> float:
    return 50.0  # MusicGen's EnCodec 32 kHz: 640 samples per frame


def parity_lines(model: CodebookLM, pattern: DelayPattern, device: torch.device, dtype: str,
                 params: GenerationParams) -> list[str]:
    """Greedy tokens of the fastest variant against the eager static step (the same decoder state machine)."""
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(2, 32, model.cfg.kv_dim, generator=g).to(device)
    mask = torch.ones(2, 32, dtype=torch.bool, device=device)
    kw = {**params.__dict__, "temperature": 0.0}
    fast = generate(model, pattern, 100, cond=cond, cond_mask=mask, params=GenerationParams(**kw))
    eager = generate(model, pattern, 100, cond=cond, cond_mask=mask,
                     params=GenerationParams(**{**kw, "backend": "static", "attention": "bmm"}))
    same = float((fast == eager).float().mean())
    return [f"greedy tokens of the fastest variant vs the eager static step (batch 2, 100 frames): {100 * same:.1f}% "
            "identical", ""]


def profile_lines(model: CodebookLM, pattern: DelayPattern, frames: int, cond: torch.Tensor, mask: torch.Tensor,
                  params: GenerationParams, device: torch.device) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        generate(model, pattern, frames, cond=cond, cond_mask=mask, params=params)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=70)
    return ["torch.profiler over one batch of the fastest variant (top kernels by GPU time):", "", "```", table,
            "```", ""]


# -- the whole evaluation ------------------------------------------------------------------------------------------
def random_musicgen_small(folder: Path, tokenizer: Path, tiny: bool, device: torch.device) -> Path:
    """A random transformers MusicGen of musicgen-small's shapes (or toy shapes), saved with ``tokenizer``."""
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    torch.manual_seed(0)
    if tiny:
        t5 = T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        codec = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 4],
                              codebook_size=64, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                              target_bandwidths=[2.2], use_causal_conv=False, normalize=False)
        dec = MusicgenDecoderConfig(num_codebooks=4, vocab_size=64, hidden_size=48, num_attention_heads=4,
                                    num_hidden_layers=2, ffn_dim=96, max_position_embeddings=2048)
    else:  # facebook/musicgen-small's config.json
        t5 = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
        codec = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                              codebook_size=2048, hidden_size=128, num_lstm_layers=2, target_bandwidths=[2.2],
                              use_causal_conv=False, normalize=False, pad_mode="reflect", norm_type="weight_norm",
                              compress=2, residual_kernel_size=3, dilation_growth_rate=2, num_residual_layers=1,
                              kernel_size=7, last_kernel_size=7)
        dec = MusicgenDecoderConfig(num_codebooks=4, vocab_size=2048, hidden_size=1024, num_attention_heads=16,
                                    num_hidden_layers=24, ffn_dim=4096, max_position_embeddings=2048)
    dec.pad_token_id = dec.bos_token_id = dec.vocab_size
    with torch.device(device):  # random initialisation of 420 M parameters is minutes on one CPU core
        model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5, audio_encoder=codec, decoder=dec))
    with torch.no_grad():  # transformers leaves the codebooks at zero: every code would decode alike
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, folder / name)
    return folder


def reference_shards(folder: Path, clips: int, seconds: float) -> Path:
    from tests.synth import write_shards

    per = 32
    write_shards(folder, n_shards=max(1, clips // per), per_shard=min(per, clips), sample_rate=32000,
                 seconds=seconds)
    return folder


def e2e_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    import yaml

    from ostinato.evaluation.runner import run_suite
    from ostinato.evaluation.timing import stage_shares
    from ostinato.interop.musicgen_import import import_musicgen
    from ostinato.metrics.embeddings.vggish import VGGish

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    hf = random_musicgen_small(work / "hf_musicgen_small", Path(args.tokenizer), args.tiny, device)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    import_musicgen(hf, work / "musicgen_small")
    t_import = time.perf_counter() - t0
    shutil.rmtree(hf)
    torch.manual_seed(0)
    torch.save(VGGish().state_dict(), work / "vggish_random.pth")
    t0 = time.perf_counter()
    reference_shards(work / "reference", args.reference_clips, args.seconds)
    t_ref = time.perf_counter() - t0
    prompts = [f"{WORDS[i % 20]} {WORDS[(i // 20) % 20]} music, take {i}" for i in range(args.clips)]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    suite = {"name": f"scale{args.clips}", "kind": "text_to_music", "reference": str(work / "reference"),
             "prompts_file": str(work / "prompts.txt"), "num_samples": args.clips, "seconds": args.seconds,
             "batch_size": args.batch, "embedding": f"vggish:{work / 'vggish_random.pth'}",
             "generation": {"cfg_scale": 3.0, "top_k": 250, "temperature": 1.0, "seed": 0},
             "melody_from_reference": False, "metrics": {"fad": {"per": "frame"}, "kad": {}},
             "report": {"max_items": 4}}
    (work / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    t0 = time.perf_counter()
    result = run_suite(work / "suite.yaml", str(work / "musicgen_small"), work / "eval", device=device,
                       progress=args.progress, cache=work / "cache")
    wall = time.perf_counter() - t0
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    audio = args.clips * args.seconds
    return [f"### The whole evaluation: {args.clips} clips of {args.seconds:g} s, batch {args.batch}", "",
            f"- set-up (not in the evaluation): random transformers MusicGen {t_build:.1f} s, `import_musicgen` "
            f"{t_import:.1f} s, {args.reference_clips} reference clips {t_ref:.1f} s",
            f"- `run_suite` wall time {wall:.1f} s: {audio / wall:.0f} s of audio per second end to end; "
            f"FAD {result['metrics'].get('fad')}, KAD {result['metrics'].get('kad')} (random weights: the numbers "
            "mean nothing, the time does)", "", stage_shares(metrics), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="+", choices=["decode", "e2e"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check of every code path)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--clips", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reference-clips", type=int, default=128)
    ap.add_argument("--tokenizer", default=None, help="folder of a BERT-style tokenizer (e2e)")
    ap.add_argument("--work", default="/tmp/eval_at_scale")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    out = None if args.out is None else Path(args.out)
    emit(out, ["## Evaluation at benchmark scale (bench/eval_at_scale.py)", "", *header(args, device)])
    for section in args.sections:
        t0 = time.perf_counter()
        lines = decode_section(args, device) if section == "decode" else e2e_section(args, device)
        emit(out, [*lines, f"({section}: {time.perf_counter() - t0:.1f} s)", ""])


if __name__ == "__main__":
    main()
