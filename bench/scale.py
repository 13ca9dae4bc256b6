"""Scaling MusicGen training over the GPUs of one machine through the engine (issues 8 and 11), in one call.

    python bench/scale.py --out $OUT/scale.md                      # every GPU of the machine
    python bench/scale.py --device cpu --world 2 --tiny            # two gloo processes, toy sizes

Each run composes the real config (``conf/``: ``family=musicgen_tiny`` with the LM preset overridden,
``data=demo_tokens`` on synthesized token shards, ``trainer=gpu`` / ``trainer=fsdp``), builds the family, the
datamodule and ``build_trainer``'s Lightning Trainer exactly as ``ostinato train`` does, and starts one process per
GPU (torchrun-style environment), so the strategy, the FSDP wrapping per block, bf16 mixed precision and the
sharded checkpoints all come from config. Runs:

* DDP, MusicGen small (``trainer.strategy=ddp``), ``--ddp-batch`` x 30 s per GPU, on 1, 2, 4, ... GPUs;
* FSDP, MusicGen large (2048 wide, 48 layers, 32 heads; ``trainer=fsdp``), ``--fsdp-batch`` x 30 s per GPU, on
  1 and all GPUs; the all-GPU run writes its sharded checkpoint, a second launch resumes from it and checks that
  the step continues and every rank's parameter shard is bitwise what was saved.

Text conditioning is a tiny random BERT written on the fly (cross-attention to its 32 projected states); every
run is eager (no ``trainer.compile``), attention as the engine picks it (cuDNN first for DDP, flash for FSDP).
Frames/s count codec frames (50 Hz) of all ranks over the timed steps (after ``--warmup``); memory is each rank's
peak allocation. Prints (and writes with --out) a Markdown report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

PRESETS = {"small": dict(dim=1024, num_heads=16, num_layers=24, ffn_dim=4096),
           "large": dict(dim=2048, num_heads=32, num_layers=48, ffn_dim=8192),
           "tiny": dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128)}
FRAME_RATE = 50.0
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


# ------------------------------------------------------------------------------------------------ preparation
def write_tiny_text_encoder(folder: Path) -> Path:
    """A random 1-layer BERT with a small word-piece vocabulary, as a local text encoder folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "clip", "synthetic", "genre", ":", ".", ","]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    return folder


