"""LAION-CLAP (``laion_clap`` 1.1.7) audio and text embeddings, built offline from local files.

``laion_clap.CLAP_Module`` fetches ``roberta-base`` (config, weights, tokenizer) from the hub when it is built. Here
the same CLAP model is built by ``laion_clap``'s own ``create_model``, with its ``RobertaModel.from_pretrained``
pointed at a local folder's *config* for the duration of the call (the RoBERTa weights come from the CLAP checkpoint,
as they do in ``CLAP_Module.load_ckpt``), and the tokenizer is read from the same folder.

Audio follows ``CLAP_Module.get_audio_embedding_from_data``:

* the int16 round trip ``int16_to_float32(float32_to_int16(x))`` (clip to [-1, 1], ``x * 32767`` truncated to int16,
  divided by 32767 in float64, back to float32), unless ``quantize=False``;
* ``laion_clap.training.data.get_audio_features`` on each 480000-sample (10 s) window with ``data_filling=
  "repeatpad"`` (a shorter clip is tiled ``floor(480000 / T)`` times, then zero-padded) and ``data_truncating=
  "rand_trunc"`` (``"fusion"`` with ``enable_fusion``: mel of the window stacked 4 times);
* ``CLAP.get_audio_embedding``: projection, then L2 normalisation.

Where laion_clap randomly crops a clip longer than 10 s to one window, this backend returns one embedding per
window instead: windows start at 0, 10 s, 20 s, ... and the last one is moved back to end with the clip, so that every
window is real audio (it overlaps the one before it unless T is a multiple of 10 s). No window is longer than
480000 samples, so nothing random happens: a clip of at most 10 s gets exactly laion_clap's embedding.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from ostinato.metrics.embeddings.base import EmbeddingBackend
from ostinato.models.mulan import window_starts  # the windowing MuLaN embeds with (same 10 s-window rule)

log = logging.getLogger(__name__)

VERSION = 1  # bump when what ``_embed`` / ``embed_text`` compute changes: invalidates cached statistics
CONTEXT_LENGTH = 77  # CLAP_Module.tokenizer: padding="max_length", truncation=True, max_length=77
FUSION_TYPE = "aff_2d"  # what CLAP_Module uses with enable_fusion=True
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
INSTALL_HINT = ("laion_clap is installed by `make install` (`pip install --no-deps laion-clap==1.1.7`: its numpy<2 "
                "pin is ignored; its runtime dependencies are in pyproject.toml)")


def _hub_free_from_pretrained(cls: type, name: str, *args: Any, **kwargs: Any) -> None:
    """Stands in for the tokenizers that ``laion_clap.training.data`` loads from the hub when imported."""
    log.debug("laion_clap import: skipped %s.from_pretrained(%r) (training-only tokenizer)", cls.__name__, name)
    return None


def import_laion_clap() -> ModuleType:
    """``import laion_clap.hook`` without touching the network.

    ``laion_clap.training.data`` calls ``{Bert,Roberta,Bart}Tokenizer.from_pretrained`` on the hub at import time
    (for its training data loaders, which nothing here uses): without a hub that import hangs in HTTP retries, or
    (offline mode) gets empty tokenizers. While importing, those three ``from_pretrained`` return ``None``, so the
    module-level ``bert_tokenizer`` / ``roberta_tokenizer`` / ``bart_tokenizer`` of ``laion_clap.training.data`` are
    ``None`` (its ``tokenizer()`` function does not work; ``CLAP_Module`` does not use it).
    """
    if "laion_clap.hook" in sys.modules:
        return sys.modules["laion_clap.hook"]
    from transformers import BartTokenizer, BertTokenizer, RobertaTokenizer

    with contextlib.ExitStack() as stack:
        for cls in (BertTokenizer, RobertaTokenizer, BartTokenizer):
            stack.enter_context(mock.patch.object(cls, "from_pretrained", classmethod(_hub_free_from_pretrained)))
        try:
            return importlib.import_module("laion_clap.hook")
        except ImportError as e:
            raise ImportError(f"the clap embedding backend needs laion_clap: {e}; {INSTALL_HINT}") from e


def _laion() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """(hook, factory, model, training.data) modules, as ``CLAP_Module`` uses them.

    ``import laion_clap`` appends its package folder to ``sys.path`` and ``laion_clap.hook`` imports ``clap_module``
    as a top-level package: patch and call *that* copy (``create_model.__module__``), not ``laion_clap.clap_module``.
    """
    hook = import_laion_clap()
    factory = importlib.import_module(hook.create_model.__module__)
    model = importlib.import_module(factory.CLAP.__module__)
    data = importlib.import_module("laion_clap.training.data")
    return hook, factory, model, data


@contextlib.contextmanager
def _local_text_branch(model_module: ModuleType, text_model: Path) -> Iterator[None]:
    """While building ``CLAP``, ``RobertaModel.from_pretrained("roberta-base")`` becomes ``RobertaModel(config)``
    with the config of ``text_model`` (randomly initialised: the CLAP checkpoint holds every text branch weight)."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig.from_pretrained(str(text_model))

    class _LocalRoberta:
        @staticmethod
        def from_pretrained(name: str, *args: Any, **kwargs: Any) -> RobertaModel:
            if name != "roberta-base":
                raise ValueError(f"laion_clap asked for text model {name!r}; only 'roberta-base' (tmodel='roberta') "
                                 "is replaced by the local text_model folder")
            return RobertaModel(config)

    original = model_module.RobertaModel
    model_module.RobertaModel = _LocalRoberta
    try:
        yield
    finally:
        model_module.RobertaModel = original


