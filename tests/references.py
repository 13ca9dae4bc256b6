"""The reference packages the parity tests compare with, built from the packages themselves.

audiocraft 1.3.0 pins torch 2.1, so ``make install`` puts it with ``pip install --no-deps --target`` into
``.venv/ref/audiocraft`` with its small pure-Python requirements; ``audiocraft()`` puts that folder and the stubs of
``xformers`` and ``spacy`` (tests/reference_stubs) on ``sys.path``, works offline, selects the torch attention backend
and returns the package. Nothing else of the test process changes.

descript-audio-codec 1.0.0 needs descript-audiotools, whose requirements (protobuf<3.20, tensorboard, IPython...)
conflict with ours: ``make install`` puts both with their small pure-Python imports into ``.venv/ref/dac``, and
``dac()`` loads them; audiotools imports tensorboard's ``SummaryWriter`` at module level and never uses it there, so
without tensorboard ``torch.utils.tensorboard`` becomes a stand-in that refuses to write.

kadtk 1.1.0 (Kernel Audio Distance) pins torch<2.6, numpy<2 and tensorflow: ``make install`` puts it with hypy-utils
into ``.venv/ref/kadtk``, and ``kadtk()`` loads its ``kadtk.kad`` module only: the package's ``__init__`` imports its
embedding models (librosa, tensorflow-era PANNs and CLAP code, even ``turtle``), so ``kadtk`` is entered as a bare
package and its ``emb_loader`` and ``model_loader`` (what ``kad.py`` imports besides numpy, torch and hypy_utils) as
stand-ins that refuse to be used.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("OSTINATO_REF", ROOT / ".venv" / "ref"))
STUBS = Path(__file__).resolve().parent / "reference_stubs"


def _on_path(folder: Path) -> None:
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # appended: the venv's own packages (torch, transformers) come first


@contextmanager
def unpickling_torch_load() -> Iterator[None]:
    """audiocraft's exporters ``torch.load`` solver checkpoints (pickled OmegaConf configs) without
    ``weights_only``, which torch >= 2.6 refuses; allowed only inside this block, so that no other test of the
    process loads pickles."""
    before = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = before


def audiocraft() -> ModuleType:
    """The audiocraft 1.3.0 package (``make install`` put it in ``.venv/ref/audiocraft``)."""
    folder = REF / "audiocraft"
    if not (folder / "audiocraft").is_dir():
        pytest.fail(f"{folder}: audiocraft 1.3.0 is not installed there; run `make install`")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    _on_path(folder)
    _on_path(STUBS)
    from ostinato.metrics.embeddings.clap import import_laion_clap

    import_laion_clap()  # audiocraft imports laion_clap, which fetches tokenizers at import: ostinato's offline import
    import audiocraft as package
    from audiocraft.modules.transformer import set_efficient_attention_backend

    set_efficient_attention_backend("torch")
    return package


# ----- audiocraft MusicGen configs ---------------------------------------------------------------------------
# The values of audiocraft's config/model/lm/{default,musicgen_lm}.yaml and config/conditioner/*.yaml (repository
# facebookresearch/audiocraft) that its builders read; sizes are the caller's (tests use small, non-default ones).
AC_TRANSFORMER_LM = dict(
    dim=512, num_heads=8, num_layers=8, hidden_scale=4, n_q=4, card=2048, dropout=0.0, emb_lr=None,
    activation="gelu", norm_first=True, bias_ff=False, bias_attn=False, bias_proj=False, past_context=None,
    causal=True, custom=False, memory_efficient=False, attention_as_float32=False, layer_scale=None,
    positional_embedding="sin", xpos=False, checkpointing="none", weight_init="gaussian", depthwise_init="current",
    zero_bias_init=True, norm="layer_norm", cross_attention=False, qk_layer_norm=False, qk_layer_norm_cross=False,
    attention_dropout=None, kv_repeat=1, two_step_cfg=False)
AC_T5 = dict(name="t5-base", finetune=False, word_dropout=0.0, normalize_text=False)
AC_CONDITIONERS = {
    # text2music.yaml: T5 description through cross-attention
    "text": dict(fuser=dict(cross=["description"], prepend=[]), cfg_dropout=0.3,
                 conditioners={"description": {"model": "t5", "t5": AC_T5}}),
    # chroma2music.yaml (melody): chroma and description both prepended
    "chroma": dict(fuser=dict(cross=[], prepend=["self_wav", "description"]), cfg_dropout=0.2,
                   conditioners={"self_wav": {"model": "chroma_stem", "chroma_stem": dict(
                       sample_rate=32000, n_chroma=12, radix2_exp=14, argmax=True, match_len_on_eval=False,
                       eval_wavs=None, n_eval_wavs=100, cache_path=None)},
                       "description": {"model": "t5", "t5": AC_T5}}),
}


def audiocraft_lm_cfg(conditioner: str = "text", *, n_q: int = 4, card: int = 64, dim: int = 48,
                      num_heads: int = 4, num_layers: int = 2, delays: list[int] | None = None,
                      sample_rate: int = 32000, channels: int = 1, t5_name: str = "t5-base", **lm):
    """An audiocraft MusicGen experiment config (``xp.cfg``) for ``builders.get_lm_model``: the yaml defaults of
    musicgen_lm + the ``conditioner`` group ("text" | "chroma"), with these sizes."""
    from omegaconf import OmegaConf

    cond = AC_CONDITIONERS[conditioner]
    conditioners = {k: dict(v) for k, v in cond["conditioners"].items()}
    if "description" in conditioners:
        conditioners["description"] = {"model": "t5", "t5": {**AC_T5, "name": t5_name}}
    if "self_wav" in conditioners:
        conditioners["self_wav"]["chroma_stem"] = {**conditioners["self_wav"]["chroma_stem"],
                                                   "sample_rate": sample_rate}
    fuser = dict(cross_attention_pos_emb=False, cross_attention_pos_emb_scale=1, sum=[], input_interpolate=[],
                 **cond["fuser"])
    return OmegaConf.create({
        "lm_model": "transformer_lm", "device": "cpu", "dtype": "float32", "sample_rate": sample_rate,
        "channels": channels, "dataset": {"segment_duration": 10.0},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": delays or list(range(n_q)),
                                                             "flatten_first": 0, "empty_initial": 0}},
        "transformer_lm": {**AC_TRANSFORMER_LM, "n_q": n_q, "card": card, "dim": dim, "num_heads": num_heads,
                           "num_layers": num_layers, **lm},
        "classifier_free_guidance": {"training_dropout": cond["cfg_dropout"], "inference_coef": 3.0},
        "attribute_dropout": {}, "fuser": fuser, "conditioners": conditioners,
        # stereo: L/R codebooks of the mono codec interleaved (audiocraft's grids/musicgen/musicgen_stereo_finetune)
        "interleave_stereo_codebooks": {"use": channels == 2, "per_timestep": False}})


# ----- the tiny T5 the tests stand in for t5-base ----------------------------------------------------------------
T5_DIM = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_tokenizer(dst: Path) -> None:
    """The MiniLM tokenizer into ``dst`` (the one available offline; the tiny T5's vocabulary is its size)."""
    import shutil

    from ostinato.nn.conditioners import default_text_model

    for name in TOKENIZER_FILES:
        if (default_text_model() / name).is_file():
            shutil.copy2(default_text_model() / name, dst / name)


def t5_config(**kw):
    """A tiny T5 (``T5_DIM`` wide, 2 layers) over the MiniLM vocabulary."""
    from transformers import T5Config

    return T5Config(vocab_size=30522, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                    **kw)


def write_t5(folder: Path, seed: int = 0) -> Path:
    """A tiny random T5 encoder (``torch.manual_seed(seed)``) with the MiniLM tokenizer, saved in ``folder``."""
    import torch
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    T5EncoderModel(t5_config()).eval().save_pretrained(folder)
    copy_tokenizer(folder)
    return folder


def use_local_t5(monkeypatch: pytest.MonkeyPatch, folder: Path, name: str = "t5-base") -> None:
    """audiocraft's ``T5Conditioner(name)`` loads ``folder`` (a tiny T5 encoder with its tokenizer) offline."""
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    conditioners = audiocraft().modules.conditioners

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(_name: str, *args, **kwargs):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)

    class LocalEncoder:
        @staticmethod
        def from_pretrained(_name: str, *args, **kwargs):
            return T5EncoderModel.from_pretrained(folder, local_files_only=True)

    monkeypatch.setattr(conditioners, "T5Tokenizer", LocalTokenizer)
    monkeypatch.setattr(conditioners, "T5EncoderModel", LocalEncoder)
    width = AutoConfig.from_pretrained(folder, local_files_only=True).d_model
    monkeypatch.setitem(conditioners.T5Conditioner.MODELS_DIMS, name, width)


