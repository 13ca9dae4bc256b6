"""`ostinato export --format audiocraft|transformers`: a MusicGen imported from the reference package, fine-tuned a
few steps with ostinato, written back in the package's files; the package itself loads them and gives the
fine-tuned model's logits for a batch of prompts of different lengths, and importing the export gives the same
tensors again."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import ostinato
from ostinato.cli import main
from ostinato.engine.weights import load_weights
from ostinato.errors import UserError
from ostinato.families.musicgen import ImportedMusicGenFamily
from ostinato.interop.codecs import load_codec
from ostinato.interop.musicgen_export import export_musicgen
from ostinato.interop.musicgen_import import import_musicgen
from ostinato.models.musicgen import MusicGen, exported_family
from ostinato.nn.conditioners import default_text_model
from ostinato.nn.decoding import GenerationParams, generate
from ostinato.nn.lora import has_adapters
from ostinato.nn.patterns import DelayPattern
from tests.references import audiocraft_export_lm, audiocraft_lm_cfg, copy_tokenizer, t5_config, use_local_t5
from tests.synth import tune

pytestmark = pytest.mark.usefixtures("one_thread")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

K, CARD, DIM, T5_DIM, SR = 4, 64, 48, 32, 16000  # K: the mono codec's codebooks; a stereo LM models 2K
STEREO_DELAYS = [0, 0, 1, 1, 2, 2, 3, 3]
IMPORTED_TARGET = "ostinato.families.musicgen.ImportedMusicGenFamily"  # family=musicgen_import
TEXTS = ["a baroque chorale for organ", "an irish reel on fiddle and flute at a fast tempo", "drums"]






def encodec_config():
    from transformers import EncodecConfig

    return EncodecConfig(sampling_rate=SR, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2],
                         codebook_size=CARD, hidden_size=16, codebook_dim=16, num_lstm_layers=1,
                         target_bandwidths=[1.2], use_causal_conv=False, normalize=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 encoder folder (with the MiniLM tokenizer) and a tiny transformers EnCodec (16 kHz, 4 x 64)."""
    from transformers import EncodecModel, T5EncoderModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sources")
    T5EncoderModel(t5_config()).save_pretrained(root / "t5")
    copy_tokenizer(root / "t5")
    EncodecModel(encodec_config()).save_pretrained(root / "encodec")
    return root


@pytest.fixture(scope="module")
def local_t5(sources: Path):
    """audiocraft's T5Conditioner("t5-base") loads the tiny T5 for the whole module."""
    patch = pytest.MonkeyPatch()
    use_local_t5(patch, sources / "t5")
    yield
    patch.undo()


def sharpen(heads) -> None:
    with torch.no_grad():  # sharper logits than the 0.02 init, so that greedy decoding has no near-ties
        for head in heads:
            head.weight.mul_(20)


def finetune(export: Path, out: Path, **family) -> Path:
    """Four AdamW steps of ``ImportedMusicGenFamily``'s loss on random codes from the import ``export`` (``family``
    overrides, e.g. ``lora``) -> a checkpoint in `ostinato train family=musicgen_import`'s layout (wrapper state
    under ``model.``, with LoRA the adapters alone; the config under ``ostinato_config``, null = the import's)."""
    kwargs = {"export": str(export), "lm": {"dropout": None}, "text": {"max_length": None}, "delays": None,
              "cfg_dropout": None, "attribute_dropout": None, "codec": None, "lora": None, **family}
    wrapper = ImportedMusicGenFamily(**kwargs)
    report = load_weights(wrapper, export)
    assert not (report.missing or report.unexpected or report.mismatched)
    wrapper.train()
    lr = 1e-2 if wrapper.lora is not None else 1e-3  # adapters start at zero: a larger step shows in the logits
    opt = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        codes = torch.randint(0, CARD, (3, wrapper.n_q, 10), generator=g)
        cond, mask = wrapper.model.condition(TEXTS)
        prefix = None if wrapper.model.melody is None else melody_prefix(wrapper.model)
        ce, _ = wrapper.compute_losses(codes, torch.tensor([10, 8, 6]), cond, mask, prefix)
        opt.zero_grad()
        ce.mean().backward()
        opt.step()
    ckpt = out / "tuned.ckpt"
    torch.save({"state_dict": wrapper.checkpoint_state(wrapper.state_dict()), "global_step": 4,
                "ostinato_config": {"family": {"_target_": IMPORTED_TARGET, **kwargs}, "continue_from": str(export)}},
               ckpt)
    return ckpt


