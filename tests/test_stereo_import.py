"""Stereo MusicGens (small / medium / large) from audiocraft and transformers: the references are built from the
packages themselves with random weights and non-default sizes, imported with ``ostinato import``, and compared on a
batch of prompts of different lengths (fp32 logits, greedy tokens at CFG 1 and 3, decoded stereo audio)."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ostinato
from ostinato.cli import main
from ostinato.engine.weights import load_weights, stereo_from_mono
from ostinato.errors import UserError
from ostinato.families.musicgen import ImportedMusicGenFamily, MusicGenFamily
from ostinato.interop.codecs import load_codec
from ostinato.interop.musicgen_import import import_musicgen
from ostinato.models.musicgen import MusicGen
from ostinato.models.stereo_codec import InterleavedStereoCodec
from ostinato.nn.conditioners import default_text_model
from ostinato.nn.decoding import GenerationParams, generate
from ostinato.nn.patterns import interleave_stereo
from tests.references import (
    audiocraft,
    audiocraft_encodec_cfg,
    audiocraft_export_compression,
    audiocraft_export_lm,
    audiocraft_lm_cfg,
    copy_tokenizer,
    t5_config,
    use_local_t5,
    write_t5,
)
from tests.runner import train
from tests.synth import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")


K_MONO, CARD, SR, T5_DIM = 4, 64, 16000, 32
K = 2 * K_MONO
STEREO_DELAYS = [0, 0, 1, 1, 2, 2, 3, 3]
TEXTS = ["organ", "an irish reel on fiddle and flute", "a slow blues with a muted trumpet and brushed drums"]
# two sizes standing for small / medium / large (heads, layers and widths differ; none is a default)
SIZES = {"narrow": dict(dim=48, num_heads=4, num_layers=2), "wide": dict(dim=64, num_heads=8, num_layers=3)}






@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def ac_encodec(tmp_path_factory: pytest.TempPathFactory):
    """audiocraft's mono EnCodec (16 kHz, 4 x 64 codes at 50 Hz) from its builders, exported with its exporter."""
    builders = audiocraft().models.builders
    torch.manual_seed(1)
    cfg = audiocraft_encodec_cfg(sample_rate=SR, n_q=K_MONO, bins=CARD, dimension=16, n_filters=4, lstm=1)
    model = builders.get_compression_model(cfg).eval()
    path = audiocraft_export_compression(model, cfg, tmp_path_factory.mktemp("ac_encodec") /
                                         "compression_state_dict.bin")
    return model, path


@pytest.fixture(scope="module", params=sorted(SIZES))
def ac_stereo(request, t5, ac_encodec, tmp_path_factory: pytest.TempPathFactory):
    """audiocraft's stereo LM (8 interleaved codebooks, delays [0, 0, 1, 1, 2, 2, 3, 3]) exported with its mono
    compression model beside it, as the released stereo MusicGens are, and imported."""
    ac = audiocraft()
    torch.manual_seed(2)
    cfg = audiocraft_lm_cfg("text", n_q=K, card=CARD, channels=2, delays=STEREO_DELAYS, sample_rate=SR,
                            hidden_scale=2, **SIZES[request.param])
    with pytest.MonkeyPatch.context() as mp:
        use_local_t5(mp, t5)
        lm = ac.models.builders.get_lm_model(cfg).eval()
    with torch.no_grad():  # sharper heads than the init: greedy decoding without near-ties
        for linear in lm.linears:
            linear.weight.mul_(20)
    folder = tmp_path_factory.mktemp(f"ac_stereo_{request.param}")
    audiocraft_export_lm(lm, cfg, folder / "state_dict.bin")
    shutil.copy2(ac_encodec[1], folder / "compression_state_dict.bin")
    compression = ac.models.builders.get_wrapped_compression_model(ac_encodec[0], cfg)
    out = import_musicgen(folder, folder.parent / f"{folder.name}_import", text_encoder=t5)
    return lm, compression, out


def ac_conditions(texts: list[str]):
    from audiocraft.modules.conditioners import ConditioningAttributes

    return [ConditioningAttributes(text={"description": t}) for t in texts]