def audiocraft_export_lm(lm, cfg, out: Path) -> Path:
    """``lm``'s weights as audiocraft's own ``export_lm`` writes them from a solver checkpoint -> ``out``
    (a ``state_dict.bin``)."""
    import torch
    from omegaconf import OmegaConf

    audiocraft()
    from audiocraft.utils.export import export_lm

    solver = out.with_name(out.name + ".solver.th")
    torch.save({"xp.cfg": OmegaConf.create(OmegaConf.to_container(cfg)), "fsdp_best_state": None,
                "best_state": {"model": lm.state_dict()}}, solver)
    with unpickling_torch_load():
        export_lm(solver, out)
    solver.unlink()
    return out


# ----- audiocraft EnCodec ------------------------------------------------------------------------------------
# The values of audiocraft's config/model/encodec/default.yaml; sizes are the caller's.
AC_SEANET = dict(dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2], activation="ELU",
                 activation_params={"alpha": 1.0}, norm="weight_norm", norm_params={}, kernel_size=7,
                 residual_kernel_size=3, last_kernel_size=7, dilation_base=2, pad_mode="constant", true_skip=True,
                 compress=2, lstm=2, disable_norm_outer_blocks=0,
                 decoder={"trim_right_ratio": 1.0, "final_activation": None, "final_activation_params": None},
                 encoder={})
