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
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ostinato.nn.transformer import CodebookLM, LMConfig

__all__ = [
    "MUSICGEN_DECODER_DEFAULTS", "MusicgenImport", "decoder_config_to_lm_config", "transformers_state_to_lm",
    "load_transformers_musicgen_decoder", "load_transformers_musicgen",
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
