"""ostinato's MusicGen LM against transformers' MusicGen, side by side, in one process (issue 8).

    python bench/musicgen_vs_transformers.py --device cuda --out $OUT/musicgen_vs_transformers.md
    python bench/musicgen_vs_transformers.py --device cpu --tiny        # the same code paths at toy size

What is timed (random weights; ostinato's LM gets the transformers decoder's weights, so both start from the same
model; the same inputs; dropout 0; cross-attention to 32 conditioning states):

* bf16 matmul ceiling: an 8192^3 bf16 matrix product.
* Training step: forward under bf16 autocast, the same fp32 cross-entropy over all K x S x card logits, backward,
  fused AdamW. transformers: ``MusicgenForCausalLM`` (its default SDPA attention). ostinato: ``CodebookLM`` eager
  and with each block compiled (``trainer.compile: [lm.layers]``), cuDNN attention first
  for the causal self-attention (``prefer_cudnn_attention``, what the engine does on Hopper GPUs). Model FLOPs count
  the matmuls (6 x params x tokens) and causal + cross attention; peak memory is everything the run allocated
  (weights, AdamW, activations).
* Generation with CFG 3, top-k 250, 500 decoding steps (10 s at 50 Hz): transformers:
  ``MusicgenForConditionalGeneration.generate`` (bf16 weights) with a tiny random T5 (32 text tokens) and a tiny
  random EnCodec of the MusicGen layout (32 kHz, 4 x 2048, 50 Hz), so the time is its decoder loop plus a
  negligible encode/decode; ostinato: ``generate`` on the same decoder weights from 32 conditioning states, codes
  only, with the reference backend (``cache``: the model's forward per step, autocast) and the fast ones
  (``static``: the static bf16 decode step run eagerly; ``graph``: replayed as a CUDA graph). The script asserts
  that graph replay draws exactly the tokens of the eager static step for the same seed.
* torch.profiler's top kernels of one ostinato training step and one graph-decoded window, as evidence of what
  bounds them.

Prints (and writes with --out) a Markdown report with device, versions, date and the command.
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ostinato.nn.decoding import GenerationParams, generate  # noqa: E402
from ostinato.interop.musicgen import decoder_config_to_lm_config, transformers_state_to_lm  # noqa: E402
from ostinato.nn.patterns import DelayPattern  # noqa: E402
from ostinato.nn.transformer import LM_PRESETS, CodebookLM, prefer_cudnn_attention  # noqa: E402

K, CARD, TC = 4, 2048, 32
TINY = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=256)
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def hf_decoder_config(preset: dict, max_positions: int):
    from transformers import MusicgenDecoderConfig

    return MusicgenDecoderConfig(
        vocab_size=CARD, num_codebooks=K, hidden_size=preset["dim"], num_hidden_layers=preset["num_layers"],
        num_attention_heads=preset["num_heads"], ffn_dim=preset["ffn_dim"], max_position_embeddings=max_positions,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, pad_token_id=CARD,
        bos_token_id=CARD, audio_channels=1, tie_word_embeddings=False)


def model_flops_per_frame(dim: int, layers: int, ffn: int, seq: int) -> float:
    """Training FLOPs per sequence step: 3 x forward (matmuls, causal self-attention, cross-attention to TC)."""
    matmul = 2 * (layers * (6 * dim * dim + 2 * dim * ffn) + K * CARD * dim)
    attention = layers * (2 * dim * seq + 4 * dim * TC)
    return 3.0 * (matmul + attention)


def matmul_ceiling(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps


def top_kernels(fn, device: torch.device, rows: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    try:
        return events.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    except (AttributeError, KeyError):
        return events.table(sort_by=key.replace("cuda", "device"), row_limit=rows, max_name_column_width=60)


# --------------------------------------------------------------------------------------------------- training
def train_inputs(b: int, frames: int, dim: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, CARD, (b, K, frames), generator=g)
    seq, _ = DelayPattern(K).build(codes, CARD)
    cond = torch.randn(b, TC, dim, generator=g)
    return seq.to(device), cond.to(device), torch.ones(b, TC, dtype=torch.bool, device=device)


def make_step(forward, params, seq, device: torch.device):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    target = seq[:, :, 1:].clamp(max=CARD - 1).flatten()
    losses: list[torch.Tensor] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(seq[:, :, :-1])  # [B, K, S, card]
            loss = F.cross_entropy(logits.float().flatten(0, 2), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step, losses


def bench_training(name: str, preset: dict, b: int, frames: int, device: torch.device, args) -> list[dict]:
    from transformers import MusicgenForCausalLM

    rows = []
    seq, cond, mask = train_inputs(b, frames, preset["dim"], device)
    flops = model_flops_per_frame(preset["dim"], preset["num_layers"], preset["ffn_dim"], seq.shape[-1] - 1)
    hf_cfg = hf_decoder_config(preset, max_positions=seq.shape[-1] + 8)
    default_order = list(torch._C._get_sdp_priority_order())

    free(device)
    with torch.device(device):
        hf = MusicgenForCausalLM(hf_cfg).train()
    state = {k: v.detach().to("cpu", copy=True) for k, v in hf.state_dict().items()}

    def hf_forward(x):
        out = hf(input_ids=x.reshape(-1, x.shape[-1]), encoder_hidden_states=cond, encoder_attention_mask=mask)  # noqa: F821 - called before the `del` below frees the model
        return out.logits.reshape(b, K, x.shape[-1], CARD)

    step, hf_losses = make_step(hf_forward, hf.parameters(), seq, device)
    t = timed_steps(step, device, args.warmup, args.steps)
    rows.append(dict(what=f"transformers {name}", t=t, peak=peak_gb(device), loss=float(hf_losses[0]),
                     attn=getattr(hf.config, "_attn_implementation", "?")))
    del hf, step, hf_losses
    free(device)

    variants = (["eager"] if name in args.eager.split(",") or not args.compile else []) + \
        (["compiled"] if args.compile else [])
    for variant in variants:
        for cudnn_first in (True, False):  # cuDNN attention first; the default order if that fails
            try:
                rows.append(ostinato_run(name, variant, cudnn_first, hf_cfg, state, seq, cond, mask, device, args))
                break
            except Exception as e:  # noqa: BLE001 - keep the other rows
                traceback.print_exc()
                rows.append(dict(what=f"ostinato {name}, {variant} (cuDNN first: {cudnn_first})", t=float("nan"),
                                 peak=float("nan"), loss=float("nan"), error=str(e).splitlines()[0][:100]))
            finally:
                torch._C._set_sdp_priority_order(default_order)
                prefer_cudnn_attention(False)
                free(device)
    for r in rows:
        r["frames_s"] = b * frames / r["t"]
        r["tflops"] = r["frames_s"] * flops / 1e12
    return rows


def ostinato_run(name: str, variant: str, cudnn_first: bool, hf_cfg, state: dict, seq, cond, mask,
                 device: torch.device, args) -> dict:
    from omegaconf import OmegaConf

    from ostinato.engine.trainer import apply_compile_and_checkpointing

    cudnn = prefer_cudnn_attention(cudnn_first)
    if cudnn_first and not cudnn and device.type == "cuda":
        raise RuntimeError("cuDNN attention not available here")
    with torch.device(device):
        lm = CodebookLM(decoder_config_to_lm_config(hf_cfg.to_dict())).train()
    lm.load_state_dict(transformers_state_to_lm(state), strict=True)
    holder = torch.nn.Module()
    holder.lm = lm
    compile_s = 0.0
    if variant == "compiled":
        torch._dynamo.reset()  # a fresh graph per preset (shapes that changed would be compiled as dynamic)
        apply_compile_and_checkpointing(OmegaConf.create({"compile": ["lm.layers"], "activation_checkpointing": False,
                                                          "strategy": "auto"}), holder)
    step, losses = make_step(lambda x: lm(x, cond, mask), lm.parameters(), seq, device)
    if variant == "compiled":
        t0 = time.perf_counter()
        step()
        sync(device)
        compile_s = time.perf_counter() - t0
    t = timed_steps(step, device, args.warmup, args.steps)
    peak = peak_gb(device)
    syncs = "none"
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as e:
            syncs = f"yes ({str(e).splitlines()[0][:60]})"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if variant == "compiled" or not args.compile:
        say(f"\nTop kernels of one ostinato {name} training step ({variant}):\n")
        say("```")
        say(top_kernels(step, device, args.profile_rows))
        say("```")
    attn = ", cuDNN SDPA" if cudnn else ", default SDPA order"
    return dict(what=f"ostinato {name}, {variant}{attn}", t=t, peak=peak, loss=float(losses[0]),
                compile_s=compile_s, syncs=syncs)


# ------------------------------------------------------------------------------------------------- generation
def tiny_t5_and_encodec():
    from transformers import EncodecConfig, T5Config

    t5 = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                  decoder_start_token_id=0, pad_token_id=0)
    codec = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, upsampling_ratios=[8, 5, 4, 4],
                          codebook_size=CARD, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                          target_bandwidths=[2.2], use_causal_conv=False, normalize=False)
    return t5, codec


def bench_generation(preset: dict, steps: int, batches: list[int], device: torch.device, args) -> list[dict]:
    from transformers import MusicgenConfig, MusicgenForConditionalGeneration

    rows = []
    t5_cfg, codec_cfg = tiny_t5_and_encodec()
    dec_cfg = hf_decoder_config(preset, max_positions=2048)
    cfg = MusicgenConfig(text_encoder=t5_cfg.to_dict(), audio_encoder=codec_cfg.to_dict(),
                         decoder=dec_cfg.to_dict())
    free(device)
    torch.manual_seed(0)
    with torch.device(device):
        hf = MusicgenForConditionalGeneration(cfg).eval()
    gen_cfg = hf.generation_config
    gen_cfg.decoder_start_token_id = CARD
    gen_cfg.pad_token_id = CARD
    gen_cfg.bos_token_id = CARD
    state = {k[len("decoder."):]: v.detach().to("cpu", copy=True) for k, v in hf.state_dict().items()
             if k.startswith("decoder.")}
    hf = hf.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for b in batches:
        ids = torch.randint(1, 128, (b, TC), generator=g).to(device)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=250,
                  guidance_scale=3.0)
        with torch.no_grad():
            hf.generate(**kw, max_new_tokens=8)
            sync(device)
            t0 = time.perf_counter()
            audio = hf.generate(**kw, max_new_tokens=steps)
            sync(device)
        t = time.perf_counter() - t0
        rows.append(dict(what=f"transformers generate (bf16 weights), B={b}", b=b, t=t, steps_s=steps / t,
                         audio=tuple(audio.shape)))
    del hf
    free(device)

    with torch.device(device):
        lm = CodebookLM(decoder_config_to_lm_config(dec_cfg.to_dict())).eval()
    lm.load_state_dict(transformers_state_to_lm(state), strict=True)
    pattern = DelayPattern(K)
    variants = [("cache", "cache", None), ("static", "static", None), ("graph", "graph", None)]
    variants += [(f"graph + compile {m}", "graph", m) for m in args.gen_compile.split(",") if m]
    frames = steps - (K - 1)  # pattern.max_steps(frames) - 1 == steps decoding steps
    assert pattern.max_steps(frames) - 1 == steps
    for b in batches:
        cond = torch.randn(b, TC, lm.cfg.dim, generator=g).to(device)
        for label, backend, mode in variants:
            if backend == "graph" and device.type != "cuda":
                continue
            params = GenerationParams(temperature=1.0, top_k=250, cfg_scale=3.0, seed=1, backend=backend,
                                      dtype=None if backend == "cache" else "bf16", compile=mode)

            def run(n: int = frames) -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=backend == "cache"):
                    return generate(lm, pattern, n, cond=cond, params=params)  # noqa: F821 - called before the `del` below frees the model

            t0 = time.perf_counter()
            try:
                run(8 if backend == "cache" else frames)  # warm-up (fast backends: same window, graph captured)
            except Exception as e:  # noqa: BLE001 - a failing variant must not hide the others
                traceback.print_exc()
                say(f"- {label}, B={b}: failed: {str(e).splitlines()[0][:150]}")
                continue
            sync(device)
            first = time.perf_counter() - t0
            reps = 1 if backend == "cache" else args.gen_repeats
            t0 = time.perf_counter()
            for _ in range(reps):
                codes = run()
            sync(device)
            t = (time.perf_counter() - t0) / reps
            rows.append(dict(what=f"ostinato generate, {label}, B={b}", b=b, t=t, steps_s=steps / t, codes=codes,
                             first=first))
        if device.type == "cuda":
            static = next(r["codes"] for r in rows if r["what"] == f"ostinato generate, static, B={b}")
            graph = next(r["codes"] for r in rows if r["what"] == f"ostinato generate, graph, B={b}")
            same = torch.equal(static, graph)
            say(f"- B={b}: graph replay and eager static step drew identical tokens (seed 1): {same}")
            assert same, "graph replay differs from the eager static step"
    if device.type == "cuda":
        cond = torch.randn(1, TC, lm.cfg.dim, generator=g).to(device)
        best = max((r for r in rows if r["b"] == 1 and "graph" in r["what"]), key=lambda r: r["steps_s"])
        mode = next((m for label, _, m in variants if best["what"].endswith(f"{label}, B=1")), None)
        params = GenerationParams(top_k=250, cfg_scale=3.0, seed=1, backend="graph", dtype="bf16", compile=mode)
        say(f"\nTop kernels of one window decoded by the fastest graph variant ({best['what']}, 500 steps):\n")
        say("```")
        say(top_kernels(lambda: generate(lm, pattern, frames, cond=cond, params=params), device, args.profile_rows))  # noqa: F821 - called before the `del` below frees the model
        say("```")
    del lm
    free(device)
    return rows


# ------------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU check of every code path)")
    ap.add_argument("--sections", default="matmul,train,generate")
    ap.add_argument("--train", default="small:16,medium:8", help="preset:batch,... (1500 frames each)")
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gen-steps", type=int, default=500)
    ap.add_argument("--gen-batches", default="1,8")
    ap.add_argument("--gen-repeats", type=int, default=3)
    ap.add_argument("--gen-compile", default="default,max-autotune-no-cudagraphs",
                    help="torch.compile modes of the graph-captured step to time too (comma list; empty: none)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--eager", default="small", help="presets whose eager variant is timed too")
    ap.add_argument("--profile-rows", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.train, args.frames, args.steps, args.warmup = "small:2", 40, 2, 1
        args.gen_steps, args.gen_batches, args.gen_repeats, args.gen_compile = 20, "1,2", 1, "default"
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    say(f"## MusicGen: ostinato vs transformers ({date.today()})\n")
    say(f"- Device: {name}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}" + (f", cuDNN {torch.backends.cudnn.version()}"
                                                 if device.type == "cuda" else ""))
    say(f"- Command: `python {' '.join(sys.argv)}`\n")
    sections = set(args.sections.split(","))
    ceiling = float("nan")
    if "matmul" in sections:
        ceiling = matmul_ceiling(device, 8192 if device.type == "cuda" else 512)
        say(f"- bf16 matmul ceiling (8192^3 product): {ceiling:,.0f} TFLOP/s\n")
    if "train" in sections:
        say("| training step | batch | ms / step | frames / s | model TFLOP/s | % of matmul ceiling | peak GB "
            "| first loss | notes |")
        say("|---|---|---|---|---|---|---|---|---|")
        for item in args.train.split(","):
            pname, b = item.split(":")
            preset = dict(TINY) if args.tiny else dict(LM_PRESETS[pname])
            try:
                rows = bench_training(pname, preset, int(b), args.frames, device, args)
            except Exception:  # noqa: BLE001 - one failing section must not hide the others
                say(f"| {pname} | failed | | | | | | | {traceback.format_exc().splitlines()[-1][:120]} |")
                traceback.print_exc()
                continue
            base = rows[0]["frames_s"]
            for r in rows:
                notes = []
                if "attn" in r:
                    notes.append(f"attn_implementation={r['attn']}")
                if r.get("compile_s"):
                    notes.append(f"first step (compile) {r['compile_s']:.0f} s")
                if "syncs" in r:
                    notes.append(f"host syncs in a step: {r['syncs']}")
                if "error" in r:
                    notes.append(f"failed: {r['error']}")
                notes.append(f"{r['frames_s'] / base:.2f}x transformers")
                say(f"| {r['what']} | {b} x {args.frames} | {r['t'] * 1000:.1f} | {r['frames_s']:,.0f} | "
                    f"{r['tflops']:.0f} | {100 * r['tflops'] / ceiling:.0f} % | {r['peak']:.1f} | {r['loss']:.4f} | "
                    f"{'; '.join(notes)} |")
        say()
    if "generate" in sections:
        batches = [int(x) for x in args.gen_batches.split(",")]
        preset = dict(TINY) if args.tiny else dict(LM_PRESETS["small"])
        try:
            rows = bench_generation(preset, args.gen_steps, batches, device, args)
        except Exception:  # noqa: BLE001
            say(f"generation failed: {traceback.format_exc().splitlines()[-1]}")
            traceback.print_exc()
            rows = []
        say(f"\n| generation, small, CFG 3, top-k 250, {args.gen_steps} steps | s | steps / s | x real time (50 Hz) "
            f"| vs transformers | first call (compile, capture) s |")
        say("|---|---|---|---|---|---|")
        for r in rows:
            ref = next((x["t"] for x in rows if x["what"].startswith("transformers") and x["b"] == r["b"]), None)
            say(f"| {r['what']} | {r['t']:.3f} | {r['steps_s']:,.0f} | {r['steps_s'] / 50:.1f} | "
                f"{(ref / r['t']) if ref else float('nan'):.1f}x | {r.get('first', float('nan')):.1f} |")
        say()
    if args.out:
        Path(args.out).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
