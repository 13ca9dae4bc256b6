"""MusicGen-Style imported from audiocraft: the style tokens are audiocraft's, MERT loads without remote code.

MusicGen-Style is in no audiocraft release (1.3.0, the reference package, predates it). The facts tested here come
from its published source, repository facebookresearch/audiocraft at 896ec7c:

* audiocraft/modules/conditioners.py ``FeatureExtractor`` (lines 762-870): MERT loaded by name
  (``AutoModel.from_pretrained("m-a-p/MERT-v1-95M", trust_remote_code=True)``, line 809) and kept out of the state
  dict (``self.__dict__["feat_extractor"]``, line 814); ``embed = nn.Linear(768, dim)`` (815); the excerpt of
  ``length`` s converted to 24 kHz mono and fed raw, unnormalised, to MERT, whose ``last_hidden_state`` is embedded
  (840-848); MERT runs at 75 Hz (857).
* ``StyleConditioner`` (872-1003): transformer sizes per ``transformer_scale`` and its args (903-915: gelu, pre-norm,
  non-causal, no Linear bias); ``ResidualVectorQuantizer(dim, n_q=n_q_out, q_dropout, bins,
  threshold_ema_dead_code)`` (924-925); ``BatchNorm1d(dim, affine=False)`` (931); forward (937-968): transformer ->
  batch norm -> RVQ with ``n_q_out`` codebooks in training and ``eval_q`` in eval -> every ``ds_factor``-th frame;
  ``output_proj`` then the length mask (991-1003).
* config/conditioner/style2music.yaml: ``fuser.prepend: [self_wav, description]``; style: mert, ds_factor 15
  ("MERT is 75Hz, 75/15 results into 5Hz"), n_q_out 6, eval_q 3, bins 1024, length 3.0, batch_norm true.

The reference conditioner (``tests.references.audiocraft_style_conditioner``) is built from the 1.3.0 package's own
blocks (``WaveformConditioner``, ``StreamingTransformer``, ``ResidualVectorQuantizer``, ``convert_audio``) under the
source's attribute names, so its state-dict keys are audiocraft's. What stands for MERT is a tiny ``HubertModel``
saved as a MERT folder (``model_type: mert_model`` and MERT's extra config keys): MERT-v1's ``MERTModel`` subclasses
``HubertModel`` and, with CQT features, DeepNorm and attention relaxation off (MERT-v1), runs HuBERT's forward; that
equivalence is read from MERT's published modelling code, not tested here (its weights are not available offline).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ostinato.interop.musicgen_style import STYLE_PREFIX, is_style, style_kwargs, style_state
from ostinato.nn.style import HFAudioFeatures, StyleConditioner
from tests.references import AC_STYLE, audiocraft, audiocraft_style_conditioner, write_t5

pytestmark = pytest.mark.usefixtures("one_thread")

SR, SECONDS = 32000, 3.0
# transformer_scale "xsmall" (width 256, 8 heads, 4 layers), fewer and smaller codebooks than the defaults
SIZES = dict(feature_dim=32, width=256, num_heads=8, num_layers=4, n_q_out=4, eval_q=2, bins=32, ds_factor=15,
             length=SECONDS)
OUT_DIM = 48  # the LM width


def write_mert(folder: Path, **config) -> Path:
    """A tiny random HuBERT saved as a MERT-v1 folder: MERT's config keys (model_type mert_model, auto_map, CQT /
    DeepNorm / attention-relax options off), 24 kHz, MERT's ``do_normalize: true`` preprocessor; default conv
    strides (hop 320: 75 Hz at 24 kHz)."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(0)
    hubert = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    HubertModel(hubert).eval().save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="mert_model", architectures=["MERTModel"],
               auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
               feature_extractor_cqt=False, feature_extractor_cqt_bins=336, deepnorm=False, attention_relax=-1.0,
               sample_rate=24000)
    raw.update(config)
    (folder / "config.json").write_text(json.dumps(raw))
    Wav2Vec2FeatureExtractor(sampling_rate=24000, do_normalize=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mert(tmp_path_factory.mktemp("mert"))


@pytest.fixture(scope="module")
def reference(mert: Path):
    """audiocraft's style conditioner with random weights, codebooks and BatchNorm statistics, in eval mode."""
    from transformers import HubertModel

    hubert = HubertModel.from_pretrained(mert, config=_hubert_config(mert), local_files_only=True)
    torch.manual_seed(1)
    ref = audiocraft_style_conditioner(hubert, output_dim=OUT_DIM, **SIZES)
    with torch.no_grad():
        for layer in ref.rvq.vq.layers:
            book = layer._codebook
            book.embed.copy_(torch.randn_like(book.embed))
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1.0)
        ref.batch_norm.running_mean.copy_(0.3 * torch.randn(SIZES["width"]))
        ref.batch_norm.running_var.copy_(0.5 + torch.rand(SIZES["width"]))
        ref.batch_norm.num_batches_tracked.fill_(100)
    return ref.eval()


