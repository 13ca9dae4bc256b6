"""Write a MusicGen back in the formats it can be imported from: audiocraft's or transformers'.

``export_musicgen(model, OUT, "audiocraft")`` writes what audiocraft's ``loaders.load_lm_model`` and
``load_compression_model`` read (``MusicGen.get_pretrained(OUT)`` takes the folder)::

    OUT/state_dict.bin              {'xp.cfg': yaml, 'best_state': LMModel state, 'version', 'exported': True}
    OUT/compression_state_dict.bin  the EnCodec (``interop.encodec.export_audiocraft_encodec``)

``export_musicgen(model, OUT, "transformers")`` writes a ``MusicgenForConditionalGeneration.save_pretrained``
folder (decoder, the text encoder, the EnCodec as ``audio_encoder``, ``enc_to_dec_proj``, generation config) with
the text encoder's tokenizer files (a MusicGen without text, a ``MusicgenForCausalLM`` import: that decoder folder
alone). Both are built in ``OUT.tmp`` and renamed onto ``OUT`` when complete.

Stereo (an ``InterleavedStereoCodec``): audiocraft's ``interleave_stereo_codebooks`` / transformers'
``audio_channels: 2``, both over the mono EnCodec. MusicGen-melody (text prepended after the chroma): audiocraft's
``chroma2music`` conditioners and fuser (a chroma of fixed length, ``melody.frames``, is its ``match_len_on_eval``
with the training segment that gives that length), or ``MusicgenMelodyForConditionalGeneration`` with
``chroma_length`` and the feature extractor's ``preprocessor_config.json``.

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
                                             f"{fmt}'s MusicGen format does not hold ("
                                             + ("transformers has no MusicGen-Style" if fmt == "transformers" else
                                                "its style conditioner is in no audiocraft release: 1.3.0 cannot "
                                                "load it") + "); keep ostinato's export")
    _refuse_unless(model.text is not None or fmt == "transformers", fmt, "this MusicGen has no text conditioner "
                                                                         "(an unconditional LM); audiocraft's "
                                                                         "text-to-music MusicGen needs one")
    _refuse_unless(model.text is not None or cfg.cross_attention, fmt, "an LM without text and without "
                                                                       "cross-attention layers: transformers' "
                                                                       "MusicgenForCausalLM always has them")
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
        _refuse_unless(model.text_prefix == (model.melody is not None), fmt, "the text is prepended without a melody: "
                       "transformers' MusicGen cross-attends it (MusicGen-melody alone prepends it, after the chroma)")
    if model.melody is not None:
        _check_melody(model, fmt)


def _check_melody(model: MusicGen, fmt: str) -> None:
    """What MusicGen-melody's formats hold: the text prepended after the chroma, the source's chromagram (librosa's
    filterbank: ``melody.chroma`` audiocraft or transformers), audiocraft's STFT (a power of 2, hop n_fft / 4)."""
    mel = model.melody
    assert mel is not None
    _refuse_unless(model.text_prefix, fmt, f"a melody MusicGen whose text is cross-attended: {fmt}'s MusicGen-melody "
                                           "prepends the text after the chroma (family.text.fuse: prefix)")
    _refuse_unless(mel.chroma != "ostinato", fmt, f"melody.chroma=ostinato: {fmt}'s MusicGen-melody computes "
                                                  "another chromagram (librosa's filterbank, a centred STFT) than the "
                                                  "one this model was trained on")
    if fmt == "transformers":
        _refuse_unless(mel.frames is not None, fmt, "melody.chroma=audiocraft (masked, of any length): transformers' "
                                                    "MusicGen-melody loops the chroma to chroma_length frames")
    else:
        n_fft = int(mel.n_fft)
        _refuse_unless(n_fft & (n_fft - 1) == 0 and mel.hop_length * 4 == n_fft, fmt,
                       f"melody n_fft={n_fft}, hop {mel.hop_length}: audiocraft's chroma takes a power of 2 "
                       "(radix2_exp) with a hop of a quarter of it")


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
    stereo = isinstance(codec, InterleavedStereoCodec)
    mono = codec.mono if stereo else codec
    architecture = mono.config.get("architecture", "seanet")
    _refuse_unless(architecture == "seanet", fmt, f"the codec is a {architecture} codec, not an EnCodec: {fmt}'s "
                                                  "MusicGen files hold an EnCodec; keep ostinato's export")
    if stereo:
        return codec.mono, 2
    _refuse_unless(int(codec.channels) == 1, fmt, f"a {codec.channels}-channel codec: {fmt}'s stereo MusicGens "
                                                  "interleave the codebooks of a mono codec run on each channel")
    return codec, 1


