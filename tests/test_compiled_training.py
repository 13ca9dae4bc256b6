"""Training speed paths on CPU: blocks compiled by ``trainer.compile`` (torch.compile / Inductor, one graph shared
by every block) train like the eager model: same losses and updates, step after step; bf16-mixed with a fused
optimizer and gradient clipping (the GPU defaults) trains."""
from __future__ import annotations

import copy

import torch
from omegaconf import OmegaConf

from ostinato.engine.trainer import apply_compile_and_checkpointing
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.transformer import CodebookLM, LMConfig


class Holder(torch.nn.Module):
    def __init__(self, lm: CodebookLM) -> None:
        super().__init__()
        self.lm = lm


def test_compiled_blocks_train_like_eager() -> None:
    torch.manual_seed(0)
    cfg = LMConfig.preset("tiny", n_q=2, card=16, dim=32, num_heads=2, num_layers=2, ffn_dim=64, cond_dim=8)
    eager = Holder(CodebookLM(cfg))
    compiled = copy.deepcopy(eager)
    apply_compile_and_checkpointing(OmegaConf.create({"compile": ["lm.layers"], "activation_checkpointing": False,
                                                      "strategy": "auto"}), compiled)
    assert all(block._compiled_call_impl is not None for block in compiled.lm.layers)
    g = torch.Generator().manual_seed(1)
    pattern = DelayPattern(2)
    codes = torch.randint(0, 16, (3, 2, 12), generator=g)
    seq, _ = pattern.build(codes, 16)
    cond = torch.randn(3, 4, 8, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 2:] = False
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, compiled)]
    for _ in range(3):
        losses = []
        for model, opt in zip((eager, compiled), opts):
            logits = model.lm(seq[:, :, :-1], cond, mask)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), seq[:, :, 1:].clamp(max=15).flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(eager.lm.layers[0].fc1.weight, CodebookLM(cfg).layers[0].fc1.weight)


def test_bf16_mixed_clips_gradients_with_a_fused_optimizer(env):
    """GPU defaults (bf16-mixed, fused AdamW, gradient_clip_val=1) train: Lightning's own bf16 plugin refuses to
    clip with an optimizer that unscales internally; the engine's clips (bf16 has no scaler)."""
    from tests.runner import train, xp_folder

    run = ["trainer.max_steps=3", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu", "optim.fused=true",
           "trainer.gradient_clip_val=0.01", "trainer.checkpoint_every_steps=3"]
    train(env, *run)
    ckpt = torch.load(xp_folder(env, *run) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