def _hubert_config(folder: Path):
    from ostinato.nn.style import mert_hubert_config

    return mert_hubert_config(folder, json.loads((folder / "config.json").read_text()))


def xp_cfg() -> dict:
    """The conditioner part of a MusicGen-Style xp.cfg (style2music.yaml with this test's sizes)."""
    style = {**AC_STYLE, "transformer_scale": "xsmall", "n_q_out": SIZES["n_q_out"], "eval_q": SIZES["eval_q"],
             "bins": SIZES["bins"], "ds_factor": SIZES["ds_factor"], "length": SECONDS}
    return {"conditioners": {"self_wav": {"model": "style", "style": style},
                             "description": {"model": "t5", "t5": {"name": "t5-base", "finetune": False}}},
            "fuser": {"prepend": ["self_wav", "description"], "cross": [], "sum": [], "input_interpolate": []}}


def ours(reference, mert: Path) -> tuple[StyleConditioner, HFAudioFeatures]:
    state = {STYLE_PREFIX + k: v for k, v in reference.state_dict().items()}
    kwargs = style_kwargs(xp_cfg(), state)
    cond = StyleConditioner(dim=OUT_DIM, **kwargs)
    mapped, rest = style_state(state)
    assert not rest
    cond.load_state_dict(mapped, strict=True)
    return cond.eval(), HFAudioFeatures(str(mert), normalize=False, resampler="audiocraft")


def wavs(b: int, seconds: float = SECONDS, seed: int = 0) -> torch.Tensor:
    return 0.3 * torch.randn(b, 1, int(seconds * SR), generator=torch.Generator().manual_seed(seed))


def reference_tokens(reference, wav: torch.Tensor) -> torch.Tensor:
    audiocraft()
    from audiocraft.modules.conditioners import WavCondition

    b = wav.shape[0]
    cond = WavCondition(wav, torch.full((b,), wav.shape[-1]), [SR] * b, [None] * b, [None] * b)
    with torch.no_grad():
        tokens, mask = reference(cond)
    assert bool(mask.all())
    return tokens


def test_mert_folder_loads_as_hubert_without_remote_code(mert: Path, tmp_path: Path) -> None:
    from transformers import HubertModel

    features = HFAudioFeatures(str(mert), normalize=False)
    assert isinstance(features.model, HubertModel)
    assert (features.sample_rate, features.frame_rate, features.dim) == (24000, 75.0, 32)
    wav = wavs(2, seconds=1.0)[..., :24000]
    ref = HubertModel.from_pretrained(mert, config=_hubert_config(mert), local_files_only=True).eval()
    with torch.no_grad():
        want = ref(wav[:, 0]).last_hidden_state
    torch.testing.assert_close(features(wav, 24000), want, atol=1e-5, rtol=1e-5)
    # the folder's preprocessor says do_normalize (MERT's), which audiocraft does not do: normalize=False wins
    assert HFAudioFeatures(str(mert)).normalize and not features.normalize
    deep = write_mert(tmp_path / "deepnorm", deepnorm=True)
    with pytest.raises(ValueError, match="deepnorm=True needs MERT's own code"):
        HFAudioFeatures(str(deep))