def greedy(model: MusicGen, texts: list[str], frames: int, cfg: float) -> torch.Tensor:
    cond, mask = model.condition(texts)
    params = GenerationParams(temperature=0.0, cfg_scale=cfg, backend="cache")
    return generate(model.lm, model.pattern, frames, cond=cond, cond_mask=mask, params=params)


# -- audiocraft -----------------------------------------------------------------------------------------------
def test_audiocraft_stereo_imports_with_logit_and_greedy_parity(ac_stereo) -> None:
    lm, _, out = ac_stereo
    model = ostinato.load(out.out)
    assert model.pattern.delays == STEREO_DELAYS and (model.n_q, model.card) == (K, CARD)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, CARD, (len(TEXTS), K, 7), generator=g)
    seq, _, _ = lm.pattern_provider.get_pattern(7).build_pattern_sequence(codes, lm.special_token_id)
    ours_seq, _ = model.pattern.build(codes, CARD)
    assert torch.equal(seq, ours_seq)  # the same interleaving and delays
    with torch.no_grad():
        ref = lm(seq, ac_conditions(TEXTS))
        cond, mask = model.condition(TEXTS)
        logits = model.lm(seq, cond, mask)
    assert logits.shape == ref.shape == (len(TEXTS), K, seq.shape[-1], CARD)
    assert (logits - ref).abs().max().item() <= 1e-4
    for cfg in (1.0, 3.0):
        with torch.no_grad():
            want = lm.generate(conditions=ac_conditions(TEXTS), max_gen_len=8, use_sampling=False, cfg_coef=cfg)
        got = greedy(model, TEXTS, 8, cfg)
        assert torch.equal(got, want) and len(torch.unique(got)) > 8, cfg


def test_audiocraft_stereo_training_loss_matches_audiocraft(ac_stereo) -> None:
    """audiocraft's solver loss per codebook over the stereo delays (the last delays[k] frames of codebook k and
    each item's padding are no targets), as fine-tuning the import computes it."""
    from audiocraft.solvers.musicgen import MusicGenSolver

    lm, _, out = ac_stereo
    family = ImportedMusicGenFamily(export=str(out.out)).eval()
    load_weights(family, out.out)
    codes = torch.randint(0, CARD, (len(TEXTS), K, 9), generator=torch.Generator().manual_seed(11))
    lengths = torch.tensor([9, 7, 3])
    padding = torch.arange(9)[None, None, :] < lengths[:, None, None]
    with torch.no_grad():
        tensors = lm.condition_provider(lm.condition_provider.tokenize(ac_conditions(TEXTS)))
        pred = lm.compute_predictions(codes, [], tensors)
        _, ref = MusicGenSolver._compute_cross_entropy(None, pred.logits, codes, padding & pred.mask)
        ours, count = family.compute_losses(codes, lengths, *family.model.condition(TEXTS))
    assert count.tolist() == (padding & pred.mask).sum(dim=(0, 2)).tolist()
    assert (ours - torch.stack(ref)).abs().max().item() <= 1e-5