def codes_seq(pattern: DelayPattern, b: int = 3, t: int = 7, seed: int = 1) -> torch.Tensor:
    """``[b, K, S]``: random codes under ``pattern`` (special token = ``CARD``)."""
    g = torch.Generator().manual_seed(seed)
    seq, _ = pattern.build(torch.randint(0, CARD, (b, pattern.n_q, t), generator=g), CARD)
    return seq


def mono(model: MusicGen):
    """The mono codec both formats store (a stereo MusicGen runs it on each channel)."""
    codec = model.codec
    return getattr(codec, "mono", codec)


def ours(model: MusicGen, seq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        cond, mask = model.condition(TEXTS)
        return model.lm(seq, cond, mask)


def greedy(model: MusicGen, frames: int, cfg: float) -> torch.Tensor:
    """``[B, K, frames]``: ostinato's greedy decoding of ``TEXTS`` at CFG ``cfg``."""
    cond, mask = model.condition(TEXTS)
    params = GenerationParams(temperature=0.0, cfg_scale=cfg, backend="cache")
    return generate(model.lm, model.pattern, frames, cond=cond, cond_mask=mask, params=params)


def assert_changed(tuned: MusicGen, export: Path, *also: str) -> None:
    """Fine-tuning changed the LM, the text projection and ``also``."""
    before = load_file(export / "model.safetensors")
    after = tuned.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert {"text.proj.weight", *also} <= set(changed) and any(k.startswith("lm.layers.") for k in changed)


def assert_same_tensors(a: Path, tuned: MusicGen) -> None:
    """The import ``a`` of an export holds the fine-tuned model's tensors, its codec and text encoder."""
    again = ostinato.load(a)
    mine, theirs = tuned.state_dict(), again.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert again.pattern.delays == tuned.pattern.delays
    codec_a, codec_b = load_codec(tuned.codec_ref), load_codec(again.codec_ref)
    assert all(torch.equal(v, codec_b.state_dict()[k]) for k, v in codec_a.state_dict().items())
    enc_a, enc_b = tuned.text.__dict__["encoder"].state_dict(), again.text.__dict__["encoder"].state_dict()
    assert set(enc_a) == set(enc_b) and all(torch.equal(v, enc_b[k]) for k, v in enc_a.items())


# -- audiocraft ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[1, 2], ids=["mono", "stereo"])
def ac_tuned(request, sources: Path, local_t5, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An audiocraft LM built by audiocraft (T5 text through cross-attention, non-default sizes; stereo: 2K
    interleaved codebooks) -> its own export_lm -> ostinato import -> fine-tuned: (import folder, checkpoint)."""
    from audiocraft.models import builders

    channels = request.param
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("audiocraft")
    cfg = audiocraft_lm_cfg(n_q=K * channels, card=CARD, dim=DIM, num_heads=4, num_layers=2, sample_rate=SR,
                            channels=channels, delays=STEREO_DELAYS if channels == 2 else None, hidden_scale=2)
    lm = builders.get_lm_model(cfg).eval()
    sharpen(lm.linears)
    audiocraft_export_lm(lm, cfg, root / "state_dict.bin")
    imported = import_musicgen(root / "state_dict.bin", root / "import", text_encoder=sources / "t5",
                               codec=str(sources / "encodec"), trust=True)
    return imported.out, finetune(imported.out, root)


def test_audiocraft_loads_the_export_of_a_finetuned_import(ac_tuned, tmp_path: Path, capsys) -> None:
    from audiocraft.models import MusicGen as MusicGenAC
    from audiocraft.models import loaders
    from audiocraft.modules.conditioners import ConditioningAttributes

    export, ckpt = ac_tuned
    tuned = ostinato.load(ckpt)
    assert tuned.semantics.text_padding == "attended"  # audiocraft's, as the import recorded it
    stereo = tuned.codec.channels == 2
    assert_changed(tuned, export)
    out = tmp_path / "ac"
    main(["export", str(ckpt), str(out), "--format", "audiocraft"])
    assert "state_dict.bin" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["compression_state_dict.bin", "state_dict.bin"]
    package = torch.load(out / "state_dict.bin", weights_only=True)  # a yaml xp.cfg: no pickled objects
    assert package["exported"] is True and isinstance(package["xp.cfg"], str)
    xp = yaml.safe_load(package["xp.cfg"])
    assert xp["conditioners"]["description"]["t5"]["name"] == "t5-base"  # as the source recorded it
    assert xp["codebooks_pattern"]["delay"]["delays"] == tuned.pattern.delays and xp["sample_rate"] == SR
    assert xp["channels"] == tuned.codec.channels and xp["interleave_stereo_codebooks"]["use"] is stereo
    assert xp["classifier_free_guidance"]["training_dropout"] == 0.3  # the import's (text2music), null in the run

    reference = loaders.load_lm_model(out / "state_dict.bin")  # audiocraft's own loader
    seq = codes_seq(tuned.pattern)
    with torch.no_grad():
        attributes = [ConditioningAttributes(text={"description": t}) for t in TEXTS]
        tensors = reference.condition_provider(reference.condition_provider.tokenize(attributes))
        theirs = reference(seq, [], condition_tensors=tensors)
    assert theirs.shape == (3, tuned.n_q, seq.shape[-1], CARD)
    assert (ours(tuned, seq) - theirs).abs().max().item() <= 1e-4

    package = MusicGenAC.get_pretrained(str(out), device="cpu")  # the whole model, as audiocraft's users load it
    assert package.compression_model.channels == tuned.codec.channels and package.sample_rate == SR
    for cfg in (1.0, 3.0):
        with torch.no_grad():
            want = package.lm.generate(conditions=attributes, max_gen_len=8, use_sampling=False, cfg_coef=cfg)
        got = greedy(tuned, 8, cfg)
        assert torch.equal(got, want) and len(torch.unique(got)) > 8, cfg

    codec = loaders.load_compression_model(out / "compression_state_dict.bin")  # the mono EnCodec
    wav = torch.sin(torch.arange(SR // 2) / SR * 2 * torch.pi * 220.0)[None, None] * 0.5
    with torch.no_grad():
        assert torch.equal(codec.encode(wav)[0], mono(tuned).encode(wav).codes)

    again = tmp_path / "again"  # the round trip: import the export
    import_musicgen(out / "state_dict.bin", again, text_encoder=Path(tuned.text.model_path))
    assert_same_tensors(again, tuned)


def test_an_audiocraft_import_exports_to_transformers(ac_tuned, tmp_path: Path, caplog) -> None:
    """Across formats: transformers masks the text padding audiocraft attends; the export says so, and a prompt
    alone (no padding) gives the same logits."""
    _, ckpt = ac_tuned
    tuned = ostinato.load(ckpt)
    out = tmp_path / "hf"
    with caplog.at_level("WARNING"):
        main(["export", str(ckpt), str(out), "--format", "transformers"])
    assert "--format transformers: its MusicGen has text_padding masked, this model attended" in caplog.text
    reference = from_pretrained(out)
    enc = {k: v[1:2] for k, v in tokens_of(out).items()}
    seq = codes_seq(tuned.pattern)[1:2]
    with torch.no_grad():
        cond, mask = tuned.condition(TEXTS[1:2])
        mine = tuned.lm(seq, cond, mask)
    assert (mine - hf_logits(reference, enc, seq)).abs().max().item() <= 1e-4


# -- transformers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[1, 2], ids=["mono", "stereo"])
def hf_tuned(request, sources: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tuned_transformers(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def hf_mono(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tuned_transformers(1, tmp_path_factory)


def tuned_transformers(channels: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random MusicgenForConditionalGeneration (T5 32 wide, EnCodec, decoder 48 wide; stereo:
    audio_channels 2, 2K codebooks) -> ostinato import -> fine-tuned: (import folder, checkpoint)."""
    from transformers import MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    torch.manual_seed(2)
    root = tmp_path_factory.mktemp("transformers")
    decoder = MusicgenDecoderConfig(num_codebooks=K * channels, audio_channels=channels, vocab_size=CARD,
                                    hidden_size=DIM, num_attention_heads=4, num_hidden_layers=2, ffn_dim=96,
                                    max_position_embeddings=256, dropout=0.0,
                                    pad_token_id=CARD, bos_token_id=CARD)
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5_config(), audio_encoder=encodec_config(),
                                                            decoder=decoder)).eval()
    sharpen(model.decoder.lm_heads)
    model.save_pretrained(root / "hf")
    copy_tokenizer(root / "hf")
    imported = import_musicgen(root / "hf", root / "import")
    return imported.out, finetune(imported.out, root)


