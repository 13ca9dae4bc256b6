"""Next-token sampling and classifier-free guidance (CFG) combinations of logits.

* ``sample_next``: temperature, then top-k, then top-p (nucleus) filtering, then one multinomial draw
  (``temperature <= 0`` is greedy argmax; filtering is then irrelevant). Seedable with a ``torch.Generator``.
* ``cfg_logits``: ``l = l_uncond + scale * (l_cond - l_uncond)`` (scale 1 returns ``l_cond``).
* ``double_cfg_logits``: MusicGen-Style's double CFG (audiocraft ``LMModel._sample_next_token``), for two
  conditions (e.g. text + style), with ``l_full`` = both conditions, ``l_partial`` = only the style condition
  (text dropped), ``l_uncond`` = both dropped::

      l = l_uncond + alpha * (l_partial + beta * (l_full - l_partial) - l_uncond)

  i.e. ``l_∅ + α·(l_style + β·(l_{text,style} − l_style) − l_∅)``. With ``beta = 1`` it is ``cfg_logits(l_full,
  l_uncond, alpha)``; ``beta > 1`` pushes further towards the text, ``beta < 1`` towards the style.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_next", "filter_logits", "cfg_logits", "double_cfg_logits"]


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Top-k then top-p filtering over the last dim; removed entries become ``-inf``.

    ``top_k <= 0`` or ``>= card``: no top-k. ``top_p <= 0`` or ``>= 1``: no top-p. The nucleus is the smallest set
    of most probable tokens whose cumulative probability (after top-k) reaches ``top_p``; the most probable token
    is always kept. Top-k keeps exactly k tokens (ties at the threshold are broken by ``torch.topk``).
    """
    card = logits.shape[-1]
    out = logits
    if 0 < top_k < card:
        idx = torch.topk(out, top_k, dim=-1).indices
        keep = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx, True)
        out = out.masked_fill(~keep, float("-inf"))
    if 0.0 < top_p < 1.0:
        probs = torch.softmax(out.float(), dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row of ``logits [..., card]`` -> int64 ``[...]``.

    Args:
        temperature: ``<= 0`` means greedy (argmax); otherwise logits are divided by it before filtering.
        top_k, top_p: see ``filter_logits`` (applied in that order).
        generator: makes the draw reproducible (must live on the logits' device).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    shape, card = logits.shape[:-1], logits.shape[-1]
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(filtered.reshape(-1, card), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).reshape(shape)


def cfg_logits(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def double_cfg_logits(full_logits: Tensor, partial_logits: Tensor, uncond_logits: Tensor,
                      alpha: float, beta: float) -> Tensor:
    """MusicGen-Style double CFG: ``uncond + alpha * (partial + beta * (full - partial) - uncond)``.

    Args:
        full_logits: both conditions (text and style).
        partial_logits: only the style condition (text dropped).
        uncond_logits: no condition.
    """
    return uncond_logits + alpha * (partial_logits + beta * (full_logits - partial_logits) - uncond_logits)