def test_audiocraft_stereo_codec_decodes_like_audiocraft(ac_stereo) -> None:
    _, compression, out = ac_stereo
    assert type(compression).__name__ == "InterleaveStereoCompressionModel"
    assert "codec/             the codec (stereo: its mono codec on each channel)" in out.summary()
    codec = load_codec(out.out / "codec")
    assert isinstance(codec, InterleavedStereoCodec)
    assert (codec.channels, codec.n_q, codec.card, codec.sample_rate) == (2, K, CARD, SR)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, CARD, (2, K, 10), generator=g)
    wav = torch.randn(2, 2, SR // 5, generator=g) * 0.3
    with torch.no_grad():
        ref = compression.decode(codes)
        ours = codec.decode(codes)
        ref_codes, _ = compression.encode(wav)
        ours_codes = codec.encode(wav).codes
    assert ours.shape == ref.shape == (2, 2, 10 * codec.hop_length)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.equal(ours_codes, ref_codes)
    # the model decodes its stereo codes to stereo audio [B, 2, T]
    model = ostinato.load(out.out)
    wav = model.generate(TEXTS[:2], duration=0.1, params=GenerationParams(temperature=0.0, cfg_scale=3.0))
    assert wav.shape == (2, 2, SR // 10)


def one_line_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The CLI's error line (exit 2); transformers' loading bars may come before it, never another error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if "ostinato" in line or "Error" in line]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("ostinato: error: "), lines
    return lines[0]


def test_stereo_faults_are_one_line(ac_stereo, t5, tmp_path: Path, capsys) -> None:
    from omegaconf import OmegaConf

    _, _, out = ac_stereo
    package = torch.load(out.source, weights_only=True)
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.interleave_stereo_codebooks.per_timestep = True
    torch.save({**package, "xp.cfg": OmegaConf.to_yaml(cfg)}, tmp_path / "state_dict.bin")
    err = one_line_error(capsys, "import", str(tmp_path / "state_dict.bin"), str(tmp_path / "out"),
                         "--text-encoder", str(t5), "--codec", str(out.out / "codec"))
    assert "interleave_stereo_codebooks.per_timestep=true is not supported" in err
    # the released checkpoints' compression_state_dict.bin names its EnCodec only (audiocraft's own exporter)
    from audiocraft.utils.export import export_pretrained_compression_model

    shutil.copy2(out.source, tmp_path / "state_dict.bin")
    export_pretrained_compression_model("facebook/encodec_32khz", tmp_path / "compression_state_dict.bin")
    err = one_line_error(capsys, "import", str(tmp_path / "state_dict.bin"), str(tmp_path / "out"),
                         "--text-encoder", str(t5))
    assert "only references the pretrained model 'facebook/encodec_32khz'" in err and "--codec FOLDER" in err
    assert f"error: {tmp_path / 'compression_state_dict.bin'} only" in err
    main(["import", str(tmp_path / "state_dict.bin"), str(tmp_path / "out"), "--text-encoder", str(t5), "--codec",
          str(Path(out.source).with_name("compression_state_dict.bin"))])
    assert isinstance(ostinato.load(tmp_path / "out").codec, InterleavedStereoCodec)
    # a stereo codec is no mono codec to make stereo
    err = one_line_error(capsys, "bundle", "stereo-codec", str(out.out / "codec"), str(tmp_path / "twice"))
    assert "a 2-channel codec; an interleaved stereo codec wraps a mono one" in err
    assert not (tmp_path / "twice").exists()


# -- transformers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(SIZES))
def hf_stereo(request, tmp_path_factory: pytest.TempPathFactory):
    """A transformers stereo MusicgenForConditionalGeneration (audio_channels 2, 8 decoder codebooks over a mono
    4-codebook EnCodec), saved with its tokenizer, and imported."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    size = SIZES[request.param]
    torch.manual_seed(5)
    codec = EncodecConfig(sampling_rate=SR, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2],
                          codebook_size=CARD, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                          target_bandwidths=[1.2], use_causal_conv=False, normalize=False)
    decoder = MusicgenDecoderConfig(num_codebooks=K, audio_channels=2, vocab_size=CARD, hidden_size=size["dim"],
                                    num_attention_heads=size["num_heads"], num_hidden_layers=size["num_layers"],
                                    ffn_dim=2 * size["dim"], max_position_embeddings=256, dropout=0.0,
                                    pad_token_id=CARD, bos_token_id=CARD)
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5_config(), audio_encoder=codec,
                                                            decoder=decoder)).eval()
    model.generation_config.pad_token_id = model.generation_config.decoder_start_token_id = CARD
    with torch.no_grad():
        for head in model.decoder.lm_heads:
            head.weight.mul_(20)
    folder = tmp_path_factory.mktemp(f"hf_stereo_{request.param}")
    model.save_pretrained(folder)
    copy_tokenizer(folder)
    return model, import_musicgen(folder, folder.parent / f"{folder.name}_import")


def hf_tokens(texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(default_text_model(), local_files_only=True)(texts, padding=True,
                                                                                      return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_transformers_stereo_imports_with_logit_and_generation_parity(hf_stereo) -> None:
    hf, out = hf_stereo
    model = ostinato.load(out.out)
    assert model.pattern.delays == STEREO_DELAYS and out.family["codec"] == str(out.out / "codec")
    codec = model.codec
    assert isinstance(codec, InterleavedStereoCodec) and codec.n_q == K
    g = torch.Generator().manual_seed(6)
    seq, _ = model.pattern.build(torch.randint(0, CARD, (len(TEXTS), K, 7), generator=g), CARD)
    enc = hf_tokens(TEXTS)
    with torch.no_grad():
        b, k, s = seq.shape
        ref = hf(**enc, decoder_input_ids=seq.reshape(b * k, s), use_cache=False).logits.reshape(b, k, s, -1)
        cond, mask = model.condition(TEXTS)
        logits = model.lm(seq, cond, mask)
    assert (logits - ref).abs().max().item() <= 1e-4
    for cfg in (1.0, 3.0):
        want_codes, want = hf_greedy(hf, enc, cfg, 12)
        assert want.shape[:2] == (len(TEXTS), 2) and want_codes.shape[:2] == (len(TEXTS), K)
        codes = greedy(model, TEXTS, want_codes.shape[-1], cfg)
        assert torch.equal(codes, want_codes) and len(torch.unique(codes)) > 8, cfg
        with torch.no_grad():  # transformers' generate decodes each channel with its mono EnCodec: so does ours
            wav = codec.decode(codes)
        assert wav.shape == want.shape and (wav - want).abs().max().item() <= 1e-5, cfg


def hf_greedy(hf, enc: dict[str, torch.Tensor], cfg: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy ``generate`` at guidance ``cfg``: (codes ``[B, K, T]``, stereo audio ``[B, 2, T']``).
    Its audio is what it returns; its codes are the argmax of the guided scores of every step, under its own delay
    pattern mask (``build_delay_pattern_mask`` / ``apply_delay_pattern_mask``)."""
    with torch.no_grad():
        out = hf.generate(**enc, do_sample=False, guidance_scale=cfg, max_new_tokens=steps, output_scores=True,
                          return_dict_in_generate=True)
    ids = torch.stack(out.scores, dim=1).argmax(-1)  # [B * K, steps]
    ids = torch.cat([torch.full((ids.shape[0], 1), CARD), ids], dim=1)
    _, mask = hf.decoder.build_delay_pattern_mask(ids[:, :1], pad_token_id=CARD, max_length=ids.shape[1])
    ids = hf.decoder.apply_delay_pattern_mask(ids, mask)
    return ids[ids != CARD].reshape(enc["input_ids"].shape[0], K, -1), out.sequences


# -- mono -> stereo -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_mono(tmp_path_factory: pytest.TempPathFactory):
    """A transformers mono MusicGen (4 codebooks over the same kind of EnCodec), imported: what stereo starts from."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    torch.manual_seed(7)
    codec = EncodecConfig(sampling_rate=SR, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2],
                          codebook_size=CARD, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                          target_bandwidths=[1.2], use_causal_conv=False, normalize=False)
    decoder = MusicgenDecoderConfig(num_codebooks=K_MONO, vocab_size=CARD, hidden_size=48, num_attention_heads=4,
                                    num_hidden_layers=2, ffn_dim=96, max_position_embeddings=256, dropout=0.0,
                                    pad_token_id=CARD, bos_token_id=CARD)
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5_config(), audio_encoder=codec,
                                                            decoder=decoder)).eval()
    folder = tmp_path_factory.mktemp("hf_mono")
    model.save_pretrained(folder)
    copy_tokenizer(folder)
    return import_musicgen(folder, folder.parent / "hf_mono_import").out


def test_stereo_from_mono_starts_as_the_mono_model_on_each_channel(hf_mono, hf_stereo) -> None:
    """Right after the conversion, identical L/R codes give on each channel the mono model's logits: L and R of
    codebook k start from mono codebook k (heads copied, embeddings halved: their sum is the mono input)."""
    mono = ostinato.load(hf_mono)
    family = ImportedMusicGenFamily(export=str(hf_mono), stereo_from_mono=True)
    stereo = family.model
    assert (stereo.n_q, stereo.pattern.delays, stereo.codec_ref) == (K, STEREO_DELAYS, None)
    report = load_weights(family, hf_mono)
    assert not (report.missing or report.unexpected or report.mismatched)
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, CARD, (len(TEXTS), K_MONO, 7), generator=g)
    mono_seq, _ = mono.pattern.build(codes, CARD)
    stereo_seq, _ = stereo.pattern.build(interleave_stereo(codes, codes), CARD)
    with torch.no_grad():
        cond, mask = mono.condition(TEXTS)
        want = mono.lm(mono_seq, cond, mask)
        got = stereo.lm(stereo_seq, *stereo.condition(TEXTS))
    assert got.shape == (len(TEXTS), K, mono_seq.shape[-1], CARD)
    for channel in (0, 1):
        assert (got[:, channel::2] - want).abs().max().item() <= 1e-4
    # a continue_from that is no mono version of this model is refused in one line
    with pytest.raises(UserError, match=r"stereo_from_mono needs a mono MusicGen with 4 codebooks .* it has 8"):
        load_weights(family, hf_stereo[1].out)


def test_stereo_from_mono_of_an_ostinato_musicgen() -> None:
    """An ostinato MusicGen (``+family.stereo_from_mono=true``, n_q from the stereo token shards): stereo delays by
    default, and its mono checkpoint's weights give each channel the mono logits for identical L/R codes."""
    lm = dict(dim=32, num_heads=4, num_layers=2, ffn_dim=64, dropout=0.0)
    torch.manual_seed(9)
    mono = MusicGenFamily(n_q=K_MONO, card=CARD, lm=lm, text=None)
    stereo = MusicGenFamily(n_q=K, card=CARD, lm=lm, text=None, stereo_from_mono=True)
    assert stereo.model.pattern.delays == STEREO_DELAYS
    stereo.load_state_dict(stereo_from_mono(mono.state_dict(), stereo.state_dict(), "mono.ckpt"), strict=True)
    codes = torch.randint(0, CARD, (2, K_MONO, 5), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = mono.model.lm(mono.model.pattern.build(codes, CARD)[0])
        got = stereo.model.lm(stereo.model.pattern.build(interleave_stereo(codes, codes), CARD)[0])
    assert (got[:, 0::2] - want).abs().max().item() <= 1e-4 and (got[:, 1::2] - want).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match=r"family.stereo_from_mono: n_q=7 must be even"):
        MusicGenFamily(n_q=7, card=CARD, lm=lm, text=None, stereo_from_mono=True)


def test_stereo_from_mono_fine_tunes_on_stereo_tokens(hf_mono, env, tmp_path: Path) -> None:
    stereo_codec = tmp_path / "stereo_codec"
    main(["bundle", "stereo-codec", str(hf_mono / "codec"), str(stereo_codec)])
    for split, n in (("train", 8), ("valid", 4)):
        write_shards(tmp_path / "audio" / split, n_shards=1, per_shard=n, sample_rate=SR, channels=2)
        main(["tokenize", str(tmp_path / "audio" / split), str(tmp_path / "tokens" / split), "--codec",
              str(stereo_codec), "--device", "cpu", "--workers", "1"])
    manifest = json.loads((tmp_path / "tokens" / "train" / "manifest.json").read_text())
    assert (manifest["codec"]["n_q"], manifest["codec"]["channels"]) == (K, 2)
    run_env = {**env, "OSTINATO_OUTPUTS": str(tmp_path / "xps"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = train(run_env, "family=musicgen_import", f"family.export={hf_mono}", "family.stereo_from_mono=true",
                 f"continue_from={hf_mono}", "data=demo_tokens", f"data.train={tmp_path / 'tokens' / 'train'}",
                 f"data.valid={tmp_path / 'tokens' / 'valid'}", "data.test=null", "trainer.max_steps=8",
                 "trainer.checkpoint_every_steps=8", "trainer.limit_val_batches=1", "family.cfg_dropout=0.0")
    folder = Path(re.search(r"XP \w+ in (\S+)", proc.stderr)[1])
    loaded = re.search(r"continue_from: (\d+) tensors loaded from \S+(.*)", (folder / "train.log").read_text())
    assert int(loaded[1]) == len(load_file(hf_mono / "model.safetensors")) + 2 * K_MONO  # + the R emb and heads
    assert loaded[2].strip() == ""  # nothing missing, unexpected or mismatched
    with open(folder / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    tuned = ostinato.load(folder)
    assert tuned.n_q == K and isinstance(tuned.codec, InterleavedStereoCodec)
    wav = tuned.generate(TEXTS[:2], duration=0.1, params=GenerationParams(temperature=0.0, cfg_scale=3.0))
    assert wav.shape == (2, 2, SR // 10)