def from_pretrained(out: Path):
    """transformers' own loading of an export: every key used, none missing."""
    from transformers import MusicgenForConditionalGeneration

    reference, info = MusicgenForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return reference.eval()


def hf_logits(reference, enc: dict[str, torch.Tensor], seq: torch.Tensor) -> torch.Tensor:
    b, k, s = seq.shape
    with torch.no_grad():
        return reference(**enc, decoder_input_ids=seq.reshape(b * k, s), use_cache=False).logits.reshape(b, k, s, -1)


def test_transformers_loads_the_export_of_a_finetuned_import(hf_tuned, tmp_path: Path, caplog) -> None:
    export, ckpt = hf_tuned
    tuned = ostinato.load(ckpt)
    assert_changed(tuned, export)
    out = tmp_path / "hf"
    with caplog.at_level("WARNING"):
        main(["export", str(ckpt), str(out), "--format", "transformers"])
    assert "text_padding" not in caplog.text  # transformers masks it as the model does
    reference = from_pretrained(out)
    gen = reference.generation_config
    assert (gen.pad_token_id, gen.decoder_start_token_id) == (CARD, CARD)
    assert (reference.config.decoder.num_codebooks, reference.config.decoder.audio_channels) == (tuned.n_q,
                                                                                               tuned.codec.channels)
    enc = tokens_of(out)  # the tokenizer travels with the export
    seq = codes_seq(tuned.pattern)
    assert (ours(tuned, seq) - hf_logits(reference, enc, seq)).abs().max().item() <= 1e-4
    for cfg in (1.0, 3.0):  # transformers' generate, with the exported generation config (pad, start token)
        with torch.no_grad():
            want = reference.generate(**enc, do_sample=False, guidance_scale=cfg, max_new_tokens=12)
        assert want.shape[:2] == (len(TEXTS), tuned.codec.channels)
        codes = greedy(tuned, want.shape[-1] // tuned.codec.hop_length, cfg)
        assert len(torch.unique(codes)) > 8
        with torch.no_grad():
            wav = tuned.codec.decode(codes)
        assert wav.shape == want.shape and (wav - want).abs().max().item() <= 1e-5, cfg
    wav = torch.sin(torch.arange(SR // 2) / SR * 2 * torch.pi * 220.0)[None, None] * 0.5
    with torch.no_grad():
        codes = reference.audio_encoder.encode(wav, bandwidth=1.2).audio_codes[0]
        assert torch.equal(codes, mono(tuned).encode(wav).codes)

    again = tmp_path / "again"  # the round trip: import the export
    import_musicgen(out, again)
    assert_same_tensors(again, tuned)


def test_a_lora_run_exports_with_its_adapters_merged(hf_mono, tmp_path: Path, capsys) -> None:
    export, _ = hf_mono
    ckpt = finetune(export, tmp_path, lora={"rank": 4, "alpha": 8})
    adapted = ostinato.load(ckpt)  # the base with the run's adapters
    assert has_adapters(adapted)
    out = tmp_path / "hf"
    main(["export", str(ckpt), str(out), "--format", "transformers"])
    reference = from_pretrained(out)
    enc = tokens_of(out)
    seq = codes_seq(adapted.pattern)
    theirs = hf_logits(reference, enc, seq)
    assert (ours(adapted, seq) - theirs).abs().max().item() <= 1e-4
    assert (ours(ostinato.load(export), seq) - theirs).abs().max().item() > 1e-3  # the adapters are in it
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), str(tmp_path / "kept"), "--format", "audiocraft", "--lora", "keep"])
    assert exit_info.value.code == 2 and "--lora keep --format audiocraft" in capsys.readouterr().err


