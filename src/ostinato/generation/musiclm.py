"""MusicLM's generation entry: load the bundle of parts (``ostinato.models.musiclm.MusicLM``) from three trained
stages, or from a bundle folder, and generate.

A *bundle* is a folder with ``musiclm.json``, ``{"semantic": REF, "coarse": REF, "fine": REF, "mulan": REF,
"quantizer": FILE, "codec": REF, "semantic_tokenizer": DIR}`` (the last four optional: null = what the stages'
training data records), written by ``ostinato bundle musiclm OUT --semantic REF --coarse REF --fine REF``; relative
paths resolve against the bundle folder. ``ostinato generate --model BUNDLE`` and ``ostinato eval SUITE --model
BUNDLE`` take it (the registry finds the family by the file).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from ostinato.fileio import atomic_write_json
from ostinato.generation.request import GenerationRequest
from ostinato.models.musiclm import MusicLM
from ostinato.nn.decoding import Progress

__all__ = ["BUNDLE_NAME", "PARTS", "load_musiclm", "load_bundle", "write_bundle", "generate_clips"]

BUNDLE_NAME = "musiclm.json"
PARTS = ("semantic", "coarse", "fine", "mulan", "quantizer", "codec", "semantic_tokenizer")


def _stage_window(cfg: dict) -> float | None:
    return (cfg.get("data") or {}).get("segment_seconds")


def _data_folder(cfg: dict, stream: str) -> str | None:
    train = (cfg.get("data") or {}).get("train") or {}
    return train.get(stream) if isinstance(train, dict) else None


def load_musiclm(semantic: str, coarse: str, fine: str, mulan: str | None = None, quantizer: str | None = None,
                 codec: str | None = None, semantic_tokenizer: str | None = None, trust: bool = False) -> MusicLM:
    """Load the three stages (XP signature, //sig/SIG, XP folder, checkpoint or export) and what they need.

    Defaults are read from the stages' training data: MuLaN and its quantizer from the MuLaN token folder's
    manifest (``write_mulan_tokens`` records both), the codec from the codec token manifest, the semantic
    tokenizer from the semantic token manifest.
    """
    import ostinato
    from ostinato.data.musiclm_tokens import MuLaNTokens
    from ostinato.data.tokens import TokenManifest
    from ostinato.interop.codecs import load_codec
    from ostinato.encoding.tokens import load_tokenizer
    from ostinato.models.mulan import MuLaNQuantizer, as_mulan
    from ostinato.models.musiclm import CoarseLM, FineLM, SemanticLM
    from ostinato.store.records import read_weights, require_ref, xps_dir

    stages, cfgs = {}, {}
    for name, ref, cls in (("semantic", semantic, SemanticLM), ("coarse", coarse, CoarseLM), ("fine", fine, FineLM)):
        resolved = require_ref(ref, f"--{name}", f"the MusicLM {name} stage: an XP folder, a checkpoint or an export")
        module = ostinato.load(resolved, xps_dir=xps_dir(), trust=trust)
        if not isinstance(module, cls):
            raise ValueError(f"--{name} {ref} holds a {type(module).__name__}, not a {cls.__name__} (train one "
                             f"with `ostinato train experiment=musiclm_{name}_tiny`)")
        stages[name] = module.eval()
        cfgs[name] = read_weights(resolved, xps_dir(), trust)[1] or {}
    if mulan is None or quantizer is None:
        folder = _data_folder(cfgs["semantic"], "mulan")
        if folder is None or not Path(folder).is_dir():
            raise ValueError(f"the semantic stage's MuLaN token folder ({folder}) is not here; pass --mulan and "
                             "--quantizer")
        recorded = MuLaNTokens.load(folder)
        mulan, quantizer = mulan or recorded.source, quantizer or recorded.quantizer
        if not mulan or not quantizer:
            raise ValueError(f"{folder}: the MuLaN tokens record no MuLaN / quantizer path; pass --mulan and "
                             "--quantizer")
    codec_ref = codec
    if codec_ref is None:
        folder = _data_folder(cfgs["coarse"], "codec")
        if folder is None:
            raise ValueError("the coarse stage records no codec token folder; pass --codec")
        codec_ref = TokenManifest.load(folder).codec.id
    sem_ref = semantic_tokenizer  # given: it must load; recorded: only continuation needs it, so it may be gone
    if sem_ref is None and _data_folder(cfgs["semantic"], "semantic"):
        recorded_ref = TokenManifest.load(_data_folder(cfgs["semantic"], "semantic")).codec.id
        sem_ref = recorded_ref if Path(recorded_ref).exists() else None
    model = MusicLM(semantic=stages["semantic"], coarse=stages["coarse"], fine=stages["fine"],
                    mulan=as_mulan(mulan), quantizer=MuLaNQuantizer.load(quantizer),
                    codec=load_codec(str(codec_ref), trust=trust).eval(),
                    semantic_tokenizer=load_tokenizer(sem_ref, trust=trust) if sem_ref else None,
                    windows={k: _stage_window(c) for k, c in cfgs.items()},
                    sources={"semantic": semantic, "coarse": coarse, "fine": fine, "mulan": str(mulan),
                             "quantizer": str(quantizer), "codec": str(codec_ref), "semantic_tokenizer": str(sem_ref)})
    model.check()
    return model


def write_bundle(out: str | Path, semantic: str, coarse: str, fine: str, **parts: str | None) -> Path:
    """``out/musiclm.json`` naming the three stages and, optionally, ``mulan``, ``quantizer``, ``codec`` and
    ``semantic_tokenizer`` (paths made absolute, so the bundle can live anywhere)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown MusicLM parts {unknown}; a bundle names {', '.join(PARTS)}")
    named = {"semantic": semantic, "coarse": coarse, "fine": fine, **parts}
    spec = {k: None if named.get(k) is None else _absolute(str(named[k])) for k in PARTS}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / BUNDLE_NAME, spec)
    return out / BUNDLE_NAME


