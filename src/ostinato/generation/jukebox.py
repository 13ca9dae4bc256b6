"""Audio out of a Jukebox bundle: the three priors and the VQ-VAE (``models.jukebox.Jukebox``) loaded together.

The four models travel as a *bundle*: a folder with ``jukebox.json`` (``{"top": REF, "middle": REF, "bottom": REF,
"vqvae": REF}``, relative paths from the folder; ``vqvae`` may be left out when the priors record it), or a folder
holding export folders named ``top``, ``middle``, ``bottom`` (and ``vqvae``), or the string
``top=REF,middle=REF,bottom=REF[,vqvae=REF]``.

    ostinato bundle jukebox OUT --top REF --middle REF --bottom REF [--vqvae REF]
    ostinato generate --model OUT --prompt "genre: baroque chorale, composer: Bach" --seconds 4
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ostinato.generation.request import GenerationRequest
from ostinato.models.jukebox import PRIORS, HierarchicalVQVAE, Jukebox, LevelPrior
from ostinato.nn.decoding import Progress

__all__ = ["BUNDLE_NAME", "bundle_spec", "load_bundle", "write_bundle", "generate_clips"]

BUNDLE_NAME = "jukebox.json"


def bundle_spec(model: str) -> dict[str, str]:
    """A bundle reference -> ``{part: ref}`` with paths resolved; not a bundle: ``FileNotFoundError``."""
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
                            "write one with `ostinato bundle jukebox`")


def load_bundle(model: str, vqvae: str | None = None, trust: bool = False) -> Jukebox:
    """The ``Jukebox`` of a bundle (see the module docstring), in eval mode; ``vqvae`` overrides the bundle's."""
    import ostinato
    from ostinato.store.records import resolve_ref, xps_dir

    spec = bundle_spec(model)
    missing = [p for p in PRIORS if p not in spec]
    if missing:
        raise ValueError(f"--model {model}: the bundle lacks {missing}")
    priors = {}
    for part in PRIORS:
        prior = ostinato.load(resolve_ref(spec[part]), xps_dir=xps_dir(), trust=trust)
        if not isinstance(prior, LevelPrior) or prior.level != part:
            level = f" of level {prior.level}" if isinstance(prior, LevelPrior) else ""
            raise ValueError(f"{spec[part]} holds a {type(prior).__name__}{level}, not the {part} prior")
        priors[part] = prior
    vq_ref = vqvae or spec.get("vqvae") or _recorded_vqvae(spec["top"], trust)
    vq = ostinato.load(resolve_ref(vq_ref), xps_dir=xps_dir(), trust=trust)
    if not isinstance(vq, HierarchicalVQVAE):
        raise ValueError(f"{vq_ref} holds a {type(vq).__name__}, not a Jukebox VQ-VAE (family jukebox_vqvae_*)")
    try:
        bundle = Jukebox(vq, priors, {**{p: spec[p] for p in PRIORS}, "vqvae": str(vq_ref)})
    except ValueError as e:
        raise ValueError(f"{vq_ref}: {e}") from None
    return bundle.eval()


def _recorded_vqvae(prior_ref: str, trust: bool) -> str:
    """The VQ-VAE a prior's config names (``family.vqvae``), else the one its training array shards record."""
    from ostinato.data.arrays import ArrayManifest
    from ostinato.store.records import read_config, resolve_ref, xps_dir

    cfg = read_config(resolve_ref(prior_ref), xps_dir(), trust) or {}
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


def generate_clips(request: GenerationRequest, progress: Progress) -> tuple[Tensor, int, list[dict[str, Any]]]:
    """``ostinato generate --model BUNDLE [--prompt "genre: ..., composer: ..."]``."""
    if request.melody or request.style or request.continuation:
        raise ValueError("a Jukebox takes metadata prompts only: drop --melody / --style / --continue")
    jukebox = load_bundle(request.model, request.codec, trust=request.trust)
    prompts = list(request.prompts)
    metas = jukebox.metadata(prompts)
    params = request.params
    wav = jukebox.generate(metas, request.duration, params, progress)
    records = [{"family": "jukebox", "model": request.model, "models": jukebox.refs, "prompt": p, "metadata": m,
                "duration": request.duration, **{k: v for k, v in params.__dict__.items() if v is not None}}
               for p, m in zip(prompts or [""], metas)]
    return wav, jukebox.sample_rate, records


if __name__ == "__main__":  # `python -m ostinato.generation.jukebox bundle ...` once wrote a bundle: say where it went
    import sys

    print("python -m ostinato.generation.jukebox: write a bundle with `ostinato bundle jukebox OUT --top REF "
          "--middle REF --bottom REF [--vqvae REF]`", file=sys.stderr)
    sys.exit(2)