def _semantics_note(model: MusicGen, fmt: str) -> None:
    """Warn when the format computes the text condition of a batch otherwise than the model was trained to:
    audiocraft (and any prepended text) attends the padding of the batch's shorter texts, transformers' cross-attention
    masks it."""
    theirs = "attended" if fmt == "audiocraft" or model.text_prefix else "masked"
    if model.semantics.text_padding != theirs:
        log.warning("--format %s: its MusicGen has text_padding %s, this model %s (family.semantics): a batch of "
                    "prompts of different lengths is conditioned otherwise there; a prompt alone is the same", fmt,
                    theirs, model.semantics.text_padding)


# ----- audiocraft ---------------------------------------------------------------------------------------------

def audiocraft_xp_config(model: MusicGen, t5_name: str, sample_rate: int, channels: int,
                         cfg_dropout: float = 0.1) -> dict[str, Any]:
    """The parts of an audiocraft experiment config that ``builders.get_lm_model`` reads, for ``model``
    (MusicGen-melody: ``chroma2music``'s conditioners and fuser)."""
    cfg = model.cfg
    transformer_lm = dict(
        dim=cfg.dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, hidden_scale=cfg.ffn_dim / cfg.dim,
        n_q=cfg.n_q, card=cfg.card, dropout=cfg.dropout, emb_lr=None, activation=cfg.activation, norm_first=True,
        bias_ff=cfg.bias, bias_attn=cfg.bias, bias_proj=False, past_context=None, causal=True, custom=False,
        memory_efficient=False, attention_as_float32=False, layer_scale=None, positional_embedding="sin",
        max_period=cfg.max_period, xpos=False, checkpointing="none", weight_init="gaussian",
        depthwise_init="current", zero_bias_init=True, norm="layer_norm", cross_attention=cfg.cross_attention,
        qk_layer_norm=False,
        qk_layer_norm_cross=False, attention_dropout=cfg.attention_dropout, kv_repeat=1, two_step_cfg=False)
    if transformer_lm["hidden_scale"] == int(transformer_lm["hidden_scale"]):
        transformer_lm["hidden_scale"] = int(transformer_lm["hidden_scale"])
    prepend = (["self_wav"] if model.melody is not None else []) + (["description"] if model.text_prefix else [])
    conditioners: dict[str, Any] = {"description": {"model": "t5", "t5": {
        "name": t5_name, "finetune": False, "word_dropout": 0.0, "normalize_text": False}}}
    duration = 30.0
    if model.melody is not None:
        conditioners["self_wav"], duration = _audiocraft_chroma(model)
    xp: dict[str, Any] = {
        "lm_model": "transformer_lm", "device": "cpu", "dtype": "float32", "sample_rate": int(sample_rate),
        "channels": int(channels), "dataset": {"segment_duration": duration},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": [int(d) for d in model.pattern.delays],
                                                             "flatten_first": 0, "empty_initial": 0}},
        "transformer_lm": transformer_lm,
        "classifier_free_guidance": {"training_dropout": float(cfg_dropout), "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [],
                  "prepend": prepend, "cross": [] if model.text_prefix else ["description"], "input_interpolate": []},
        "conditioners": conditioners,
    }
    # stereo: the L/R codebooks of the mono codec interleaved (audiocraft's InterleaveStereoCompressionModel)
    xp["interleave_stereo_codebooks"] = {"use": channels == 2, "per_timestep": False}
    return xp