AC_RVQ = dict(n_q=8, q_dropout=False, bins=1024, decay=0.99, kmeans_init=True, kmeans_iters=50,
              threshold_ema_dead_code=2, orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False)


def audiocraft_encodec_cfg(*, sample_rate: int = 32000, channels: int = 1, n_q: int = 4, bins: int = 64,
                           causal: bool = False, **seanet):
    """An audiocraft EnCodec experiment config for ``builders.get_compression_model``: encodec/default.yaml with
    these sizes (``seanet`` overrides, e.g. ``dimension``, ``n_filters``, ``ratios``, ``lstm``). Its codebooks
    start random (``kmeans_init: false``), so that random weights give distinct codes."""
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "compression_model": "encodec", "device": "cpu", "sample_rate": sample_rate, "channels": channels,
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": sample_rate, "channels": channels,
                    "causal": causal, "renormalize": False},
        "seanet": {**AC_SEANET, "channels": channels, "causal": causal, **seanet},
        "rvq": {**AC_RVQ, "n_q": n_q, "bins": bins, "kmeans_init": False}})


def audiocraft_export_compression(model, cfg, out: Path) -> Path:
    """``model``'s weights as audiocraft's own ``export_encodec`` writes them from a solver checkpoint -> ``out``
    (a ``compression_state_dict.bin``)."""
    import torch
    from omegaconf import OmegaConf

    audiocraft()
    from audiocraft.utils.export import export_encodec

    solver = out.with_name(out.name + ".solver.th")
    torch.save({"xp.cfg": OmegaConf.create(OmegaConf.to_container(cfg)), "best_state": {"model": model.state_dict()}},
               solver)
    with unpickling_torch_load():
        export_encodec(solver, out)
    solver.unlink()
    return out


# ----- audiocraft MusicGen-Style (not in the 1.3.0 release) ----------------------------------------------------
# The style conditioner of audiocraft's repository (audiocraft/modules/conditioners.py at 896ec7c, FeatureExtractor
# and StyleConditioner, lines 762-1003; config/conditioner/style2music.yaml) is not in any audiocraft release: the
# reference is assembled from the 1.3.0 package's own blocks (WaveformConditioner, StreamingTransformer,
# ResidualVectorQuantizer, convert_audio) with the source's attribute names and forward.
AC_STYLE = dict(model_name="mert", transformer_scale="default", sample_rate=32000, encodec_n_q=3, length=3.0,
                ds_factor=15, n_q_out=6, eval_q=3, q_dropout=True, bins=1024, varying_lengths=[1.5, 4.5],
                batch_norm=True, compute_mask=True, ds_rate_compression=640, use_middle_of_segment=False,
                rvq_threshold_ema_dead_code=0.1, encodec_checkpoint="//pretrained/facebook/encodec_32khz")


