"""Backends by name, imported lazily (transformers, laion-clap... load only when asked for).

Spec strings: ``NAME:PATH[,KEY=VALUE...]``, e.g. ``codec://sig/abc123``, ``vggish:/m/vggish.pth,pca=/m/pca.pth``,
``hf:/m/mert,layer=6,trust_remote_code=1``, ``clap:/m/clap.pt,text=/m/roberta``; or a mapping
``{"name": NAME, "path": PATH, KEY: VALUE...}`` (needed when the path holds a comma). The backend class is built as
``cls(PATH, **options)``. In a spec string, ``true``/``false``, ``none`` and numbers become Python values and
anything else stays a string; ``OPTION_ALIASES`` renames short spec keys to constructor arguments.
"""
from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

from ostinato.metrics.embeddings.base import EmbeddingBackend

BACKENDS: dict[str, str] = {
    "codec": "ostinato.metrics.embeddings.codec:CodecBackend",
    "encodec": "ostinato.metrics.embeddings.codec:CodecBackend",  # the name fadtk users type; any codec folder
    "vggish": "ostinato.metrics.embeddings.vggish:VGGishBackend",
    "hf": "ostinato.metrics.embeddings.hf:HFBackend",
    "clap": "ostinato.metrics.embeddings.clap:ClapBackend",
    "mulan": "ostinato.metrics.embeddings.mulan:MuLaNBackend",
}

# Short spec keys -> constructor arguments.
OPTION_ALIASES: dict[str, dict[str, str]] = {"clap": {"text": "text_model"}}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)")


def known_backends() -> list[str]:
    return sorted(BACKENDS)


def parse_spec(spec: str) -> dict[str, Any]:
    """``"NAME:PATH[,KEY=VALUE...]"`` -> ``{"name": NAME, "path": PATH, KEY: VALUE...}``; values: see ``_literal``."""
    name, sep, rest = str(spec).partition(":")
    name = name.strip()
    if not sep or not rest.strip():
        raise ValueError(f"embedding backend spec {spec!r} needs a path: NAME:PATH[,KEY=VALUE...] with NAME one of "
                         f"{known_backends()}, e.g. 'vggish:/models/vggish.pth'")
    path, *pairs = rest.split(",")
    out: dict[str, Any] = {"name": name, "path": path.strip()}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"embedding backend spec {spec!r}: option {pair!r} is not KEY=VALUE (a path with a comma "
                             "needs the mapping form {'name': ..., 'path': ...})")
        if key.strip() in out:
            raise ValueError(f"embedding backend spec {spec!r}: option {key.strip()!r} given twice")
        out[key.strip()] = _literal(value.strip())
    return out


def _literal(value: str) -> Any:
    """``true``/``false`` -> bool, ``none``/``null`` -> None, numbers -> int / float, anything else unchanged."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if _NUMBER.fullmatch(value):
        return int(value) if re.fullmatch(r"[+-]?\d+", value) else float(value)
    return value


def backend_class(name: str) -> type[EmbeddingBackend]:
    """The class registered under ``name``, imported now."""
    if name not in BACKENDS:
        raise ValueError(f"unknown embedding backend {name!r}; known: {known_backends()}")
    module_name, _, attr = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ImportError(f"embedding backend {name!r} is unavailable: importing {module_name} failed ({e})") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ImportError(f"embedding backend {name!r}: {module_name} defines no {attr}")
    return cls


def load_backend(spec: str | Mapping[str, Any]) -> EmbeddingBackend:
    """Build a backend from a spec string or mapping (see the module docstring); unknown names and options raise
    ``ValueError`` listing the known ones."""
    options = parse_spec(spec) if isinstance(spec, str) else dict(spec)
    name = options.pop("name", None)
    if not name:
        raise ValueError(f"embedding backend mapping {dict(spec)!r} lacks 'name' (one of {known_backends()})")
    cls = backend_class(str(name))
    for short, full in OPTION_ALIASES.get(str(name), {}).items():
        if short in options:
            if full in options:
                raise ValueError(f"embedding backend {name!r}: give {short!r} or {full!r}, not both")
            options[full] = options.pop(short)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = list(params)[2:]  # after self and the path
        unknown = sorted(set(options) - {"path"} - set(accepted))
        if unknown:
            raise ValueError(f"embedding backend {name!r}: unknown options {unknown}; accepted: {accepted}")
    path = options.pop("path", None)
    return cls(path, **options) if path is not None else cls(**options)
