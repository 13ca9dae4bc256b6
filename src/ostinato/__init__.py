"""ostinato: a Lightning-based training platform for music generation models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(ref: Any, map_location: Any = "cpu", trust: bool = False, xps_dir: Any = None) -> Any:
    """An export folder (``ostinato export`` / ``import``), an XP (folder or signature) or a checkpoint -> its
    inference model (``ostinato.models``), in eval mode."""
    from functools import partial

    from ostinato.interop.codecs import load_codec
    from ostinato.models import load as _load

    model = _load(ref, map_location=map_location, xps_dir=xps_dir, trust=trust)
    if hasattr(model, "set_codec_loader"):  # a MusicGen loads its codec (maybe another toolkit's) on first use
        model.set_codec_loader(partial(load_codec, trust=trust))
    return model