def _audiocraft_chroma(model: MusicGen) -> tuple[dict[str, Any], float]:
    """(``conditioners.self_wav`` of chroma2music, ``dataset.segment_duration``): a chroma of fixed length
    (``melody.frames``, looped or cut, null C) is audiocraft's ``match_len_on_eval``, whose length the training
    segment gives: ``int(duration * sample_rate) // hop + 1`` frames."""
    mel = model.melody
    assert mel is not None
    duration = 30.0
    if mel.frames is not None:
        samples = (mel.frames - 1) * mel.hop_length
        duration = samples / mel.sample_rate
        if int(duration * mel.sample_rate) != samples:  # a float below the sample count: half a sample more
            duration = (samples + 0.5) / mel.sample_rate
    stem = {"sample_rate": mel.sample_rate, "n_chroma": 12, "radix2_exp": int(mel.n_fft).bit_length() - 1,
            "argmax": True, "match_len_on_eval": mel.frames is not None, "eval_wavs": None, "n_eval_wavs": 0,
            "cache_path": None}
    return {"model": "chroma_stem", "chroma_stem": stem}, duration


def _write_audiocraft(model: MusicGen, stage: Path, t5_name: str | None, cfg_dropout: float) -> None:
    from omegaconf import OmegaConf

    from ostinato.interop.encodec import export_audiocraft_encodec

    name = text_encoder_name(model, t5_name)
    codec, channels = _codec(model, "audiocraft")
    assert model.text is not None
    state = lm_state_to_audiocraft(model.lm.state_dict())
    conditioners = "condition_provider.conditioners."
    state.update({f"{conditioners}description.output_proj.{k}": v for k, v in model.text.proj.state_dict().items()})
    if model.melody is not None:  # the chroma projection, and the Hann window of its STFT (a buffer there)
        state.update({f"{conditioners}self_wav.output_proj.{k}": v
                      for k, v in model.melody.proj.state_dict().items()})
        state[f"{conditioners}self_wav.chroma.spec.window"] = torch.hann_window(int(model.melody.n_fft))
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


def _transformers_classes(melody: bool) -> tuple[type, type, type]:
    """(decoder config, decoder, whole model) classes: MusicGen's, or MusicGen-melody's."""
    import transformers as tf

    if melody:
        return tf.MusicgenMelodyDecoderConfig, tf.MusicgenMelodyForCausalLM, tf.MusicgenMelodyForConditionalGeneration
    return tf.MusicgenDecoderConfig, tf.MusicgenForCausalLM, tf.MusicgenForConditionalGeneration


