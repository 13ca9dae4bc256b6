"""Write a MusicGen back in the formats it can be imported from: audiocraft's or transformers'.

``export_musicgen(model, OUT, "audiocraft")`` writes what audiocraft's ``loaders.load_lm_model`` and
``load_compression_model`` read (``MusicGen.get_pretrained(OUT)`` takes the folder)::

    OUT/state_dict.bin              {'xp.cfg': yaml, 'best_state': LMModel state, 'version', 'exported': True}
    OUT/compression_state_dict.bin  the EnCodec (``interop.encodec.export_audiocraft_encodec``)

``export_musicgen(model, OUT, "transformers")`` writes a ``MusicgenForConditionalGeneration.save_pretrained``
folder (decoder, the text encoder, the EnCodec as ``audio_encoder``, ``enc_to_dec_proj``, generation config) with
the text encoder's tokenizer files. Both are built in ``OUT.tmp`` and renamed onto ``OUT`` when complete.

The mappings are the inverses of ``interop.musicgen``'s ``audiocraft_state_to_lm`` / ``transformers_state_to_lm``.
What a format cannot hold is refused in one line (``UserError``) naming the reason: style conditioning, a text
encoder other than T5 for audiocraft, LM options the format's transformer lacks.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.errors import UserError
from ostinato.models.codec import Codec
from ostinato.models.musicgen import MusicGen
from ostinato.models.stereo_codec import InterleavedStereoCodec
from ostinato.nn.patterns import stereo_delays
from ostinato.nn.transformer import LMConfig

__all__ = ["FORMATS", "export_musicgen", "lm_state_to_audiocraft", "lm_state_to_transformers",
           "audiocraft_xp_config", "transformers_decoder_config", "text_encoder_name", "AUDIOCRAFT_VERSION"]

log = logging.getLogger(__name__)

FORMATS = ("audiocraft", "transformers")
AUDIOCRAFT_VERSION = "1.3.0"  # the audiocraft release whose files this writes (what its export_lm records)
AUDIOCRAFT_T5 = ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b", "google/flan-t5-small",
                 "google/flan-t5-base", "google/flan-t5-large", "google/flan-t5-xl", "google/flan-t5-xxl")
TEXT_NAME_KEY = "text_encoder_name"  # where an import's export.json records its source's text encoder name
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt", "vocab.json",
                    "merges.txt")


# ----- LM state mappings -------------------------------------------------------------------------------------

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_AC_NAMES = {"self_attn.out_proj": "self_attn.mha.out_proj", "cross_attn.out_proj": "cross_attention.mha.out_proj",
             "norm_self": "norm1", "norm_cross": "norm_cross", "norm_ffn": "norm2", "fc1": "linear1",
             "fc2": "linear2"}
_TF_NAMES = {"self_attn": "self_attn", "cross_attn": "encoder_attn", "norm_self": "self_attn_layer_norm",
             "norm_cross": "encoder_attn_layer_norm", "norm_ffn": "final_layer_norm", "fc1": "fc1", "fc2": "fc2"}


def lm_state_to_audiocraft(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``CodebookLM`` state -> audiocraft ``LMModel`` names (``custom: false`` layers: ``.mha.``); q, k, v rows
    are fused into ``in_proj_weight [3D, D]`` (and ``in_proj_bias``). The text projection is not part of it."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(("emb.", "out_norm.")):
            out[key] = value
        elif key.startswith("heads."):
            out["linears." + key[len("heads."):]] = value
        elif match := _LAYER.match(key):
            i, rest = match[1], match[2]
            qkv = re.match(r"^(self_attn|cross_attn)\.([qkv])_proj\.(weight|bias)$", rest)
            if qkv:
                module = "self_attn" if qkv[1] == "self_attn" else "cross_attention"
                fused.setdefault(f"transformer.layers.{i}.{module}.mha.in_proj_{qkv[3]}", {})[qkv[2]] = value
                continue
            module, _, param = rest.rpartition(".")
            if module not in _AC_NAMES:
                raise KeyError(f"CodebookLM key {key} has no audiocraft name")
            out[f"transformer.layers.{i}.{_AC_NAMES[module]}.{param}"] = value
        else:
            raise KeyError(f"CodebookLM key {key} has no audiocraft name")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def lm_state_to_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``CodebookLM`` state -> ``MusicgenForCausalLM`` names (``model.decoder.*``, ``lm_heads.*``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("emb."):
            out["model.decoder.embed_tokens." + key[len("emb."):]] = value
        elif key.startswith("out_norm."):
            out["model.decoder.layer_norm." + key[len("out_norm."):]] = value
        elif key.startswith("heads."):
            out["lm_heads." + key[len("heads."):]] = value
        elif (match := _LAYER.match(key)) and match[2].split(".")[0] in _TF_NAMES:
            module, _, rest = match[2].partition(".")
            out[f"model.decoder.layers.{match[1]}.{_TF_NAMES[module]}.{rest}"] = value
        else:
            raise KeyError(f"CodebookLM key {key} has no transformers name")
    return out


# ----- what each format can hold ------------------------------------------------------------------------------

def _refuse_unless(ok: bool, fmt: str, reason: str) -> None:
    if not ok:
        raise UserError(f"--format {fmt}: {reason}")


def _check_model(model: MusicGen, fmt: str) -> None:
    """The refusals common to both formats, and each format's own (one line each, naming the reason)."""
    cfg: LMConfig = model.cfg
    _refuse_unless(fmt in FORMATS, fmt, f"unknown format; use one of {', '.join(FORMATS)} (or leave --format out "
                                        "for ostinato's own export)")
    _refuse_unless(model.style is None, fmt, "this MusicGen has style conditioning (MusicGen-Style), which "
                                             f"{fmt}'s MusicGen format does not hold")
    _refuse_unless(model.melody is None, fmt, "this MusicGen has melody (chroma) conditioning, which the "
                                              f"{fmt} export does not write yet; export it with ostinato's format")
    _refuse_unless(model.text is not None, fmt, "this MusicGen has no text conditioner (an unconditional LM); "
                                                f"{fmt}'s text-to-music MusicGen needs one")
    _refuse_unless(cfg.positional == "sin", fmt, f"lm.positional={cfg.positional}: {fmt}'s MusicGen has "
                                                 "sinusoidal positions only")
    _refuse_unless(cfg.cond_dim is None, fmt, f"lm.cond_dim={cfg.cond_dim}: {fmt}'s cross-attention reads "
                                              "conditions of the LM width")
    _refuse_unless(cfg.layer_norm_eps == 1e-5, fmt, f"lm.layer_norm_eps={cfg.layer_norm_eps}: {fmt}'s MusicGen "
                                                    "uses 1e-5")
    _refuse_unless(cfg.activation in ("gelu", "relu"), fmt, f"lm.activation={cfg.activation}: only gelu or relu "
                                                            f"mean the same in {fmt}")
    if fmt == "transformers":
        _refuse_unless(not cfg.bias, fmt, "lm.bias=true: transformers' MusicGen layers have no biases")


