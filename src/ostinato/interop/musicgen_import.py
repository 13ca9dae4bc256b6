"""Import whole MusicGen models (transformers or audiocraft) as an ostinato export folder.

``import_musicgen(SRC, OUT)`` (CLI: ``ostinato import SRC OUT``) accepts:

* a transformers ``MusicgenForConditionalGeneration`` ``save_pretrained`` folder (decoder, ``text_encoder.*``,
  ``audio_encoder.*``, ``enc_to_dec_proj``); the tokenizer files must sit in the folder (a processor saved with
  it) or come from ``tokenizer=``;
* a transformers ``MusicgenForCausalLM`` folder (decoder only: no text conditioning; ``codec=`` or none);
* a transformers ``MusicgenMelodyForConditionalGeneration`` folder (MusicGen-Melody, ``audio_enc_to_dec_proj``: see
  ``interop.musicgen_melody``);
* audiocraft's MusicGen ``state_dict.bin`` (``{'xp.cfg', 'best_state'}``; text-to-music or melody), or a folder
  holding one. audiocraft does not ship the T5 weights: ``text_encoder=`` names a local encoder folder (with its
  tokenizer), and ``codec=`` the codec (default: a ``compression_state_dict.bin`` beside the file).

The export folder ``OUT`` (built in ``OUT.tmp``, then renamed):

    OUT/model.safetensors   MusicGen (ostinato.models) state: lm.* (CodebookLM), text.proj.* (= enc_to_dec_proj)
    OUT/config.yaml         family: {_target_: ostinato.families.musicgen.MusicGenFamily, n_q, card, lm: {...},
                                     text: {model: OUT/text_encoder, ...}, delays, codec: OUT/codec, ...}; optim
    OUT/export.json         source, kind, tensor count
    OUT/text_encoder/       the frozen text encoder (HF folder, encoder only for T5) + tokenizer files
    OUT/codec/              the codec: a transformers EncodecModel folder (or a copy of ``codec=``)

``ostinato.load(OUT)`` builds the ``MusicGen`` model; ``continue_from=OUT`` fine-tunes it, with
``family=musicgen_import family.export=OUT`` (``families.musicgen.ImportedMusicGenFamily`` rebuilds the
architecture from ``OUT/config.yaml``). ``config.yaml`` records ``text_encoder`` and ``codec`` relative to ``OUT``:
the folder can be moved or copied whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.interop.codecs import FOREIGN_WEIGHTS
from ostinato.interop.musicgen import (
    AUDIOCRAFT_SEMANTICS, AUDIOCRAFT_TEXT_PROJ, MUSICGEN_DECODER_DEFAULTS, TRANSFORMERS_SEMANTICS, _read_weights,
    audiocraft_delays, audiocraft_lm_config, audiocraft_state_to_lm, decoder_config_to_lm_config,
    transformers_state_to_lm,
)
from ostinato.interop.musicgen_melody import (
    MELODY_SEMANTICS, audiocraft_fusing, audiocraft_melody, split_audiocraft_melody, transformers_melody,
)
from ostinato.interop.musicgen_style import (
    STYLE_DIR, STYLE_FEATURES, check_fuser, is_style, style_kwargs, style_state, write_style_encoder,
)
from ostinato.models.musicgen import FAMILY_TARGET, MusicGen, exported_family, model_kwargs
from ostinato.nn.patterns import stereo_delays
from ostinato.nn.transformer import LMConfig

__all__ = ["ImportResult", "detect_source", "import_musicgen", "exported_family", "TEXT_DIR", "CODEC_DIR"]

TEXT_DIR, CODEC_DIR = "text_encoder", "codec"
TEXT_MAX_LENGTH = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt", "vocab.json",
                   "merges.txt")
AUDIOCRAFT_FILES = ("state_dict.bin", "state_dict.th")
# the parts of an audiocraft xp.cfg the importer reads (only these are resolved: dora.dir and the like may hold
# ${oc.env:USER}, unset in containers and CI)
AUDIOCRAFT_LM_KEYS = ("transformer_lm", "codebooks_pattern", "conditioners", "fuser", "classifier_free_guidance",
                      "attribute_dropout", "channels", "sample_rate", "interleave_stereo_codebooks", "dataset")
_FOREIGN_WEIGHTS = FOREIGN_WEIGHTS


# ----- result -----------------------------------------------------------------------------------------------

@dataclass
class ImportResult:
    """What ``import_musicgen`` wrote."""

    out: Path
    source: str
    kind: str  # transformers-conditional | transformers-causal | transformers-melody | audiocraft
    family: dict[str, Any]
    tensors: int
    codec_n_q: int | None = None  # codebooks of the codec (the LM may use fewer: tokenize --n-q)

    def summary(self) -> str:
        f = self.family
        lm = f["lm"]
        lines = [f"imported {self.kind} MusicGen {self.source} -> {self.out}",
                 f"  model.safetensors  {self.tensors} tensors: lm ({lm['num_layers']} layers, dim {lm['dim']}, "
                 f"{f['n_q']} x {f['card']} codes, delays {f['delays']})"
                 + (", text.proj" if f["text"] else ""),
                 "  config.yaml        family MusicGenFamily (ostinato.load / continue_from)",
                 "  export.json        source and kind"]
        if f["text"]:
            lines.append(f"  {TEXT_DIR}/      frozen text encoder + tokenizer")
        if f.get("style"):
            lines.append(f"  {STYLE_DIR}/     frozen MERT of the style conditioner (generate --style REF.wav)")
        if f.get("melody"):
            lines.append(f"  melody             the {f['melody']['chroma']} chroma of the whole melody (no demucs "
                         "stems), prepended before the text (generate --melody TUNE.wav)")
        codec = f["codec"]
        if codec and Path(codec).is_relative_to(self.out):
            from ostinato.interop.codecs import STEREO_FILE

            stereo = " (stereo: its mono codec on each channel)" if (Path(codec) / STEREO_FILE).is_file() else ""
            lines.append(f"  {Path(codec).relative_to(self.out)}{'/' if Path(codec).is_dir() else ''}"
                         f"             the codec{stereo}")
        elif codec:
            lines.append(f"  codec: {codec} (referenced, not copied)")
        else:
            lines.append("  codec: none (pass --codec REF to record one)")
        return "\n".join(lines)

    def finetune_hint(self) -> str:
        """The commands that tokenize audio with this codec, fine-tune from the import and generate with it."""
        out, f = self.out, self.family
        codec = f["codec"] or "CODEC"
        n_q = f" --n-q {f['n_q']}" if self.codec_n_q is not None and self.codec_n_q != f["n_q"] else ""
        lines = ["fine-tune it: tokenize audio shards (ostinato prep shards) with its codec, then train from it:",
                 f"  ostinato tokenize SHARDS/train TOKENS/train --codec {codec}{n_q}",
                 f"  ostinato tokenize SHARDS/valid TOKENS/valid --codec {codec}{n_q}",
                 f"  ostinato train family=musicgen_import family.export={out} continue_from={out} \\",
                 "      data=demo_tokens data.train=TOKENS/train data.valid=TOKENS/valid data.test=null",
                 "  (family.cfg_dropout=..., family.lm.dropout=..., family.lm.checkpointing=true adjust it)",
                 "generate with it:",
                 f"  ostinato generate --model {out} --codec {codec} --prompt \"...\" --out samples"
                 + (" --style REF.wav [--cfg-beta 5]" if f.get("style") else "")
                 + (" --melody TUNE.wav" if f.get("melody") else "")]
        if not f["codec"]:
            lines.insert(0, "no codec recorded (pass --codec REF to ostinato import): CODEC = the codec whose "
                            f"codes this LM models ({f['n_q']} x {f['card']})")
        return "\n".join(lines)


# ----- detection ---------------------------------------------------------------------------------------------

def detect_source(src: str | Path) -> tuple[str, Path]:
    """``(kind, path)``: a transformers MusicGen folder (``config.json`` model_type / architectures) or an audiocraft
    checkpoint (a ``.bin``/``.th``/``.pt`` file, or a folder holding ``state_dict.bin``)."""
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; give a transformers MusicGen folder or an "
                                "audiocraft state_dict.bin")
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        kind = _transformers_kind(config, path / "config.json")
        if kind:
            return kind, path
        if not any((path / name).is_file() for name in AUDIOCRAFT_FILES):
            raise ValueError(f"{path / 'config.json'}: model_type={config.get('model_type')!r}, architectures="
                             f"{config.get('architectures')}; expected a transformers MusicGen "
                             "(MusicgenForConditionalGeneration / MusicgenForCausalLM)")
    if path.is_dir():
        found = [path / name for name in AUDIOCRAFT_FILES if (path / name).is_file()]
        if not found:
            raise ValueError(f"{path}: neither a transformers MusicGen folder (config.json) nor an audiocraft one "
                             f"({' / '.join(AUDIOCRAFT_FILES)}); give the folder save_pretrained wrote, or "
                             "audiocraft's exported state_dict.bin")
        return "audiocraft", found[0]
    if path.suffix in (".bin", ".th", ".pt"):
        return "audiocraft", path
    raise ValueError(f"{path}: expected a transformers MusicGen folder or an audiocraft state_dict.bin")


def _transformers_kind(config: Mapping[str, Any], source: Path) -> str | None:
    model_type, archs = config.get("model_type"), list(config.get("architectures") or [])
    if model_type == "musicgen_melody" or "MusicgenMelodyForConditionalGeneration" in archs:
        return "transformers-melody"
    if model_type == "musicgen_melody_decoder" or "MusicgenMelodyForCausalLM" in archs:
        raise ValueError(f"{source}: a MusicgenMelodyForCausalLM folder holds no chroma projection: import the "
                         "whole MusicgenMelodyForConditionalGeneration folder")
    if model_type == "musicgen" or "MusicgenForConditionalGeneration" in archs:
        return "transformers-conditional"
    if model_type == "musicgen_decoder" or "MusicgenForCausalLM" in archs:
        return "transformers-causal"
    return None


# ----- the pieces of an import -------------------------------------------------------------------------------

@dataclass
class _Parts:
    """Everything an export folder is written from (state dicts in ostinato names)."""

    source: str
    kind: str
    lm: LMConfig
    lm_state: dict[str, Tensor]
    delays: list[int]
    proj: dict[str, Tensor] | None = None  # text projection {weight [D, H], bias [D]}; None = no text
    cfg_dropout: float = 0.1
    channels: int = 1  # 2: stereo MusicGen
    interleaved: bool = False  # stereo over a mono codec: L/R codebooks interleaved (an InterleavedStereoCodec)
    codec: str | None = None  # relative to the export folder when inside it (see _codec_ref)
    semantics: dict[str, str] | None = None  # the source's Semantics kwargs (None: ostinato's)
    text_name: str | None = None  # the source's name of its text encoder (t5-base...): what an export back needs
    melody: dict[str, Any] | None = None  # MusicGen-melody: MelodyConditioner kwargs (interop.musicgen_melody)
    melody_proj: dict[str, Tensor] | None = None  # chroma projection {weight [dim, 12], bias [dim]}
    text_fuse: str = "cross"  # "prefix": MusicGen-melody prepends the text after the chroma
    style: dict[str, Any] | None = None  # MusicGen-Style: StyleConditioner kwargs (interop.musicgen_style)
    style_state: dict[str, Tensor] | None = None  # its tensors, in StyleConditioner names


def _transformers_parts(folder: Path, kind: str) -> tuple[_Parts, dict[str, Any], dict[str, Tensor],
                                                            dict[str, Tensor]]:
    """A transformers folder -> (parts, full config, text-encoder state, audio-encoder state)."""
    config = json.loads((folder / "config.json").read_text())
    state = _read_weights(folder)
    melody = kind == "transformers-melody"
    if kind == "transformers-causal":
        dec_cfg, dec_state, text_state, audio_state, proj = config, state, {}, {}, None
    else:
        dec_cfg = dict(config["decoder"])
        prefixes = ("decoder.", "text_encoder.", "audio_encoder.", "enc_to_dec_proj.") + (
            ("audio_enc_to_dec_proj.",) if melody else ())
        groups = _split_prefixes(state, prefixes, folder)
        dec_state, text_state, audio_state = groups["decoder."], groups["text_encoder."], groups["audio_encoder."]
        proj = groups["enc_to_dec_proj."] or None
    lm = decoder_config_to_lm_config(dec_cfg)
    if melody:  # the text and the chroma are prepended: no cross-attention
        lm = lm.with_(cross_attention=False)
    channels = int({**MUSICGEN_DECODER_DEFAULTS, **dec_cfg}["audio_channels"])
    delays = stereo_delays(lm.n_q // 2) if channels == 2 else list(range(lm.n_q))
    if kind != "transformers-causal":
        proj = proj or _identity_proj(_text_width(config["text_encoder"]), lm.dim, folder)
    parts = _Parts(str(folder), kind, lm, transformers_state_to_lm(dec_state), delays, proj, channels=channels,
                   interleaved=channels == 2, semantics=dict(TRANSFORMERS_SEMANTICS),
                   text_name=(config.get("text_encoder") or {}).get("_name_or_path") or None)
    if melody:
        parts.melody, parts.melody_proj = transformers_melody(config, folder), groups["audio_enc_to_dec_proj."]
        parts.text_fuse, parts.semantics = "prefix", {**TRANSFORMERS_SEMANTICS, **MELODY_SEMANTICS}
    return parts, config, text_state, audio_state


def _split_prefixes(state: Mapping[str, Tensor], prefixes: Sequence[str], source: Path) -> dict[str, dict]:
    groups: dict[str, dict[str, Tensor]] = {p: {} for p in prefixes}
    stray = []
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            stray.append(key)
        else:
            groups[prefix][key[len(prefix):]] = value
    if stray:
        raise ValueError(f"{source}: unexpected keys outside {', '.join(prefixes)}: {sorted(stray)[:10]}")
    return groups


def _text_width(text_cfg: Mapping[str, Any]) -> int:
    width = text_cfg.get("hidden_size") or text_cfg.get("d_model")
    if width is None:
        raise ValueError("config.json: text_encoder has neither hidden_size nor d_model")
    return int(width)


def _identity_proj(width: int, dim: int, source: Path) -> dict[str, Tensor]:
    """transformers skips ``enc_to_dec_proj`` when the text width equals the decoder width: an identity."""
    if width != dim:
        raise ValueError(f"{source}: no enc_to_dec_proj weights, but the text encoder width {width} differs "
                         f"from the decoder width {dim}")
    return {"weight": torch.eye(dim), "bias": torch.zeros(dim)}


def _audiocraft_parts(path: Path, trust: bool) -> tuple[_Parts, dict[str, Any]]:
    """audiocraft ``state_dict.bin`` -> (parts, its xp.cfg as plain containers)."""
    from ostinato.interop.encodec import _plain_config

    package = _load_audiocraft_package(path, trust)
    cfg = _plain_config(package["xp.cfg"], AUDIOCRAFT_LM_KEYS)
    style, best = None, package["best_state"]
    if is_style(cfg):  # style then text prepended, no cross-attention
        check_fuser(cfg)
        style = (style_kwargs(cfg, best), *style_state(best))
        best = style[2]
    lm = audiocraft_lm_config(cfg)
    lm_state, proj = audiocraft_state_to_lm(best)
    has_melody, text_fuse = audiocraft_fusing(cfg)
    has_melody = has_melody and style is None  # style's self_wav is no chroma
    melody_proj = split_audiocraft_melody(lm_state) if has_melody else None
    if has_melody and not melody_proj:
        raise ValueError(f"{path}: a melody LM (fuser.prepend self_wav) without "
                         "condition_provider.conditioners.self_wav.output_proj.* weights")
    if lm.cross_attention and not proj:
        raise ValueError(f"{path}: a cross-attention LM without {AUDIOCRAFT_TEXT_PROJ}* weights")
    cfg_dropout = float((cfg.get("classifier_free_guidance") or {}).get("training_dropout", 0.1))
    channels = int(cfg.get("channels") or 1)
    parts = _Parts(str(path), "audiocraft", lm, lm_state, audiocraft_delays(cfg, lm.n_q), proj or None,
                   cfg_dropout, channels=channels, interleaved=_audiocraft_interleaved(cfg, channels, lm.n_q, path),
                   semantics=dict(AUDIOCRAFT_SEMANTICS),
                   text_name=((cfg.get("conditioners") or {}).get("description") or {}).get("t5", {}).get("name"))
    if has_melody:
        parts.melody, parts.melody_proj, parts.text_fuse = audiocraft_melody(cfg), melody_proj, text_fuse
    if style is not None:  # style tokens, then the text, prepended
        parts.style, parts.style_state, parts.text_fuse = style[0], style[1], text_fuse
    return parts, cfg


def _audiocraft_interleaved(cfg: Mapping[str, Any], channels: int, n_q: int, path: Path) -> bool:
    """Whether a stereo audiocraft LM models L/R interleaved codebooks of a mono codec
    (``interleave_stereo_codebooks.use``, audiocraft's ``InterleaveStereoCompressionModel``)."""
    interleave = dict(cfg.get("interleave_stereo_codebooks") or {})
    if not interleave.get("use"):
        return False
    if channels != 2:
        raise ValueError(f"{path}: xp.cfg interleave_stereo_codebooks.use=true with channels={channels}; "
                         "interleaved stereo needs channels: 2")
    if interleave.get("per_timestep"):
        raise ValueError(f"{path}: xp.cfg interleave_stereo_codebooks.per_timestep=true is not supported (only "
                         "codebook interleaving, as the released stereo MusicGens)")
    if n_q % 2:
        raise ValueError(f"{path}: interleaved stereo needs an even transformer_lm.n_q, got {n_q}")
    return True


def _load_audiocraft_package(path: Path, trust: bool) -> dict[str, Any]:
    from ostinato.interop.encodec import PickledFileError, _load_package

    try:
        package = _load_package(path, trust)
    except PickledFileError as e:
        raise ValueError(f"{path} holds pickled Python objects (an OmegaConf xp.cfg) that weights-only loading "
                         "refuses; if you trust this file, pass --trust (ostinato import) / trust=True") from e
    if not isinstance(package, Mapping) or "best_state" not in package or "xp.cfg" not in package:
        keys = sorted(package)[:8] if isinstance(package, Mapping) else type(package).__name__
        raise ValueError(f"{path}: not an audiocraft LM checkpoint (expected 'xp.cfg' and 'best_state', got {keys})")
    return dict(package)


# ----- text encoder ------------------------------------------------------------------------------------------

def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _copy_tokenizer(src: Path, dst: Path, flag: str) -> None:
    if not _has_tokenizer(src):
        raise FileNotFoundError(f"{src}: no tokenizer files (tokenizer.json / tokenizer_config.json); pass "
                                f"{flag} FOLDER (a folder with the text encoder's tokenizer, e.g. a t5-base folder)")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_text_from_state(text_cfg: Mapping[str, Any], state: Mapping[str, Tensor], dst: Path) -> None:
    """The ``text_encoder.*`` tensors and sub-config of a transformers MusicGen -> an encoder-only HF folder."""
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    config = AutoConfig.for_model(**dict(text_cfg))
    arch = MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES.get(config.model_type)
    if arch:
        config.architectures = [arch]
    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dst)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    _check_text_folder(dst)


