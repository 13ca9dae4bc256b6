"""Whole-MusicGen import: T5 text conditioning, transformers and audiocraft checkpoints -> an export folder that
``ostinato.load`` and ``continue_from`` take (logit and greedy parity with transformers), and fine-tuning it."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

import ostinato
from ostinato.cli import main
from ostinato.engine.weights import load_weights
from ostinato.families.musicgen import ImportedMusicGenFamily
from ostinato.interop.codecs import load_codec
from ostinato.interop.musicgen_import import detect_source, import_musicgen
from ostinato.models.musicgen import MusicGen, Semantics
from ostinato.nn.conditioners import TextConditioner, default_text_model
from ostinato.nn.decoding import GenerationParams, generate
from ostinato.nn.patterns import DelayPattern
from ostinato.nn.transformer import generate_greedy
from tests.references import (
    audiocraft,
    audiocraft_export_lm,
    audiocraft_lm_cfg,
    copy_tokenizer,
    t5_config,
    use_local_t5,
)
from tests.runner import train
from tests.synth import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

K, CARD, DIM, T5_DIM, LAYERS, SR = 4, 64, 48, 32, 2, 16000
TEXTS = ["a baroque chorale for organ", "an irish reel on fiddle and flute at a fast tempo"]
BATCH = ["organ", *TEXTS]  # three token lengths: the shorter two are padded, which transformers masks






@pytest.fixture(scope="module")
def hf_musicgen(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random MusicgenForConditionalGeneration (T5 32 wide, EnCodec 16 kHz 4 x 64 at 50 Hz, decoder 48
    wide) saved with the MiniLM tokenizer files beside it, as a processor would."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    torch.manual_seed(0)
    codec = EncodecConfig(sampling_rate=SR, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2],
                          codebook_size=CARD, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                          target_bandwidths=[1.2], use_causal_conv=False, normalize=False)
    decoder = MusicgenDecoderConfig(num_codebooks=K, vocab_size=CARD, hidden_size=DIM, num_attention_heads=4,
                                    num_hidden_layers=LAYERS, ffn_dim=96, max_position_embeddings=256, dropout=0.0,
                                    pad_token_id=CARD, bos_token_id=CARD)
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5_config(), audio_encoder=codec,
                                                            decoder=decoder)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so that greedy decoding has no near-ties
        for head in model.decoder.lm_heads:
            head.weight.mul_(20)
    folder = tmp_path_factory.mktemp("hf_musicgen")
    model.save_pretrained(folder)
    copy_tokenizer(folder)
    return model, folder


@pytest.fixture(scope="module")
def imported(hf_musicgen, tmp_path_factory: pytest.TempPathFactory):
    _, folder = hf_musicgen
    out = tmp_path_factory.mktemp("imports") / "musicgen"
    return import_musicgen(folder, out)


def tokens(texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_text_model(), local_files_only=True)
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def codes_seq(b: int = 2, t: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq, _ = DelayPattern(K).build(torch.randint(0, CARD, (b, K, t), generator=g), CARD)
    return seq


def hf_logits(model, enc: dict[str, torch.Tensor], seq: torch.Tensor) -> torch.Tensor:
    b, k, s = seq.shape
    with torch.no_grad():
        out = model(**enc, decoder_input_ids=seq.reshape(b * k, s), use_cache=False)
    return out.logits.reshape(b, k, s, -1)


def hf_greedy(model, enc: dict[str, torch.Tensor], n_frames: int) -> torch.Tensor:
    """transformers' full model, argmax step by step without a cache, under the delay pattern."""
    pat = DelayPattern(K)
    b = enc["input_ids"].shape[0]
    valid = pat.valid_mask(n_frames)
    seq = torch.full((b, K, pat.max_steps(n_frames)), CARD)
    for s in range(seq.shape[-1] - 1):
        nxt = hf_logits(model, enc, seq[:, :, :s + 1])[:, :, -1].argmax(-1)
        seq[:, :, s + 1] = torch.where(valid[:, s + 1], nxt, CARD)
    return pat.revert(seq, n_frames)[0]


def assert_parity(family, model, texts: list[str] = TEXTS) -> None:
    """Logits (<= 1e-4) and greedy codes of ``family`` equal transformers' for the same (non-empty) texts."""
    enc = tokens(texts)
    seq = codes_seq(len(texts))
    with torch.no_grad():
        cond, mask = family.condition(texts)
        ours = family.lm(seq, cond, mask)
        ref = hf_logits(model, enc, seq)
        assert ours.shape == ref.shape == (len(texts), K, seq.shape[-1], CARD)
        assert (ours - ref).abs().max().item() <= 1e-4
        greedy, _ = generate_greedy(family.lm, family.pattern, 6, cond=cond, cond_mask=mask)
    ref_codes = hf_greedy(model, enc, 6)
    assert torch.equal(greedy, ref_codes) and len(torch.unique(greedy)) > 3