def load_clap_state_dict(checkpoint: Path, model_keys: set[str]) -> dict[str, Tensor]:
    """A laion-clap ``.pt`` -> state dict for ``CLAP``, as ``laion_clap``'s ``load_state_dict(skip_params=True)``:
    the ``state_dict`` entry if there is one, ``module.`` (DDP) prefixes removed, and the
    ``text_branch.embeddings.position_ids`` buffer dropped when the model does not keep it (transformers >= 4.31)."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - older checkpoints pickle more than tensors
        log.warning("%s: weights_only load failed (%s); loading it as a full pickle, as laion_clap does",
                    checkpoint, e)
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{checkpoint}: no state dict found (expected a laion-clap checkpoint: a dict with "
                         "'state_dict', or a state dict)")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for key in ("text_branch.embeddings.position_ids", "text_branch.embeddings.token_type_ids"):
        if key in state and key not in model_keys:
            del state[key]
    return state


def _files_hash(folder: Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def quantize_int16(x: Tensor) -> Tensor:
    """laion_clap's ``int16_to_float32(float32_to_int16(x))`` in torch: x [..., T] float -> [..., T] float32."""
    q = (x.float().clamp(-1.0, 1.0) * 32767.0).to(torch.int16)  # float -> int truncates towards zero, as numpy
    return (q.double() / 32767.0).float()