def test_an_import_folder_exports_as_it_is(hf_mono, tmp_path: Path) -> None:
    export, _ = hf_mono
    imported = ostinato.load(export)
    out = tmp_path / "hf"
    main(["export", str(export), str(out), "--format", "transformers"])
    seq = codes_seq(imported.pattern)
    assert (ours(imported, seq) - hf_logits(from_pretrained(out), tokens_of(out), seq)).abs().max().item() <= 1e-4


def test_a_decoder_only_import_exports_as_a_causal_lm(hf_mono, tmp_path: Path, capsys) -> None:
    """A ``MusicgenForCausalLM`` import (no text) goes back as that decoder folder; audiocraft has no such model."""
    from transformers import MusicgenForCausalLM, MusicgenForConditionalGeneration

    export, _ = hf_mono
    MusicgenForConditionalGeneration.from_pretrained(export.parent / "hf").decoder.save_pretrained(tmp_path / "dec")
    causal = import_musicgen(tmp_path / "dec", tmp_path / "causal", codec=str(export / "codec")).out
    model = ostinato.load(causal)
    assert model.text is None
    out = tmp_path / "hf"
    main(["export", str(causal), str(out), "--format", "transformers"])
    reference, info = MusicgenForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert reference.generation_config.decoder_start_token_id == CARD
    seq = codes_seq(model.pattern)
    with torch.no_grad():
        theirs = reference.eval()(input_ids=seq.reshape(-1, seq.shape[-1])).logits.reshape(*seq.shape, CARD)
        assert (model.lm(seq) - theirs).abs().max().item() <= 1e-4
    again = import_musicgen(out, tmp_path / "again", codec=str(export / "codec")).out
    mine, theirs_state = model.state_dict(), ostinato.load(again).state_dict()
    assert set(mine) == set(theirs_state) and all(torch.equal(v, theirs_state[k]) for k, v in mine.items())
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(causal), str(tmp_path / "ac"), "--format", "audiocraft"])
    assert exit_info.value.code == 2 and "no text conditioner" in capsys.readouterr().err