# -- text encoders --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["T5EncoderModel", "T5Model"])
def test_text_conditioner_takes_a_t5_encoder(tmp_path: Path, arch: str) -> None:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, arch)(t5_config()).eval()
    model.save_pretrained(tmp_path)
    copy_tokenizer(tmp_path)
    cond = TextConditioner(str(tmp_path), dim=24, max_length=16)
    assert type(cond.__dict__["encoder"]).__name__ == "T5EncoderModel"  # the encoder only, also of a T5Model
    texts = [*TEXTS, ""]
    out, mask = cond(texts)
    counts = [len(cond.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert out.shape == (3, min(max(counts), 16), 24) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [min(c, 16) for c in counts] + [0]
    assert bool((out[2] == 0).all()) and bool((out[0, counts[0]:] == 0).all())  # padding and the null text
    assert not torch.allclose(out[0, :3], out[1, :3])
    enc = {k: v[:, :16] for k, v in tokens(TEXTS).items()}
    with torch.no_grad():
        ref = model.get_encoder()(**enc).last_hidden_state
        proj = cond.proj(ref) * enc["attention_mask"][..., None]
    assert torch.allclose(out[:2], proj, atol=1e-6)
    assert set(cond.state_dict()) == {"proj.weight", "proj.bias"}


def test_text_conditioner_keeps_bert_models_whole() -> None:
    cond = TextConditioner(dim=8)
    assert type(cond.__dict__["encoder"]).__name__ == "BertModel"


# -- transformers MusicgenForConditionalGeneration -------------------------------------------------------------
def test_import_writes_an_export_folder(imported, hf_musicgen) -> None:
    _, src = hf_musicgen
    out = imported.out
    assert detect_source(src) == ("transformers-conditional", src)
    assert sorted(p.name for p in out.iterdir()) == ["codec", "config.yaml", "export.json", "model.safetensors",
                                                     "text_encoder"]
    assert not out.with_name(out.name + ".tmp").exists()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    family = cfg["family"]
    assert family["_target_"] == "ostinato.families.musicgen.MusicGenFamily" and cfg["optim"]["name"] == "adamw"
    assert (family["n_q"], family["card"], family["delays"]) == (K, CARD, [0, 1, 2, 3])
    assert "preset" not in family["lm"] and family["lm"]["dim"] == DIM and family["lm"]["cross_attention"] is True
    assert family["text"]["model"] == "text_encoder" and family["codec"] == "codec"  # relative: the folder travels
    weights = load_file(out / "model.safetensors")
    assert {k.split(".")[0] for k in weights} == {"lm", "text"}
    assert sorted(k for k in weights if k.startswith("text.")) == ["text.proj.bias", "text.proj.weight"]
    assert json.loads((out / "export.json").read_text())["kind"] == "transformers-conditional"
    text_cfg = json.loads((out / "text_encoder" / "config.json").read_text())
    assert text_cfg["architectures"] == ["T5EncoderModel"] and (out / "text_encoder" / "tokenizer.json").is_file()
    codec = load_codec(out / "codec")
    assert (codec.sample_rate, codec.n_q, codec.card, codec.frame_rate) == (SR, K, CARD, 50)


def test_imported_model_matches_transformers(imported, hf_musicgen) -> None:
    model, _ = hf_musicgen
    family = ostinato.load(imported.out)
    assert type(family) is MusicGen and family.codec_ref == str(imported.out / "codec")
    assert not isinstance(family, L.LightningModule)
    assert family.semantics == Semantics()  # transformers masks the padding and counts every frame, as ostinato
    assert_parity(family, model, BATCH)
    # the codec is transformers' audio encoder: the same codes
    wav = torch.sin(torch.arange(SR) / SR * 2 * torch.pi * 220.0)[None, None] * 0.5
    with torch.no_grad():
        ref = model.audio_encoder.encode(wav, bandwidth=1.2).audio_codes[0]
        ours = load_codec(imported.out / "codec").encode(wav).codes
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_generation_matches_transformers_for_a_batch(imported, hf_musicgen, cfg: float) -> None:
    """transformers' ``generate`` (its CFG: zero states, all-masked) and ``MusicGen.generate`` give the same audio
    for prompts of different lengths."""
    model, _ = hf_musicgen
    family = ostinato.load(imported.out)
    params = GenerationParams(temperature=0.0, cfg_scale=cfg)
    with torch.no_grad():
        want = model.generate(**tokens(BATCH), do_sample=False, guidance_scale=cfg, max_new_tokens=12)
        wav = family.generate(BATCH, want.shape[-1] / SR, params=params)
        assert wav.shape == want.shape and (wav - want).abs().max().item() <= 1e-5
        cond, mask = family.condition(BATCH)
        codes = generate(family.lm, family.pattern, want.shape[-1] // 320, cond=cond, cond_mask=mask, params=params)
    assert len(torch.unique(codes)) > 8  # tokens far from constant: the audio comparison means something


def test_a_moved_import_finds_its_codec_and_text_encoder(imported, hf_musicgen, tmp_path: Path) -> None:
    model, _ = hf_musicgen
    moved = tmp_path / "moved"
    shutil.copytree(imported.out, moved)
    loaded = ostinato.load(moved)
    assert loaded.codec_ref == str(moved / "codec") and loaded.text.model_path == str(moved / "text_encoder")
    assert_parity(loaded, model)


def test_import_cli_refuses_and_overwrites(hf_musicgen, tmp_path: Path, capsys) -> None:
    _, src = hf_musicgen
    bare = tmp_path / "bare"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab.txt"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(bare), str(out)])
    assert exit_info.value.code == 2 and "--tokenizer FOLDER" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    main(["import", str(bare), str(out), "--tokenizer", str(default_text_model())])
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and f"family.export={out.resolve()}" in printed
    assert f"continue_from={out.resolve()}" in printed and "ostinato tokenize" in printed
    with pytest.raises(SystemExit):
        main(["import", str(bare), str(out), "--tokenizer", str(default_text_model())])
    assert "--overwrite" in capsys.readouterr().err
    main(["import", str(src), str(out), "--overwrite"])
    assert (out / "text_encoder" / "vocab.txt").is_file() and not (tmp_path / "out.old").exists()


def test_import_causal_lm_keeps_cross_attention(hf_musicgen, imported, tmp_path: Path) -> None:
    model, _ = hf_musicgen
    model.decoder.save_pretrained(tmp_path / "decoder")
    out = import_musicgen(tmp_path / "decoder", tmp_path / "out", codec=str(imported.out / "codec"))
    assert out.kind == "transformers-causal" and out.family["text"] is None
    assert out.family["lm"]["cross_attention"] is True and out.family["codec"] == str(tmp_path / "out" / "codec")
    family = ostinato.load(tmp_path / "out")
    assert family.text is None and family.lm.layers[0].cross_attn is not None
    seq = codes_seq()
    with torch.no_grad():
        ref = model.decoder(input_ids=seq.reshape(-1, seq.shape[-1])).logits.reshape(*seq.shape, CARD)
        assert (family.lm(seq) - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="--text-encoder is for audiocraft"):
        import_musicgen(tmp_path / "decoder", tmp_path / "out2", text_encoder=str(tmp_path))


# -- audiocraft state_dict.bin --------------------------------------------------------------------------------
def audiocraft_lm(monkeypatch: pytest.MonkeyPatch, t5: Path, out: Path, **lm) -> torch.nn.Module:
    """audiocraft's own text LM (``builders.get_lm_model``, sizes of the transformers fixture) exported by its own
    ``export_lm`` as ``out`` (a state_dict.bin)."""
    audiocraft()
    from audiocraft.models import builders

    torch.manual_seed(0)
    cfg = audiocraft_lm_cfg("text", n_q=K, card=CARD, dim=DIM, num_heads=4, num_layers=LAYERS, hidden_scale=2,
                            sample_rate=SR, **lm)
    use_local_t5(monkeypatch, t5)
    model = builders.get_lm_model(cfg).eval()
    audiocraft_export_lm(model, cfg, out)
    return model


def audiocraft_checkpoint(hf_musicgen, folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module,
                                                                                                 Path, Path]:
    """(audiocraft LM, t5 folder, EnCodec folder): ``folder/state_dict.bin`` by audiocraft's exporter, beside the
    transformers fixture's T5 and EnCodec saved as folders (what ``--text-encoder`` / ``--codec`` take)."""
    model, _ = hf_musicgen
    t5, encodec = folder / "t5", folder / "encodec"
    model.text_encoder.save_pretrained(t5)
    copy_tokenizer(t5)
    model.audio_encoder.save_pretrained(encodec)
    return audiocraft_lm(monkeypatch, t5, folder / "state_dict.bin"), t5, encodec


def test_import_audiocraft_state_dict(hf_musicgen, tmp_path: Path, capsys, monkeypatch) -> None:
    lm, t5, encodec = audiocraft_checkpoint(hf_musicgen, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="--text-encoder FOLDER"):
        import_musicgen(tmp_path / "state_dict.bin", tmp_path / "out")
    main(["import", str(tmp_path), str(tmp_path / "out"), "--text-encoder", str(t5), "--codec", str(encodec)])
    assert "audiocraft" in capsys.readouterr().out
    family = ostinato.load(tmp_path / "out")
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["family"]
    assert recorded["cfg_dropout"] == 0.3 and family.pattern.delays == [0, 1, 2, 3]  # training's, in the config
    assert recorded["semantics"] == {"text_padding": "attended", "loss_frames": "trim_delays"}
    from audiocraft.modules.conditioners import ConditioningAttributes

    codes = torch.randint(0, CARD, (len(TEXTS), K, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the full parity (sizes, greedy, CFG, loss) is tests/test_audiocraft_parity.py
        attrs = [ConditioningAttributes(text={"description": t}) for t in TEXTS]
        ref = lm.compute_predictions(codes, [], lm.condition_provider(lm.condition_provider.tokenize(attrs)))
        seq, _ = family.pattern.build(codes, CARD)
        ours, _ = family.pattern.revert(family.lm(seq[:, :, :-1], *family.condition(TEXTS)), 6, shift=1)
    assert (ours - ref.logits)[ref.mask].abs().max().item() <= 1e-4

    # an OmegaConf object as xp.cfg (older releases) is pickled Python: only with --trust
    package = torch.load(tmp_path / "state_dict.bin", weights_only=True)
    torch.save({**package, "xp.cfg": OmegaConf.create(package["xp.cfg"])}, tmp_path / "pickled.bin")
    with pytest.raises(ValueError, match="--trust"):
        import_musicgen(tmp_path / "pickled.bin", tmp_path / "out2", text_encoder=t5, codec=str(encodec))
    import_musicgen(tmp_path / "pickled.bin", tmp_path / "out2", text_encoder=t5, codec=str(encodec), trust=True)
    assert torch.equal(load_file(tmp_path / "out2" / "model.safetensors")["lm.heads.0.weight"],
                       lm.linears[0].weight)
    audiocraft_lm(monkeypatch, t5, tmp_path / "bad.bin", layer_scale=1e-4)
    with pytest.raises(ValueError, match=r"transformer_lm\.layer_scale"):
        import_musicgen(tmp_path / "bad.bin", tmp_path / "out3", text_encoder=t5, codec=str(encodec))


# -- fine-tuning an import ------------------------------------------------------------------------------------
def test_finetune_an_import_with_continue_from(imported, env, tmp_path: Path) -> None:
    out = imported.out
    for split, n in (("train", 8), ("valid", 4)):
        write_shards(tmp_path / "audio" / split, n_shards=1, per_shard=n, sample_rate=SR)
        main(["tokenize", str(tmp_path / "audio" / split), str(tmp_path / "tokens" / split), "--codec",
              str(out / "codec"), "--device", "cpu", "--workers", "1"])
    run_env = {**env, "OSTINATO_OUTPUTS": str(tmp_path / "xps"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = ["family=musicgen_import", f"family.export={out}", f"continue_from={out}", "data=demo_tokens",
           f"data.train={tmp_path / 'tokens' / 'train'}", f"data.valid={tmp_path / 'tokens' / 'valid'}",
           "data.test=null", "trainer.max_steps=4", "trainer.checkpoint_every_steps=4",
           "trainer.limit_val_batches=1", "family.cfg_dropout=0.5", "ema.decay=0.5"]
    proc = train(run_env, *run)
    folder = Path(re.search(r"XP \w+ in (\S+)", proc.stderr)[1])
    log = (folder / "train.log").read_text()
    imported_weights = load_file(out / "model.safetensors")
    loaded = re.search(r"continue_from: (\d+) tensors loaded from (\S+)(.*)", log)
    assert int(loaded[1]) == len(imported_weights) and loaded[2] == str(out / "model.safetensors")
    assert loaded[3].strip() == ""  # nothing missing, unexpected or mismatched
    report = load_weights(ImportedMusicGenFamily(export=str(out)), out)
    assert not (report.missing or report.unexpected or report.mismatched)
    assert len(report.loaded) == len(imported_weights)

    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["ostinato_config"]["family"]["cfg_dropout"] == 0.5
    state = ckpt["state_dict"]  # the wrapper's: the model under model.
    assert set(state) == {f"model.{k}" for k in imported_weights}
    changed = [k for k, v in imported_weights.items() if not torch.equal(state[f"model.{k}"], v)]
    assert "text.proj.weight" in changed and any(k.startswith("lm.layers.") for k in changed)
    tuned = ostinato.load(folder)
    assert type(tuned) is MusicGen and tuned.text.model_path == str(out / "text_encoder")
    with torch.no_grad():
        cond, mask = tuned.condition(TEXTS)
        assert torch.isfinite(tuned.lm(codes_seq(), cond, mask)).all()
