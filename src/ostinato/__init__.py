"""ostinato: a Lightning-based training platform for music generation models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: Any, map_location: Any = "cpu", **kw: Any) -> Any:
    """An exported folder (``ostinato export``), an XP folder or a checkpoint -> the family module, in eval mode."""
    from ostinato.engine.weights import load as _load

    return _load(path, map_location=map_location, **kw)