def _absolute(ref: str, base: Path | None = None) -> str:
    path = Path(ref).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        return str((base / path).resolve())
    return str(path.resolve()) if path.exists() else ref  # an XP signature or //sig/ ref stays as is


def load_bundle(ref: str | Path, codec: str | None = None, trust: bool = False) -> MusicLM:
    """The ``MusicLM`` of a bundle folder (``musiclm.json``); ``codec`` overrides the bundle's."""
    folder = Path(ref)
    if not (folder / BUNDLE_NAME).is_file():
        raise FileNotFoundError(f"--model {ref}: not a MusicLM bundle (a folder with {BUNDLE_NAME}); write one with "
                                "`ostinato bundle musiclm OUT --semantic REF --coarse REF --fine REF`")
    spec = json.loads((folder / BUNDLE_NAME).read_text())
    missing = [k for k in ("semantic", "coarse", "fine") if not spec.get(k)]
    if missing:
        raise ValueError(f"--model {ref}: {BUNDLE_NAME} names no {', '.join(missing)} stage")
    parts = {k: None if spec.get(k) is None else _absolute(str(spec[k]), folder) for k in PARTS}
    if codec is not None:
        parts["codec"] = codec
    return load_musiclm(**parts, trust=trust)


def generate_clips(request: GenerationRequest, progress: Progress | None) -> tuple[Tensor, int, list[dict]]:
    """``ostinato generate --model BUNDLE`` or ``--semantic REF --coarse REF --fine REF [--mulan REF --quantizer
    FILE] --prompt TEXT [--rerank K] [--continue WAV]``."""
    if request.model is not None:
        model = load_bundle(request.model, request.codec, trust=request.trust)
    else:
        missing = [f"--{k}" for k in ("semantic", "coarse", "fine") if getattr(request, k) is None]
        if missing:
            raise ValueError(f"MusicLM needs {', '.join(missing)} (the three trained stages) or --model BUNDLE")
        model = load_musiclm(request.semantic, request.coarse, request.fine, request.mulan, request.quantizer,
                             request.codec, request.semantic_tokenizer, trust=request.trust)
    prompts = list(request.prompts) or [""]
    params = request.params
    cont = request.continuation
    out = model.sample(prompts, request.duration, None if cont is None else cont.wav, request.num_candidates,
                       params, progress, continuation_sample_rate=None if cont is None else cont.sample_rate)
    records = [{"prompt": p, "family": "musiclm", **model.sources, "duration": request.duration,
                "continue": request.inputs.get("continue"), "num_candidates": request.num_candidates,
                "mulan_scores": [round(float(s), 5) for s in out.scores[i]], "chosen": int(out.best[i]),
                **params.__dict__} for i, p in enumerate(prompts)]
    return out.wav, model.sample_rate, records