def prepare(root: Path, items: int, seconds: float) -> None:
    from bench.data_throughput import write_token_shards

    for split in ("train",):
        write_token_shards(root / "data" / "demo" / "tokens" / split, max(1, items // 8), 8,
                           int(2 * seconds * FRAME_RATE))
    write_tiny_text_encoder(root / "text")


def overrides(run: dict, root: Path, args) -> list[str]:
    p = PRESETS[run["preset"]]
    world, per_gpu = run["world"], run["batch"]
    out = ["family=musicgen_tiny", "data=demo_tokens", "family.n_q=4", "family.card=2048",
           f"family.lm.dim={p['dim']}", f"family.lm.num_heads={p['num_heads']}",
           f"family.lm.num_layers={p['num_layers']}", f"family.lm.ffn_dim={p['ffn_dim']}",
           f"family.text.model={root / 'text'}", "family.text.max_length=32",
           f"data.train={root / 'data' / 'demo' / 'tokens' / 'train'}", "data.valid=null", "data.test=null",
           f"data.segment_seconds={args.seconds}", f"data.batch_size={per_gpu * world}",
           f"data.num_workers={args.workers}", "data.batches_per_epoch=100000", "data.shuffle_buffer=16",
           f"trainer.devices={world}", f"trainer.max_steps={run['steps']}",
           f"trainer.checkpoint_every_steps={run.get('checkpoint', 10**9)}", "trainer.val_every_epochs=1000",
           "trainer.progress_bar=false", "trainer.model_summary=false", "trainer.log_every_n_steps=100000",
           "ema.decay=0", "logger=csv", "optim.schedule.warmup_steps=0"]
    if args.device == "cpu":
        out += [f"trainer.strategy={run['strategy']}", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    elif run["strategy"] == "fsdp":
        out += ["trainer=fsdp", f"trainer.activation_checkpointing={str(args.checkpointing).lower()}"]
    else:
        out += ["trainer=gpu", "trainer.strategy=ddp"]
    return out


# ----------------------------------------------------------------------------------------------------- worker
def worker(spec: dict) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ostinato.engine.config import validate
    from ostinato.evaluation.hooks import check_evaluate, evaluation_callbacks
    from ostinato.families.base import plain
    from ostinato.engine.trainer import apply_compile_and_checkpointing, build_trainer, last_checkpoint

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=spec["overrides"])
    validate(cfg, checks=[check_evaluate])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = torch.device("cuda", local) if spec["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with device:  # build on the GPU: initialising MusicGen-large on the CPU takes minutes
        family = instantiate(cfg.family, optim=plain(cfg.optim), _convert_="all")
    datamodule = instantiate(cfg.data, _convert_="all")
    apply_compile_and_checkpointing(cfg.trainer, family)
    folder = Path(spec["folder"])
    trainer = build_trainer(cfg, folder, family, loggers=[], extra_callbacks=evaluation_callbacks(cfg))
    clock = Clock(spec["warmup"], Path(spec["report"]) / f"rank{rank}.json", device, spec.get("profile", False))
    trainer.callbacks.insert(0, clock)  # before ModelCheckpoint: a step's time never includes a checkpoint save
    resume = last_checkpoint(folder)
    trainer.fit(family, datamodule, ckpt_path=str(resume) if resume else None)


def _checksum(module: torch.nn.Module) -> list[float]:
    """(sum, sum of |.|) in float64 of this rank's parameters (its shards under FSDP)."""
    ps = [p.detach().double() for p in module.parameters() if p.numel()]
    return [float(torch.stack([p.sum() for p in ps]).sum()), float(torch.stack([p.abs().sum() for p in ps]).sum())]


class Clock(L.Callback):
    """Times the steps after ``warmup`` (synchronising only at both ends) and writes this rank's report."""

    def __init__(self, warmup: int, out: Path, device: torch.device, profile: bool = False) -> None:
        self.warmup, self.out, self.device, self.profile = warmup, out, device, profile
        self.t0 = self.t1 = None
        self.info: dict = {"step_seconds": []}
        self._last = time.perf_counter()
        self._prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self.info["start_step"] = trainer.global_step
        self.info["start_checksum"] = _checksum(pl_module)
        self.first = trainer.global_step + self.warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.profile and trainer.global_rank == 0 and trainer.global_step == self.first - 1:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self._sync()  # the engine's non-finite guard syncs every step anyway
        now = time.perf_counter()
        self.info["step_seconds"].append(round(now - self._last, 4))
        self._last = now
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            events = self._prof.key_averages()
            tables = [events.table(sort_by=k, row_limit=15, max_name_column_width=70)
                      for k in ("self_cuda_time_total", "cpu_time_total") if self.device.type == "cuda"
                      or k.startswith("cpu")]
            self.out.with_name("profile_rank0.txt").write_text("\n".join(tables))
            self._prof = None
        if step == self.first:
            self._sync()
            self.t0, self.n0 = time.perf_counter(), step
        if step >= trainer.max_steps:
            self._sync()
            self.t1, self.n1 = time.perf_counter(), step
            self.info["frames_per_step"] = int(batch.codes.shape[0] * batch.codes.shape[-1] * trainer.world_size)

    def on_train_end(self, trainer, pl_module) -> None:
        info = dict(self.info, rank=trainer.global_rank, world=trainer.world_size, end_step=trainer.global_step,
                    end_checksum=_checksum(pl_module), strategy=type(trainer.strategy).__name__,
                    wrapped=sum(type(m).__name__ == "FullyShardedDataParallel"
                                for m in trainer.strategy.model.modules()),
                    params=sum(p.numel() for p in pl_module.parameters()))
        if self.t0 is not None and self.t1 is not None:
            info.update(seconds=self.t1 - self.t0, steps=self.n1 - self.n0)
        if self.device.type == "cuda":
            info["peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(info))


# ----------------------------------------------------------------------------------------------------- parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: dict, root: Path, args, logs: Path) -> list[dict]:
    """Start ``run['world']`` processes of ``run`` and return every rank's report."""
    name = run["name"]
    report = root / "reports" / name
    report.mkdir(parents=True, exist_ok=True)
    for f in list(report.glob("rank*.json")) + list(report.glob("profile*.txt")):
        f.unlink()
    spec = {"overrides": overrides(run, root, args), "device": args.device, "folder": str(root / "xp" / run["xp"]),
            "report": str(report), "warmup": run.get("warmup", args.warmup), "profile": args.profile}
    port = _free_port()
    procs = []
    for rank in range(run["world"]):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(run["world"]),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        log = open(logs / f"{name}.rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    start = time.time()
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, args.run_timeout - (time.time() - start))))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(-9)
        log.close()
    if any(codes):
        tail = (logs / f"{name}.rank0.log").read_text()[-3000:]
        raise RuntimeError(f"{name}: exit codes {codes}\n{tail}")
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(run["world"])]


