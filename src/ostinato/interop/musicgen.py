"""Import transformers MusicGen decoder weights into ``ostinato.nn.transformer.CodebookLM`` (without transformers).

Accepted sources (``save_pretrained`` folders: ``config.json`` + ``model.safetensors`` / sharded safetensors /
``pytorch_model.bin``, or an already loaded state dict plus its config mapping):

* ``MusicgenForCausalLM``: keys ``model.decoder.*`` and ``lm_heads.*``, config = the decoder config.
* ``MusicgenForConditionalGeneration``: the same keys under ``decoder.``, config with a ``decoder`` sub-config;
  ``enc_to_dec_proj.{weight,bias}`` (text-encoder width -> decoder width) is returned separately; the text
  encoder (``text_encoder.*``) and audio codec (``audio_encoder.*``) weights are ignored.

Name mapping (transformers on the left, ours on the right; ``P = model.decoder.``):

    P.embed_tokens.{k}.weight                 -> emb.{k}.weight
    P.layers.{i}.self_attn.{q,k,v,out}_proj   -> layers.{i}.self_attn.{q,k,v,out}_proj
    P.layers.{i}.self_attn_layer_norm         -> layers.{i}.norm_self
    P.layers.{i}.encoder_attn.*               -> layers.{i}.cross_attn.*
    P.layers.{i}.encoder_attn_layer_norm      -> layers.{i}.norm_cross
    P.layers.{i}.fc1 / fc2                    -> layers.{i}.fc1 / fc2
    P.layers.{i}.final_layer_norm             -> layers.{i}.norm_ffn
    P.layer_norm                              -> out_norm
    lm_heads.{k}.weight                       -> heads.{k}.weight

The special token of ``CodebookLM`` is ``card`` (= transformers' ``vocab_size``), which is MusicGen's
``pad_token_id`` / ``bos_token_id``. Loading is strict: missing or unexpected keys raise a ``KeyError`` listing them.

audiocraft's ``LMModel`` (``best_state`` of a MusicGen ``state_dict.bin``; ``T = transformer.layers.{i}``):

    emb.{k}.weight                                  -> emb.{k}.weight
    T.self_attn[.mha].in_proj_{weight,bias}         -> layers.{i}.self_attn.{q,k,v}_proj (rows split in 3)
    T.self_attn[.mha].out_proj                      -> layers.{i}.self_attn.out_proj
    T.cross_attention[.mha].in_proj_* / out_proj    -> layers.{i}.cross_attn.*  (same split)
    T.norm1 / T.norm_cross / T.norm2                -> layers.{i}.norm_self / norm_cross / norm_ffn
    T.linear1 / T.linear2                           -> layers.{i}.fc1 / fc2
    out_norm / linears.{k}.weight                   -> out_norm / heads.{k}.weight
    condition_provider.conditioners.description.output_proj -> the text projection (``enc_to_dec_proj``)
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ostinato.interop.musicgen_melody import audiocraft_fusing
from ostinato.nn.transformer import CodebookLM, LMConfig

__all__ = [
    "MUSICGEN_DECODER_DEFAULTS", "MusicgenImport", "decoder_config_to_lm_config", "transformers_state_to_lm",
    "load_transformers_musicgen_decoder", "load_transformers_musicgen", "AUDIOCRAFT_TEXT_PROJ",
    "audiocraft_lm_config", "audiocraft_delays", "audiocraft_state_to_lm", "AUDIOCRAFT_SEMANTICS",
    "TRANSFORMERS_SEMANTICS",
]

# MusicgenDecoderConfig's defaults: config.json files written with ``use_diff`` omit them.
MUSICGEN_DECODER_DEFAULTS: dict[str, Any] = dict(
    vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
    activation_function="gelu", hidden_size=1024, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
    num_codebooks=4, audio_channels=1, initializer_factor=0.02,
)

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^model\.decoder\.embed_tokens\.(\d+)\.weight$"), r"emb.\1.weight"),
    (re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$"),
     r"layers.\1.self_attn.\2_proj.\3"),
    (re.compile(r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.(q|k|v|out)_proj\.(weight|bias)$"),
     r"layers.\1.cross_attn.\2_proj.\3"),
    (re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$"), r"layers.\1.norm_self.\2"),
    (re.compile(r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.(weight|bias)$"),
     r"layers.\1.norm_cross.\2"),
    (re.compile(r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$"), r"layers.\1.norm_ffn.\2"),
    (re.compile(r"^model\.decoder\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)$"), r"layers.\1.\2.\3"),
    (re.compile(r"^model\.decoder\.layer_norm\.(weight|bias)$"), r"out_norm.\1"),
    (re.compile(r"^lm_heads\.(\d+)\.weight$"), r"heads.\1.weight"),
]
_IGNORED = re.compile(r"^model\.decoder\.embed_positions\.")  # non-persistent sinusoid table, if ever saved


class MusicgenImport(NamedTuple):
    """Result of ``load_transformers_musicgen``."""

    lm: CodebookLM
    config: LMConfig
    enc_to_dec_proj: nn.Linear | None  # text-encoder width -> decoder width, ConditionalGeneration only
    audio_channels: int  # 2: codebooks are L/R interleaved (use ``stereo_delays``)


def decoder_config_to_lm_config(config: Mapping[str, Any]) -> LMConfig:
    """``MusicgenDecoderConfig`` fields (dict) -> ``LMConfig`` (cross-attention width = decoder width)."""
    c = {**MUSICGEN_DECODER_DEFAULTS, **dict(config)}
    return LMConfig(
        n_q=int(c["num_codebooks"]), card=int(c["vocab_size"]), dim=int(c["hidden_size"]),
        num_heads=int(c["num_attention_heads"]), num_layers=int(c["num_hidden_layers"]), ffn_dim=int(c["ffn_dim"]),
        dropout=float(c["dropout"]), attention_dropout=float(c["attention_dropout"]),
        activation_dropout=float(c["activation_dropout"]),
        activation=str(c["activation_function"]), cross_attention=True, cond_dim=None, positional="sin",
        max_period=10_000.0, bias=False, layer_norm_eps=1e-5, init_std=float(c["initializer_factor"]),
    )


def transformers_state_to_lm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ``MusicgenForCausalLM`` state dict to ``CodebookLM`` names; unknown keys are kept as they are
    (so that strict loading reports them)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if _IGNORED.match(key):
            continue
        for pattern, repl in _RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            out[key] = value
    return out


def _read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _split_source(folder_or_state: str | Path | Mapping[str, Tensor], config: Mapping[str, Any] | None,
                  ) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    if isinstance(folder_or_state, Mapping):
        if config is None:
            raise ValueError("a state dict needs its config (the config.json contents)")
        return dict(folder_or_state), dict(config), "state dict"
    folder = Path(folder_or_state)
    cfg = dict(config) if config is not None else json.loads((folder / "config.json").read_text())
    return _read_weights(folder), cfg, str(folder)


def _load(folder_or_state: str | Path | Mapping[str, Tensor], config: Mapping[str, Any] | None,
          ) -> MusicgenImport:
    state, cfg, source = _split_source(folder_or_state, config)
    conditional = "decoder" in cfg and isinstance(cfg["decoder"], Mapping)
    dec_cfg = dict(cfg["decoder"]) if conditional else cfg
    proj: nn.Linear | None = None
    if conditional or any(k.startswith("decoder.") for k in state):
        proj_w, proj_b = state.get("enc_to_dec_proj.weight"), state.get("enc_to_dec_proj.bias")
        if proj_w is not None:
            proj = nn.Linear(proj_w.shape[1], proj_w.shape[0], bias=proj_b is not None)
            with torch.no_grad():
                proj.weight.copy_(proj_w)
                if proj_b is not None and proj.bias is not None:
                    proj.bias.copy_(proj_b)
        state = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    lm_cfg = decoder_config_to_lm_config(dec_cfg)
    lm = CodebookLM(lm_cfg)
    mapped = transformers_state_to_lm(state)
    expected = lm.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: MusicGen decoder weights do not match CodebookLM({lm_cfg}); "
                       f"missing keys: {missing}; unexpected keys: {unexpected}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{source}: shape mismatch: {bad}")
    lm.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True)
    lm.eval()
    return MusicgenImport(lm, lm_cfg, proj, int({**MUSICGEN_DECODER_DEFAULTS, **dec_cfg}["audio_channels"]))


def load_transformers_musicgen_decoder(folder_or_state: str | Path | Mapping[str, Tensor],
                                       config: Mapping[str, Any] | None = None) -> tuple[CodebookLM, LMConfig]:
    """Load the decoder LM of a ``MusicgenForCausalLM`` or ``MusicgenForConditionalGeneration`` checkpoint.

    Args:
        folder_or_state: a ``save_pretrained`` folder, or a state dict (then ``config`` is required).
        config: overrides ``config.json`` (decoder config, or the full config with a ``decoder`` entry).
    Returns:
        ``(lm, config)``; ``lm`` is float32 and in eval mode. Feed it ``cond`` of the decoder's width (for the
        conditional model: text-encoder states passed through ``enc_to_dec_proj``, see ``load_transformers_musicgen``).
    """
    out = _load(folder_or_state, config)
    return out.lm, out.config


def load_transformers_musicgen(folder_or_state: str | Path | Mapping[str, Tensor],
                               config: Mapping[str, Any] | None = None) -> MusicgenImport:
    """Like ``load_transformers_musicgen_decoder`` but also returns ``enc_to_dec_proj`` (or None) and the
    number of audio channels."""
    return _load(folder_or_state, config)


# ----- audiocraft -----

# What each toolkit computes (``ostinato.models.musicgen.Semantics``), read from audiocraft 1.3.0 and transformers:
# audiocraft's ConditionFuser hands cross-attention the T5 states (padding zeroed by T5Conditioner) without their
# mask, and its solver's loss mask is the pattern's valid steps of the batch (LMModel.compute_predictions with
# keep_only_valid_steps), which leaves out the last delays[k] frames of codebook k; transformers passes the
# encoder's attention mask to cross-attention and counts every label that is not the pad (special) token.
AUDIOCRAFT_SEMANTICS: dict[str, str] = {"text_padding": "attended", "loss_frames": "trim_delays"}
TRANSFORMERS_SEMANTICS: dict[str, str] = {"text_padding": "masked", "loss_frames": "all"}

AUDIOCRAFT_TEXT_PROJ = "condition_provider.conditioners.description.output_proj."
_AC_LAYER = r"^transformer\.layers\.(\d+)\."
_AC_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^emb\.(\d+)\.weight$"), r"emb.\1.weight"),
    (re.compile(_AC_LAYER + r"self_attn\.(?:mha\.)?out_proj\.(weight|bias)$"), r"layers.\1.self_attn.out_proj.\2"),
    (re.compile(_AC_LAYER + r"cross_attention\.(?:mha\.)?out_proj\.(weight|bias)$"),
     r"layers.\1.cross_attn.out_proj.\2"),
    (re.compile(_AC_LAYER + r"norm1\.(weight|bias)$"), r"layers.\1.norm_self.\2"),
    (re.compile(_AC_LAYER + r"norm_cross\.(weight|bias)$"), r"layers.\1.norm_cross.\2"),
    (re.compile(_AC_LAYER + r"norm2\.(weight|bias)$"), r"layers.\1.norm_ffn.\2"),
    (re.compile(_AC_LAYER + r"linear1\.(weight|bias)$"), r"layers.\1.fc1.\2"),
    (re.compile(_AC_LAYER + r"linear2\.(weight|bias)$"), r"layers.\1.fc2.\2"),
    (re.compile(r"^out_norm\.(weight|bias)$"), r"out_norm.\1"),
    (re.compile(r"^linears\.(\d+)\.weight$"), r"heads.\1.weight"),
]
_AC_FUSED = re.compile(_AC_LAYER + r"(self_attn|cross_attention)\.(?:mha\.)?in_proj_(weight|bias)$")

# transformer_lm values this import reproduces exactly; anything else is refused (key: required value)
_AC_REQUIRED: dict[str, Any] = dict(norm_first=True, norm="layer_norm", layer_scale=None, positional_embedding="sin",
                                    positional_scale=1.0, xpos=False, past_context=None, qk_layer_norm=False,
                                    qk_layer_norm_cross=False, kv_repeat=1, bias_proj=False)


def audiocraft_lm_config(cfg: Mapping[str, Any]) -> LMConfig:
    """audiocraft experiment config (``xp.cfg`` as plain containers) -> ``LMConfig`` of the same decoder.

    Raises ``ValueError`` naming the ``transformer_lm`` / ``fuser`` key for what ``CodebookLM`` cannot reproduce
    (post-norm, LayerScale, RoPE, limited context, qk-norm, grouped kv, biased heads, summed conditions).
    """
    tlm = dict(cfg.get("transformer_lm") or {})
    for key in ("dim", "num_heads", "num_layers", "n_q", "card"):
        if key not in tlm:
            raise ValueError(f"xp.cfg: transformer_lm.{key} is missing (not a MusicGen LM checkpoint?)")
    for key, want in _AC_REQUIRED.items():
        if key in tlm and tlm[key] != want:
            raise ValueError(f"xp.cfg: transformer_lm.{key}={tlm[key]!r} is not supported (only {want!r})")
    if bool(tlm.get("bias_ff", False)) != bool(tlm.get("bias_attn", False)):
        raise ValueError("xp.cfg: transformer_lm.bias_ff and bias_attn differ; CodebookLM has one bias flag")
    fuser = dict(cfg.get("fuser") or {})
    _, text_fuse = audiocraft_fusing(cfg)
    cross = text_fuse == "cross" and "description" in (fuser.get("cross") or [])
    if fuser.get("cross_attention_pos_emb"):
        raise ValueError("xp.cfg: fuser.cross_attention_pos_emb=true is not supported")
    dim, dropout = int(tlm["dim"]), float(tlm.get("dropout") or 0.0)
    attention_dropout = tlm.get("attention_dropout")
    return LMConfig(
        n_q=int(tlm["n_q"]), card=int(tlm["card"]), dim=dim, num_heads=int(tlm["num_heads"]),
        num_layers=int(tlm["num_layers"]), ffn_dim=int(float(tlm.get("hidden_scale", 4)) * dim), dropout=dropout,
        attention_dropout=dropout if attention_dropout is None else float(attention_dropout),
        activation_dropout=dropout, activation=str(tlm.get("activation", "gelu")),
        cross_attention=bool(cross) or bool(tlm.get("cross_attention", False)), cond_dim=None, positional="sin",
        max_period=float(tlm.get("max_period", 10_000.0)), bias=bool(tlm.get("bias_attn", False)),
        layer_norm_eps=1e-5, init_std=0.02)


def audiocraft_delays(cfg: Mapping[str, Any], n_q: int) -> list[int]:
    """The codebook delays of an audiocraft LM (``codebooks_pattern``): ``delay`` or ``parallel`` modeling."""
    pattern = dict(cfg.get("codebooks_pattern") or {})
    modeling = pattern.get("modeling") or "delay"
    if modeling == "parallel":
        return [0] * n_q
    if modeling != "delay":
        raise ValueError(f"xp.cfg: codebooks_pattern.modeling={modeling!r} is not supported (delay or parallel)")
    delay = dict(pattern.get("delay") or {})
    if delay.get("flatten_first", 0) or delay.get("empty_initial", 0):
        raise ValueError("xp.cfg: codebooks_pattern.delay.flatten_first / empty_initial must be 0")
    delays = [int(d) for d in (delay.get("delays") or range(n_q))]
    if len(delays) != n_q:
        raise ValueError(f"xp.cfg: codebooks_pattern.delay.delays={delays} needs {n_q} entries (transformer_lm.n_q)")
    return delays


def audiocraft_state_to_lm(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """audiocraft ``LMModel`` state -> (``CodebookLM`` state, text projection ``{weight, bias}``).

    Fused ``in_proj_weight [3D, D]`` (and ``in_proj_bias``) are split into q, k, v rows. Unknown keys are kept
    under their own names in the LM state, so that strict loading names them.
    """
    lm: dict[str, Tensor] = {}
    proj: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(AUDIOCRAFT_TEXT_PROJ):
            proj[key[len(AUDIOCRAFT_TEXT_PROJ):]] = value
        elif match := _AC_FUSED.match(key):
            module = "self_attn" if match[2] == "self_attn" else "cross_attn"
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                lm[f"layers.{match[1]}.{module}.{name}_proj.{match[3]}"] = part.contiguous()
        else:
            for pattern, repl in _AC_RULES:
                if pattern.match(key):
                    lm[pattern.sub(repl, key)] = value
                    break
            else:
                lm[key] = value
    return lm, proj
