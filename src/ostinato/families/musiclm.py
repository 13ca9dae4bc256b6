"""The MusicLM family: three stage wrappers, each training one stage model of ``ostinato.models.musiclm``
(``self.model``) on ``MusicLMTokenDataModule`` crops.

* ``SemanticStage`` trains a ``SemanticLM``: semantic tokens given the clip's MuLaN "semantic" tokens.
* ``CoarseStage`` trains a ``CoarseLM``: codec codebooks ``0 .. coarse_q - 1`` given MuLaN "coarse" tokens and the
  crop's semantic tokens.
* ``FineStage`` trains a ``FineLM``: codebooks ``coarse_q .. K - 1`` given the coarse codebooks of the crop.

Every stage trains with the codebook-LM base's masked cross-entropy (``families.codebook_lm``): targets are the
positions that hold a real code of a valid frame. The MuLaN prefix is dropped to zeros with ``cfg_dropout`` so
generation can use classifier-free guidance on it. The data's frame rates are recorded at setup in the model's
``rates`` buffer (semantic, codec), and the data's shapes are checked against the model's.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ostinato.data.musiclm_tokens import MusicLMBatch
from ostinato.errors import DataMismatch
from ostinato.families.codebook_lm import CodebookLMFamily, masked_lm_losses
from ostinato.models.musiclm import CoarseLM, FineLM, SemanticLM

__all__ = ["SemanticStage", "CoarseStage", "FineStage"]


class _Stage(CodebookLMFamily):
    """What the three stage wrappers share: the data checks, the recorded rates, MuLaN-prefix dropout, the loss."""

    model: SemanticLM | CoarseLM | FineLM
    ema_modules = ("model.lm", "model.prefix_modules")

    def __init__(self, model: SemanticLM | CoarseLM | FineLM, cfg_dropout: float,
                 optim: Mapping[str, Any] | None):
        super().__init__(optim)
        self.model = model
        self.cfg_dropout = float(cfg_dropout)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        for i, info in enumerate((getattr(dm, "semantic", None), getattr(dm, "codec", None))):
            if info is not None:
                self.model.rates[i] = float(info.frame_rate)
        self.check_data(dm)

    def check_data(self, dm: Any) -> None:
        namespace = self.model.namespace
        if namespace is None:
            return
        mulan = getattr(dm, "mulan_tokens", None)
        if mulan is None:
            raise DataMismatch(f"{type(self).__name__} needs MuLaN tokens: set data.<split>.mulan "
                             "(written by write_mulan_tokens)")
        have, want = (mulan.tokens[namespace].shape[1], mulan.card[namespace]), self.model.mulan_shape
        if have != want:
            raise DataMismatch(f"family.mulan_n_q / mulan_card = {want} but the MuLaN tokens have {have}; set "
                               f"family.mulan_n_q={have[0]} family.mulan_card={have[1]}, or fit them anew with "
                               f"`ostinato prep mulan --n-q {want[0]} --card {want[1]}`")

    def _check(self, info: Any, name: str, n_q: int, card: int, keys: tuple[str, str]) -> None:
        """``info``: the ``name`` tokens' manifest; ``keys``: the family keys of their codebooks and card."""
        if info is None:
            raise DataMismatch(f"{type(self).__name__} needs {name} tokens: set data.<split>.{name}")
        if int(info.card) != card:
            refit = (f"`ostinato prep semantic --k {card}` and tokenize the splits again" if name == "semantic" else
                     f"tokenize with a codec of {card} codes")
            raise DataMismatch(f"family.{keys[1]}={card} but the {name} tokens ({info.id}) have {info.card} codes: "
                               f"set family.{keys[1]}={info.card} (or leave it out: the stage reads the data's "
                               f"manifest), or {refit}")
        if int(info.n_q) < n_q:
            raise DataMismatch(f"family.{keys[0]}={n_q} but the {name} tokens ({info.id}) have {info.n_q} codebooks: "
                               f"set family.{keys[0]}={info.n_q} or tokenize with more codebooks")

    def keep(self, batch_size: int, train: bool) -> Tensor | None:
        """Items ``[B]`` that keep their MuLaN prefix: all outside training, else each with 1 - ``cfg_dropout``."""
        if not train or self.cfg_dropout <= 0:
            return None
        return torch.rand(batch_size, device=self.model.rates.device) >= self.cfg_dropout

    # -- what each stage defines ------------------------------------------------------------------------------
    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        """``(codes [B, n_q, T], lengths [B])`` this stage predicts."""
        raise NotImplementedError

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor:
        raise NotImplementedError

    def losses(self, batch: MusicLMBatch, train: bool) -> Tensor:
        codes, lengths = self.targets(batch)
        ce, _ = masked_lm_losses(self.model.lm, self.model.pattern, codes, lengths, self.batch_prefix(batch, train))
        return ce