def throughput(reports: list[dict]) -> float:
    r0 = reports[0]
    return r0["frames_per_step"] * r0["steps"] / max(r["seconds"] for r in reports)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--world", type=int, default=None, help="processes (default: every GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and 1 s crops (CPU check)")
    ap.add_argument("--root", default="/tmp/ostinato_scale")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--ddp-batch", type=int, default=16, help="MusicGen small: items per GPU")
    ap.add_argument("--fsdp-batch", type=int, default=4, help="MusicGen large: items per GPU")
    ap.add_argument("--ddp-steps", type=int, default=14)
    ap.add_argument("--fsdp-steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing for FSDP large")
    ap.add_argument("--workers", type=int, default=4, help="loader workers per rank")
    ap.add_argument("--threads", type=int, default=4, help="OMP threads per rank")
    ap.add_argument("--skip", default="", help="comma list of: ddp, fsdp, fsdp1, resume")
    ap.add_argument("--run-timeout", type=float, default=400.0)
    ap.add_argument("--profile", action="store_true", help="profile one step after warm-up on rank 0 (printed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    if args.world is None:
        args.world = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.tiny:
        args.seconds, args.ddp_batch, args.fsdp_batch, args.ddp_steps, args.fsdp_steps, args.warmup = \
            1.0, 2, 2, 4, 4, 1
        args.workers, args.threads = 0, 1
    small, large = ("tiny", "tiny") if args.tiny else ("small", "large")
    root = Path(args.root)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t = time.time()
    prepare(root, items=max(16, args.world * args.ddp_batch), seconds=args.seconds)
    import transformers

    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    say(f"## Scaling: DDP MusicGen {small}, FSDP MusicGen {large} ({date.today()})\n")
    say(f"- Device: {args.world} x {name}; torch {torch.__version__}, lightning {L.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}")
    say(f"- Command: `python {' '.join(sys.argv)}` (data and text encoder prepared in {time.time() - t:.0f} s)\n")
    skip = set(filter(None, args.skip.split(",")))
    worlds = sorted({1, args.world} | {w for w in (2, 4, 8) if w < args.world})
    say("| run | GPUs | batch per GPU | s / step | frames / s | per GPU | scaling vs 1 GPU | peak GB per GPU |")
    say("|---|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    jobs = []
    if "ddp" not in skip:
        jobs += [dict(name=f"ddp_{small}_{w}", xp=f"ddp_{small}_{w}", preset=small, strategy="ddp", world=w,
                      batch=args.ddp_batch, steps=args.ddp_steps) for w in worlds]
    fsdp_worlds = [w for w in (1, args.world) if not (w == 1 and "fsdp1" in skip)] if "fsdp" not in skip else []
    jobs += [dict(name=f"fsdp_{large}_{w}", xp=f"fsdp_{large}_{w}", preset=large, strategy="fsdp", world=w,
                  batch=args.fsdp_batch, steps=args.fsdp_steps,
                  checkpoint=args.fsdp_steps if w == args.world else 10**9)  # the all-GPU run is resumed
             for w in sorted(set(fsdp_worlds))]
    results: dict[str, list[dict]] = {}
    for job in jobs:
        t = time.time()
        try:
            reports = launch(job, root, args, logs)
        except Exception as e:  # noqa: BLE001 - report and go on with the other runs
            say(f"| {job['name']} | {job['world']} | {job['batch']} | failed: {str(e).splitlines()[0][:150]} "
                f"| | | | |")
            print(e, file=sys.stderr)
            continue
        results[job["name"]] = reports
        fps = throughput(reports)
        kind = job["strategy"]
        if job["world"] == 1:
            base[kind] = fps
        scale = f"{fps / (job['world'] * base[kind]):.2f} x N" if kind in base else "-"
        peak = max(r.get("peak_gb", float("nan")) for r in reports)
        secs = max(r["seconds"] for r in reports) / reports[0]["steps"]
        say(f"| {job['strategy'].upper()} {job['preset']} ({reports[0]['params'] / 1e6:,.0f} M params on rank 0, "
            f"{reports[0]['wrapped']} FSDP units) | {job['world']} | {job['batch']} x {args.seconds:.0f} s | "
            f"{secs:.3f} | {fps:,.0f} | {fps / job['world']:,.0f} | {scale} | {peak:.1f} |")
        print(f"  ({job['name']}: {time.time() - t:.0f} s wall; rank 0 step seconds "
              f"{reports[0]['step_seconds']})", flush=True)
        prof = root / "reports" / job["name"] / "profile_rank0.txt"
        if prof.is_file():
            print(f"\nprofile of one {job['name']} step (rank 0):\n{prof.read_text()}\n", flush=True)
    # resume the all-GPU FSDP run from its sharded checkpoint
    key = f"fsdp_{large}_{args.world}"
    if key in results and "resume" not in skip:
        first = results[key]
        ckpt = root / "xp" / key / "checkpoints" / "last.ckpt"
        job = dict(name=f"{key}_resume", xp=key, preset=large, strategy="fsdp", world=args.world,
                   batch=args.fsdp_batch, steps=args.fsdp_steps + 2, checkpoint=10**9, warmup=0)
        try:
            again = launch(job, root, args, logs)
            same = all(a["start_checksum"] == b["end_checksum"] for a, b in zip(again, first))
            say(f"\nFSDP {large} sharded checkpoint `{ckpt.name}/` ({'a directory' if ckpt.is_dir() else 'a file'}, "
                f"{len(list(ckpt.glob('*.distcp'))) if ckpt.is_dir() else 0} shard files): resumed at step "
                f"{again[0]['start_step']} (saved at {first[0]['end_step']}), every rank's parameter shard equal "
                f"to the saved one: {same}; trained on to step {again[0]['end_step']}.")
        except Exception as e:  # noqa: BLE001
            say(f"\nFSDP resume failed: {str(e).splitlines()[0][:200]}")
            print(e, file=sys.stderr)
    say()
    if args.out:
        Path(args.out).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