def _text_folder(model: MusicGen) -> Path:
    assert model.text is not None
    return Path(model.text.model_path)


def _text_config(model: MusicGen) -> dict[str, Any]:
    return json.loads((_text_folder(model) / "config.json").read_text())


def text_encoder_name(model: MusicGen, name: str | None = None) -> str:
    """The T5 name audiocraft's ``T5Conditioner`` loads for this model's text encoder: ``name`` when given, else
    the one its import recorded (``export.json`` beside the ``text_encoder`` folder), else the encoder folder's
    ``_name_or_path``. audiocraft knows only its list of T5 names."""
    folder = _text_folder(model)
    model_type = _text_config(model).get("model_type")
    if model_type != "t5":
        raise UserError(f"--format audiocraft: the text encoder {folder} is a {model_type} model; audiocraft's "
                        "MusicGen conditions on T5 only and could not load it (export --format transformers, or "
                        "train from a T5 import)")
    if name is None:
        info = folder.parent / "export.json"
        if info.is_file():
            name = json.loads(info.read_text()).get(TEXT_NAME_KEY)
    if name is None:
        name = _text_config(model).get("_name_or_path") or None
    if name is None:
        raise UserError(f"--format audiocraft: no T5 name recorded for the text encoder {folder}; pass --t5-name "
                        f"(one of {', '.join(AUDIOCRAFT_T5)}) naming the T5 it is")
    if name not in AUDIOCRAFT_T5:
        raise UserError(f"--format audiocraft: the text encoder's name {name!r} is none that audiocraft's "
                        f"T5Conditioner loads; pass --t5-name (one of {', '.join(AUDIOCRAFT_T5)})")
    return str(name)


