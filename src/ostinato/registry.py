"""The one family registry: for every training wrapper, its family, the inference model it trains, and the
family's generation and evaluation entries.

Entries are dotted names resolved on use, so the registry sits below every layer it names (the CLI, ``load``,
``generate``, ``eval`` and ``app`` dispatch through it; nothing here imports them).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ostinato.errors import UserError


@dataclass(frozen=True)
class Kind:
    """One trainable kind: ``wrapper`` (the LightningModule of ``family._target_``) trains ``model``."""

    family: str
    wrapper: str
    model: str  # "module:Class" of the plain nn.Module that ``ostinato.load`` returns


@dataclass(frozen=True)
class Family:
    """A family's verbs: ``generate`` a module with ``generate_clips(request, progress)``; ``evaluate`` the
    evaluation producer (``"module:Class"``, its ``kinds`` the suite kinds it runs; None: no suite evaluates it)."""

    name: str
    generate: str | None
    evaluate: str | None
    bundle: str | None = None  # the file that makes a folder a bundle of this family's models (no config of its own)


KINDS: tuple[Kind, ...] = (
    Kind("debug", "ostinato.families.debug.DebugFamily", "ostinato.models.debug:ConvAutoencoder"),
    Kind("codec", "ostinato.families.codec.CodecFamily", "ostinato.models.codec:Codec"),
    Kind("musicgen", "ostinato.families.musicgen.MusicGenFamily", "ostinato.models.musicgen:MusicGen"),
    Kind("musicgen", "ostinato.families.musicgen.ImportedMusicGenFamily", "ostinato.models.musicgen:MusicGen"),
    Kind("mulan", "ostinato.families.mulan.MuLaNFamily", "ostinato.models.mulan:MuLaN"),
    Kind("musiclm", "ostinato.families.musiclm.SemanticStage", "ostinato.models.musiclm:SemanticLM"),
    Kind("musiclm", "ostinato.families.musiclm.CoarseStage", "ostinato.models.musiclm:CoarseLM"),
    Kind("musiclm", "ostinato.families.musiclm.FineStage", "ostinato.models.musiclm:FineLM"),
    Kind("musika", "ostinato.families.musika.MusikaAutoencoderFamily", "ostinato.models.musika:SpectralAutoencoder"),
    Kind("musika", "ostinato.families.musika.MusikaFamily", "ostinato.models.musika:Musika"),
    Kind("jukebox", "ostinato.families.jukebox.JukeboxVQVAEFamily", "ostinato.models.jukebox:HierarchicalVQVAE"),
    Kind("jukebox", "ostinato.families.jukebox.JukeboxPrior", "ostinato.models.jukebox:LevelPrior"),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("debug", None, None),
    Family("codec", None, "ostinato.evaluation.producers:CodecProducer"),
    Family("musicgen", "ostinato.generation.musicgen", "ostinato.evaluation.producers:MusicGenProducer"),
    Family("mulan", None, "ostinato.evaluation.producers:MuLaNProducer"),
    Family("musiclm", "ostinato.generation.musiclm", "ostinato.evaluation.producers:MusicLMProducer",
           bundle="musiclm.json"),
    Family("musika", "ostinato.generation.musika", "ostinato.evaluation.producers:MusikaProducer"),
    Family("jukebox", "ostinato.generation.jukebox", "ostinato.evaluation.producers:JukeboxProducer",
           bundle="jukebox.json"),
)}

_BY_WRAPPER = {k.wrapper: k for k in KINDS}
# where a wrapper lived before: records written then still name it
_BY_WRAPPER["ostinato.interop.musicgen_import.ImportedMusicGenFamily"] = _BY_WRAPPER[
    "ostinato.families.musicgen.ImportedMusicGenFamily"]


def resolve(dotted: str) -> Any:
    """``"package.module:Name"`` or ``"package.module.Name"`` -> the object."""
    module, _, name = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def kind_of(cfg: Mapping[str, Any] | None, source: str = "this record") -> Kind:
    """The kind of a training config (``family._target_``); an unknown or missing one is refused in one line."""
    target = ((cfg or {}).get("family") or {}).get("_target_")
    if not target:
        raise UserError(f"{source}: its config names no family (family._target_); give an export, XP or checkpoint "
                        "written by ostinato")
    kind = _BY_WRAPPER.get(str(target)) or _subclassed(str(target))
    if kind is None:
        raise UserError(f"{source}: family {target} is not one ostinato knows ({', '.join(FAMILIES)}); a wrapper "
                        "of your own is added to ostinato.registry.KINDS")
    return kind


def bundle_family(ref: str) -> Family | None:
    """The family of a bundle: a folder holding a family's bundle file, or ``part=REF,...`` naming its parts."""
    from pathlib import Path

    for family in FAMILIES.values():
        if family.bundle and (Path(ref) / family.bundle).is_file():
            return family
    if "=" in ref and not Path(ref).exists():
        return FAMILIES["jukebox"]  # top=REF,middle=REF,bottom=REF (the one family whose parts are named so)
    return None


def _subclassed(target: str) -> Kind | None:
    """The kind of a wrapper of the user's own that subclasses a registered one."""
    try:
        cls = resolve(target)
    except (ImportError, AttributeError, ValueError):
        return None
    for base in getattr(cls, "__mro__", ()):
        kind = _BY_WRAPPER.get(f"{base.__module__}.{base.__qualname__}")
        if kind is not None:
            return kind
    return None


def family_of(cfg: Mapping[str, Any] | None, source: str = "this record") -> Family:
    return FAMILIES[kind_of(cfg, source).family]
