"""FSDP through the real `ostinato train` CLI on two CPU processes (gloo): a tiny MusicGen trains with one FSDP
unit per transformer block, writes a sharded checkpoint (a directory), resumes from it with the same weights and
step, and exports its consolidated weights."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from ostinato.store.checkpoint import load_checkpoint
from ostinato.engine.weights import export
from tests.runner import losses, train, xp_folder
from tests.test_musicgen_family import write_token_shards

RUN = ["family=musicgen_tiny", "data=demo_tokens", "family.lm.num_heads=2",
       "family.lm.num_layers=2", "family._target_=tests.fsdp_models.FSDPProbeMusicGen",
       "trainer.strategy=fsdp", "trainer.accelerator=cpu", "trainer.max_steps=8", "trainer.checkpoint_every_steps=2",
       "ema.decay=0", "optim.weight_decay=0.1", "trainer.val_every_epochs=100"]


def test_fsdp_trains_saves_sharded_and_resumes(env, tmp_path):
    data = tmp_path / "data"
    for i, split in enumerate(("train", "valid", "test")):
        write_token_shards(data / "demo" / "tokens" / split, [60] * 8, first_index=100 * i)
    run_env = {**env, "OSTINATO_DATA": str(data), "OSTINATO_OUTPUTS": str(tmp_path / "out")}
    folder = xp_folder(run_env, *RUN)
    last = folder / "checkpoints" / "last.ckpt"

    # first run: stopped after step 4 (as a preempted job would be), leaving a sharded checkpoint
    train({**run_env, "OSTINATO_STOP_AT": "4", "OSTINATO_DUMP": str(tmp_path / "first")}, *RUN, ddp=2)
    assert last.is_dir() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2
    saved = load_checkpoint(last)  # consolidated on one process
    assert saved["global_step"] == 4
    first_end = torch.load(tmp_path / "first" / "end.pt")
    assert first_end["world"] == 2 and first_end["step"] == 4
    assert saved["state_dict"].keys() == first_end["state"].keys()
    for key, value in first_end["state"].items():
        assert torch.equal(saved["state_dict"][key], value), key
    # the weight-decay groups saw the blocks' original shapes, not their 1-D shards
    groups = {name: (decay, n) for name, decay, n in first_end["groups"]}
    assert groups["decay"][0] == 0.1 and groups["decay"][1] >= 2 * 6  # q/k/v/o, fc1, fc2 of both blocks
    assert first_end["ndims"]["model.lm.layers.0.fc1.weight"] == 2

    # second run, same experiment: resumes from the directory with exactly the saved weights and step
    result = train({**run_env, "OSTINATO_DUMP": str(tmp_path / "second")}, *RUN, ddp=2)
    assert f"resuming {last}" in result.stderr
    start = torch.load(tmp_path / "second" / "start.pt")
    assert start["step"] == 4
    for key, value in saved["state_dict"].items():
        assert torch.equal(start["state"][key], value), key
    assert torch.load(tmp_path / "second" / "end.pt")["step"] == 8
    assert load_checkpoint(last)["global_step"] == 8
    assert max(step for step, _ in losses(folder)) == 7  # logged steps go on from the checkpoint (0-based)
    assert not any(p.name.endswith((".partial", ".old")) for p in last.parent.iterdir())
    assert load_checkpoint(last.with_name("last-previous.ckpt"))["global_step"] == 6  # the one before, kept whole

    # export consolidates the shards into plain weights
    out = export(folder, tmp_path / "export")
    weights = load_file(out / "model.safetensors")
    final = load_checkpoint(last)["state_dict"]
    final = {k.removeprefix("model."): v for k, v in final.items()}  # an export holds the model's own tensors
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in weights)