@pytest.mark.parametrize("layout", ["weight_g_v", "mert_model_prefix"])
def test_mert_checkpoint_layouts_load(mert: Path, tmp_path: Path, layout: str) -> None:
    """MERT's published pytorch_model.bin: the positional conv's weight norm as ``weight_g`` / ``weight_v`` (torch's
    old weight_norm), and keys that may carry MERT's ``mert_model.`` prefix; both load into the same HuBERT."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / layout
    shutil.copytree(mert, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    state = {k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert "encoder.pos_conv_embed.conv.weight_g" in state
    if layout == "mert_model_prefix":
        state = {f"mert_model.{k}": v for k, v in state.items()}
    torch.save(state, folder / "pytorch_model.bin")
    wav = wavs(1, seconds=0.5)
    want = HFAudioFeatures(str(mert), normalize=False)(wav, SR)
    torch.testing.assert_close(HFAudioFeatures(str(folder), normalize=False)(wav, SR), want)


def test_style_tokens_match_audiocraft(reference, mert: Path) -> None:
    cond, features = ours(reference, mert)
    wav = wavs(2)
    want = reference_tokens(reference, wav)
    feats = features(wav, SR)
    assert feats.shape[1] == 224  # 3 s of 24 kHz through hop 320 (75 Hz)
    tokens, _ = cond(feats)
    assert tokens.shape == want.shape == (2, 15, OUT_DIM)  # 5 tokens a second: 75 Hz / ds_factor 15
    assert (tokens - want).abs().max() <= 1e-4
    # audiocraft resamples with julius: torchaudio's filter (ostinato's own resampler) gives other tokens
    other = HFAudioFeatures(features.path, normalize=False)(wav, SR)
    assert (cond(other)[0] - want).abs().max() > 1e-2
    # eval mode: eval_q codebooks (all of them give other tokens) and the BatchNorm's running statistics (a batch
    # of one gives the same tokens as in a batch of two)
    assert not torch.allclose(cond(feats, n_q=SIZES["n_q_out"])[0], tokens, atol=1e-3)
    torch.testing.assert_close(cond(feats[1:])[0], tokens[1:], atol=1e-5, rtol=1e-5)


def test_style_kwargs_and_state_names(reference) -> None:
    state = {STYLE_PREFIX + k: v for k, v in reference.state_dict().items()}
    assert is_style(xp_cfg())
    kwargs = style_kwargs(xp_cfg(), state)
    assert kwargs["feature_dim"] == SIZES["feature_dim"]
    assert (kwargs["width"], kwargs["num_layers"], kwargs["num_heads"]) == (256, 4, 8)  # transformer_scale xsmall
    assert (kwargs["n_q"], kwargs["eval_q"], kwargs["card"], kwargs["downsample"]) == (4, 2, 32, 15)
    assert kwargs["eval_excerpt_seconds"] == SECONDS and kwargs["excerpt_seconds"] == [1.5, 4.5]
    assert kwargs["norm_bias"] and kwargs["q_dropout"] and kwargs["null_tokens"] == 1 and kwargs["mask_excerpt"]
    mapped, _ = style_state(state)
    assert mapped["rvq.layers.0.codebook.inited"].dtype == torch.bool
    assert "input_proj.weight" in mapped and "norm.running_var" in mapped and "rvq.steps" in mapped
    assert "transformer.layers.1.norm1.bias" in mapped and "transformer.layers.1.linear1.bias" not in mapped
    for key, value in [("model_name", "encodec"), ("transformer_scale", "none"), ("batch_norm", False)]:
        cfg = xp_cfg()
        cfg["conditioners"]["self_wav"]["style"][key] = value
        with pytest.raises(ValueError, match=f"conditioners.self_wav.style.{key}="):
            style_kwargs(cfg, state)


# ----- the whole MusicGen-Style: imported with `ostinato import`, generating as audiocraft does ---------------
K, CARD, DIM = 4, 64, OUT_DIM
TEXTS = ["organ", "an irish reel on fiddle and flute", "a slow blues with a muted trumpet and brushed drums"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def ac_style(t5: Path, mert: Path, reference, tmp_path_factory: pytest.TempPathFactory):
    """audiocraft's LM (1.3.0 builders) with the T5 description and the reference style conditioner both prepended
    (fuser.prepend [self_wav, description], no cross-attention), exported with audiocraft's exporter beside its
    EnCodec, and imported with ``ostinato import --text-encoder --style-encoder``."""
    from omegaconf import OmegaConf

    from ostinato.cli import main
    from tests.references import (
        audiocraft_encodec_cfg,
        audiocraft_export_compression,
        audiocraft_export_lm,
        audiocraft_lm_cfg,
        use_local_t5,
    )

    ac = audiocraft()
    torch.manual_seed(2)
    cfg = audiocraft_lm_cfg("text", n_q=K, card=CARD, dim=DIM, num_heads=4, num_layers=2, sample_rate=SR,
                            hidden_scale=2)
    cfg.fuser.cross, cfg.fuser.prepend = [], ["self_wav", "description"]
    with pytest.MonkeyPatch.context() as mp:
        use_local_t5(mp, t5)
        lm = ac.models.builders.get_lm_model(cfg).eval()
    lm.condition_provider.conditioners["self_wav"] = reference  # 1.3.0's builders know no "style" model
    with torch.no_grad():  # sharper heads than the init: greedy decoding without near-ties
        for linear in lm.linears:
            linear.weight.mul_(20)
    style = {**xp_cfg()["conditioners"]["self_wav"]["style"], "num_codebooks_lm": K}
    export_cfg = OmegaConf.merge(cfg, {"conditioners": {"self_wav": {"model": "style", "style": style}}})
    folder = tmp_path_factory.mktemp("ac_style")
    audiocraft_export_lm(lm, export_cfg, folder / "state_dict.bin")
    torch.manual_seed(3)
    codec_cfg = audiocraft_encodec_cfg(sample_rate=SR, n_q=K, bins=CARD, dimension=16, n_filters=4, lstm=1)
    audiocraft_export_compression(ac.models.builders.get_compression_model(codec_cfg).eval(), codec_cfg,
                                  folder / "compression_state_dict.bin")
    out = folder.parent / "style_import"
    main(["import", str(folder), str(out), "--text-encoder", str(t5), "--style-encoder", str(mert)])
    return lm, out, folder


def ac_attributes(texts: list[str | None], wav: torch.Tensor):
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    return [ConditioningAttributes(text={"description": t}, wav={"self_wav": WavCondition(
        wav[None], torch.tensor([wav.shape[-1]]), [SR], [None], [None])}) for t in texts]


def style_input(wav: torch.Tensor):
    from ostinato.generation.request import AudioInput

    return AudioInput(wav, SR)


def test_import_writes_style_and_text_prefix(ac_style) -> None:
    _, out, _ = ac_style
    import ostinato

    family = json.loads((out / "export.json").read_text())
    assert family["kind"] == "audiocraft"
    model = ostinato.load(out)
    assert model.style is not None and model.text is not None and model.text_prefix
    assert not model.cfg.cross_attention
    assert (out / "style_encoder" / "config.json").is_file()
    assert model.style.eval_q == SIZES["eval_q"] and model.style.null_tokens == 1
    assert model.semantics.text_padding == "attended"


def test_imported_style_model_matches_audiocraft_logits(ac_style) -> None:
    import ostinato

    lm, out, _ = ac_style
    model = ostinato.load(out)
    wav = wavs(1, seed=5)[0]
    codes = torch.randint(0, CARD, (len(TEXTS), K, 6), generator=torch.Generator().manual_seed(4))
    seq, _, _ = lm.pattern_provider.get_pattern(6).build_pattern_sequence(codes, lm.special_token_id)
    with torch.no_grad():
        ref = lm(seq, ac_attributes(TEXTS, wav))
        style = model._style_prefix(style_input(wav), len(TEXTS))
        text = model.text_tokens(TEXTS)
        assert style.shape[1] == 15  # 3 s at 5 Hz, before the text
        logits = model.lm(seq, prefix=model.prefix(style, None, text))
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() <= 1e-4
    with torch.no_grad():  # the source's order is style then text: the other order gives other logits
        swapped = model.lm(seq, prefix=torch.cat([text, style], dim=1))
    assert (swapped - ref).abs().max().item() > 1e-2


def _ac_double_cfg(lm, texts: list[str], wav: torch.Tensor, frames: int, alpha: float, beta: float) -> torch.Tensor:
    """audiocraft's double CFG (lm.py ``_sample_next_token`` with ``cfg_coef_beta``, source lines 362-376; the
    conditions of ``generate``, 490-495: full, description dropped, all dropped), greedy, recomputing the whole
    sequence every step with 1.3.0's LM forward (1.3.0 has no cfg_coef_beta)."""
    from audiocraft.modules.conditioners import AttributeDropout, ClassifierFreeGuidanceDropout

    full = ac_attributes(texts, wav)
    wav_only = AttributeDropout(p={"text": {"description": 1.0}, "wav": {"self_wav": 0.0}})(full)
    null = ClassifierFreeGuidanceDropout(p=1.0)(full)
    conditions = full + wav_only + null
    pattern = lm.pattern_provider.get_pattern(frames)
    b = len(texts)
    codes = torch.full((b, K, frames), -1, dtype=torch.long)
    seq, _, mask = pattern.build_pattern_sequence(codes, lm.special_token_id)
    seq = torch.full_like(seq, lm.special_token_id)
    with torch.no_grad():
        for s in range(1, seq.shape[-1]):
            logits = lm(torch.cat([seq[..., :s]] * 3), conditions)[:, :, -1]
            c, w, u = logits.split(b)
            nxt = (u + alpha * (w + beta * (c - w) - u)).argmax(-1)
            seq[..., s] = torch.where(mask[None, :, s], nxt, seq[..., s])
    out, _, _ = pattern.revert_pattern_sequence(seq, special_token=-1)
    return out[..., :frames]


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_imported_style_model_generates_audiocrafts_tokens(ac_style, cfg: float) -> None:
    import ostinato
    from ostinato.nn.decoding import GenerationParams

    lm, out, _ = ac_style
    model = ostinato.load(out)
    wav, frames = wavs(1, seed=6)[0], 8
    with torch.no_grad():
        ref = lm.generate(conditions=ac_attributes(TEXTS, wav), max_gen_len=frames, use_sampling=False,
                          cfg_coef=cfg)
        audio = model.generate(TEXTS, frames / model.codec.frame_rate, style=style_input(wav),
                               params=GenerationParams(temperature=0.0, cfg_scale=cfg, backend="cache"))
        want = model.codec.decode(ref)
    torch.testing.assert_close(audio, want[..., :audio.shape[-1]], atol=1e-5, rtol=1e-5)


