"""LoRA fine-tuning (``family.lora``): only the adapters train and are saved, resume and ``continue_from`` carry
them, ``export`` merges them (or keeps them apart in peft's format) and ``ostinato.load`` reads both; for an
imported MusicGen through the CLI, and for a MusicLM stage and a Jukebox prior in process."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import ostinato
from ostinato.cli import main
from ostinato.engine.config import ConfigError, check_lora
from ostinato.engine.weights import export, load_weights
from ostinato.families.musicgen import ImportedMusicGenFamily
from ostinato.models.musicgen import MusicGen
from ostinato.nn.lora import has_adapters
from ostinato.store.records import CONFIG_KEY
from tests.runner import train, xp_folder
from tests.synth import write_shards
from tests.test_musicgen_import import SR, TEXTS, codes_seq, hf_musicgen, imported  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
LORA = "family.lora={rank: 4, alpha: 8}"


def lora_keys(state: dict) -> list[str]:
    return sorted(k for k in state if ".lora_" in k)


def logits(model: MusicGen) -> torch.Tensor:
    with torch.no_grad():
        cond, mask = model.condition(TEXTS)
        return model.lm(codes_seq(), cond, mask)


@pytest.fixture(scope="module")
def musicgen_run(imported, env, tmp_path_factory):  # noqa: F811
    """The tiny import fine-tuned with LoRA through `ostinato train` (4 steps, rank 4 on the attention)."""
    root = tmp_path_factory.mktemp("lora_musicgen")
    out = imported.out
    for split, n in (("train", 8), ("valid", 4)):
        write_shards(root / "audio" / split, n_shards=1, per_shard=n, sample_rate=SR)
        main(["tokenize", str(root / "audio" / split), str(root / "tokens" / split), "--codec", str(out / "codec"),
              "--device", "cpu", "--workers", "1"])
    run_env = {**env, "OSTINATO_OUTPUTS": str(root / "xps"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base = ["family=musicgen_import", f"family.export={out}", f"continue_from={out}", "data=demo_tokens",
            f"data.train={root / 'tokens' / 'train'}", f"data.valid={root / 'tokens' / 'valid'}", "data.test=null",
            "trainer.limit_val_batches=1", "ema.decay=0.5", LORA]
    run = [*base, f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every_steps={STEPS}"]
    proc = train(run_env, *run)
    folder = Path(re.search(r"XP \w+ in (\S+)", proc.stderr)[1])
    return {"env": run_env, "base": base, "folder": folder, "import": out, "root": root}


def test_only_the_adapters_train_and_are_saved(musicgen_run) -> None:
    folder, out = musicgen_run["folder"], musicgen_run["import"]
    ckpt_path = folder / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    state = ckpt["state_dict"]
    layers = 2  # the import's decoder layers; 4 self- and 4 cross-attention projections each, A and B
    assert ckpt["global_step"] == STEPS and len(lora_keys(state)) == layers * 8 * 2 == len(state)
    assert ckpt["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj",
                                                                                    "out_proj"]}
    optimizer = ckpt["optimizer_states"][0]
    assert len(optimizer["state"]) == len(state)  # the optimizer took the adapters alone
    shadows = [c["shadow"] for c in ckpt["callbacks"].values() if isinstance(c, dict) and "shadow" in c]
    assert len(shadows) == 1 and set(shadows[0]) == set(state)  # the EMA averages the adapters alone
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    base = load_file(out / "model.safetensors")
    assert nbytes(state.values()) < nbytes(base.values()) / 10
    assert ckpt_path.stat().st_size < (out / "model.safetensors").stat().st_size / 2  # with Adam's moments and EMA
    assert all(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # B starts at 0: they trained

    tuned = ostinato.load(folder)  # the import with the adapters on
    own = tuned.state_dict()
    for key, value in base.items():  # the base is bit-identical
        moved = key.replace(".weight", ".base_layer.weight")
        assert torch.equal(own[key if key in own else moved], value), key
    assert has_adapters(tuned) and not torch.allclose(logits(tuned), logits(ostinato.load(out)), atol=1e-4)


def test_resume_continues_the_adapters(musicgen_run) -> None:
    run_env, folder = musicgen_run["env"], musicgen_run["folder"]
    moved = [*musicgen_run["base"], f"trainer.max_steps={STEPS + 2}", f"trainer.checkpoint_every_steps={STEPS}"]
    target = xp_folder(run_env, *moved) / "checkpoints"
    target.mkdir(parents=True)
    shutil.copy(folder / "checkpoints" / "last.ckpt", target / "last.ckpt")
    proc = train(run_env, *moved)
    assert f"resuming {target / 'last.ckpt'}" in proc.stderr
    before = torch.load(target / "last-previous.ckpt", weights_only=True)
    after = torch.load(target / "last.ckpt", weights_only=True)
    assert after["global_step"] == STEPS + 2
    adam = after["optimizer_states"][0]["state"]
    assert {int(s["step"]) for s in adam.values()} == {STEPS + 2}  # the optimizer went on from step 4
    # two more steps from the restored adapters: a small change, where a fresh start would be far off
    prev, now = before["state_dict"], after["state_dict"]
    for key in lora_keys(prev):
        if ".lora_B." in key:
            assert (now[key] - prev[key]).norm() < prev[key].norm(), key


def test_a_resume_without_its_base_is_refused_in_one_line(imported, tmp_path) -> None:  # noqa: F811
    from ostinato.train import load_base

    family = ImportedMusicGenFamily(export=str(imported.out), lora={"rank": 4})
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError, match=rf"continue_from={re.escape(str(gone))}: the base this LoRA run adapts is "
                                          r"gone \(.*\); .* put the base back at that path to resume"):
        load_base(family, str(gone), tmp_path / "xps", trust=False, resuming=True)
    with pytest.raises(FileNotFoundError):  # at a first start the usual message stands
        load_base(family, str(gone), tmp_path / "xps", trust=False, resuming=False)


def test_the_benchmark_runs_tiny_on_cpu(tmp_path) -> None:
    from bench.lora_finetune import main as bench

    records = bench(["--device", "cpu", "--tiny", "--json", str(tmp_path / "out.jsonl")])
    full, lora = records
    assert full["trainable"] == full["params"] and 0 < lora["trainable"] < lora["params"] / 2
    assert lora["rank"] == 16 and lora["targets"] == "q_proj,k_proj,v_proj,out_proj"
    assert all(r["step_s"] > 0 and r["peak_gib"] is None for r in records)
    assert [json.loads(line)["mode"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == ["full", "lora"]


def test_export_merges_or_keeps_the_adapters(musicgen_run, tmp_path) -> None:
    folder = musicgen_run["folder"]
    adapted = logits(ostinato.load(folder))
    merged_dir = export(folder, tmp_path / "merged")
    merged = ostinato.load(merged_dir)
    assert not has_adapters(merged) and type(merged) is MusicGen
    assert set(load_file(merged_dir / "model.safetensors")) == set(load_file(musicgen_run["import"] /
                                                                             "model.safetensors"))
    assert (logits(merged) - adapted).abs().max() <= 1e-5

    main(["export", str(folder), str(tmp_path / "kept"), "--lora", "keep"])
    kept = tmp_path / "kept"
    config = json.loads((kept / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA" and not (kept / "model.safetensors").exists()
    assert len(load_file(kept / "adapter" / "adapter_model.safetensors")) == 32
    assert json.loads((kept / "export.json").read_text())["base"] == str(musicgen_run["import"])
    from_kept = ostinato.load(kept)
    assert has_adapters(from_kept) and (logits(from_kept) - adapted).abs().max() <= 1e-6
    from peft import PeftModel  # peft itself reads the adapter folder onto the base LM

    base = ostinato.load(musicgen_run["import"])
    base.lm = PeftModel.from_pretrained(base.lm, kept / "adapter").base_model.model
    assert (logits(base) - adapted).abs().max() <= 1e-6
    back = export(folder, tmp_path / "back", format="transformers")  # the source's format, adapters merged in
    from transformers import MusicgenForConditionalGeneration

    hf = MusicgenForConditionalGeneration.from_pretrained(back).state_dict()
    for name, ours in (("self_attn.q_proj", "self_attn.q_proj"), ("encoder_attn.v_proj", "cross_attn.v_proj")):
        assert torch.allclose(hf[f"decoder.model.decoder.layers.1.{name}.weight"],
                              merged.state_dict()[f"lm.layers.1.{ours}.weight"], atol=1e-6)
    for model in (folder, kept):  # generation takes the adapted model as it is, from its XP or kept apart
        main(["generate", "--model", str(model), "--prompt", TEXTS[0], "--seconds", "0.2", "--seed", "0",
              "--out", str(tmp_path / "gen" / model.name)])
    clips = [sorted((tmp_path / "gen" / m.name).glob("*.wav")) for m in (folder, kept)]
    assert len(clips[0]) == 1 and clips[0][0].read_bytes() == clips[1][0].read_bytes()


def test_continue_from_carries_the_adapters(musicgen_run, tmp_path) -> None:
    out, folder = musicgen_run["import"], musicgen_run["folder"]
    lora = {"rank": 4, "alpha": 8}
    adapted = logits(ostinato.load(folder))
    family = ImportedMusicGenFamily(export=str(out), lora=lora)
    report = load_weights(family, folder)  # an XP of a LoRA run: its base, then its adapters
    assert not report.missing and len(lora_keys(report.loaded)) == 32
    assert (logits(family.model.eval()) - adapted).abs().max() <= 1e-6
    export(folder, tmp_path / "kept", lora="keep")
    plain = ImportedMusicGenFamily(export=str(out))  # no adapters here: theirs come merged
    load_weights(plain, tmp_path / "kept")
    assert (logits(plain.model.eval()) - adapted).abs().max() <= 1e-5


def test_lora_off_is_the_plain_family(imported) -> None:  # noqa: F811
    torch.manual_seed(0)
    plain = ImportedMusicGenFamily(export=str(imported.out))
    torch.manual_seed(0)
    off = ImportedMusicGenFamily(export=str(imported.out), lora=None)
    assert off.lora is None and off.strict_loading and not has_adapters(off)
    state = off.state_dict()
    assert list(state) == list(plain.state_dict()) and off.checkpoint_state(state).keys() == state.keys()
    assert all(p.requires_grad for p in off.parameters())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())


def test_lora_needs_a_base_and_known_targets(imported) -> None:  # noqa: F811
    with pytest.raises(ValueError, match=r"family.lora.targets: 'qkv' names no linear layer of the LM; choose among"):
        ImportedMusicGenFamily(export=str(imported.out), lora={"targets": ["qkv"]})
    with pytest.raises(ValueError, match=r"family.lora.ranks is not a LoRA setting"):
        ImportedMusicGenFamily(export=str(imported.out), lora={"ranks": 4})
    cfg = OmegaConf.create({"family": {"lora": {}}, "continue_from": None})
    with pytest.raises(ConfigError, match=r"family.lora trains adapters on a pretrained model: set continue_from="):
        check_lora(cfg)
    check_lora(OmegaConf.create({"family": {"lora": None}, "continue_from": None}))


# -- a MusicLM stage and a Jukebox prior, trained in process ------------------------------------------------------
def semantic_stage(lora: dict | None) -> tuple[Any, dict, Any]:
    from ostinato.families.musiclm import SemanticStage
    from tests.test_musiclm import MULAN_CARD, MULAN_NQ, SEM, TINY_LM, fixed_batch

    kw = dict(card=SEM.card, mulan_n_q=MULAN_NQ, mulan_card=MULAN_CARD, lm=TINY_LM, cfg_dropout=0.0)
    cfg = {"_target_": "ostinato.families.musiclm.SemanticStage", **kw, "lora": lora}
    return SemanticStage(**kw, lora=lora), cfg, fixed_batch()


def top_prior(lora: dict | None) -> tuple[Any, dict, Any]:
    from ostinato.families.jukebox import JukeboxPrior
    from tests.test_jukebox import LM, META, _code_batch

    kw = dict(level="top", card=32, lm=LM, metadata=META, cfg_dropout=0.0)
    cfg = {"_target_": "ostinato.families.jukebox.JukeboxPrior", **kw, "lora": lora}
    family = JukeboxPrior(**kw, lora=lora)
    family.model.window_frames.fill_(16)  # what setup reads from the data
    return family, cfg, _code_batch("top", None, 16)


class Seen(L.Callback):
    """The adapters a fit starts from (after a resume's restore)."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.adapters = {k: v.clone() for k, v in module.state_dict().items() if ".lora_" in k}


def fit(family: L.LightningModule, batch: Any, steps: int, ckpt: Path | None = None) -> Seen:
    from torch.utils.data import DataLoader

    seen = Seen()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[seen])
    loader = DataLoader([batch] * 8, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(family, loader, ckpt_path=None if ckpt is None else str(ckpt))
    family.trainer_ = trainer
    return seen


def adapted_from(make: Any, base_dir: Path, lora: dict) -> L.LightningModule:
    family, cfg, _ = make(lora)
    load_weights(family, base_dir)
    family.__dict__[CONFIG_KEY] = {"family": cfg, "continue_from": str(base_dir)}
    return family


@pytest.mark.parametrize("make", [semantic_stage, top_prior], ids=["musiclm_semantic", "jukebox_top"])
def test_a_stage_and_a_prior_train_save_resume_and_export_adapters(make, tmp_path) -> None:
    torch.manual_seed(0)
    base, base_cfg, batch = make(None)
    base_dir = tmp_path / "base"  # the pretrained model: an export
    base_dir.mkdir()
    save_file({k: v.contiguous() for k, v in base.model.state_dict().items()}, str(base_dir / "model.safetensors"))
    (base_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"family": base_cfg})))
    lora = {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "fc1"]}
    family = adapted_from(make, base_dir, lora)

    trainable = {n for n, p in family.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in family.named_parameters() if not p.requires_grad}
    layers = len(family.model.lm.layers)
    assert trainable == {n for n in trainable if ".lora_" in n} and len(trainable) == layers * 3 * 2
    family.losses(batch, train=True).mean().backward()
    assert all(p.grad is None for n, p in family.named_parameters() if n in frozen)
    assert all(p.grad.abs().sum() > 0 for n, p in family.named_parameters() if ".lora_B." in n)
    family.zero_grad()

    fit(family, batch, 3)
    assert all(torch.equal(p, frozen[n]) for n, p in family.named_parameters() if n in frozen)  # base untouched
    assert all(p.abs().sum() > 0 for n, p in family.named_parameters() if ".lora_B." in n)
    ckpt = tmp_path / "last.ckpt"
    family.trainer_.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    buffers = {n for n, _ in family.named_buffers() if n in family.state_dict()}
    assert set(state) == set(lora_keys(state)) | buffers and len(lora_keys(state)) == layers * 3 * 2
    assert sum(v.numel() for v in state.values()) < sum(p.numel() for p in frozen.values()) / 4

    resumed = adapted_from(make, base_dir, lora)  # what `ostinato train` does at a resume: base, then last.ckpt
    seen = fit(resumed, batch, 5, ckpt)
    assert resumed.trainer_.global_step == 5
    assert all(torch.equal(v, state[k]) for k, v in seen.adapters.items()) and len(seen.adapters) == len(trainable)

    tokens = torch.randint(0, family.model.lm.cfg.card, (2, family.model.lm.cfg.n_q, 12))
    with torch.no_grad():
        adapted = ostinato.load(ckpt)
        want = adapted.lm(tokens)
        merged = ostinato.load(export(ckpt, tmp_path / "merged"))
        assert not has_adapters(merged) and (merged.lm(tokens) - want).abs().max() <= 1e-5
        kept = ostinato.load(export(ckpt, tmp_path / "kept", lora="keep"))
        assert has_adapters(kept) and (kept.lm(tokens) - want).abs().max() <= 1e-6
        assert not torch.allclose(ostinato.load(base_dir).lm(tokens), want, atol=1e-4)