class ClapBackend(EmbeddingBackend):
    """LAION-CLAP joint audio-text embeddings: audio [B, 1, T] at 48 kHz -> per clip [F_i, 512], one frame per 10 s
    window (F_i = max(1, ceil(T / 480000)), 0 for T = 0); texts -> [B, 512]. All embeddings are L2-normalised.

    Args:
        checkpoint: local laion-clap ``.pt`` (``630k-audioset-best.pt`` with ``amodel="HTSAT-tiny"``,
            ``music_audioset_epoch_15_esc_90.14.pt`` with ``amodel="HTSAT-base"``, ``*-fusion-*`` with
            ``enable_fusion=True``).
        text_model: local folder of roberta-base as written by ``save_pretrained`` (``config.json`` and the
            tokenizer files; its weights are not read: the checkpoint has the text branch).
        amodel: laion_clap audio model config name (``HTSAT-tiny``, ``HTSAT-base``, ...).
        enable_fusion: the feature-fusion variant (``fusion_type="aff_2d"``, as ``CLAP_Module``).
        device: where the model runs.
        quantize: reproduce laion_clap's int16 round trip of the waveform.
        batch_size: windows (and texts) per forward pass.
    """

    name = "clap"
    has_text = True
    sample_rate = 48000
    channels = 1

    def __init__(self, checkpoint: str | Path, text_model: str | Path, amodel: str = "HTSAT-tiny",
                 enable_fusion: bool = False, device: str | torch.device = "cpu", quantize: bool = True,
                 batch_size: int = 16) -> None:
        from transformers import RobertaTokenizer

        from ostinato.interop.codecs import weights_hash

        self.checkpoint = Path(checkpoint).expanduser().resolve()
        self.text_model = Path(text_model).expanduser().resolve()
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"CLAP checkpoint {self.checkpoint} not found: pass the local laion-clap .pt "
                                    "(e.g. 630k-audioset-best.pt); nothing is downloaded")
        if not (self.text_model / "config.json").is_file():
            raise FileNotFoundError(f"text_model {self.text_model} has no config.json: pass a folder written by "
                                    "RobertaModel/RobertaTokenizer.save_pretrained of roberta-base")
        if not ((self.text_model / "tokenizer.json").is_file()  # transformers may build an empty tokenizer without
                or ((self.text_model / "vocab.json").is_file() and (self.text_model / "merges.txt").is_file())):
            raise FileNotFoundError(f"text_model {self.text_model} has no tokenizer.json (nor vocab.json + "
                                    f"merges.txt): save roberta-base's tokenizer there with "
                                    "RobertaTokenizer.save_pretrained")
        self.amodel = amodel
        self.enable_fusion = bool(enable_fusion)
        self.quantize = bool(quantize)
        self.batch_size = int(batch_size)
        hook, factory, model_module, self._data = _laion()
        if amodel not in factory.list_models():
            raise ValueError(f"unknown laion_clap amodel {amodel!r}; one of {factory.list_models()}")

        with _local_text_branch(model_module, self.text_model):
            model, cfg = hook.create_model(amodel, "roberta", precision="fp32", device="cpu",
                                           enable_fusion=self.enable_fusion,
                                           **({"fusion_type": FUSION_TYPE} if self.enable_fusion else {}))
        state = load_clap_state_dict(self.checkpoint, set(model.state_dict()))
        missing, unexpected = (sorted(set(model.state_dict()) - set(state)),
                               sorted(set(state) - set(model.state_dict())))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"CLAP checkpoint {self.checkpoint} does not fit amodel={amodel!r}, enable_fusion="
                f"{self.enable_fusion}, text_model={self.text_model} (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}): music_audioset_* checkpoints need amodel='HTSAT-base', *fusion* ones "
                f"enable_fusion=True, and text_model must be roberta-base's config. {str(e)[:500]}") from e
        self.model = self.clap = model.eval().requires_grad_(False)
        self.audio_cfg: dict[str, Any] = dict(cfg["audio_cfg"])
        self.window = int(self.audio_cfg["clip_samples"])
        if int(self.audio_cfg["sample_rate"]) != self.sample_rate:
            raise ValueError(f"laion_clap amodel {amodel!r} runs at {self.audio_cfg['sample_rate']} Hz, "
                             f"this backend at {self.sample_rate}")
        self.window_seconds = self.hop_seconds = self.window / self.sample_rate
        self.dim = int(model.joint_embed_shape)
        self.tokenizer = self._load_tokenizer(RobertaTokenizer, int(model.text_branch.config.vocab_size))
        self.weights = weights_hash(model)
        self.tokenizer_hash = _files_hash(self.text_model, TOKENIZER_FILES)
        self.to(device)

    def _load_tokenizer(self, cls: type, vocab_size: int) -> Any:
        hint = "save roberta-base's tokenizer there with RobertaTokenizer.save_pretrained"
        try:
            tokenizer = cls.from_pretrained(str(self.text_model))
        except Exception as e:  # noqa: BLE001 - transformers raises several kinds
            raise ValueError(f"cannot load the RoBERTa tokenizer of text_model {self.text_model} ({e}): {hint}") from e
        if len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer of text_model {self.text_model} has {len(tokenizer)} tokens, more than "
                             f"the text branch's vocab_size {vocab_size}: config.json and tokenizer do not match")
        return tokenizer

    def _identity(self) -> dict[str, Any]:
        return {"version": VERSION, "checkpoint": str(self.checkpoint), "text_model": str(self.text_model),
                "weights": self.weights, "tokenizer": self.tokenizer_hash, "amodel": self.amodel,
                "enable_fusion": self.enable_fusion, "quantize": self.quantize, "window": self.window,
                "sample_rate": self.sample_rate, "filling": "repeatpad", "long": "10s windows, last end-aligned"}

    def _features(self, window: Tensor) -> dict[str, Tensor]:
        return self._data.get_audio_features(
            {}, window, self.window, data_truncating="fusion" if self.enable_fusion else "rand_trunc",
            data_filling="repeatpad", audio_cfg=self.audio_cfg, require_grad=False)

    def _embed(self, wav: Tensor) -> list[Tensor]:
        """wav [B, 1, T] at 48 kHz -> per clip [F, dim] (F the same for every clip of the batch)."""
        x = quantize_int16(wav[:, 0]) if self.quantize else wav[:, 0].float()  # [B, T]
        starts = window_starts(x.shape[-1], self.window)
        if not starts:
            return [x.new_zeros(0, self.dim) for _ in range(x.shape[0])]
        windows = [clip[s:s + self.window] for clip in x for s in starts]  # clip-major, each [<= window]
        out = []
        for i in range(0, len(windows), self.batch_size):
            feats = [self._features(w) for w in windows[i:i + self.batch_size]]
            out.append(self.clap.get_audio_embedding(feats))  # [n, dim], normalised
        return list(torch.cat(out).view(x.shape[0], len(starts), self.dim).unbind(0))

    def embed_text(self, texts: list[str]) -> Tensor:
        """texts (B,) -> [B, dim] L2-normalised text embeddings (RoBERTa tokens padded / truncated to 77)."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of strings, got one string: wrap it in a list")
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                        max_length=CONTEXT_LENGTH, return_tensors="pt")
                batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
                out.append(self.clap.get_text_embedding(batch).float())
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=self.device)
