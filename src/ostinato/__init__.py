"""ostinato: a Lightning-based training platform for music generation models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(ref: Any, map_location: Any = "cpu", trust: bool = False, xps_dir: Any = None) -> Any:
    """An export folder (``ostinato export`` / ``import``), an XP (folder or signature), a checkpoint, or a bundle
    folder (``ostinato bundle``: a MusicLM's or a Jukebox's parts) -> its inference model (``ostinato.models``), in
    eval mode, the family read from the record."""
    from functools import partial

    from ostinato.interop.codecs import load_codec
    from ostinato.models import load as _load
    from ostinato.registry import bundle_family, resolve

    family = bundle_family(str(ref))
    if family is not None and family.generate is not None:  # its parts are loaded by the family's generation entry
        return resolve(f"{family.generate}:load_bundle")(str(ref), None, trust=trust).to(map_location).eval()
    model = _load(ref, map_location=map_location, xps_dir=xps_dir, trust=trust)
    if hasattr(model, "set_codec_loader"):  # a MusicGen loads its codec (maybe another toolkit's) on first use
        model.set_codec_loader(partial(load_codec, trust=trust))
    return model
