"""The MusicGen family: a text-conditioned ``CodebookLM`` over codec token shards (``TokenDataModule``).

Training step: codes ``[B, K, T]`` -> ``DelayPattern.build`` (special token = ``card``) -> the LM reads steps
``[:-1]`` and predicts steps ``[1:]``; the cross-entropy counts only positions that hold a real code of a valid
frame (pattern mask and item lengths). Frames past an item's length are replaced by the special token before the
pattern is built, so padding never enters the context of a valid target.

Text: each sample's caption merged with its structured fields (``description``), encoded by a frozen
``TextConditioner``; in training a field is dropped with ``attribute_dropout`` and the whole description with
``cfg_dropout`` (the null condition for classifier-free guidance: an empty text, all-False mask).
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ostinato.data.token_datamodule import TokenBatch
from ostinato.engine.family import FamilyModule
from ostinato.nn.conditioners import TextConditioner, description
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.transformer import CodebookLM, LMConfig, _Block

__all__ = ["MusicGenFamily", "lm_config"]


def lm_config(lm: Mapping[str, Any] | None, *, n_q: int, card: int, cross_attention: bool) -> LMConfig:
    """``{preset: tiny, dim: 128, ...}`` or plain ``LMConfig`` kwargs -> ``LMConfig`` (n_q/card from the family)."""
    kw = dict(lm or {})
    for key in ("n_q", "card"):
        if key in kw and int(kw.pop(key)) != {"n_q": n_q, "card": card}[key]:
            raise ValueError(f"family.lm.{key} differs from family.{key}: set family.{key} only")
    kw.setdefault("cross_attention", cross_attention)
    preset = kw.pop("preset", None)
    if preset:
        return LMConfig.preset(preset, n_q=n_q, card=card, **kw)
    return LMConfig(n_q=n_q, card=card, **kw)


class MusicGenFamily(FamilyModule):
    """MusicGen LM training on token shards.

    Args:
        n_q, card: codebooks and codebook size of the tokens; checked against the token manifests' codec at
            setup (``data`` ``codec.n_q`` / ``codec.cardinality``).
        lm: ``LMConfig`` kwargs, optionally ``preset: tiny|small|medium|large`` plus overrides.
        text: ``TextConditioner`` kwargs (``model``, ``max_length``, ``dropout``); None = unconditional.
        delays: the delay pattern (default ``[0, 1, ..., n_q - 1]``).
        cfg_dropout: probability, per training item, of the null (empty) condition.
        attribute_dropout: probability, per training item and structured field, of leaving the field out.
        codec: the codec the tokens come from (anything ``load_codec`` takes); None = the one recorded in the
            token shards' manifest. Generation decodes with it.
    """

    def __init__(self, n_q: int, card: int, lm: Mapping[str, Any] | None = None,
                 text: Mapping[str, Any] | None = None, delays: Sequence[int] | None = None,
                 cfg_dropout: float = 0.1, attribute_dropout: float = 0.0, codec: str | None = None,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        self.n_q, self.card = int(n_q), int(card)
        self.cfg = lm_config(lm, n_q=self.n_q, card=self.card, cross_attention=text is not None)
        self.lm = CodebookLM(self.cfg)
        self.text: TextConditioner | None = None
        if text is not None:
            kw = dict(text)
            if "dim" in kw and kw["dim"] != self.cfg.kv_dim:
                raise ValueError(f"family.text.dim={kw['dim']} must equal the LM cross-attention width "
                                 f"{self.cfg.kv_dim}; leave it out")
            kw["dim"] = self.cfg.kv_dim
            self.text = TextConditioner(**kw)
        self.pattern = DelayPattern(self.n_q, delays)
        self.cfg_dropout, self.attribute_dropout = float(cfg_dropout), float(attribute_dropout)
        self.codec_ref = None if codec is None else str(codec)
        self.ema_modules = ("lm", "text") if self.text is not None else ("lm",)

    # -- engine hooks ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        codec = getattr(dm, "codec", None)
        if codec is None:
            return
        for key, have in (("n_q", codec.n_q), ("cardinality", codec.cardinality)):
            mine = self.n_q if key == "n_q" else self.card
            if int(have) != mine:
                name = "n_q" if key == "n_q" else "card"
                raise ValueError(f"family.{name}={mine} does not match the token shards: their codec "
                                 f"({codec.id}) has {key}={have}; set family.{name}={have}")
        self._sample_rate = codec.sample_rate

    def block_classes(self) -> set[type[torch.nn.Module]]:
        return {_Block}

    # -- conditioning ---------------------------------------------------------------------------------------
    def descriptions(self, batch: TokenBatch, train: bool) -> list[str]:
        if not train:
            return [description(m) for m in batch.meta]
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
        return ["" if rng.random() < self.cfg_dropout else description(m, rng, self.attribute_dropout)
                for m in batch.meta]

    def condition(self, texts: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
        """``(cond [B, Tc, D], mask [B, Tc])`` for the LM; None, None when unconditional.

        A null condition (all-False mask) attends to one zero vector instead: with bias-free keys/values that
        adds exactly nothing, where an all-masked softmax would give NaN.
        """
        if self.text is None:
            return None, None
        cond, mask = self.text(list(texts))
        attend = mask.clone()
        attend[~mask.any(dim=1), 0] = True
        return cond, attend

    # -- loss -----------------------------------------------------------------------------------------------
    def compute_losses(self, codes: Tensor, lengths: Tensor, cond: Tensor | None = None,
                       cond_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-codebook mean cross-entropy ``[K]`` over valid targets, and the count of those targets ``[K]``."""
        b, k, t = codes.shape
        frame_ok = torch.arange(t, device=codes.device)[None, :] < lengths[:, None]  # [B, T]
        codes = codes.masked_fill(~frame_ok[:, None, :], self.card)
        seq, _ = self.pattern.build(codes, self.card)  # [B, K, S]
        pos = self.pattern.positions(t).to(codes.device)  # [K, T]
        valid = torch.zeros(seq.shape, dtype=torch.bool, device=codes.device)
        valid.scatter_(2, pos[None].expand(b, k, t), frame_ok[:, None, :].expand(b, k, t))
        logits = self.lm(seq[:, :, :-1], cond, cond_mask)  # [B, K, S-1, card]
        target, valid = seq[:, :, 1:], valid[:, :, 1:]
        ce = F.cross_entropy(logits.float().permute(0, 3, 1, 2), target.clamp(max=self.card - 1),
                             reduction="none")  # [B, K, S-1]
        ce = ce * valid
        count = valid.sum(dim=(0, 2))
        return ce.sum(dim=(0, 2)) / count.clamp_min(1), count

    def _step(self, batch: TokenBatch, train: bool) -> Tensor:
        cond, mask = self.condition(self.descriptions(batch, train))
        ce, _ = self.compute_losses(batch.codes, batch.lengths, cond, mask)
        return ce

    def training_step(self, batch: TokenBatch, batch_idx: int) -> Tensor:
        ce = self._step(batch, train=True)
        loss = ce.mean()
        n = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for q in range(self.n_q):
            self.log(f"train/ce_q{q}", ce[q], batch_size=n)
            self.log(f"train/ppl_q{q}", torch.exp(ce[q].detach().clamp(max=50)), batch_size=n)
        return loss

    def _eval(self, batch: TokenBatch, split: str) -> None:
        ce = self._step(batch, train=False)
        n = len(batch)
        self.log(f"{split}/ce", ce.mean(), prog_bar=split == "valid", sync_dist=True, batch_size=n)
        self.log(f"{split}/loss", ce.mean(), sync_dist=True, batch_size=n)
        for q in range(self.n_q):
            self.log(f"{split}/ce_q{q}", ce[q], sync_dist=True, batch_size=n)
        self.log(f"{split}/ppl", torch.exp(ce.mean().clamp(max=50)), sync_dist=True, batch_size=n)

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> None:
        self._eval(batch, "valid")

    def test_step(self, batch: TokenBatch, batch_idx: int) -> None:
        self._eval(batch, "test")

    @property
    def frame_rate(self) -> float | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        codec = getattr(dm, "codec", None)
        return None if codec is None else float(codec.frame_rate)

