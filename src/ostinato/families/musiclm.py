"""The MusicLM family: three token LMs trained separately on ``MusicLMTokenDataModule`` crops.

* ``SemanticStage``: semantic tokens ``[B, 1, Fs]``, prefix = the clip's MuLaN "semantic" tokens, embedded.
* ``CoarseStage``: codec codebooks ``0 .. coarse_q - 1``, flattened (``pattern: unroll``, AudioLM) or delayed;
  prefix = MuLaN "coarse" tokens + the crop's semantic tokens, embedded.
* ``FineStage``: codebooks ``coarse_q .. K - 1``; prefix = the coarse codebooks of every frame of the crop, their
  embeddings summed per frame (one prefix position per frame).

Every stage is a ``CodebookLM`` trained with the masked cross-entropy of MusicGen: targets are the positions that
hold a real code of a valid frame. The MuLaN prefix is dropped to zeros with ``cfg_dropout`` so generation can
use classifier-free guidance on it. Frame rates are recorded at setup (buffer ``rates``: semantic, codec) so a
loaded stage knows how many frames a second holds.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ostinato.data.musiclm_tokens import MusicLMBatch
from ostinato.families.codebook_lm import CodebookLMFamily, masked_lm_losses
from ostinato.nn.patterns import CodebookPattern, DelayPattern, ParallelPattern, UnrollPattern
from ostinato.nn.transformer import CodebookLM, lm_config

__all__ = ["SemanticStage", "CoarseStage", "FineStage", "make_pattern"]


def make_pattern(name: str, n_q: int, key: str) -> CodebookPattern:
    if name == "unroll":
        return UnrollPattern(n_q)
    if name == "delay":
        return DelayPattern(n_q)
    if name == "parallel":
        return ParallelPattern(n_q)
    raise ValueError(f"{key} must be unroll, delay or parallel, got {name!r}")


class MuLaNPrefix(nn.Module):
    """MuLaN tokens ``[B, n_q]`` (one vocabulary per codebook) -> ``[B, n_q, dim]``."""

    def __init__(self, n_q: int, bins: int, dim: int):
        super().__init__()
        self.n_q, self.bins = int(n_q), int(bins)
        self.emb = nn.Embedding(self.n_q * self.bins, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.n_q:
            raise ValueError(f"expected MuLaN tokens [B, {self.n_q}], got {tuple(tokens.shape)}; "
                             f"family.mulan_n_q must match the MuLaN quantizer")
        offsets = torch.arange(self.n_q, device=tokens.device) * self.bins
        return self.emb(tokens.clamp(0, self.bins - 1) + offsets)


class _Stage(CodebookLMFamily):
    """What the three stages share: the LM, its pattern, the loss, logging and the recorded frame rates."""

    namespace: str | None = None  # MuLaN tokens of this stage's prefix
    ema_modules = ("lm", "prefix_modules")

    def __init__(self, n_q: int, card: int, lm: Mapping[str, Any] | None, pattern: str,
                 mulan_n_q: int, mulan_bins: int, cfg_dropout: float, optim: Mapping[str, Any] | None):
        super().__init__(optim)
        self.n_q, self.card = int(n_q), int(card)
        self.cfg = lm_config(lm, n_q=self.n_q, card=self.card, cross_attention=False)
        self.lm = CodebookLM(self.cfg)
        self.pattern = make_pattern(pattern, self.n_q, "family.pattern")
        self.pattern_name = pattern
        self.cfg_dropout = float(cfg_dropout)
        self.prefix_modules = nn.ModuleDict()
        if self.namespace is not None:
            self.prefix_modules["mulan"] = MuLaNPrefix(mulan_n_q, mulan_bins, self.cfg.dim)
        self.register_buffer("rates", torch.zeros(2))  # frames/s of the semantic and codec tokens

    @property
    def semantic_rate(self) -> float:
        return float(self.rates[0])

    @property
    def frame_rate(self) -> float:
        return float(self.rates[1])

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        for i, info in enumerate((getattr(dm, "semantic", None), getattr(dm, "codec", None))):
            if info is not None:
                self.rates[i] = float(info.frame_rate)
        self.check_data(dm)

    def check_data(self, dm: Any) -> None:
        mulan = getattr(dm, "mulan_tokens", None)
        if self.namespace is None:
            return
        if mulan is None:
            raise ValueError(f"{type(self).__name__} needs MuLaN tokens: set data.<split>.mulan "
                             "(written by write_mulan_tokens)")
        have = mulan.tokens[self.namespace].shape[1], mulan.bins[self.namespace]
        want = self.prefix_modules["mulan"].n_q, self.prefix_modules["mulan"].bins
        if have != want:
            raise ValueError(f"family.mulan_n_q / mulan_bins = {want} but the MuLaN tokens have {have}; "
                             f"set family.mulan_n_q={have[0]} family.mulan_bins={have[1]}")

    def _check(self, info: Any, name: str, n_q: int, card: int) -> None:
        if info is None:
            raise ValueError(f"{type(self).__name__} needs {name} tokens: set data.<split>.{name}")
        if int(info.n_q) < n_q or int(info.cardinality) != card:
            raise ValueError(f"the {name} tokens have {info.n_q} x {info.cardinality} codes but the family "
                             f"expects {n_q} x {card}; fix family.card / n_q / coarse_q")

    def mulan_prefix(self, tokens: Tensor, train: bool) -> Tensor:
        """MuLaN tokens ``[B, n_q]`` -> ``[B, n_q, dim]``, zeroed per item with ``cfg_dropout`` in training."""
        pre = self.prefix_modules["mulan"](tokens.to(self.rates.device))
        if train and self.cfg_dropout > 0:
            keep = (torch.rand(pre.shape[0], device=pre.device) >= self.cfg_dropout).to(pre.dtype)
            pre = pre * keep[:, None, None]
        return pre

    # -- what each stage defines ------------------------------------------------------------------------------
    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        """``(codes [B, n_q, T], lengths [B])`` this stage predicts."""
        raise NotImplementedError

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor | None:
        raise NotImplementedError

    # -- steps -----------------------------------------------------------------------------------------------
    def losses(self, batch: MusicLMBatch, train: bool) -> Tensor:
        codes, lengths = self.targets(batch)
        ce, _ = masked_lm_losses(self.lm, self.pattern, codes, lengths, self.batch_prefix(batch, train))
        return ce


class SemanticStage(_Stage):
    """Semantic tokens given MuLaN "semantic" tokens.

    Args:
        card: semantic vocabulary (the k-means tokenizer's K; checked against the token manifest).
        mulan_n_q, mulan_bins: the MuLaN quantizer's "semantic" namespace.
        lm: ``LMConfig`` kwargs (``preset`` + overrides); cfg_dropout: probability of a zero MuLaN prefix.
    """

    namespace = "semantic"

    def __init__(self, card: int, mulan_n_q: int = 12, mulan_bins: int = 1024, lm: Mapping[str, Any] | None = None,
                 cfg_dropout: float = 0.1, optim: Mapping[str, Any] | None = None):
        super().__init__(1, card, lm, "parallel", mulan_n_q, mulan_bins, cfg_dropout, optim)

    def check_data(self, dm: Any) -> None:
        self._check(getattr(dm, "semantic", None), "semantic", 1, self.card)
        super().check_data(dm)

    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        assert batch.semantic is not None and batch.semantic_lengths is not None
        return batch.semantic, batch.semantic_lengths

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor:
        return self.mulan_prefix(batch.mulan["semantic"], train)


class CoarseStage(_Stage):
    """Codec codebooks ``0 .. coarse_q - 1`` given MuLaN "coarse" tokens and the semantic tokens of the crop.

    Args:
        card: codec cardinality; coarse_q: coarse codebooks (MusicLM / AudioLM: 4 of 12).
        semantic_card: the semantic vocabulary; pattern: ``unroll`` (AudioLM) or ``delay``.
    """

    namespace = "coarse"

    def __init__(self, card: int, coarse_q: int, semantic_card: int, mulan_n_q: int = 12, mulan_bins: int = 1024,
                 pattern: str = "unroll", lm: Mapping[str, Any] | None = None, cfg_dropout: float = 0.1,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(coarse_q, card, lm, pattern, mulan_n_q, mulan_bins, cfg_dropout, optim)
        self.semantic_card = int(semantic_card)
        # row semantic_card: frames past the crop's valid length
        self.prefix_modules["semantic"] = nn.Embedding(self.semantic_card + 1, self.cfg.dim)
        nn.init.normal_(self.prefix_modules["semantic"].weight, std=0.02)

    def check_data(self, dm: Any) -> None:
        self._check(getattr(dm, "codec", None), "codec", self.n_q, self.card)
        self._check(getattr(dm, "semantic", None), "semantic", 1, self.semantic_card)
        super().check_data(dm)

    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        assert batch.codes is not None and batch.code_lengths is not None
        return batch.codes[:, :self.n_q], batch.code_lengths

    def prefix(self, mulan: Tensor, semantic: Tensor, semantic_lengths: Tensor | None = None,
               train: bool = False) -> Tensor:
        """MuLaN tokens ``[B, n_q_m]`` + semantic ``[B, 1, Fs]`` -> ``[B, n_q_m + Fs, dim]``."""
        sem = semantic[:, 0].to(self.rates.device)
        if semantic_lengths is not None:
            ok = torch.arange(sem.shape[-1], device=sem.device)[None] < semantic_lengths.to(sem.device)[:, None]
            sem = sem.masked_fill(~ok, self.semantic_card)
        return torch.cat([self.mulan_prefix(mulan, train), self.prefix_modules["semantic"](sem)], dim=1)

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor:
        assert batch.semantic is not None
        return self.prefix(batch.mulan["coarse"], batch.semantic, batch.semantic_lengths, train)


class FineStage(_Stage):
    """Codec codebooks ``coarse_q .. n_q - 1`` given the coarse codebooks of every frame of the crop.

    Args:
        n_q: all codec codebooks (K); coarse_q: how many of them the coarse stage predicts.
        pattern: ``unroll`` (AudioLM) or ``delay`` over the K - coarse_q fine codebooks.
    """

    def __init__(self, n_q: int, card: int, coarse_q: int, pattern: str = "unroll",
                 lm: Mapping[str, Any] | None = None, optim: Mapping[str, Any] | None = None):
        if not 0 < int(coarse_q) < int(n_q):
            raise ValueError(f"family.coarse_q must be in [1, family.n_q - 1] = [1, {int(n_q) - 1}], got {coarse_q}")
        super().__init__(int(n_q) - int(coarse_q), card, lm, pattern, 0, 0, 0.0, optim)
        self.total_q, self.coarse_q = int(n_q), int(coarse_q)
        self.prefix_modules["coarse"] = nn.ModuleList(
            [nn.Embedding(self.card + 1, self.cfg.dim) for _ in range(self.coarse_q)])
        for emb in self.prefix_modules["coarse"]:
            nn.init.normal_(emb.weight, std=0.02)

    def check_data(self, dm: Any) -> None:
        self._check(getattr(dm, "codec", None), "codec", self.total_q, self.card)

    def targets(self, batch: MusicLMBatch) -> tuple[Tensor, Tensor]:
        assert batch.codes is not None and batch.code_lengths is not None
        return batch.codes[:, self.coarse_q:self.total_q], batch.code_lengths

    def prefix(self, coarse: Tensor, lengths: Tensor | None = None) -> Tensor:
        """coarse codes ``[B, coarse_q, F]`` -> summed embeddings ``[B, F, dim]`` (frames past ``lengths`` get the
        special row)."""
        coarse = coarse.to(self.rates.device)
        if lengths is not None:
            ok = torch.arange(coarse.shape[-1], device=coarse.device)[None] < lengths.to(coarse.device)[:, None]
            coarse = coarse.masked_fill(~ok[:, None], self.card)
        return sum(emb(coarse[:, q]) for q, emb in enumerate(self.prefix_modules["coarse"]))

    def batch_prefix(self, batch: MusicLMBatch, train: bool) -> Tensor:
        assert batch.codes is not None
        return self.prefix(batch.codes[:, :self.coarse_q], batch.code_lengths)
