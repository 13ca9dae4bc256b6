"""Codec benchmarks: training throughput of the codec family, and encode/decode speed against transformers'
``EncodecModel`` with the same architecture and weights.

    python bench/codec.py --device cuda --preset musicgen32      # one GPU
    python bench/codec.py --device cpu --preset tiny --train-steps 10

Prints Markdown tables (with device, versions and date) for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date

import torch
from omegaconf import OmegaConf

from ostinato.data.batch import AudioBatch

PRESETS = {"tiny": "conf/family/codec_tiny.yaml", "encodec24": "conf/family/codec_encodec24.yaml",
           "musicgen32": "conf/family/codec_musicgen32.yaml"}


def family_config(preset: str) -> dict:
    """The family node of a preset with its `defaults` chain resolved (no Hydra needed)."""
    node = OmegaConf.load(PRESETS[preset] if preset in PRESETS else preset)
    parents = [d for d in node.pop("defaults", []) if d != "_self_"]
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, OmegaConf.create(family_config(f"conf/family/{parent}.yaml")))
    return OmegaConf.to_container(OmegaConf.merge(merged, node))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def bench_training(preset: str, device: torch.device, batch: int, seconds: float, steps: int,
                   precision: str) -> dict:
    import lightning as L
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, IterableDataset

    cfg = family_config(preset)
    family = instantiate(cfg, _convert_="all")
    sr, ch = family.sample_rate, family.channels
    n = int(seconds * sr)

    class Noise(IterableDataset):
        def __iter__(self):
            while True:
                audio = 0.1 * torch.randn(batch, ch, n)
                yield AudioBatch(audio, torch.full((batch,), n), [""] * batch, [{}] * batch)

    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            sync(device)
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, out, b, i):
            sync(device)
            times.append(time.perf_counter() - self.t)

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
                        precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])
    trainer.fit(family, DataLoader(Noise(), batch_size=None))
    steady = sorted(times[max(2, len(times) // 5):])  # drop start-up steps (k-means, cudnn autotune)
    step = sum(steady) / len(steady)
    return {"step_s": step, "audio_s_per_s": batch * seconds / step,
            "params_m": sum(p.numel() for p in family.model.parameters()) / 1e6}


def transformers_twin(preset: str, folder: str):
    """A random transformers EncodecModel of the preset's architecture, saved to ``folder``."""
    from transformers import EncodecConfig, EncodecModel

    c = family_config(preset)
    k = c["codec"]
    card, n_q = k.get("card", 1024), k.get("n_q", 8)
    frame_rate = c["sample_rate"] / torch.tensor(k["ratios"]).prod().item()
    bandwidth = n_q * torch.log2(torch.tensor(float(card))).item() * frame_rate / 1000
    cfg = EncodecConfig(sampling_rate=c["sample_rate"], audio_channels=c.get("channels", 1),
                        num_filters=k.get("n_filters", 32), upsampling_ratios=k["ratios"], codebook_size=card,
                        hidden_size=k.get("dimension", 128), codebook_dim=k.get("dimension", 128),
                        num_lstm_layers=k.get("lstm", 2) or 1, use_causal_conv=k.get("causal", False),
                        target_bandwidths=[round(bandwidth, 3)], normalize=False, norm_type="weight_norm",
                        pad_mode="reflect", use_conv_shortcut=False)
    model = EncodecModel(cfg)
    model.save_pretrained(folder)
    return model, bandwidth


def bench_codec_speed(preset: str, device: torch.device, batch: int, seconds: float, repeats: int) -> list[dict]:
    from ostinato.interop.encodec import load_transformers_encodec

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        hf, bandwidth = transformers_twin(preset, folder)
        ours = load_transformers_encodec(folder)
    hf, ours = hf.to(device).eval(), ours.to(device).eval()
    x = 0.1 * torch.randn(batch, ours.channels, int(seconds * ours.sample_rate), device=device)
    with torch.inference_mode():
        codes = ours.encode(x).codes
        hf_codes = hf.encode(x, bandwidth=bandwidth).audio_codes
        assert torch.equal(codes, hf_codes[0]), "codes differ from transformers"
        audio_seconds = batch * seconds
        for name, fn in [("ostinato encode", lambda: ours.encode(x)),
                         ("transformers encode", lambda: hf.encode(x, bandwidth=bandwidth)),
                         ("ostinato decode", lambda: ours.decode(codes)),
                         ("transformers decode", lambda: hf.decode(hf_codes, [None]))]:
            t = timed(fn, device, repeats)
            rows.append({"op": name, "ms": t * 1000, "x_realtime": audio_seconds / t})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="musicgen32")
    p.add_argument("--train-preset", default=None, help="preset for the training benchmark (default: --preset)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=1.0, help="training crop length")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32-true on CPU")
    p.add_argument("--codec-batch", type=int, default=16)
    p.add_argument("--codec-seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    print(f"date {date.today()}, device {name}, torch {torch.__version__}, python {platform.python_version()}")
    import transformers

    print(f"transformers {transformers.__version__}\n")
    train_preset = args.train_preset or args.preset
    r = bench_training(train_preset, device, args.batch, args.seconds, args.train_steps, precision)
    print(f"| training ({train_preset}, {precision}, batch {args.batch} x {args.seconds} s) | step ms | "
          f"audio-s / s | codec params (M) |")
    print("|---|---|---|---|")
    print(f"| ostinato codec family (GAN step) | {r['step_s'] * 1000:.0f} | {r['audio_s_per_s']:,.1f} | "
          f"{r['params_m']:.1f} |\n", flush=True)
    rows = bench_codec_speed(args.preset, device, args.codec_batch, args.codec_seconds, args.repeats)
    print(f"| {args.preset}, fp32, batch {args.codec_batch} x {args.codec_seconds} s | ms | x real time |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['op']} | {row['ms']:.1f} | {row['x_realtime']:,.0f} |")


if __name__ == "__main__":
    main()