def test_double_cfg_generates_audiocrafts_tokens(ac_style) -> None:
    import ostinato
    from ostinato.nn.decoding import GenerationParams

    lm, out, _ = ac_style
    model = ostinato.load(out)
    wav, frames, alpha, beta = wavs(1, seed=7)[0], 6, 3.0, 2.0
    ref = _ac_double_cfg(lm, TEXTS, wav, frames, alpha, beta)
    params = GenerationParams(temperature=0.0, cfg_scale=alpha, cfg_beta=beta, backend="cache")
    with torch.no_grad():
        audio = model.generate(TEXTS, frames / model.codec.frame_rate, style=style_input(wav), params=params)
        plain = model.generate(TEXTS, frames / model.codec.frame_rate, style=style_input(wav),
                               params=GenerationParams(temperature=0.0, cfg_scale=alpha, backend="cache"))
        want = model.codec.decode(ref)
    torch.testing.assert_close(audio, want[..., :audio.shape[-1]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(audio, plain, atol=1e-3)


def test_style_import_errors_name_the_flag(ac_style, t5: Path, mert: Path, tmp_path: Path, capsys) -> None:
    from ostinato.cli import main

    _, _, folder = ac_style
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(folder), str(out), "--text-encoder", str(t5)])
    assert exit_info.value.code == 2 and "pass --style-encoder FOLDER" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    wide = tmp_path / "wide"
    from transformers import HubertConfig, HubertModel

    HubertModel(HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
                ).save_pretrained(wide)
    (wide / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 24000}))
    with pytest.raises(SystemExit):
        main(["import", str(folder), str(out), "--text-encoder", str(t5), "--style-encoder", str(wide)])
    assert "16-dim features, but the checkpoint's style conditioner takes 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["import", str(folder), str(out), "--text-encoder", str(t5), "--style-encoder", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--style-encoder {tmp_path}: no config.json there" in err and not out.exists()