def _check_delays(model: MusicGen, channels: int) -> None:
    n, delays = model.n_q, list(model.pattern.delays)
    want = stereo_delays(n // 2) if channels == 2 else list(range(n))
    _refuse_unless(delays == want, "transformers", f"delays {delays}: transformers' "
                                                   f"{'stereo ' if channels == 2 else ''}MusicGen models the delays "
                                                   f"{want} only")


def _set_generation(model: MusicGen, generation: Any) -> None:
    """The generation config: the special token ``card`` starts the decoder and pads; sampling with CFG 3."""
    generation.decoder_start_token_id = generation.pad_token_id = generation.bos_token_id = model.card
    generation.do_sample, generation.guidance_scale = True, 3.0
    generation.max_length = 1500


def _write_transformers_decoder(model: MusicGen, stage: Path) -> None:
    """A MusicGen without text (a ``MusicgenForCausalLM`` import): transformers' decoder alone, as it came in."""
    recorded = model.codec_ref is not None or "_codec" in model.__dict__
    channels = _codec(model, "transformers")[1] if recorded else 1
    _check_delays(model, channels)
    decoder_config, decoder_class, _ = _transformers_classes(False)
    decoder = decoder_class(decoder_config(**transformers_decoder_config(model, channels)))
    decoder.load_state_dict(lm_state_to_transformers(model.lm.state_dict()), strict=True)
    _set_generation(model, decoder.generation_config)
    decoder.save_pretrained(stage)


def _write_transformers(model: MusicGen, stage: Path) -> None:
    from transformers import EncodecConfig, EncodecModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    from ostinato.interop.encodec import codec_to_transformers

    if model.text is None:
        return _write_transformers_decoder(model, stage)
    encoder = model.text.__dict__["encoder"]
    model_type = encoder.config.model_type
    _refuse_unless(type(encoder).__name__ == MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES.get(model_type), "transformers",
                   f"the text encoder {_text_folder(model)} ({type(encoder).__name__}) is not what transformers' "
                   "MusicGen builds for its config (AutoModelForTextEncoding)")
    codec, channels = _codec(model, "transformers")
    _check_delays(model, channels)
    codec_cfg, codec_state = codec_to_transformers(codec)
    audio = EncodecModel(EncodecConfig(**codec_cfg))
    audio.load_state_dict(codec_state, strict=True)
    decoder_config, decoder_class, full_class = _transformers_classes(model.melody is not None)
    decoder = decoder_class(decoder_config(**transformers_decoder_config(model, channels)))
    decoder.load_state_dict(lm_state_to_transformers(model.lm.state_dict()), strict=True)
    proj = model.text.proj
    width = int(proj.weight.shape[1])
    if width == model.cfg.dim:  # transformers then feeds the text states unprojected
        _refuse_unless(torch.equal(proj.weight, torch.eye(width)) and not bool(proj.bias.any()), "transformers",
                       f"the text encoder is as wide as the decoder ({width}), where transformers' MusicGen has no "
                       "text projection, but this model's text.proj is not the identity")
    full = full_class(text_encoder=type(encoder)(encoder.config), audio_encoder=audio, decoder=decoder)
    full.text_encoder.load_state_dict(encoder.state_dict(), strict=True)
    if getattr(full, "enc_to_dec_proj", None) is not None:
        full.enc_to_dec_proj.load_state_dict(proj.state_dict(), strict=True)
    if model.melody is not None:
        _melody_to_transformers(model, full, stage)
    _set_generation(model, full.generation_config)
    full.config.decoder.pad_token_id = full.config.decoder.bos_token_id = model.card
    full.config.decoder.decoder_start_token_id = model.card
    full.config.pad_token_id = full.config.decoder_start_token_id = model.card
    full.save_pretrained(stage)
    for name in _TOKENIZER_FILES:
        if (_text_folder(model) / name).is_file():
            shutil.copy2(_text_folder(model) / name, stage / name)


def _melody_to_transformers(model: MusicGen, full: Any, stage: Path) -> None:
    """The chroma projection (``audio_enc_to_dec_proj``), ``chroma_length`` and the feature extractor's STFT
    (``preprocessor_config.json``) of a MusicGen-melody."""
    from transformers import MusicgenMelodyFeatureExtractor

    mel = model.melody
    assert mel is not None and mel.frames is not None
    full.config.chroma_length, full.config.num_chroma = int(mel.frames), 12
    _refuse_unless(getattr(full, "audio_enc_to_dec_proj", None) is not None, "transformers",
                   "a decoder 12 wide: transformers' MusicGen-melody then feeds the chroma unprojected")
    full.audio_enc_to_dec_proj.load_state_dict(mel.proj.state_dict(), strict=True)
    MusicgenMelodyFeatureExtractor(sampling_rate=mel.sample_rate, hop_length=mel.hop_length,
                                   n_fft=int(mel.n_fft)).save_pretrained(stage)


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