def tokens_of(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# -- refusals ----------------------------------------------------------------------------------------------------
def test_export_refuses_what_a_format_cannot_hold(hf_mono, tmp_path: Path, capsys) -> None:
    export, ckpt = hf_mono
    family = exported_family(export)
    minilm = MusicGen(**{**{k: family[k] for k in ("n_q", "card", "lm", "delays", "codec")},
                         "text": {"model": str(default_text_model())}})
    with pytest.raises(UserError, match="audiocraft's MusicGen conditions on T5 only"):
        export_musicgen(minilm, tmp_path / "minilm", "audiocraft")
    assert not (tmp_path / "minilm").exists() and not (tmp_path / "minilm.tmp").exists()

    no_name = MusicGen(**{k: family[k] for k in ("n_q", "card", "lm", "text", "delays", "codec")})
    info = json.loads((export / "export.json").read_text())
    assert info["text_encoder_name"] is None  # the tiny T5 has no name
    with pytest.raises(UserError, match="--t5-name"):
        export_musicgen(no_name, tmp_path / "noname", "audiocraft")

    base = {k: family[k] for k in ("n_q", "card", "lm", "text", "codec")}
    style = MusicGen(**base, style={"feature_dim": 8, "width": 16, "num_layers": 1, "num_heads": 2, "n_q": 2,
                                    "eval_q": 1, "card": 8})
    for fmt in ("transformers", "audiocraft"):
        with pytest.raises(UserError, match="style conditioning"):
            export_musicgen(style, tmp_path / "style", fmt)
    with pytest.raises(UserError, match=r"models the delays \[0, 1, 2, 3\] only"):
        export_musicgen(MusicGen(**base, delays=[0, 0, 0, 0]), tmp_path / "parallel", "transformers")
    with pytest.raises(UserError, match="layers have no biases"):
        export_musicgen(MusicGen(**{**base, "lm": {**family["lm"], "bias": True}}), tmp_path / "bias", "transformers")

    own_chroma = MusicGen(**{**base, "text": {**family["text"], "fuse": "prefix"}}, melody={"sample_rate": SR},
                          semantics={"text_padding": "attended"})  # trained on ostinato's chromagram
    for fmt in ("transformers", "audiocraft"):
        with pytest.raises(UserError, match="melody.chroma=ostinato"):
            export_musicgen(own_chroma, tmp_path / "chroma", fmt)

    from ostinato.models.dac import DACCodec

    on_dac = MusicGen(**base)
    on_dac.attach_codec(DACCodec.build(sample_rate=16000, encoder_dim=4, encoder_rates=[2, 4], decoder_dim=8,
                                       decoder_rates=[4, 2], n_q=K, card=CARD, codebook_dim=4))
    for fmt in ("transformers", "audiocraft"):
        with pytest.raises(UserError, match="the codec is a dac codec, not an EnCodec"):
            export_musicgen(on_dac, tmp_path / "dac", fmt, t5_name="t5-base")

    codec = tmp_path / "codec"  # another family's export
    codec.mkdir()
    save_file({}, str(codec / "model.safetensors"))
    (codec / "config.yaml").write_text(yaml.safe_dump({"family": {"_target_": "ostinato.families.codec.CodecFamily"}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(codec), str(tmp_path / "x"), "--format", "transformers"])
    assert exit_info.value.code == 2 and "only MusicGen models" in capsys.readouterr().err

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), str(out), "--format", "transformers"])
    assert "--overwrite" in capsys.readouterr().err and (out / "keep").is_file()
    main(["export", str(ckpt), str(out), "--format", "transformers", "--overwrite"])
    assert not (out / "keep").exists() and (out / "config.json").is_file()


