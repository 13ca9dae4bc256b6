"""Audio out of the Jukebox-style models: top prior -> middle upsampler -> bottom upsampler -> VQ-VAE decoder.

The top prior samples ``ceil(seconds * rate_top)`` codes conditioned on the metadata (with classifier-free
guidance); each upsampler then samples 4x as many codes of its level, conditioned on the metadata and on the codes
just sampled above (``JukeboxPrior.upper_condition`` of the whole piece, sliced per window). Outputs longer than a
prior's training window use ``generate``'s sliding window (half a window of new frames per step); the condition
of every window is the part of the upper codes under it. The bottom codes are decoded by the bottom VQ-VAE level.

The four models travel as a *bundle*: a folder with ``jukebox.json`` (``{"top": REF, "middle": REF, "bottom": REF,
"vqvae": REF}``, relative paths from the folder; ``vqvae`` may be left out when the priors record it), or a folder
holding export folders named ``top``, ``middle``, ``bottom`` (and ``vqvae``), or the string
``top=REF,middle=REF,bottom=REF[,vqvae=REF]``.

    python -m ostinato.generation.jukebox bundle OUT --top REF --middle REF --bottom REF [--vqvae REF]
    ostinato generate --family jukebox --model OUT --prompt "genre: baroque chorale, composer: Bach" --duration 4
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.generation.request import GenerationRequest
from ostinato.nn.decoding import GenerationParams, generate
from ostinato.models.jukebox import parse_metadata

__all__ = ["JukeboxModels", "generate_codes", "generate_audio", "load_bundle", "write_bundle", "generate_clips"]

Progress = Callable[[int, int], None]
BUNDLE_NAME = "jukebox.json"
PRIORS = ("top", "middle", "bottom")


@dataclass
class JukeboxModels:
    """The three priors (``JukeboxPrior``, eval mode) and the VQ-VAE (``JukeboxVQVAEFamily``), with their refs."""

    priors: dict[str, Any]
    vqvae: Any
    refs: dict[str, str]

    @property
    def sample_rate(self) -> int:
        return int(self.vqvae.vqvae.sample_rate)

    @property
    def fields(self) -> list[str]:
        return self.priors["top"].metadata_fields

    def to(self, device: torch.device | str) -> JukeboxModels:
        for m in (*self.priors.values(), self.vqvae):
            m.to(device)
        return self


def _spec(model: str) -> dict[str, str]:
    """A bundle reference -> ``{part: ref}`` with paths resolved."""
    if "=" in model and not Path(model).exists():
        parts = dict(p.split("=", 1) for p in model.split(",") if p.strip())
        bad = sorted(set(parts) - {*PRIORS, "vqvae"})
        if bad:
            raise ValueError(f"--model {model}: unknown parts {bad}; use top=REF,middle=REF,bottom=REF[,vqvae=REF]")
        return {k: v.strip() for k, v in parts.items()}
    path = Path(model)
    if path.is_file():
        path = path.parent
    if (path / BUNDLE_NAME).is_file():
        spec = json.loads((path / BUNDLE_NAME).read_text())
        return {k: str(v if os.path.isabs(str(v)) or str(v).startswith("//") else path / v)
                for k, v in spec.items() if v}
    if path.is_dir() and all((path / p).is_dir() for p in PRIORS):
        return {p: str(path / p) for p in (*PRIORS, "vqvae") if (path / p).is_dir()}
    raise FileNotFoundError(f"--model {model}: not a Jukebox bundle (a folder with {BUNDLE_NAME}, or with top/, "
                            "middle/ and bottom/ export folders, or top=REF,middle=REF,bottom=REF[,vqvae=REF]); "
                            "write one with `python -m ostinato.generation.jukebox bundle`")


def load_bundle(model: str, vqvae: str | None = None, trust: bool = False) -> JukeboxModels:
    """Load the priors and the VQ-VAE of a bundle (see the module docstring); ``vqvae`` overrides the bundle's."""
    import ostinato
    from ostinato.families.jukebox import JukeboxPrior, JukeboxVQVAEFamily
    from ostinato.store.records import resolve_ref, xps_dir

    spec = _spec(model)
    missing = [p for p in PRIORS if p not in spec]
    if missing:
        raise ValueError(f"--model {model}: the bundle lacks {missing}")
    priors = {}
    for part in PRIORS:
        prior = ostinato.load(resolve_ref(spec[part]), xps_dir=xps_dir(), trust=trust)
        if not isinstance(prior, JukeboxPrior) or prior.level != part:
            raise ValueError(f"{spec[part]} holds a {type(prior).__name__}"
                             f"{'' if not isinstance(prior, JukeboxPrior) else f' of level {prior.level}'}, not the "
                             f"{part} prior")
        priors[part] = prior.eval()
    vq_ref = vqvae or spec.get("vqvae") or _recorded_vqvae(spec["top"], trust)
    vq = ostinato.load(resolve_ref(vq_ref), xps_dir=xps_dir(), trust=trust)
    if not isinstance(vq, JukeboxVQVAEFamily):
        raise ValueError(f"{vq_ref} holds a {type(vq).__name__}, not a Jukebox VQ-VAE (family jukebox_vqvae_*)")
    rates = vq.vqvae.frame_rates
    for part, prior in priors.items():
        if abs(prior.frame_rate - rates[part]) > 1e-6 or prior.bins != vq.vqvae.bins:
            raise ValueError(f"the {part} prior was trained on {prior.bins} codes at {prior.frame_rate:g} Hz but "
                             f"{vq_ref} gives {vq.vqvae.bins} at {rates[part]:g} Hz: pass the VQ-VAE it was trained "
                             "with (--codec)")
    return JukeboxModels(priors, vq.eval(), {**{p: spec[p] for p in PRIORS}, "vqvae": str(vq_ref)})