def _codec(model: MusicGen, fmt: str) -> tuple[Codec, int]:
    """(the mono codec both formats store, the model's channels): a stereo MusicGen's codec is a mono one on each
    channel, codebooks interleaved (``InterleavedStereoCodec``)."""
    if "_codec" not in model.__dict__ and "_codec_loader" not in model.__dict__:
        from ostinato.interop.codecs import load_codec

        model.set_codec_loader(load_codec)  # a MusicGen built by hand: its codec_ref is read as ostinato.load reads it
    try:
        codec = model.codec
    except ValueError as e:
        raise UserError(f"--format {fmt}: the MusicGen has no usable codec ({str(e).splitlines()[0]}); the export "
                        "writes it too: record one at import (--codec) or train on token shards that name it") from e
    if isinstance(codec, InterleavedStereoCodec):
        return codec.mono, 2
    _refuse_unless(int(codec.channels) == 1, fmt, f"a {codec.channels}-channel codec: {fmt}'s stereo MusicGens "
                                                  "interleave the codebooks of a mono codec run on each channel")
    return codec, 1


def _semantics_note(model: MusicGen, fmt: str) -> None:
    want = "attended" if fmt == "audiocraft" else "masked"
    if model.semantics.text_padding != want:
        log.warning("%s attends %s text padding, this model %s it: a batch of prompts of different lengths "
                    "conditions differently there (single prompts are the same)", fmt,
                    "all" if want == "attended" else "no", model.semantics.text_padding)


# ----- audiocraft ---------------------------------------------------------------------------------------------

def audiocraft_xp_config(model: MusicGen, t5_name: str, sample_rate: int, channels: int,
                         cfg_dropout: float = 0.1) -> dict[str, Any]:
    """The parts of an audiocraft experiment config that ``builders.get_lm_model`` reads, for ``model``."""
    cfg = model.cfg
    transformer_lm = dict(
        dim=cfg.dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, hidden_scale=cfg.ffn_dim / cfg.dim,
        n_q=cfg.n_q, card=cfg.card, dropout=cfg.dropout, emb_lr=None, activation=cfg.activation, norm_first=True,
        bias_ff=cfg.bias, bias_attn=cfg.bias, bias_proj=False, past_context=None, causal=True, custom=False,
        memory_efficient=False, attention_as_float32=False, layer_scale=None, positional_embedding="sin",
        max_period=cfg.max_period, xpos=False, checkpointing="none", weight_init="gaussian",
        depthwise_init="current", zero_bias_init=True, norm="layer_norm", cross_attention=True, qk_layer_norm=False,
        qk_layer_norm_cross=False, attention_dropout=cfg.attention_dropout, kv_repeat=1, two_step_cfg=False)
    if transformer_lm["hidden_scale"] == int(transformer_lm["hidden_scale"]):
        transformer_lm["hidden_scale"] = int(transformer_lm["hidden_scale"])
    xp: dict[str, Any] = {
        "lm_model": "transformer_lm", "device": "cpu", "dtype": "float32", "sample_rate": int(sample_rate),
        "channels": int(channels), "dataset": {"segment_duration": 30.0},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": [int(d) for d in model.pattern.delays],
                                                             "flatten_first": 0, "empty_initial": 0}},
        "transformer_lm": transformer_lm,
        "classifier_free_guidance": {"training_dropout": float(cfg_dropout), "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
                  "cross": ["description"], "input_interpolate": []},
        "conditioners": {"description": {"model": "t5", "t5": {"name": t5_name, "finetune": False,
                                                                "word_dropout": 0.0, "normalize_text": False}}},
    }
    # stereo: the L/R codebooks of the mono codec interleaved (audiocraft's InterleaveStereoCompressionModel)
    xp["interleave_stereo_codebooks"] = {"use": channels == 2, "per_timestep": False}
    return xp


def _write_audiocraft(model: MusicGen, stage: Path, t5_name: str | None, cfg_dropout: float) -> None:
    from omegaconf import OmegaConf

    from ostinato.interop.encodec import export_audiocraft_encodec

    name = text_encoder_name(model, t5_name)
    codec, channels = _codec(model, "audiocraft")
    assert model.text is not None
    state = lm_state_to_audiocraft(model.lm.state_dict())
    prefix = "condition_provider.conditioners.description.output_proj."
    state.update({prefix + k: v for k, v in model.text.proj.state_dict().items()})
    xp = audiocraft_xp_config(model, name, codec.sample_rate, channels, cfg_dropout)
    package = {"xp.cfg": OmegaConf.to_yaml(OmegaConf.create(xp)),
               "best_state": {k: v.detach().cpu().float().contiguous().clone() for k, v in state.items()},
               "version": AUDIOCRAFT_VERSION, "exported": True}
    torch.save(package, stage / "state_dict.bin")
    export_audiocraft_encodec(codec, stage / "compression_state_dict.bin")


# ----- transformers -------------------------------------------------------------------------------------------