# -- MusicGen-melody ---------------------------------------------------------------------------------------------
SR_MELODY = 32000  # the released melody models' rate; the chroma's STFT is 2**14 with a hop of 4096
TUNES = [(0.9, [60, 64, 67, 72]), (0.45, [69, 62]), (0.7, [71, 66, 59])]  # seconds, MIDI notes: 3 lengths


MELODIES = [tune(s, n, SR_MELODY) for s, n in TUNES]


def melody_prefix(model: MusicGen) -> torch.Tensor:
    """``[3, P, dim]``: the chroma of ``MELODIES`` (as the model's source computes a batch) then ``TEXTS``."""
    chroma = model.melody.batch_features(MELODIES, SR_MELODY)
    if model.melody.frames is not None:
        chroma = model.fit_chroma(chroma, model.melody.frames)
    return model.prefix(None, model.melody(chroma), model.text_tokens(TEXTS))


def melody_greedy(model: MusicGen, frames: int, cfg: float) -> torch.Tensor:
    """``[3, K, frames]``: ostinato's greedy decoding under ``melody_prefix``; the null rows of CFG are zeros, or
    for a transformers chroma its null melody (pitch class C) before zero text states."""
    prefix = melody_prefix(model)
    params = GenerationParams(temperature=0.0, cfg_scale=cfg, backend="cache")
    rows = prefix
    if model.melody.chroma == "transformers":
        null = model.prefix(None, model.melody(model.melody.null(3, model.melody.frames)),
                            torch.zeros_like(model.text_tokens(TEXTS)))
        rows = lambda start, n: (prefix, null)  # noqa: E731
    with torch.no_grad():
        return generate(model.lm, model.pattern, frames, params=params, batch_size=3, prefix=rows)