def _recorded_vqvae(prior_ref: str, trust: bool) -> str:
    from ostinato.data.arrays import ArrayManifest
    from ostinato.store.records import read_weights
    from ostinato.store.records import resolve_ref, xps_dir

    _, cfg, _ = read_weights(resolve_ref(prior_ref), xps_dir(), trust)
    cfg = cfg or {}
    ref = (cfg.get("family") or {}).get("vqvae")
    if ref is None:
        train = (cfg.get("data") or {}).get("train")
        if train is None:
            raise ValueError(f"{prior_ref}: no VQ-VAE recorded (family.vqvae or array shards); give vqvae= or --codec")
        ref = ArrayManifest.load(train).model.id
    return str(ref)


def write_bundle(out: str | Path, top: str, middle: str, bottom: str, vqvae: str | None = None) -> Path:
    """``out/jukebox.json`` naming the four models (absolute paths, so the bundle can live anywhere)."""
    from ostinato.fileio import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def absolute(ref: str) -> str:
        return str(Path(ref).resolve()) if Path(ref).exists() else ref

    spec = {"top": absolute(top), "middle": absolute(middle), "bottom": absolute(bottom)}
    if vqvae is not None:
        spec["vqvae"] = absolute(vqvae)
    atomic_write_json(out / BUNDLE_NAME, spec)
    return out / BUNDLE_NAME