def test_text_only_generation_matches_audiocraft(ac_style) -> None:
    """Without a style reference audiocraft's MusicGen gives every item a one-sample zero wav (musicgen.py
    ``_prepare_tokens_and_attributes``): one zero style token, which the import records as ``null_tokens: 1``."""
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    import ostinato
    from ostinato.nn.decoding import GenerationParams

    lm, out, _ = ac_style
    model = ostinato.load(out)
    attributes = [ConditioningAttributes(text={"description": t}, wav={"self_wav": WavCondition(
        torch.zeros(1, 1, 1), torch.tensor([0]), [SR], [None], [None])}) for t in TEXTS]
    with torch.no_grad():
        ref = lm.generate(conditions=attributes, max_gen_len=8, use_sampling=False, cfg_coef=3.0)
        audio = model.generate(TEXTS, 8 / model.codec.frame_rate,
                               params=GenerationParams(temperature=0.0, cfg_scale=3.0, backend="cache"))
        want = model.codec.decode(ref)
    torch.testing.assert_close(audio, want[..., :audio.shape[-1]], atol=1e-5, rtol=1e-5)


def test_generate_cli_with_style_and_double_cfg(ac_style, tmp_path: Path) -> None:
    """``ostinato generate --style ref.wav --cfg 3 --cfg-beta 2 --style-eval-q 1`` on the import writes one clip
    per prompt; fewer style codebooks (eval_q 1, the import's is 2) give another clip."""
    from ostinato.cli import main
    from ostinato.fileio import write_wav

    _, out, _ = ac_style
    ref = tmp_path / "ref.wav"
    write_wav(ref, wavs(1, seconds=4.0, seed=8)[0], SR)
    for eval_q in ("1", "2"):
        main(["generate", "--model", str(out), "--prompt", "organ", "--prompt", "an irish reel", "--style", str(ref),
              "--cfg-scale", "3", "--cfg-beta", "2", "--style-eval-q", eval_q, "--temperature", "0", "--seconds", "0.1",
              "--out", str(tmp_path / f"q{eval_q}")])
    clips = {q: sorted((tmp_path / f"q{q}").glob("*.wav")) for q in "12"}
    assert len(clips["1"]) == len(clips["2"]) == 2
    import soundfile

    one, two = (soundfile.read(str(clips[q][0]))[0] for q in "12")
    assert one.shape == two.shape and abs(one - two).max() > 1e-3


