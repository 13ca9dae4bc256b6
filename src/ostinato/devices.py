"""``--device``: one meaning on every verb. ``auto`` is CUDA when a GPU is visible, else the CPU; a verb that spreads
work over several devices (``tokenize``, ``encode``) takes a comma-separated list, and ``auto`` there is every
visible GPU."""
from __future__ import annotations

import torch

__all__ = ["AUTO", "check_device", "resolve_device", "resolve_devices"]

AUTO = "auto"


def check_device(name: str) -> str:
    """``name`` if it is ``auto`` or a device ``torch.device`` takes and this machine has; else ``ValueError`` in one
    line."""
    if name == AUTO:
        return name
    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"not a device: {name!r}; use auto, cpu, cuda or cuda:N") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{name}: no GPU is visible (CUDA_VISIBLE_DEVICES?); use auto or cpu")
    return name


def resolve_device(name: str | None = AUTO) -> str:
    """``auto`` (or None) -> ``cuda`` when a GPU is visible, else ``cpu``; any other name unchanged."""
    if name in (None, AUTO):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def resolve_devices(names: str | None = AUTO) -> list[str]:
    """``cuda:0,cuda:1`` -> that list; ``auto`` (or None) -> every visible GPU (``cuda:N``), else ``["cpu"]``."""
    if names in (None, AUTO):
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    return [check_device(n.strip()) for n in str(names).split(",") if n.strip()]