def _params(base: GenerationParams, prior: Any, offset: int, guided: bool) -> GenerationParams:
    window = prior.window or None
    return GenerationParams(temperature=base.temperature, top_k=base.top_k, top_p=base.top_p,
                            cfg_scale=base.cfg_scale if guided else 1.0, cfg_beta=None,
                            seed=None if base.seed is None else base.seed + offset, max_window_frames=window,
                            extend_stride_frames=None if window is None else max(1, window // 2))


@torch.no_grad()
def generate_codes(models: JukeboxModels, metas: Sequence[Mapping[str, Any]], seconds: float,
                   params: GenerationParams | None = None, progress: Progress | None = None) -> dict[str, Tensor]:
    """Per level codes ``[B, 1, F_level]`` for ``seconds`` of audio, one item per metadata dict.

    ``params``: sampling settings; ``cfg_scale`` guides the top prior by the metadata, the upsamplers sample
    without guidance (their null condition would drop the upper codes too); each level's seed is ``seed + i``.
    """
    params = params or GenerationParams(cfg_scale=3.0)
    b = len(metas)
    top = models.priors["top"]
    frames = {"top": max(1, math.ceil(seconds * top.frame_rate))}
    for part in ("middle", "bottom"):
        frames[part] = frames[models.priors[part].upper] * models.priors[part].level_ratio
    steps = {part: _steps(frames[part], models.priors[part].window) for part in PRIORS}
    total, done = sum(steps.values()), 0
    codes: dict[str, Tensor] = {}
    for i, part in enumerate(PRIORS):
        prior = models.priors[part]
        device = next(prior.parameters()).device
        meta = prior.metadata_prefix(metas, train=False)
        before = done

        def report(d: int, _t: int, before: int = before) -> None:
            if progress is not None:
                progress(before + d, total)

        if prior.upper is None:
            prefix: Any = meta
        else:
            condition = prior.upper_condition(codes[prior.upper].to(device))

            def prefix(start: int, n: int, prior: Any = prior, meta: Tensor | None = meta,
                       condition: Tensor = condition) -> Tensor:
                return prior.prefix(meta, condition[:, start:start + n], b)

        codes[part] = generate(prior.lm, prior.pattern, frames[part], prefix=prefix, batch_size=b,
                               params=_params(params, prior, i, guided=prior.upper is None), progress=report)
        done = before + steps[part]
    return codes


def _steps(n_frames: int, window: int) -> int:
    """Decoding steps ``generate`` reports for ``n_frames`` with windows of ``window`` frames advancing by half a
    window (its sliding-window plan)."""
    if not window or n_frames <= window:
        return n_frames
    stride = max(1, window // 2)
    total, have = window, window
    while have < n_frames:
        add = min(stride, n_frames - have)
        total += window - stride + add
        have += add
    return total


@torch.no_grad()
def generate_audio(models: JukeboxModels, metas: Sequence[Mapping[str, Any]], seconds: float,
                   params: GenerationParams | None = None, progress: Progress | None = None) -> Tensor:
    """``[B, C, round(seconds * sample_rate)]`` waveforms decoded from the bottom codes."""
    codes = generate_codes(models, metas, seconds, params, progress)
    device = next(models.vqvae.parameters()).device
    wav = models.vqvae.vqvae.decode(codes["bottom"].to(device), "bottom")
    return wav[..., :round(seconds * models.sample_rate)]


def prompt_metadata(prompts: Sequence[str], fields: Sequence[str]) -> list[dict[str, str]]:
    """``--prompt`` texts -> metadata dicts (``"genre: ..., composer: ..."``); no prompt: one unconditioned item."""
    if not prompts:
        return [{}]
    if not fields:
        raise ValueError("this Jukebox prior has no metadata conditioning (family.metadata: null); drop --prompt")
    return [parse_metadata(p, fields) for p in prompts]


def generate_clips(request: GenerationRequest, progress: Progress) -> tuple[Tensor, int, list[dict[str, Any]]]:
    """``ostinato generate --model BUNDLE [--prompt "genre: ..., composer: ..."]``."""
    if request.melody or request.style or request.continuation:
        raise ValueError("a Jukebox takes metadata prompts only: drop --melody / --style / --continue")
    models = load_bundle(request.model, request.codec, trust=request.trust)
    prompts = list(request.prompts)
    metas = prompt_metadata(prompts, models.fields)
    params = request.params
    wav = generate_audio(models, metas, request.duration, params, progress)
    records = [{"family": "jukebox", "model": request.model, "models": models.refs, "prompt": p, "metadata": m,
                "duration": request.duration, **{k: v for k, v in params.__dict__.items() if v is not None}}
               for p, m in zip(prompts or [""], metas)]
    return wav, models.sample_rate, records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ostinato.generation.jukebox",
                                description="Write a Jukebox bundle (jukebox.json) naming the priors and VQ-VAE.")
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("bundle", help="OUT/jukebox.json from the three priors (and the VQ-VAE)")
    b.add_argument("out")
    for part in PRIORS:
        b.add_argument(f"--{part}", required=True, help=f"the {part} prior (export folder, XP folder, //sig/SIG)")
    b.add_argument("--vqvae", default=None, help="the VQ-VAE (default: the one the priors' array shards record)")
    args = p.parse_args(argv)
    path = write_bundle(args.out, args.top, args.middle, args.bottom, args.vqvae)
    print(f"wrote {path}; generate with: ostinato generate --family jukebox --model {args.out} --duration 4 "
          f"--out gen/jukebox")


if __name__ == "__main__":
    main()
