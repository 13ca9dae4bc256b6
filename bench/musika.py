"""Musika generation speed: seconds of 44.1 kHz audio generated per second of wall time (x real time).

The whole pipeline of ``ostinato generate --family musika``: style + coordinate anchors -> the latent GAN over many
windows in parallel -> stitched latents -> the spectrogram autoencoder's decoder -> ISTFT, with the 44.1 kHz
presets (conf/family/musika_44k.yaml, musika_autoencoder_44k.yaml) and random weights (speed does not depend on
them). A warm-up run precedes the timed runs.

    python bench/musika.py --device cpu --seconds 60 --repeats 3
    python bench/musika.py --device cuda --seconds 600 --batch 16 --dtype bfloat16 --decode-chunk 2048 \
        --batch-windows 1024 --repeats 3

Prints one Markdown row per run for bench/RESULTS.md (device, versions, date and the command first).
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
GAN, AUTOENCODER = ROOT / "conf/family/musika_44k.yaml", ROOT / "conf/family/musika_autoencoder_44k.yaml"


def build(gan_cfg: Path, ae_cfg: Path, device: torch.device):
    """The Musika model (its autoencoder attached) and the autoencoder of two family presets, random weights,
    eval mode."""
    from ostinato.models.musika import Musika, SpectralAutoencoder

    torch.manual_seed(0)
    ae = SpectralAutoencoder.from_config({"family": OmegaConf.to_container(OmegaConf.load(ae_cfg))})
    gan = Musika.from_config({"family": OmegaConf.to_container(OmegaConf.load(gan_cfg))})
    return gan.attach(ae).to(device).eval(), ae


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(gan, ae, seconds: float, batch: int, params: dict, device: torch.device, dtype: torch.dtype) -> dict:
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        sync(device)
        t0 = time.perf_counter()
        latents = gan.latents(int(seconds * ae.frame_rate + 0.999), batch, seed=params["seed"],
                              batch_windows=params["batch_windows"])
        sync(device)
        t1 = time.perf_counter()
        wav = gan.generate(seconds, batch, **params)
        sync(device)
        t2 = time.perf_counter()
    assert wav.shape == (batch, ae.channels, round(seconds * ae.sample_rate)) and bool(torch.isfinite(wav).all())
    audio = batch * seconds
    return {"latents_s": t1 - t0, "total_s": t2 - t1, "x_realtime": audio / (t2 - t1),
            "latent_x_realtime": audio / (t1 - t0), "frames": latents.shape[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=60.0, help="audio per piece")
    p.add_argument("--batch", type=int, default=1, help="pieces generated together")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-windows", type=int, default=256, help="generator windows per forward")
    p.add_argument("--decode-chunk", type=int, default=512, help="latent frames per decoder chunk")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--gan", default=str(GAN), help="GAN family preset")
    p.add_argument("--autoencoder", default=str(AUTOENCODER), help="autoencoder family preset")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gan, ae = build(Path(args.gan), Path(args.autoencoder), device)
    params = {"seed": 0, "batch_windows": args.batch_windows, "decode_chunk": args.decode_chunk}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    n_params = {"generator": sum(x.numel() for x in gan.generator.parameters()) / 1e6,
                "decoder": sum(x.numel() for x in ae.decoder.parameters()) / 1e6}
    print(f"date {date.today()}, device {name} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"python {platform.python_version()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{ae.sample_rate} Hz, latents {ae.dimension} x {ae.frame_rate:.2f} Hz, window {gan.window} frames, "
          f"generator {n_params['generator']:.1f} M, decoder {n_params['decoder']:.1f} M params\n")
    run_once(gan, ae, min(args.seconds, 10.0), args.batch, params, device, dtype)  # warm-up
    print(f"| {args.device}, {args.dtype}, batch {args.batch} x {args.seconds:g} s | latents s | total s | "
          f"x real time |")
    print("|---|---|---|---|")
    best = 0.0
    for i in range(args.repeats):
        r = run_once(gan, ae, args.seconds, args.batch, params, device, dtype)
        best = max(best, r["x_realtime"])
        print(f"| run {i + 1} | {r['latents_s']:.3f} | {r['total_s']:.3f} | {r['x_realtime']:,.1f} |", flush=True)
    print(f"\nbest: {best:,.1f}x real time")


if __name__ == "__main__":
    main()