class SemanticStage(_Stage):
    """Trains a ``SemanticLM``.

    Args:
        card, mulan_n_q, mulan_card, lm: the ``SemanticLM``'s (``card`` is checked against the token manifest).
        cfg_dropout: probability of a zero MuLaN prefix.
        lora: LoRA adapters to train on the LM instead of the model (``LoRA`` kwargs; null = off).
    """

    def __init__(self, card: int, mulan_n_q: int = 12, mulan_card: int = 1024, lm: Mapping[str, Any] | None = None,
                 cfg_dropout: float = 0.1, lora: Mapping[str, Any] | None = None,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(SemanticLM(card, mulan_n_q, mulan_card, lm), cfg_dropout, optim)
        self.use_lora(lora)

    def check_data(self, dm: Any) -> None:
        self._check(getattr(dm, "semantic", None), "semantic", 1, self.model.card, ("n_q", "card"))
        super().check_data(dm)

    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        assert batch.semantic is not None and batch.semantic_lengths is not None
        return batch.semantic, batch.semantic_lengths

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor:
        tokens = batch.mulan["semantic"]
        return self.model.mulan_prefix(tokens, self.keep(len(tokens), train))


class CoarseStage(_Stage):
    """Trains a ``CoarseLM``.

    Args:
        card, coarse_q, semantic_card, mulan_n_q, mulan_card, pattern, lm: the ``CoarseLM``'s.
        cfg_dropout: probability of a zero MuLaN prefix (the semantic tokens stay).
    """

    def __init__(self, card: int, coarse_q: int, semantic_card: int, mulan_n_q: int = 12, mulan_card: int = 1024,
                 pattern: str = "unroll", lm: Mapping[str, Any] | None = None, cfg_dropout: float = 0.1,
                 lora: Mapping[str, Any] | None = None, optim: Mapping[str, Any] | None = None):
        super().__init__(CoarseLM(card, coarse_q, semantic_card, mulan_n_q, mulan_card, pattern, lm), cfg_dropout,
                         optim)
        self.use_lora(lora)

    def check_data(self, dm: Any) -> None:
        self._check(getattr(dm, "codec", None), "codec", self.model.n_q, self.model.card, ("coarse_q", "card"))
        self._check(getattr(dm, "semantic", None), "semantic", 1, self.model.semantic_card, ("n_q", "semantic_card"))
        super().check_data(dm)

    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        assert batch.codes is not None and batch.code_lengths is not None
        return batch.codes[:, :self.model.n_q], batch.code_lengths

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor:
        assert batch.semantic is not None
        tokens = batch.mulan["coarse"]
        return self.model.prefix(tokens, batch.semantic, batch.semantic_lengths, self.keep(len(tokens), train))


class FineStage(_Stage):
    """Trains a ``FineLM``.

    Args:
        n_q, card, coarse_q, pattern, lm: the ``FineLM``'s.
    """

    def __init__(self, n_q: int, card: int, coarse_q: int, pattern: str = "unroll",
                 lm: Mapping[str, Any] | None = None, lora: Mapping[str, Any] | None = None,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(FineLM(n_q, card, coarse_q, pattern, lm), 0.0, optim)
        self.use_lora(lora)

    def check_data(self, dm: Any) -> None:
        self._check(getattr(dm, "codec", None), "codec", self.model.total_q, self.model.card, ("n_q", "card"))

    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        assert batch.codes is not None and batch.code_lengths is not None
        return batch.codes[:, self.model.coarse_q:self.model.total_q], batch.code_lengths

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor:
        assert batch.codes is not None
        return self.model.prefix(batch.codes[:, :self.model.coarse_q], batch.code_lengths)
