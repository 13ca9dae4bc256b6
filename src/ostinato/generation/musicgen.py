"""Text -> audio with a trained MusicGen family and its codec: prompts -> conditioned LM decoding -> codec."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ostinato.generation.lm import GenerationParams, generate
from ostinato.nn.codec import Codec


@torch.no_grad()
def generate_audio(module: torch.nn.Module, codec: Codec, prompts: Sequence[str], seconds: float,
                   params: GenerationParams) -> torch.Tensor:
    """One clip per prompt ("" = unconditional) -> wav [B, C, round(seconds * sample_rate)]."""
    if module.n_q != codec.n_q or module.card != codec.cardinality:
        raise ValueError(f"the model predicts {module.n_q} x {module.card} codes but the codec has "
                         f"{codec.n_q} x {codec.cardinality}; pass the codec it was trained with (--codec)")
    cond, mask = module.condition(list(prompts))
    frames = max(1, round(seconds * codec.frame_rate))
    codes = generate(module.lm, module.pattern, frames, cond=cond, cond_mask=mask, params=params,
                     batch_size=len(prompts))
    return codec.decode(codes)[..., : round(seconds * codec.sample_rate)]
