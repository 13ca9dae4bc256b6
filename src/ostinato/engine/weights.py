"""Weights in and out of training: ``continue_from`` loading and ``export`` (``ostinato.load`` is in models/)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ostinato.errors import UserError
from ostinato.fileio import atomic_write_json, atomic_write_text
from ostinato.models import model_weights
from ostinato.models.lora import ADAPTER_DIR, BUFFERS_NAME, base_reference, kept_export, merged, record_lora
from ostinato.nn.lora import adapted_keys, adapter_state, has_adapters, save_adapters
from ostinato.registry import kind_of
from ostinato.store.records import (CONFIG_NAME, INFO_NAME, MODEL_PREFIX, WEIGHTS_NAME, export_folder, read_config,
                                   read_weights, staged_folder)

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded from {self.source}"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts)


def _family_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def load_weights(module: torch.nn.Module, ref: str | Path, xps_dir: str | Path | None = None,
                 trust: bool = False) -> LoadReport:
    """Load what matches by name and shape; report loaded, missing, unexpected and mismatched keys. A source of
    which nothing fits (another family's checkpoint) is refused, naming its family.

    LoRA: a base's weights go under the adapted names of a module with adapters (``<layer>.base_layer.weight``);
    a LoRA run's record loads its base first, then its adapters into the module's (the same ``family.lora``), or,
    into a module without adapters, merged; a kept-adapters export loads merged."""
    if kept_export(ref) is not None:
        weights, cfg, source = _merged_weights(ref, xps_dir, trust)
    else:
        weights, cfg, source = read_weights(ref, xps_dir, trust)
    base = None
    if record_lora(cfg) is not None and export_folder(ref) is None:
        if has_adapters(module):
            base = load_weights(module, base_reference(cfg, source), xps_dir, trust)
        else:
            weights, cfg, source = _merged_weights(ref, xps_dir, trust)
    if _holds_model_alone(ref, cfg, source):  # an export of a split family: the wrapper holds it as ``model``
        weights = {f"{MODEL_PREFIX}{k}": v for k, v in weights.items()}
    own = module.state_dict()
    weights = adapted_keys(weights, own)
    if getattr(module, "stereo_from_mono", False):
        weights = stereo_from_mono(weights, own, ref)
    report = LoadReport(source=source)
    usable = {}
    for key, value in weights.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    report.loaded = sorted(usable)
    report.missing = sorted(set(own) - set(usable) - {m.split(" ")[0] for m in report.mismatched}
                            - {k for k in own if ".lora_" in k})  # adapters a base has not start afresh
    if base is not None:  # what the base brought counts as loaded
        report.loaded = sorted(set(report.loaded) | set(base.loaded))
        report.missing = sorted(set(report.missing) - set(base.loaded))
        report.source = f"{source} over {base.source}"
    if weights and not usable:
        theirs = ((cfg or {}).get("family") or {}).get("_target_")
        which = f"a checkpoint of family {_family_name(theirs)} ({theirs})" if theirs else "weights of another model"
        raise UserError(f"continue_from={ref}: {source} is {which}; none of its {len(weights)} tensors fit "
                        f"{type(module).__name__}: give a checkpoint of the family being trained")
    module.load_state_dict(usable, strict=False)
    log.info("continue_from: %s", report.summary())
    return report


def _merged_weights(ref: str | Path, xps_dir: str | Path | None,
                    trust: bool) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """A LoRA record as the plain model's weights (``model.``-prefixed), adapters merged in."""
    from ostinato.models import load

    model = merged(load(ref, xps_dir=xps_dir, trust=trust))
    cfg = read_config(ref, xps_dir, trust) if kept_export(ref) is None else None
    return {f"{MODEL_PREFIX}{k}": v for k, v in model.state_dict().items()}, cfg, f"{ref} (LoRA adapters merged)"


_CODEBOOK = re.compile(r"^(.*\blm\.(?:emb|heads))\.(\d+)\.weight$")  # a codebook's embedding or output head


def _codebooks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{prefix: count}`` of the per-codebook tensors (``...lm.emb`` / ``...lm.heads``) of a state dict."""
    found: dict[str, set[int]] = {}
    for key in state:
        if match := _CODEBOOK.match(key):
            found.setdefault(match[1], set()).add(int(match[2]))
    return {prefix: len(ks) for prefix, ks in found.items()}


def stereo_from_mono(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                     ref: str | Path) -> dict[str, torch.Tensor]:
    """A mono MusicGen's ``weights`` for its stereo version ``own`` (``family.stereo_from_mono``): L and R codebook
    ``k`` (stereo codebooks ``2k`` and ``2k + 1``) both start from mono codebook ``k``: its output head copied, its
    embedding copied at half scale. The LM sums its codebooks' embeddings: halved, identical L/R codes sum to the
    mono input exactly, so that the converted model's per-channel logits equal the mono model's (audiocraft's
    recipe copies the embeddings whole, which doubles that sum). Everything else is taken by name."""
    mine, theirs = _codebooks(own), _codebooks(weights)
    out = {k: v for k, v in weights.items() if not _CODEBOOK.match(k)}
    for prefix, count in mine.items():
        if theirs.get(prefix, 0) * 2 != count:
            raise UserError(f"continue_from={ref}: family.stereo_from_mono needs a mono MusicGen with {count // 2} "
                            f"codebooks ({prefix}.*), it has {theirs.get(prefix, 0)}; give the mono model this "
                            "stereo one is made from, or leave stereo_from_mono out")
        for k in range(count):
            mono = weights[f"{prefix}.{k // 2}.weight"]
            target = own[f"{prefix}.{k}.weight"]
            if mono.shape != target.shape:
                raise UserError(f"continue_from={ref}: {prefix}.{k // 2}.weight is {list(mono.shape)} there, "
                                f"{list(target.shape)} here; stereo_from_mono keeps the mono model's sizes "
                                "(family.lm, card)")
            out[f"{prefix}.{k}.weight"] = mono / 2 if prefix.endswith(".emb") else mono
    return out


def _holds_model_alone(ref: str | Path, cfg: dict | None, source: str) -> bool:
    try:
        return export_folder(ref) is not None and kind_of(cfg, source).model is not None
    except UserError:  # weights of no family ostinato knows: loaded by name as they are
        return False


def export(ref: str | Path, out: str | Path, xps_dir: str | Path | None = None, trust: bool = False,
           overwrite: bool = False, lora: str = "merge", format: str = "ostinato",
           t5_name: str | None = None) -> Path:
    """Write ``model.safetensors`` (EMA weights when present), ``config.yaml`` and ``export.json`` to ``out``;
    with ``format`` "audiocraft" or "transformers", a MusicGen in that toolkit's files instead
    (``interop.musicgen_export``; ``t5_name``: the T5 audiocraft loads, when the import recorded none).

    A LoRA run's record: ``lora="merge"`` (default) folds the adapters into the base weights (a plain model);
    ``"keep"`` writes them apart, in peft's format (``adapter/``), beside the base's reference (``export.json``
    ``base``) and the model's buffers, with no ``model.safetensors`` (see ``ostinato.models.lora``).

    All or nothing: the files are written to a temp folder beside ``out`` that is renamed onto it at the end; an
    ``out`` that holds files is replaced only with ``overwrite``."""
    if lora not in ("merge", "keep"):
        raise UserError(f"--lora {lora}: use merge (fold the adapters into the weights) or keep (write them apart)")
    out = Path(out)
    _check_export_folder(out, overwrite)
    if format != "ostinato":
        return _export_foreign(ref, out, xps_dir, trust, overwrite, lora, format, t5_name)
    if kept_export(ref) is not None:
        raise UserError(f"{ref} is an export already (its adapters kept apart); load it with ostinato.load, or "
                        "export the XP it came from")
    weights, cfg, source = read_weights(ref, xps_dir, trust)
    if cfg is None:
        raise ValueError(f"{source} carries no config; export needs a checkpoint written by `ostinato train`")
    kind = kind_of(cfg, source)
    spec = record_lora(cfg) if export_folder(ref) is None else None
    adapted = None
    if spec is not None:
        from ostinato.models import load

        adapted = load(ref, xps_dir=xps_dir, trust=trust)
        cfg = {**cfg, "continue_from": _absolute(base_reference(cfg, source))}
        if lora == "merge":
            weights = merged(adapted).state_dict()
            cfg = {**cfg, "family": {**cfg["family"], "lora": None}}
    elif kind.model is not None and export_folder(ref) is None:  # a checkpoint: its model's tensors only
        weights = model_weights(weights, None)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    info = {"source": source, "tensors": len(tensors), "family": kind.family, "wrapper": kind.wrapper,
            "model": kind.model}
    with staged_folder(out) as stage:
        from ostinato.interop.codecs import embed_codec

        cfg = embed_codec(cfg, stage, out, trust, export)  # a MusicGen's codec travels with it
        if spec is not None and lora == "keep":
            assert adapted is not None
            save_adapters(adapted.lm, spec, stage / ADAPTER_DIR, base=cfg["continue_from"])
            buffers = {k: v.detach().cpu().contiguous() for k, v in adapted.state_dict().items()
                       if k in dict(adapted.named_buffers())}
            if buffers:
                save_file(buffers, str(stage / BUFFERS_NAME))
            info = {**info, "tensors": len(adapter_state(adapted.lm)), "lora": "kept", "base": cfg["continue_from"]}
        else:
            save_file(tensors, str(stage / WEIGHTS_NAME))
        atomic_write_text(stage / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(cfg)))
        atomic_write_json(stage / INFO_NAME, info)
    return out


def _absolute(ref: str) -> str:
    """A local base reference as an absolute path (the export may be read from anywhere); XP signatures as they are."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if not ref.startswith("//") and path.exists() else ref


def _check_export_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder (new or empty) for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and holds files; pass --overwrite to replace it, or choose another folder")


def _export_foreign(ref: str | Path, out: Path, xps_dir: str | Path | None, trust: bool, overwrite: bool,
                    lora: str, format: str, t5_name: str | None) -> Path:
    """A MusicGen record -> ``format``'s files (the model with EMA weights and LoRA adapters merged, its codec and
    text encoder)."""
    from ostinato.interop.codecs import load_codec
    from ostinato.interop.musicgen_export import FORMATS, export_musicgen
    from ostinato.models import load
    from ostinato.models.musicgen import MusicGen

    if format not in FORMATS:
        raise UserError(f"--format {format}: unknown; use ostinato (the default), {' or '.join(FORMATS)}")
    if lora != "merge":
        raise UserError(f"--lora {lora} --format {format}: {format}'s files hold whole weights; the adapters are "
                        "merged in (leave --lora out), or kept apart in ostinato's own export (leave --format out)")
    kept = kept_export(ref)
    if kept is not None:  # adapters kept apart: its config.yaml beside them
        cfg = OmegaConf.to_container(OmegaConf.load(kept / CONFIG_NAME)) if (kept / CONFIG_NAME).is_file() else None
    else:
        cfg = read_config(ref, xps_dir, trust)
    kind = kind_of(cfg, str(ref)) if cfg is not None else None
    if kind is None or kind.family != "musicgen":
        what = f"a {kind.family} model" if kind is not None else "a record without a config"
        raise UserError(f"--format {format}: {ref} is {what}; only MusicGen models have a {format} format "
                        "(leave --format out for ostinato's own export)")
    model = merged(load(ref, xps_dir=xps_dir, trust=trust))
    assert isinstance(model, MusicGen)
    model.set_codec_loader(lambda codec: load_codec(codec, trust=trust))
    family = (cfg or {}).get("family") or {}
    dropout = family.get("cfg_dropout")
    if dropout is None and family.get("export"):  # a fine-tuned import (null = the import's)
        from ostinato.models.musicgen import exported_family

        dropout = exported_family(family["export"]).get("cfg_dropout")
    return export_musicgen(model, out, format, overwrite=overwrite, t5_name=t5_name,
                           cfg_dropout=0.1 if dropout is None else float(dropout))
