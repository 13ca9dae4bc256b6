"""The one codebook-LM training base: MusicGen, the MusicLM stages and the Jukebox priors share its masked loss
and its logging."""
from __future__ import annotations

import torch

from ostinato.data.arrays import ArrayBatch
from ostinato.families.codebook_lm import CodebookLMFamily, masked_lm_losses
from ostinato.families.jukebox import JukeboxPrior
from ostinato.families.musicgen import MusicGenFamily
from ostinato.families.musiclm import CoarseStage, FineStage, SemanticStage
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.transformer import CodebookLM, lm_config

LM = {"preset": "tiny", "dim": 32, "num_heads": 2, "num_layers": 1, "ffn_dim": 64}


def test_the_three_families_train_on_one_base():
    for cls in (MusicGenFamily, SemanticStage, CoarseStage, FineStage, JukeboxPrior):
        assert issubclass(cls, CodebookLMFamily)


def test_padding_never_enters_a_valid_target_and_lengths_count_targets():
    torch.manual_seed(0)
    lm = CodebookLM(lm_config(LM, n_q=2, card=16, cross_attention=False))
    pattern = DelayPattern(2)
    codes = torch.randint(0, 16, (3, 2, 6))
    lengths = torch.tensor([6, 4, 0])
    ce, count = masked_lm_losses(lm, pattern, codes, lengths)
    assert ce.shape == (2,) and count.tolist() == [10, 10]
    changed = codes.clone()
    changed[1, :, 4:] = (changed[1, :, 4:] + 1) % 16
    changed[2] = (changed[2] + 3) % 16
    assert torch.equal(masked_lm_losses(lm, pattern, changed, lengths)[0], ce)


def test_logging_names_are_shared():
    torch.manual_seed(0)
    prior = JukeboxPrior("top", card=16, lm=LM, metadata=None, cfg_dropout=0.0)
    logged: dict[str, float] = {}
    prior.log = lambda name, value, **kw: logged.__setitem__(name, float(value.detach()))  # type: ignore[method-assign]
    batch = ArrayBatch({"top": torch.randint(0, 16, (2, 1, 8))}, {"top": torch.tensor([8, 5])}, [{}, {}])
    loss = prior.training_step(batch, 0)
    assert set(logged) == {"train/ce", "train/loss", "train/ppl", "train/ce_q0", "train/ppl_q0"}
    assert abs(logged["train/loss"] - float(loss.detach())) < 1e-6
    assert abs(logged["train/ppl"] - float(torch.exp(loss.detach()))) < 1e-3
    prior.validation_step(batch, 0)
    assert {"valid/ce", "valid/loss", "valid/ppl", "valid/ce_q0", "valid/ppl_q0"} <= set(logged)
    blank = ArrayBatch({"top": torch.zeros(2, 1, 8, dtype=torch.long)}, {"top": torch.zeros(2, dtype=torch.long)},
                       [{}, {}])
    logged.clear()
    prior.test_step(blank, 0)  # no valid target: nothing to log
    assert logged == {}