def token_batch(frames: int, seed: int = 9):
    from ostinato.data.token_datamodule import TokenBatch

    codes = torch.randint(0, CARD, (len(TEXTS), K, frames), generator=torch.Generator().manual_seed(seed))
    return TokenBatch(codes, torch.full((len(TEXTS),), frames), TEXTS, [{"caption": t} for t in TEXTS])


def test_finetuning_leaves_the_style_excerpt_out_of_the_loss(ac_style) -> None:
    """audiocraft's ``compute_mask`` (style2music.yaml; conditioners.py ``_get_mask_wav``, lines 860-869, and the
    solver's ``padding_mask & model_output.mask & style_mask``): the frames the style excerpt was cut from are no
    targets, in training (random start and length) and in evaluation (the first ``length`` seconds)."""
    from ostinato.families.musicgen import ImportedMusicGenFamily

    _, out, _ = ac_style
    family = ImportedMusicGenFamily(export=str(out)).eval()
    fr = family.model.codec.frame_rate
    batch = token_batch(int(5 * fr))
    c = family.batch_conditions(batch, batch.codes, batch.lengths, None, train=False)
    excerpt = int(SECONDS * fr)
    assert not c.targets[:, :excerpt].any() and c.targets[:, excerpt:].all()
    _, masked = family.compute_losses(batch.codes, batch.lengths, c.cond, c.mask, c.prefix, c.targets)
    _, whole = family.compute_losses(batch.codes, batch.lengths, c.cond, c.mask, c.prefix)
    assert torch.equal(whole - masked, torch.full((K,), len(TEXTS) * excerpt))
    c = family.batch_conditions(batch, batch.codes, batch.lengths, None, train=True)
    cut = (~c.targets).sum(dim=1)
    assert bool((cut == cut[0]).all()) and 1.5 * fr <= int(cut[0]) <= 4.5 * fr  # one length, drawn
    family.model.style.mask_excerpt = False
    assert family.batch_conditions(batch, batch.codes, batch.lengths, None, train=False).targets is None