def audiocraft_style_conditioner(mert, *, output_dim: int, feature_dim: int, width: int, num_heads: int,
                                 num_layers: int, n_q_out: int, eval_q: int, bins: int, ds_factor: int,
                                 length: float, sample_rate: int = 32000):
    """audiocraft's MusicGen-Style ``StyleConditioner`` (mert features, ``use_middle_of_segment`` so that the
    excerpt is deterministic) over ``mert`` (a frozen HF encoder standing for MERT); random weights."""
    import torch
    from torch import nn

    audiocraft()
    from audiocraft.data.audio_utils import convert_audio
    from audiocraft.modules.conditioners import WaveformConditioner
    from audiocraft.modules.transformer import StreamingTransformer
    from audiocraft.quantization import ResidualVectorQuantizer

    class StyleConditioner(WaveformConditioner):
        def __init__(self) -> None:
            super().__init__(dim=width, output_dim=output_dim, device="cpu")
            self.__dict__["feat_extractor"] = mert.eval()  # frozen, outside the state dict (source line 814)
            self.embed = nn.Linear(feature_dim, width)  # "hardcoded" 768 -> dim in the source (line 815)
            self.transformer = StreamingTransformer(  # tr_args of the source (lines 903-915)
                d_model=width, num_heads=num_heads, num_layers=num_layers, dim_feedforward=4 * width,
                memory_efficient=True, activation="gelu", norm_first=True, causal=False, layer_scale=None,
                bias_ff=False, bias_attn=False)
            self.rvq = ResidualVectorQuantizer(width, n_q=n_q_out, q_dropout=True, bins=bins,
                                               threshold_ema_dead_code=0.1)
            self.batch_norm = nn.BatchNorm1d(width, affine=False)
            self.sample_rate, self.length_subwav = sample_rate, int(length * sample_rate)

        def _get_wav_embedding(self, x):  # FeatureExtractor + StyleConditioner._get_wav_embedding, in eval
            if x.wav.shape[-1] == 1:
                return torch.zeros(x.wav.shape[0], 1, width)
            start = int((x.wav.shape[-1] - self.length_subwav) / 2)
            wav = convert_audio(x.wav[:, :, start:start + self.length_subwav], from_rate=x.sample_rate[0],
                                to_rate=24000, to_channels=1)
            with torch.no_grad():
                out = self.embed(self.feat_extractor(wav.squeeze(-2)).last_hidden_state)
            out = self.transformer(out)
            out = self.batch_norm(out.transpose(1, 2)).transpose(1, 2)
            self.rvq.set_num_codebooks(n_q_out if self.training else eval_q)
            out = self.rvq(out.transpose(1, 2), frame_rate=1.).x.transpose(1, 2)
            return out[:, ::ds_factor]

        def _downsampling_factor(self):
            return self.sample_rate / 75 * ds_factor

    return StyleConditioner()


# ----- descript-audio-codec ----------------------------------------------------------------------------------
def _without_tensorboard() -> None:
    """``torch.utils.tensorboard`` as an empty stand-in when tensorboard is not installed (audiotools imports its
    ``SummaryWriter`` at module level; DAC never writes a log)."""
    import importlib.util
    from types import ModuleType

    if importlib.util.find_spec("tensorboard") is None and "torch.utils.tensorboard" not in sys.modules:
        stub = ModuleType("torch.utils.tensorboard")

        class SummaryWriter:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("tensorboard is not installed (a stand-in for the reference packages)")

        stub.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = stub


def dac() -> ModuleType:
    """The descript-audio-codec 1.0.0 package (``make install`` put it in ``.venv/ref/dac``)."""
    folder = REF / "dac"
    if not (folder / "dac").is_dir():
        pytest.fail(f"{folder}: descript-audio-codec 1.0.0 is not installed there; run `make install`")
    _without_tensorboard()
    _on_path(folder)
    import dac as package

    return package


# ----- kadtk (Kernel Audio Distance) --------------------------------------------------------------------------
def kadtk() -> ModuleType:
    """kadtk 1.1.0's ``kadtk.kad`` module (``make install`` put the package in ``.venv/ref/kadtk``), with its
    ``calc_kernel_audio_distance``, ``median_pairwise_distance`` and ``SCALE_FACTOR``."""
    import importlib

    folder = REF / "kadtk"
    if not (folder / "kadtk" / "kad.py").is_file():
        pytest.fail(f"{folder}: kadtk 1.1.0 is not installed there; run `make install`")
    if "kadtk.kad" not in sys.modules:
        _on_path(folder)  # hypy_utils

        class Refused:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("kadtk's embedding models are stand-ins in the tests")

        package = ModuleType("kadtk")
        package.__path__ = [str(folder / "kadtk")]  # a bare package: its __init__ (every model) is not run
        sys.modules["kadtk"] = package
        for name, attr in (("emb_loader", "EmbeddingLoader"), ("model_loader", "ModelLoader")):
            stub = ModuleType(f"kadtk.{name}")
            setattr(stub, attr, Refused)
            sys.modules[f"kadtk.{name}"] = stub
    return importlib.import_module("kadtk.kad")