def _check_text_folder(folder: Path) -> None:
    """Every weight of the encoder class is in the folder and every tensor of the folder is used."""
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    auto = AutoModelForTextEncoding if config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES else AutoModel
    _, info = auto.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    bad = {k: sorted(v)[:10] for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{folder}: the text encoder weights do not match its config: {bad}")


def _write_text_from_folder(src: Path, dst: Path) -> None:
    """A local encoder folder (``--text-encoder``) -> ``dst``: re-saved encoder-only when transformers has a
    text-encoding class for it (t5 -> T5EncoderModel), else copied (without TF/Flax/ONNX weights)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    from ostinato.nn.conditioners import load_text_encoder

    encoder = load_text_encoder(src)
    if encoder.config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES and hasattr(encoder, "save_pretrained"):
        encoder.save_pretrained(dst)
    else:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_FOREIGN_WEIGHTS))


def _check_text(folder: Path, width: int) -> None:
    """The encoder loads, its width is the projection's input, and the tokenizer's ids fit its embedding."""
    from transformers import AutoTokenizer

    from ostinato.nn.conditioners import hidden_size, load_text_encoder

    encoder = load_text_encoder(folder)
    if hidden_size(encoder) != width:
        raise ValueError(f"{folder}: text encoder width {hidden_size(encoder)} != the checkpoint's text projection "
                         f"input {width}; use the text encoder the model was trained with")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rows = encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the encoder embeds only {rows}; "
                         "pass the encoder's own tokenizer (--tokenizer FOLDER)")


# ----- codec -------------------------------------------------------------------------------------------------

def _write_codec_from_state(codec_cfg: Mapping[str, Any], state: Mapping[str, Tensor], dst: Path) -> str:
    """The ``audio_encoder.*`` tensors of a transformers MusicGen -> a transformers EncodecModel folder."""
    from safetensors.torch import save_file

    cfg = dict(codec_cfg)
    if cfg.get("model_type", "encodec") != "encodec":
        raise ValueError(f"audio_encoder model_type {cfg.get('model_type')!r} is not supported (only encodec)")
    cfg.setdefault("model_type", "encodec")
    cfg.setdefault("architectures", ["EncodecModel"])
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return CODEC_DIR


def _place_codec(ref: str, out: Path) -> str:
    """A copy of a local codec in ``out/codec`` (transformers folder, ostinato export folder, audiocraft file);
    returns its path relative to ``out``, or ``ref`` itself when it is no local file/folder (an XP signature)."""
    from ostinato.interop.codecs import copy_codec

    placed = copy_codec(ref, out / CODEC_DIR)
    if placed is not None:
        return placed.relative_to(out).as_posix()
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def _codec_ref(root: Path | None, codec: str | None) -> str | None:
    """``codec`` as the family records it: under ``root`` when it was placed in the export folder (relative to
    the folder when ``root`` is None)."""
    if root is not None and codec is not None and (codec == CODEC_DIR or codec.startswith(CODEC_DIR + "/")):
        return str(root / codec)
    return codec


def _check_codec(ref: str, parts: _Parts, trust: bool) -> int:
    """The codec loads and writes codes the LM reads (card, enough codebooks); returns its ``n_q``."""
    from ostinato.interop.codecs import load_codec

    codec = load_codec(ref, trust=trust)
    if codec.channels != parts.channels:
        raise ValueError(f"codec {ref}: {codec.channels} channel(s), the LM models {parts.channels}; pass --codec "
                         "with the codec the LM was trained on")
    if codec.card != parts.lm.card:
        raise ValueError(f"codec {ref}: codebook size {codec.card} != the LM's card {parts.lm.card}; "
                         "pass --codec with the codec the LM was trained on")
    if codec.n_q < parts.lm.n_q:
        raise ValueError(f"codec {ref}: {codec.n_q} codebooks, the LM models {parts.lm.n_q}; pass --codec with the "
                         "codec the LM was trained on")
    return int(codec.n_q)


# ----- the export folder -------------------------------------------------------------------------------------

def _family_config(parts: _Parts, root: Path | None) -> dict[str, Any]:
    """``MusicGenFamily`` kwargs (``lm`` = exact ``LMConfig`` kwargs, paths under ``root``; relative to the export
    folder when ``root`` is None, as ``config.yaml`` records them)."""
    lm = {k: v for k, v in asdict(parts.lm).items() if k not in ("n_q", "card")}
    text_dir = TEXT_DIR if root is None else str(root / TEXT_DIR)
    text = None if parts.proj is None else {"model": text_dir, "max_length": TEXT_MAX_LENGTH, "dropout": 0.0}
    if text is not None and parts.text_fuse != "cross":
        text["fuse"] = parts.text_fuse
    family = {"_target_": FAMILY_TARGET, "n_q": parts.lm.n_q, "card": parts.lm.card, "lm": lm, "text": text,
              "delays": list(parts.delays), "cfg_dropout": parts.cfg_dropout, "attribute_dropout": 0.0,
              "codec": _codec_ref(root, parts.codec)}
    if parts.semantics is not None:
        family["semantics"] = dict(parts.semantics)
    if parts.melody is not None:
        family["melody"] = dict(parts.melody)
    if parts.style is not None:
        family["style"] = {**parts.style, "features": STYLE_DIR if root is None else str(root / STYLE_DIR),
                           **STYLE_FEATURES}
    return family


def _family_state(parts: _Parts) -> dict[str, Tensor]:
    state = {f"lm.{k}": v for k, v in parts.lm_state.items()}
    if parts.proj is not None:
        weight = parts.proj["weight"]
        state["text.proj.weight"] = weight
        state["text.proj.bias"] = parts.proj.get("bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    if parts.melody_proj is not None:
        state.update({f"melody.proj.{k}": v for k, v in parts.melody_proj.items()})
    if parts.style_state is not None:
        state.update({f"style.{k}": v for k, v in parts.style_state.items()})
    return state


def _build_model(family_cfg: Mapping[str, Any], state: Mapping[str, Tensor], source: str) -> MusicGen:
    """The model of ``family_cfg`` with ``state`` loaded strictly (a ``ValueError`` names the keys)."""
    model = MusicGen(**model_kwargs(family_cfg))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not match MusicGen(lm={model.cfg}); missing keys: "
                         f"{missing[:12]}; unexpected keys: {unexpected[:12]}")
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"{source}: shape mismatches: {shapes[:12]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def _write_folder(tmp: Path, out: Path, parts: _Parts) -> int:
    """Weights (checked by building the family from ``tmp``), ``config.yaml`` (paths under ``out``), export.json."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    model = _build_model(_family_config(parts, tmp), _family_state(parts), parts.source)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    # optim: what ostinato.load passes the family (training takes the optim config group instead)
    config = {"family": _family_config(parts, None), "optim": {"name": "adamw", "lr": 3e-4}}
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    info = {"source": parts.source, "kind": parts.kind, "tensors": len(tensors), "family": "musicgen",
            "wrapper": FAMILY_TARGET, "model": f"{MusicGen.__module__}:{MusicGen.__name__}",
            "imported_by": "ostinato import", "text_encoder_name": parts.text_name}
    (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return len(tensors)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out`` (an existing ``out`` is removed only after the rename)."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def import_musicgen(src: str | Path, out: str | Path, *, text_encoder: str | Path | None = None,
                    tokenizer: str | Path | None = None, codec: str | None = None, trust: bool = False,
                    overwrite: bool = False, style_encoder: str | Path | None = None) -> ImportResult:
    """Convert a transformers or audiocraft MusicGen into the export folder ``out`` (see the module docstring).

    Args:
        src: a transformers MusicGen folder, an audiocraft ``state_dict.bin`` or a folder holding one.
        out: the export folder to write (built in ``out.tmp`` and renamed when complete).
        text_encoder: audiocraft only: a local text-encoder folder (e.g. t5-base) with its tokenizer.
        tokenizer: a folder with tokenizer files, when ``src`` / ``text_encoder`` has none (or to replace them).
        codec: the codec reference (a transformers EncodecModel folder, a compression_state_dict.bin, an ostinato
            codec); replaces a transformers MusicGen's audio encoder. Local ones are copied into ``out/codec``.
        trust: allow full unpickling of audiocraft files that weights-only loading refuses.
        overwrite: replace an existing ``out``.
        style_encoder: audiocraft MusicGen-Style only: the local MERT folder (m-a-p/MERT-v1-95M), copied into
            ``out/style_encoder``.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    _check_flags(text_encoder, tokenizer, codec)
    kind, path = detect_source(src)
    if text_encoder is not None and kind != "audiocraft":
        raise ValueError("--text-encoder is for audiocraft checkpoints; a transformers MusicGen brings its own "
                         "(MusicgenForCausalLM has none: it is imported unconditional)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        parts = _prepare(kind, path, tmp, text_encoder=text_encoder, tokenizer=tokenizer, codec=codec, trust=trust)
        _place_style_encoder(parts, style_encoder, tmp)
        codec_n_q = None if parts.codec is None else _check_codec(_codec_ref(tmp, parts.codec), parts, trust)
        tensors = _write_folder(tmp, out, parts)
        _swap_in(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        written = _write_error(e, tmp, out)
        if written is not None:
            raise written from e
        raise
    return ImportResult(out, str(path), kind, _family_config(parts, out), tensors, codec_n_q)


def _write_error(e: BaseException, tmp: Path, out: Path) -> OSError | None:
    """An error writing the temp folder (disk full, read-only...; safetensors' own carries the errno in its text
    only) as an OSError naming ``out``, the folder asked for; None for anything else."""
    number = e.errno if isinstance(e, OSError) else None
    if type(e).__name__ == "SafetensorError" and (found := re.search(r"\(os error (\d+)\)", str(e))):
        number = int(found.group(1))
    if isinstance(e, OSError) and e.filename is not None and not str(e.filename).startswith(str(tmp)):
        return None  # a source file's error: it names that file already
    return None if number is None else OSError(number, os.strerror(number), str(out))


def _check_flags(text_encoder: str | Path | None, tokenizer: str | Path | None, codec: str | None) -> None:
    """The folders and the codec the flags name exist (before anything is read or written)."""
    from ostinato.errors import UserError
    from ostinato.interop.codecs import CODEC_KINDS
    from ostinato.store.records import require_ref

    for flag, folder, what in (("--text-encoder", text_encoder, "a local text-encoder folder (e.g. t5-base) with its "
                                                                "tokenizer"),
                               ("--tokenizer", tokenizer, "a folder with tokenizer files")):
        if folder is not None and not Path(folder).expanduser().is_dir():
            state = "is a file" if Path(folder).expanduser().is_file() else "no such folder"
            raise UserError(f"{flag} {folder}: {state}; give {what}")
    if codec is not None:
        require_ref(codec, "--codec", CODEC_KINDS)


def _prepare(kind: str, path: Path, tmp: Path, *, text_encoder: str | Path | None, tokenizer: str | Path | None,
             codec: str | None, trust: bool) -> _Parts:
    """Read the source and write ``text_encoder/`` and ``codec/`` into ``tmp``."""
    if kind == "audiocraft":
        parts, _ = _audiocraft_parts(path, trust)
        if parts.proj is not None:
            if text_encoder is None:
                raise ValueError(f"{path}: audiocraft checkpoints do not hold the text encoder; pass --text-encoder "
                                 "FOLDER (a local T5 folder such as t5-base, with its tokenizer)")
            _write_text_from_folder(Path(text_encoder).expanduser(), tmp / TEXT_DIR)
            _copy_tokenizer(Path(tokenizer or text_encoder).expanduser(), tmp / TEXT_DIR, "--tokenizer")
        sibling = path.parent / "compression_state_dict.bin"
        codec = codec if codec is not None else (str(sibling) if sibling.is_file() else None)
    else:
        parts, config, text_state, audio_state = _transformers_parts(path, kind)
        if kind != "transformers-causal":
            _write_text_from_state(config["text_encoder"], text_state, tmp / TEXT_DIR)
            _copy_tokenizer(Path(tokenizer).expanduser() if tokenizer else path, tmp / TEXT_DIR, "--tokenizer")
            if codec is None:
                codec = _write_codec_from_state(config["audio_encoder"], audio_state, tmp / CODEC_DIR)
    if parts.proj is not None:
        _check_text(tmp / TEXT_DIR, int(parts.proj["weight"].shape[1]))
    if codec is not None and codec != CODEC_DIR:
        _refuse_codec_reference(codec, trust)
        codec = _place_codec(codec, tmp)
    if codec is not None and parts.interleaved:
        codec = _stereo_codec(codec, tmp, trust)
    parts.codec = codec
    return parts


def _refuse_codec_reference(ref: str, trust: bool) -> None:
    """A ``compression_state_dict.bin`` that only names its EnCodec (``{'pretrained': NAME}``, as audiocraft's
    released MusicGens ship it) is refused naming the file and the flag, before anything is copied."""
    from ostinato.interop.encodec import _load_package

    path = Path(ref).expanduser()
    if not (path.is_file() and path.suffix in (".bin", ".th", ".pt")):
        return
    try:
        package = _load_package(path, trust)
    except ValueError:  # not loadable here: loading the codec names the fault
        return
    if isinstance(package, Mapping) and "pretrained" in package and "best_state" not in package:
        raise ValueError(f"{path} only references the pretrained model {package['pretrained']!r} (as audiocraft's "
                         "released MusicGens ship it): download that transformers EncodecModel folder and pass "
                         "--codec FOLDER")


def _place_style_encoder(parts: _Parts, style_encoder: str | Path | None, tmp: Path) -> None:
    """MusicGen-Style's MERT (``--style-encoder``, not in audiocraft's checkpoint) -> ``tmp/style_encoder``."""
    if parts.style is None:
        if style_encoder is not None:
            raise ValueError(f"--style-encoder is for MusicGen-Style checkpoints; {parts.source} has no style "
                             "conditioner (conditioners.self_wav.model: style)")
        return
    if style_encoder is None:
        raise ValueError(f"{parts.source}: a MusicGen-Style checkpoint does not hold its MERT; pass --style-encoder "
                         "FOLDER (a local m-a-p/MERT-v1-95M folder)")
    write_style_encoder(style_encoder, tmp / STYLE_DIR, int(parts.style["feature_dim"]))


def _stereo_codec(codec: str, tmp: Path, trust: bool) -> str:
    """The codec of an interleaved stereo MusicGen: a mono codec placed in ``tmp/codec`` becomes the interleaved
    stereo codec folder ``tmp/codec`` around it (``codec/mono``); a stereo codec folder is kept as it is."""
    from ostinato.interop.codecs import STEREO_FILE, write_stereo_codec

    placed = _codec_ref(tmp, codec)
    if (Path(placed) / STEREO_FILE).is_file():
        return codec
    if codec != CODEC_DIR and not codec.startswith(CODEC_DIR + "/"):
        raise ValueError(f"--codec {codec}: a stereo MusicGen decodes each channel with its mono codec; give a local "
                         "mono codec (a transformers EncodecModel folder or a compression_state_dict.bin)")
    mono = tmp / (CODEC_DIR + ".mono")
    os.replace(tmp / CODEC_DIR, mono)
    inside = mono / Path(codec).relative_to(CODEC_DIR) if codec != CODEC_DIR else mono
    write_stereo_codec(str(inside), tmp / CODEC_DIR, trust=trust)
    shutil.rmtree(mono)
    return CODEC_DIR