def test_finetuning_the_import_conditions_like_audiocraft(ac_style) -> None:
    """``continue_from=OUT`` with ``family=musicgen_import``: the family's eval prefix of a 3 s token batch is what
    audiocraft's conditioners and fuser prepend (style then text), and a training loss reaches the style
    conditioner and the text projection."""
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    from ostinato.engine.weights import load_weights
    from ostinato.families.musicgen import ImportedMusicGenFamily

    lm, out, _ = ac_style
    family = ImportedMusicGenFamily(export=str(out)).eval()
    assert not load_weights(family, out).missing
    codec = family.model.codec
    frames = int(SECONDS * codec.frame_rate)
    batch = token_batch(frames)
    codes = batch.codes
    c = family.batch_conditions(batch, batch.codes, batch.lengths, None, train=False)
    with torch.no_grad():
        wav = codec.decode(codes)
        attrs = [ConditioningAttributes(text={"description": t}, wav={"self_wav": WavCondition(
            w[None], torch.tensor([w.shape[-1]]), [SR], [None], [None])}) for t, w in zip(TEXTS, wav)]
        tensors = lm.condition_provider(lm.condition_provider.tokenize(attrs))
        ref, _ = lm.fuser(torch.zeros(len(TEXTS), 0, DIM), tensors)
    assert c.prefix.shape == ref.shape and (c.prefix - ref).abs().max().item() <= 1e-4
    family.train()
    loss = family.losses(token_batch(6 * frames // 3), train=True).mean()  # 6 s: targets outside the excerpt
    loss.backward()
    assert torch.isfinite(loss)
    assert family.model.style.input_proj.weight.grad.abs().sum() > 0
    assert family.model.text.proj.weight.grad.abs().sum() > 0


def test_a_reference_at_another_rate_is_resampled_as_audiocraft_does(ac_style, reference) -> None:
    """audiocraft's ``generate_with_chroma`` brings the reference to the model's rate with ``convert_audio``
    (julius) before the conditioner resamples it again for MERT: a 44.1 kHz reference gives its tokens."""
    from audiocraft.data.audio_utils import convert_audio

    import ostinato
    from ostinato.generation.request import AudioInput

    _, out, _ = ac_style
    model = ostinato.load(out)
    wav44 = 0.3 * torch.randn(1, 1, int(SECONDS * 44100), generator=torch.Generator().manual_seed(11))
    want = reference_tokens(reference, convert_audio(wav44, 44100, SR, 1))
    with torch.no_grad():
        tokens = model._style_prefix(AudioInput(wav44[0], 44100), 1)
    assert tokens.shape == want.shape and (tokens - want).abs().max() <= 1e-4


def test_a_moved_import_finds_its_style_encoder(ac_style, tmp_path: Path) -> None:
    import shutil

    import ostinato

    _, out, _ = ac_style
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    recorded = (moved / "config.yaml").read_text()
    assert "features: style_encoder" in recorded and str(out) not in recorded  # relative to the folder
    model = ostinato.load(moved)
    assert Path(model.style_source) == moved / "style_encoder"