def melody_logits(model: MusicGen, seq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.lm(seq, prefix=melody_prefix(model))


@pytest.fixture(scope="module")
def encodec32(sources: Path) -> Path:
    """A tiny transformers EnCodec at 32 kHz (4 x 64 codes at 100 Hz)."""
    from transformers import EncodecModel

    torch.manual_seed(4)
    config = encodec_config()
    config.sampling_rate, config.target_bandwidths = SR_MELODY, [2.56]
    EncodecModel(config).save_pretrained(sources / "encodec32")
    return sources / "encodec32"


def audiocraft_melody_attributes() -> list:
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    attributes = []
    for text, wav in zip(TEXTS, MELODIES):
        attribute = ConditioningAttributes(text={"description": text})
        attribute.wav["self_wav"] = WavCondition(wav[None], torch.tensor([wav.shape[-1]]), sample_rate=[SR_MELODY],
                                                 path=[None], seek_time=[None])
        attributes.append(attribute)
    return attributes


def audiocraft_melody_logits(out: Path, seq: torch.Tensor) -> torch.Tensor:
    """audiocraft's own loading of a melody export, and its logits for ``seq`` under ``TEXTS`` and ``MELODIES``."""
    from audiocraft.models import loaders

    reference = loaders.load_lm_model(out / "state_dict.bin")
    with torch.no_grad():
        return reference(seq, audiocraft_melody_attributes())


@pytest.fixture(scope="module", params=[1, 2], ids=["mono", "stereo"])
def ac_melody_tuned(request, sources: Path, local_t5, encodec32: Path, tmp_path_factory) -> tuple[Path, Path]:
    """audiocraft's own melody LM (chroma2music: chroma and text prepended; stereo-melody: 2K interleaved
    codebooks) -> export_lm -> ostinato import -> fine-tuned with the melody prefix: (import folder, checkpoint)."""
    from audiocraft.models import builders

    channels = request.param
    torch.manual_seed(5)
    root = tmp_path_factory.mktemp("audiocraft_melody")
    cfg = audiocraft_lm_cfg("chroma", n_q=K * channels, card=CARD, dim=DIM, num_heads=4, num_layers=2,
                            sample_rate=SR_MELODY, channels=channels,
                            delays=STEREO_DELAYS if channels == 2 else None, hidden_scale=2)
    lm = builders.get_lm_model(cfg).eval()
    sharpen(lm.linears)
    audiocraft_export_lm(lm, cfg, root / "state_dict.bin")
    imported = import_musicgen(root / "state_dict.bin", root / "import", text_encoder=sources / "t5",
                               codec=str(encodec32), trust=True)
    return imported.out, finetune(imported.out, root)


def test_audiocraft_loads_the_melody_export_of_a_finetuned_import(ac_melody_tuned, tmp_path: Path,
                                                                   capsys) -> None:
    from audiocraft.models import loaders

    export, ckpt = ac_melody_tuned
    tuned = ostinato.load(ckpt)
    assert tuned.melody.chroma == "audiocraft" and tuned.text_prefix
    assert_changed(tuned, export, "melody.proj.weight")
    out = tmp_path / "ac"
    main(["export", str(ckpt), str(out), "--format", "audiocraft"])
    xp = yaml.safe_load(torch.load(out / "state_dict.bin", weights_only=True)["xp.cfg"])
    assert xp["fuser"]["prepend"] == ["self_wav", "description"] and xp["fuser"]["cross"] == []
    assert xp["conditioners"]["self_wav"]["chroma_stem"]["match_len_on_eval"] is False
    seq = codes_seq(tuned.pattern)
    theirs = audiocraft_melody_logits(out, seq)
    assert theirs.shape == (3, tuned.n_q, seq.shape[-1], CARD)
    assert (melody_logits(tuned, seq) - theirs).abs().max().item() <= 1e-4
    reference = loaders.load_lm_model(out / "state_dict.bin")  # (get_pretrained makes any chroma match_len)
    for cfg in (1.0, 3.0):
        with torch.no_grad():
            want = reference.generate(conditions=audiocraft_melody_attributes(), max_gen_len=6, use_sampling=False,
                                       cfg_coef=cfg, two_step_cfg=False)
        got = melody_greedy(tuned, 6, cfg)
        assert torch.equal(got, want) and len(torch.unique(got)) > 3, cfg
    again = tmp_path / "again"
    import_musicgen(out / "state_dict.bin", again, text_encoder=Path(tuned.text.model_path))
    assert_same_tensors(again, tuned)
    # transformers' MusicGen-melody loops the chroma to a fixed length: a masked chroma has no place there
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "transformers"])
    assert exit_info.value.code == 2 and "chroma_length" in capsys.readouterr().err


