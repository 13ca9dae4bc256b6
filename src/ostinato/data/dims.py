"""Dimensions declared once: a family reads rates, codebook counts and sizes and feature widths from its training
data's manifest through the ``manifest`` config resolver, instead of repeating them::

    n_q: ${manifest:codec.n_q,4}                 token shards: codec.{sample_rate, channels, frame_rate, n_q, card}
    card: ${manifest:semantic.card,64}           MusicLM streams: semantic / codec as above, mulan.<ns>.{n_q, card}
    dimension: ${manifest:streams.latents.channels,32}   array shards: streams.<name>.{rate, channels, card}

The manifest is the first of ``data.train`` / ``data.valid`` / ``data.test`` that is set. Codebook size is ``card``
(``card_named``: manifests written before said ``cardinality`` or ``bins``).

The manifests are read only once a run has its XP (``read_manifests()``, called by ``ostinato.train.run``): until
then, and where the data is absent or records no such dimension (audio shards), the value after the comma stands.
So an XP's signature (dora hashes the resolved config's differences) is the config's text, the same before and
after the data is written; the run stores its config resolved, so an XP or export keeps the values its data gave.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ostinato.data.manifest import card_named
from ostinato.fileio import read_json

__all__ = ["data_dims", "read_manifests", "register_resolvers"]

_NO_DEFAULT = object()
_reading = False


def _folder_dims(folder: str | Path) -> dict[str, Any]:
    """The dimensions one shard folder's ``manifest.json`` records (token, array or MuLaN token manifest)."""
    path = Path(folder)
    path = path / "manifest.json" if path.suffix != ".json" else path
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}")
    m = read_json(path)
    fmt = str(m.get("format", ""))
    out: dict[str, Any] = {}
    if fmt.startswith(("ostinato.token-shards/", "ostinato.array-shards/")) and m.get("codec"):
        codec = card_named(m["codec"])
        out["codec"] = {k: codec[k] for k in ("sample_rate", "channels", "frame_rate", "n_q", "card")}
    if fmt.startswith("ostinato.array-shards/") and m["model"].get("kind") == "mulan":
        return {"mulan": {ns: {"n_q": s["channels"], "card": card_named(s)["card"]} for ns, s in m["streams"].items()}}
    if fmt.startswith("ostinato.array-shards/"):
        return {**out, "streams": {n: card_named(s) for n, s in m["streams"].items()}, "model": dict(m["model"])}
    if out:
        return out
    if fmt.startswith("ostinato.mulan-tokens/"):
        return {"mulan": {ns: card_named(o) for ns, o in m["namespaces"].items()}}
    return {}  # audio shards: their rate and channels are the family's to choose


def data_dims(spec: Any) -> dict[str, Any]:
    """The dimensions of a data split: a shard folder (or a list of them: the first), or a mapping of MusicLM
    streams (``semantic`` / ``codec``: token folders, ``mulan``: a MuLaN token folder)."""
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        out: dict[str, Any] = {}
        for name, folder in spec.items():
            if folder is not None:
                d = _folder_dims(folder)
                out[name] = d["codec"] if "codec" in d else d.get("mulan", d)
        return out
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        spec = spec[0]
    return _folder_dims(spec)


def _manifest(key: str, default: Any = _NO_DEFAULT, *, _root_: DictConfig) -> Any:
    if not _reading:
        return None if default is _NO_DEFAULT else default
    data = _root_.get("data")
    split = next((s for s in ("train", "valid", "test") if data is not None and data.get(s) is not None), None)
    try:
        if split is None:
            raise FileNotFoundError("data.train, data.valid and data.test are unset")
        node: Any = data_dims(data[split])
    except FileNotFoundError as e:
        if default is not _NO_DEFAULT:
            return default
        raise ValueError(f"${{manifest:{key}}}: {e}; write the data first (ostinato tokenize / encode) or give "
                         "the value") from None
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not _NO_DEFAULT:
                return default
            raise ValueError(f"${{manifest:{key}}}: the data.{split} manifest has no {part!r} "
                             f"(it has {sorted(node) if isinstance(node, Mapping) else node!r})")
        node = node[part]
    return node


def read_manifests(on: bool = True) -> None:
    """From now on ``${manifest:...}`` reads the data's manifests (a run, once its XP signature is fixed)."""
    global _reading
    _reading = on


def register_resolvers() -> None:
    """Register ``${manifest:KEY[,DEFAULT]}`` (idempotent); it gives its fallback until ``read_manifests()``."""
    if not OmegaConf.has_resolver("manifest"):
        OmegaConf.register_new_resolver("manifest", _manifest)