def transformers_decoder_config(model: MusicGen, channels: int = 1) -> dict[str, Any]:
    """``MusicgenDecoderConfig`` kwargs of ``model``'s LM (special token = ``card``: pad and BOS)."""
    cfg = model.cfg
    return dict(vocab_size=cfg.card, max_position_embeddings=2048, num_hidden_layers=cfg.num_layers,
                ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads, activation_function=cfg.activation,
                hidden_size=cfg.dim, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                activation_dropout=cfg.activation_dropout, initializer_factor=cfg.init_std,
                num_codebooks=cfg.n_q, audio_channels=channels, scale_embedding=False, tie_word_embeddings=False,
                pad_token_id=cfg.card, bos_token_id=cfg.card, decoder_start_token_id=cfg.card)


def _write_transformers(model: MusicGen, stage: Path) -> None:
    from transformers import (EncodecConfig, EncodecModel, MusicgenDecoderConfig, MusicgenForCausalLM,
                              MusicgenForConditionalGeneration)
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    from ostinato.interop.encodec import codec_to_transformers

    assert model.text is not None
    encoder = model.text.__dict__["encoder"]
    model_type = encoder.config.model_type
    _refuse_unless(type(encoder).__name__ == MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES.get(model_type), "transformers",
                   f"the text encoder {_text_folder(model)} ({type(encoder).__name__}) is not what transformers' "
                   "MusicGen builds for its config (AutoModelForTextEncoding)")
    codec, channels = _codec(model, "transformers")
    n, delays = model.n_q, list(model.pattern.delays)
    want = stereo_delays(n // 2) if channels == 2 else list(range(n))
    _refuse_unless(delays == want, "transformers", f"delays {delays}: transformers' "
                                                   f"{'stereo ' if channels == 2 else ''}MusicGen models the delays "
                                                   f"{want} only")
    codec_cfg, codec_state = codec_to_transformers(codec)
    audio = EncodecModel(EncodecConfig(**codec_cfg))
    audio.load_state_dict(codec_state, strict=True)
    decoder = MusicgenForCausalLM(MusicgenDecoderConfig(**transformers_decoder_config(model, channels)))
    decoder.load_state_dict(lm_state_to_transformers(model.lm.state_dict()), strict=True)
    proj = model.text.proj
    width = int(proj.weight.shape[1])
    if width == model.cfg.dim:  # transformers then feeds the text states unprojected
        _refuse_unless(torch.equal(proj.weight, torch.eye(width)) and not bool(proj.bias.any()), "transformers",
                       f"the text encoder is as wide as the decoder ({width}), where transformers' MusicGen has no "
                       "text projection, but this model's text.proj is not the identity")
    full = MusicgenForConditionalGeneration(text_encoder=type(encoder)(encoder.config), audio_encoder=audio,
                                            decoder=decoder)
    full.text_encoder.load_state_dict(encoder.state_dict(), strict=True)
    if full.enc_to_dec_proj is not None:
        full.enc_to_dec_proj.load_state_dict(proj.state_dict(), strict=True)
    gen = full.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = model.card
    gen.do_sample, gen.guidance_scale = True, 3.0
    gen.max_length = 1500
    full.config.decoder.pad_token_id = full.config.decoder.bos_token_id = model.card
    full.config.decoder.decoder_start_token_id = model.card
    full.config.pad_token_id = full.config.decoder_start_token_id = model.card
    full.save_pretrained(stage)
    for name in _TOKENIZER_FILES:
        if (_text_folder(model) / name).is_file():
            shutil.copy2(_text_folder(model) / name, stage / name)


# ----- the folder ---------------------------------------------------------------------------------------------

def export_musicgen(model: MusicGen, out: str | Path, format: str, *, overwrite: bool = False,
                    t5_name: str | None = None, cfg_dropout: float = 0.1) -> Path:
    """Write ``model`` (a plain ``MusicGen``, e.g. with LoRA adapters merged) to the folder ``out`` in ``format``
    ("audiocraft" | "transformers", see the module docstring); returns ``out``.

    Args:
        t5_name: audiocraft: the T5 name its ``T5Conditioner`` loads (default: the one the import recorded).
        cfg_dropout: audiocraft: the ``classifier_free_guidance.training_dropout`` to record.
    """
    from ostinato.interop.musicgen_import import _swap_in

    out = Path(out).expanduser().absolute()
    _check_model(model, format)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder (new or empty) for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and holds files; pass --overwrite to replace it, or choose another folder")
    _semantics_note(model, format)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            if format == "audiocraft":
                _write_audiocraft(model, tmp, t5_name, cfg_dropout)
            else:
                _write_transformers(model, tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

