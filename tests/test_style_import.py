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
from tests.references import AC_STYLE, audiocraft, audiocraft_style_conditioner

pytestmark = pytest.mark.usefixtures("one_thread")

SR, SECONDS = 32000, 3.0
SIZES = dict(feature_dim=32, width=48, num_heads=4, num_layers=2, n_q_out=4, eval_q=2, bins=32, ds_factor=15,
             length=SECONDS)
OUT_DIM = 40


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
    style = {**AC_STYLE, "n_q_out": SIZES["n_q_out"], "eval_q": SIZES["eval_q"], "bins": SIZES["bins"],
             "ds_factor": SIZES["ds_factor"], "length": SECONDS}
    return {"conditioners": {"self_wav": {"model": "style", "style": style},
                             "description": {"model": "t5", "t5": {"name": "t5-base", "finetune": False}}},
            "fuser": {"prepend": ["self_wav", "description"], "cross": [], "sum": [], "input_interpolate": []}}


def ours(reference, mert: Path) -> tuple[StyleConditioner, HFAudioFeatures]:
    state = {STYLE_PREFIX + k: v for k, v in reference.state_dict().items()}
    kwargs = style_kwargs(xp_cfg(), state)
    # the width comes from transformer_scale in audiocraft; this test's is not one of the three scales
    kwargs.update(width=SIZES["width"], num_layers=SIZES["num_layers"], num_heads=SIZES["num_heads"])
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
    assert (kwargs["width"], kwargs["num_layers"], kwargs["num_heads"]) == (512, 8, 8)  # transformer_scale default
    assert (kwargs["n_q"], kwargs["eval_q"], kwargs["card"], kwargs["downsample"]) == (4, 2, 32, 15)
    assert kwargs["eval_excerpt_seconds"] == SECONDS and kwargs["excerpt_seconds"] == [1.5, 4.5]
    assert kwargs["norm_bias"] and kwargs["q_dropout"] and kwargs["null_tokens"] == 1
    mapped, _ = style_state(state)
    assert mapped["rvq.layers.0.codebook.inited"].dtype == torch.bool
    assert "input_proj.weight" in mapped and "norm.running_var" in mapped and "rvq.steps" in mapped
    assert "transformer.layers.1.norm1.bias" in mapped and "transformer.layers.1.linear1.bias" not in mapped
    for key, value in [("model_name", "encodec"), ("transformer_scale", "none"), ("batch_norm", False)]:
        cfg = xp_cfg()
        cfg["conditioners"]["self_wav"]["style"][key] = value
        with pytest.raises(ValueError, match=f"conditioners.self_wav.style.{key}="):
            style_kwargs(cfg, state)
