"""The one training base of codebook language models: MusicGen, the MusicLM stages and the Jukebox priors.

``masked_lm_losses``: codes ``[B, K, T]`` with item lengths -> the codebook pattern's sequence (frames past an
item's length become the special token first, so padding never enters a valid target's context; audiocraft's
loss, ``trim_delays``, keeps them as its solver does) -> the LM reads
steps ``[:-1]`` and predicts steps ``[1:]``; the cross-entropy counts only positions that hold a real code of a
valid frame.

``CodebookLMFamily``: a wrapper defines ``losses(batch, train) -> ce [K]``; the base logs, per split, ``ce`` (mean
over codebooks), ``loss``, ``ppl`` and per codebook ``ce_q{k}`` / ``ppl_q{k}``.

LoRA (``family.lora``, ``use_lora``): adapters on ``self.model.lm``, everything else frozen (the optimizer takes
only what requires grad); checkpoints hold the adapters and the buffers alone (the base is ``continue_from``'s,
loaded again at resume), so Lightning's restore is not strict.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.families.base import FamilyModule
from ostinato.nn.lora import LoRA, add_adapters, lora_spec, spec_dict
from ostinato.nn.patterns import CodebookPattern
from ostinato.nn.transformer import CodebookLM, _Block

__all__ = ["CodebookLMFamily", "masked_lm_losses"]

_MAX_LOG_CE = 50.0  # exp() of a larger cross-entropy (a diverged step) overflows float32


def masked_lm_losses(lm: CodebookLM, pattern: CodebookPattern, codes: Tensor, lengths: Tensor,
                     prefix: Tensor | None = None, cond: Tensor | None = None,
                     cond_mask: Tensor | None = None, trim_delays: bool = False,
                     targets: Tensor | None = None, step_cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """codes ``[B, K, T]``, valid frames ``lengths [B]``, optional ``prefix [B, P, dim]`` and cross-attention
    ``cond [B, Tc, D]`` / ``cond_mask [B, Tc]`` -> (per-codebook mean CE ``[K]`` over valid targets, their count
    ``[K]``).

    ``trim_delays``: audiocraft's loss (its solver's mask: the item's frames and the pattern steps complete within
    the batch's T frames): the last ``delays[k]`` frames of codebook ``k`` of the batch are no targets, and the
    frames past an item's length keep their codes (the codec's codes of the padded audio, audiocraft's
    ``padding_with_special_token: false``), which the valid targets of later codebooks see.

    ``targets``: ``[B, T]`` bool, False for frames that are no targets though they stay in the context
    (MusicGen-Style's: the frames its style excerpt was cut from, which the LM could otherwise copy).

    ``step_cond``: ``[B, T', dim]`` added to the LM's input at sequence steps ``0 .. T' - 1`` (cut or zero-padded to
    the ``S - 1`` input steps); with a one-codebook parallel pattern row t sits on the step that predicts frame t
    (a Jukebox upsampler's upper codes)."""
    b, k, t = codes.shape
    card = lm.cfg.card
    frame_ok = torch.arange(t, device=codes.device)[None, :] < lengths.to(codes.device)[:, None]  # [B, T]
    if not trim_delays:
        codes = codes.masked_fill(~frame_ok[:, None, :], card)
    seq, _ = pattern.build(codes, card)  # [B, K, S]
    pos = pattern.positions(t).to(codes.device)  # [K, T]
    valid = torch.zeros(seq.shape, dtype=torch.bool, device=codes.device)
    target_ok = frame_ok[:, None, :].expand(b, k, t)
    if trim_delays:
        delays = torch.as_tensor(getattr(pattern, "delays", [0] * k), device=codes.device)
        frames = torch.arange(t, device=codes.device)
        target_ok = target_ok & (frames[None, :] < t - delays[:, None])[None]
    if targets is not None:
        target_ok = target_ok & targets.to(device=codes.device, dtype=torch.bool)[:, None, :]
    valid.scatter_(2, pos[None].expand(b, k, t), target_ok)
    extra = {}
    if step_cond is not None:
        n = seq.shape[-1] - 1
        extra["step_cond"] = F.pad(step_cond[:, :n], (0, 0, 0, n - min(n, step_cond.shape[1])))
    logits = lm(seq[:, :, :-1], cond, cond_mask, prefix=prefix, **extra)  # [B, K, S-1, card]
    target, valid = seq[:, :, 1:], valid[:, :, 1:]
    ce = F.cross_entropy(logits.float().permute(0, 3, 1, 2), target.clamp(max=card - 1), reduction="none")
    ce = ce * valid  # [B, K, S-1]
    count = valid.sum(dim=(0, 2))
    return ce.sum(dim=(0, 2)) / count.clamp_min(1), count


class CodebookLMFamily(FamilyModule):
    """Base of the wrappers that train a ``CodebookLM``: steps and logging around ``losses``; LoRA fine-tuning of
    ``self.model.lm`` when a wrapper calls ``use_lora`` (last in its ``__init__``)."""

    lora: LoRA | None = None

    def use_lora(self, spec: Mapping[str, Any] | None) -> None:
        """``family.lora`` (null = off): adapters on the LM; every other parameter is frozen."""
        self.lora = lora_spec(spec)
        if self.lora is None:
            return
        self.requires_grad_(False)
        add_adapters(self.model.lm, self.lora)  # its new adapter parameters are the only ones requiring grad
        self.strict_loading = False  # checkpoints hold the adapters; the base comes from continue_from

    def checkpoint_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What a checkpoint keeps of ``state`` (this module's state dict): all of it, or with LoRA the adapters
        and the buffers (data rates, windows) a model is rebuilt with."""
        if self.lora is None:
            return dict(state)
        params = {name for name, _ in self.named_parameters()}
        return {k: v for k, v in state.items() if ".lora_" in k or k not in params}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora is not None:
            checkpoint["state_dict"] = self.checkpoint_state(checkpoint["state_dict"])
            checkpoint["lora"] = spec_dict(self.lora)

    def losses(self, batch: Any, train: bool) -> Tensor:
        """Per-codebook mean cross-entropy ``[K]`` of a batch (conditions dropped out when ``train``)."""
        raise NotImplementedError

    def block_classes(self) -> set[type[nn.Module]]:
        return {_Block}

    def log_ce(self, split: str, ce: Tensor, batch_size: int, loss: Tensor | None = None) -> Tensor:
        """Log ``split/ce``, ``split/loss`` (``loss``, default the mean CE), ``split/ppl`` and per codebook
        ``split/ce_q{k}`` and ``split/ppl_q{k}``; returns the loss."""
        train = split == "train"
        mean = ce.mean()
        loss = mean if loss is None else loss
        kw: dict[str, Any] = dict(batch_size=batch_size, sync_dist=not train)
        self.log(f"{split}/ce", mean, prog_bar=split == "valid", **kw)
        self.log(f"{split}/loss", loss, prog_bar=train, **kw)
        self.log(f"{split}/ppl", torch.exp(mean.detach().clamp(max=_MAX_LOG_CE)), **kw)
        for q in range(ce.shape[0]):
            self.log(f"{split}/ce_q{q}", ce[q], **kw)
            self.log(f"{split}/ppl_q{q}", torch.exp(ce[q].detach().clamp(max=_MAX_LOG_CE)), **kw)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.log_ce("train", self.losses(batch, train=True), len(batch))

    def evaluate(self, batch: Any, split: str) -> None:
        self.log_ce(split, self.losses(batch, train=False), len(batch))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "valid")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test")