@pytest.fixture(scope="module", params=[1, 2], ids=["mono", "stereo"])
def hf_melody_tuned(request, sources: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random MusicgenMelodyForConditionalGeneration (chroma_length 11; stereo: audio_channels 2, 2K
    codebooks), saved with its feature extractor -> ostinato import -> fine-tuned with the melody prefix: (import
    folder, checkpoint)."""
    from transformers import (
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyFeatureExtractor,
        MusicgenMelodyForConditionalGeneration,
    )

    channels = request.param
    torch.manual_seed(6)
    root = tmp_path_factory.mktemp("transformers_melody")
    audio = encodec_config()
    audio.sampling_rate, audio.target_bandwidths = SR_MELODY, [2.56]
    decoder = MusicgenMelodyDecoderConfig(num_codebooks=K * channels, audio_channels=channels, vocab_size=CARD,
                                          hidden_size=DIM, num_attention_heads=4,
                                          num_hidden_layers=2, ffn_dim=96, max_position_embeddings=256,
                                          dropout=0.0, pad_token_id=CARD, bos_token_id=CARD)
    config = MusicgenMelodyConfig(text_encoder=t5_config().to_dict(), audio_encoder=audio.to_dict(),
                                  decoder=decoder.to_dict(), chroma_length=11)
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    sharpen(model.decoder.lm_heads)
    model.save_pretrained(root / "hf")
    MusicgenMelodyFeatureExtractor(sampling_rate=SR_MELODY).save_pretrained(root / "hf")
    copy_tokenizer(root / "hf")
    imported = import_musicgen(root / "hf", root / "import")
    return imported.out, finetune(imported.out, root)


def test_transformers_and_audiocraft_load_the_melody_export_of_a_finetuned_import(hf_melody_tuned, local_t5,
                                                                                  tmp_path: Path) -> None:
    from transformers import MusicgenMelodyFeatureExtractor, MusicgenMelodyForConditionalGeneration

    export, ckpt = hf_melody_tuned
    tuned = ostinato.load(ckpt)
    assert tuned.melody.chroma == "transformers" and tuned.melody.frames == 11
    assert_changed(tuned, export, "melody.proj.weight")
    out = tmp_path / "hf"
    main(["export", str(ckpt), str(out), "--format", "transformers"])
    reference, info = MusicgenMelodyForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert reference.config.chroma_length == 11
    features = MusicgenMelodyFeatureExtractor.from_pretrained(out)  # the chroma's STFT travels with it
    chroma = features([w[0].numpy() for w in MELODIES], sampling_rate=SR_MELODY, return_tensors="pt")
    seq = codes_seq(tuned.pattern)
    b, k, s = seq.shape
    with torch.no_grad():
        theirs = reference(**tokens_of(out), input_features=chroma["input_features"],
                           decoder_input_ids=seq.reshape(b * k, s)).logits.reshape(b, k, -1, CARD)[:, :, -s:]
    ours = melody_logits(tuned, seq)
    assert (ours - theirs).abs().max().item() <= 1e-4
    for cfg in (1.0, 3.0):  # transformers' generate with the exported generation config
        with torch.no_grad():
            want = reference.generate(**tokens_of(out), input_features=chroma["input_features"], do_sample=False,
                                      guidance_scale=cfg, max_new_tokens=8)
        codes = melody_greedy(tuned, want.shape[-1] // tuned.codec.hop_length, cfg)
        assert len(torch.unique(codes)) > 3
        with torch.no_grad():
            wav = tuned.codec.decode(codes)
        assert wav.shape == want.shape and (wav - want).abs().max().item() <= 1e-5, cfg
    again = tmp_path / "again"
    import_musicgen(out, again)
    assert_same_tensors(again, tuned)

    # the same model to audiocraft: a chroma of fixed length is its match_len_on_eval
    ac = tmp_path / "ac"
    export_musicgen(tuned, ac, "audiocraft", t5_name="t5-base")
    xp = yaml.safe_load(torch.load(ac / "state_dict.bin", weights_only=True)["xp.cfg"])
    assert xp["conditioners"]["self_wav"]["chroma_stem"]["match_len_on_eval"] is True
    with pytest.MonkeyPatch.context() as patch:  # audiocraft's "t5-base" is this model's own text encoder
        use_local_t5(patch, Path(tuned.text.model_path))
        assert (audiocraft_melody_logits(ac, seq) - ours).abs().max().item() <= 1e-4
