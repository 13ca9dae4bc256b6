"""Initialisations that keep a signal's size through a stack of convolutions.

PyTorch's default conv init draws weights of variance ``1 / (3 fan_in)``: each layer shrinks its input by about
``1 / sqrt(3)`` while its bias stays, so after six to eight layers a SEANet's output is almost all bias and barely
depends on its input. An encoder then writes nearly the same latents for every clip, and a decoder nearly the same
output for every latent: one optimizer step on the biases moves the output more than the whole input does, and
training settles on the average output before it learns to read its input.

``unit_gain_`` starts every convolution at unit gain instead: zero bias, and weights whose norm over what one output
sample sees is ``gain``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["unit_gain_"]


def _magnitude(conv: nn.Module) -> torch.Tensor | None:
    """The weight-norm magnitude (``g``) of a conv under ``parametrizations.weight_norm``, else None."""
    parametrizations = getattr(conv, "parametrizations", None)
    if parametrizations is not None and hasattr(parametrizations, "weight"):
        return parametrizations.weight.original0
    return None


@torch.no_grad()
def unit_gain_(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """Start every ``Conv1d`` and ``ConvTranspose1d`` in ``module`` at unit gain, in place; returns ``module``.

    A ``Conv1d`` gets the norm ``gain`` per output channel (its weight ``[out, in, k]`` over ``in, k``); a
    ``ConvTranspose1d`` (weight ``[in, out, k]``, of which one output sample sees ``k / stride`` taps) gets the norm
    ``gain * sqrt(out * stride / in)`` per input channel, the same ``gain`` per output sample on average. Biases are
    zeroed. Under weight norm (dim 0) the magnitude is set, else the weight is rescaled.
    """
    for conv in module.modules():
        if isinstance(conv, nn.Conv1d):
            norm = float(gain)
        elif isinstance(conv, nn.ConvTranspose1d):
            norm = float(gain) * math.sqrt(conv.out_channels / conv.groups * conv.stride[0] / conv.in_channels)
        else:
            continue
        if conv.bias is not None:
            conv.bias.zero_()
        magnitude = _magnitude(conv)
        if magnitude is not None:
            magnitude.fill_(norm)
        else:
            conv.weight.mul_(norm / conv.weight.norm(dim=(1, 2), keepdim=True).clamp(min=1e-12))
    return module
