"""Import EnCodec checkpoints of transformers and audiocraft into ``ostinato.models.codec.Codec``.

* ``load_transformers_encodec(folder)``: an ``EncodecModel.save_pretrained`` folder (``config.json`` +
  ``model.safetensors``, sharded safetensors or ``pytorch_model.bin``), read directly, without transformers.
* ``load_audiocraft_encodec(path)``: audiocraft's ``compression_state_dict.bin`` (``{'xp.cfg', 'best_state'}``).
* ``export_audiocraft_encodec(codec, path)``: the inverse, in audiocraft's layout and parameter names.

Name mapping (ours on the right; weight norm ``weight_g`` / ``weight_v`` and ``parametrizations.weight.original0`` /
``original1`` are both accepted):

    transformers  encoder.layers.{i}.[block.{j}.|shortcut.]conv.*      -> encoder.model.{i}.[...]conv.*
                  quantizer.layers.{k}.codebook.*                        -> quantizer.layers.{k}.codebook.*
    audiocraft    encoder.model.{i}.[...]conv.conv.*  / .conv.norm.*     -> encoder.model.{i}.[...]conv.* / .norm.*
                  decoder.model.{i}.convtr.convtr.*   / .convtr.norm.*   -> decoder.model.{i}.conv.* / .norm.*
                  quantizer.vq.layers.{k}._codebook.*                    -> quantizer.layers.{k}.codebook.*
"""
from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.models.codec import Codec
from ostinato.nn.conv import NormConv1d, NormConvTranspose1d

# EncodecConfig's defaults: config.json files written with ``use_diff`` may omit them.
TRANSFORMERS_DEFAULTS: dict[str, Any] = dict(
    target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], sampling_rate=24_000, audio_channels=1, normalize=False,
    chunk_length_s=None, overlap=None, hidden_size=128, num_filters=32, num_residual_layers=1,
    upsampling_ratios=[8, 5, 4, 2], norm_type="weight_norm", kernel_size=7, last_kernel_size=7,
    residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="reflect", compress=2,
    num_lstm_layers=2, trim_right_ratio=1.0, codebook_size=1024, codebook_dim=None, use_conv_shortcut=True)

_WN_RENAMES = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


# ----- shared helpers -----

def _rename_weight_norm(key: str) -> str:
    head, _, last = key.rpartition(".")
    return f"{head}.{_WN_RENAMES[last]}" if last in _WN_RENAMES else key


def _conventions(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``inited`` is a float [1] elsewhere, a bool [] here; the q_dropout step counter exists only here."""
    out = {k: (v.reshape(()).bool() if k.endswith(".codebook.inited") else v) for k, v in state.items()}
    out.setdefault("quantizer.steps", torch.zeros((), dtype=torch.long))
    return out


def load_codec_state(codec: Codec, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state`` (our names) into ``codec``; ``ValueError`` naming missing, unexpected and mis-shaped
    keys otherwise."""
    expected = codec.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match the codec built from its config: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {shapes}")
    codec.load_state_dict(dict(state), strict=True)


# ----- transformers -----

def transformers_config_to_codec_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers ``EncodecConfig`` (as a dict, e.g. config.json) -> ``Codec.build`` kwargs.

    ``n_q`` is transformers' ``num_quantizers`` (the codebooks of the largest target bandwidth). Chunked models
    (``chunk_length_s`` set, the 48 kHz EnCodec) are refused.
    """
    cfg = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in config.items() if k in TRANSFORMERS_DEFAULTS}}
    if cfg["chunk_length_s"] is not None:
        raise ValueError(f"chunked EnCodec configs (chunk_length_s={cfg['chunk_length_s']}, "
                         f"overlap={cfg['overlap']}, e.g. the 48 kHz model) are not implemented: Codec encodes "
                         "whole signals; only chunk_length_s=None is supported")
    dimension = int(cfg["hidden_size"])
    codebook_dim = cfg["codebook_dim"] if cfg["codebook_dim"] is not None else dimension
    if int(codebook_dim) != dimension:
        raise ValueError(f"codebook_dim {codebook_dim} != hidden_size {dimension} is not supported")
    if int(cfg["num_lstm_layers"]) < 1:
        raise ValueError("transformers EnCodec always has an LSTM: num_lstm_layers must be >= 1")
    ratios = [int(r) for r in cfg["upsampling_ratios"]]
    card = int(cfg["codebook_size"])
    frame_rate = math.ceil(cfg["sampling_rate"] / math.prod(ratios))
    n_q = int(1000 * cfg["target_bandwidths"][-1] // (frame_rate * math.ceil(math.log2(card))))
    return dict(
        sample_rate=int(cfg["sampling_rate"]), channels=int(cfg["audio_channels"]), normalize=bool(cfg["normalize"]),
        dimension=dimension, n_filters=int(cfg["num_filters"]), n_residual_layers=int(cfg["num_residual_layers"]),
        ratios=ratios, activation="ELU", activation_params={"alpha": 1.0}, norm=str(cfg["norm_type"]),
        kernel_size=int(cfg["kernel_size"]), last_kernel_size=int(cfg["last_kernel_size"]),
        residual_kernel_size=int(cfg["residual_kernel_size"]), dilation_base=int(cfg["dilation_growth_rate"]),
        causal=bool(cfg["use_causal_conv"]), pad_mode=str(cfg["pad_mode"]),
        true_skip=not bool(cfg["use_conv_shortcut"]), compress=int(cfg["compress"]),
        lstm=int(cfg["num_lstm_layers"]), trim_right_ratio=float(cfg["trim_right_ratio"]), n_q=n_q, card=card)


_TF_SEANET = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def transformers_state_to_codec(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``EncodecModel`` state dict -> ours (names and the ``inited`` dtype)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _TF_SEANET.match(key)
        new = f"{match[1]}.model.{match[2]}.{match[3]}" if match else key
        out[_rename_weight_norm(new)] = value
    return _conventions(out)


def _read_transformers_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_transformers_encodec(folder: str | Path) -> Codec:
    """A transformers ``EncodecModel.save_pretrained`` folder -> ``Codec`` in eval mode (transformers not needed).

    The codec has ``n_q`` = transformers' ``num_quantizers``; transformers' ``encode(x, bandwidth=bw)`` matches
    ``codec.encode(x, n_q=floor(bw * 1000 / (log2(card) * ceil(frame_rate))))``.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected an EncodecModel.save_pretrained folder)")
    config = json.loads(config_file.read_text())
    if config.get("model_type", "encodec") != "encodec":
        raise ValueError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'encodec'")
    codec = Codec.build(**transformers_config_to_codec_kwargs(config))
    state = transformers_state_to_codec(_read_transformers_weights(folder))
    load_codec_state(codec, state, source=str(folder))
    return codec.eval()


def codec_to_transformers(codec: Codec) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``codec`` -> (``EncodecConfig`` kwargs, ``EncodecModel`` state dict): the inverse of
    ``load_transformers_encodec``. Codecs that transformers' EnCodec cannot build (another activation, a final
    activation, per-side overrides, unnormalized outer blocks) raise a ``ValueError`` naming the setting."""
    cfg = dict(codec.config)
    unsupported = {"activation": (cfg.get("activation"), "ELU"),
                   "activation_params": (cfg.get("activation_params"), {"alpha": 1.0}),
                   "final_activation": (cfg.get("final_activation"), None),
                   "disable_norm_outer_blocks": (cfg.get("disable_norm_outer_blocks", 0), 0),
                   "encoder": (cfg.get("encoder") or {}, {}), "decoder": (cfg.get("decoder") or {}, {})}
    for key, (have, want) in unsupported.items():
        if have != want:
            raise ValueError(f"codec {key}={have!r}: transformers' EnCodec has only {want!r}")
    frame_rate = math.ceil(cfg["sample_rate"] / math.prod(cfg["ratios"]))
    bandwidth = int(cfg["n_q"]) * frame_rate * math.ceil(math.log2(int(cfg["card"]))) / 1000
    config = dict(
        sampling_rate=int(cfg["sample_rate"]), audio_channels=int(cfg["channels"]), normalize=bool(cfg["normalize"]),
        hidden_size=int(cfg["dimension"]), codebook_dim=int(cfg["dimension"]), num_filters=int(cfg["n_filters"]),
        num_residual_layers=int(cfg["n_residual_layers"]), upsampling_ratios=[int(r) for r in cfg["ratios"]],
        norm_type=str(cfg["norm"]), kernel_size=int(cfg["kernel_size"]), last_kernel_size=int(cfg["last_kernel_size"]),
        residual_kernel_size=int(cfg["residual_kernel_size"]), dilation_growth_rate=int(cfg["dilation_base"]),
        use_causal_conv=bool(cfg["causal"]), pad_mode=str(cfg["pad_mode"]), use_conv_shortcut=not cfg["true_skip"],
        compress=int(cfg["compress"]), num_lstm_layers=int(cfg["lstm"]),
        trim_right_ratio=float(cfg["trim_right_ratio"]), codebook_size=int(cfg["card"]),
        target_bandwidths=[bandwidth], chunk_length_s=None, overlap=None)
    state: dict[str, Tensor] = {}
    for key, value in codec.state_dict().items():
        if key == "quantizer.steps":
            continue
        value = value.detach().clone()
        if match := re.match(r"^(encoder|decoder)\.model\.(\d+)\.(.+)$", key):
            key = f"{match[1]}.layers.{match[2]}.{match[3]}"
        elif key.endswith(".codebook.inited"):
            value = value.float().reshape(1)
        state[key] = value
    return config, state


# ----- audiocraft -----

_AC_CONV = re.compile(r"^(encoder|decoder)\.model\.(\d+)\.((?:block\.\d+\.|shortcut\.)?)"
                      r"(conv|convtr)\.(conv|convtr|norm)\.(.+)$")
_AC_CODEBOOK = re.compile(r"^quantizer\.vq\.layers\.(\d+)\._codebook\.(.+)$")


def audiocraft_state_to_codec(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """audiocraft ``EncodecModel`` state dict (``best_state``) -> ours."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if match := _AC_CONV.match(key):
            inner = "norm" if match[5] == "norm" else "conv"
            key = f"{match[1]}.model.{match[2]}.{match[3]}{inner}.{match[6]}"
        elif match := _AC_CODEBOOK.match(key):
            key = f"quantizer.layers.{match[1]}.codebook.{match[2]}"
        out[_rename_weight_norm(key)] = value
    return _conventions(out)


def codec_state_to_audiocraft(codec: Codec, legacy_weight_norm: bool = True) -> dict[str, Tensor]:
    """Our state dict -> audiocraft's names (``weight_g``/``weight_v`` when ``legacy_weight_norm``, float
    ``inited`` [1]), e.g. to hand a codec to audiocraft tools."""
    wrappers: dict[str, str] = {}
    for name, module in codec.named_modules():
        if isinstance(module, NormConvTranspose1d):
            wrappers[name] = "convtr"
        elif isinstance(module, NormConv1d):
            wrappers[name] = "conv"
    inverse_wn = {v: k for k, v in _WN_RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in codec.state_dict().items():
        if key == "quantizer.steps":
            continue
        value = value.detach().clone()
        if match := re.match(r"^quantizer\.layers\.(\d+)\.codebook\.(.+)$", key):
            key = f"quantizer.vq.layers.{match[1]}._codebook.{match[2]}"
            if match[2] == "inited":
                value = value.float().reshape(1)
        elif key.startswith(("encoder.", "decoder.")):
            for prefix, wrap in wrappers.items():
                if key.startswith(prefix + "."):
                    rest = key[len(prefix) + 1:]
                    inner, _, tail = rest.partition(".")
                    if legacy_weight_norm and tail in inverse_wn:
                        tail = inverse_wn[tail]
                    key = f"{prefix}.{wrap}.{wrap if inner == 'conv' else 'norm'}.{tail}"
                    break
        out[key] = value
    return out


def audiocraft_config_to_codec_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """audiocraft experiment config (``xp.cfg`` resolved to plain containers) -> ``Codec.build`` kwargs."""
    if cfg.get("compression_model", "encodec") != "encodec":
        raise ValueError(f"compression_model is {cfg.get('compression_model')!r}, only 'encodec' is supported")
    encodec = dict(cfg.get("encodec") or {})
    if encodec.get("autoencoder", "seanet") != "seanet" or encodec.get("quantizer", "rvq") != "rvq":
        raise ValueError(f"only the seanet autoencoder with the rvq quantizer is supported, got "
                         f"{encodec.get('autoencoder')!r} / {encodec.get('quantizer')!r}")
    seanet = dict(cfg["seanet"])
    enc_over, dec_over = dict(seanet.pop("encoder", None) or {}), dict(seanet.pop("decoder", None) or {})
    for params in (seanet.pop("norm_params", None), enc_over.pop("norm_params", None),
                   dec_over.pop("norm_params", None)):
        if params:
            raise ValueError(f"seanet norm_params {params} are not supported")
    decoder_only = {k: dec_over.pop(k) for k in ("trim_right_ratio", "final_activation", "final_activation_params")
                    if k in dec_over}
    rvq = dict(cfg.get("rvq") or {})
    if rvq.get("orthogonal_reg_weight", 0.0):
        raise ValueError("rvq.orthogonal_reg_weight > 0 is not supported")
    rvq_keys = ("n_q", "q_dropout", "bins", "decay", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code")
    kwargs: dict[str, Any] = {
        "sample_rate": int(encodec.get("sample_rate", cfg.get("sample_rate"))),
        "channels": int(encodec.get("channels", cfg.get("channels", seanet.get("channels", 1)))),
        "normalize": bool(encodec.get("renormalize", False)),
        **{k: v for k, v in seanet.items() if k != "channels"},
        **decoder_only,
        **{("card" if k == "bins" else k): rvq[k] for k in rvq_keys if k in rvq},
    }
    if enc_over:
        kwargs["encoder"] = enc_over
    if dec_over:
        kwargs["decoder"] = dec_over
    return kwargs


def codec_config_to_audiocraft(codec: Codec) -> dict[str, Any]:
    """``codec.config`` -> the parts of an audiocraft experiment config that build the same EnCodec."""
    cfg = dict(codec.config)
    seanet_keys = ("dimension", "n_filters", "n_residual_layers", "ratios", "activation", "activation_params",
                   "norm", "kernel_size", "last_kernel_size", "residual_kernel_size", "dilation_base", "causal",
                   "pad_mode", "true_skip", "compress", "lstm", "disable_norm_outer_blocks")
    seanet = {k: cfg[k] for k in seanet_keys if k in cfg}
    seanet.update(channels=cfg["channels"], norm_params={}, encoder=dict(cfg.get("encoder") or {}),
                  decoder={**dict(cfg.get("decoder") or {}), "trim_right_ratio": cfg["trim_right_ratio"],
                           "final_activation": cfg["final_activation"],
                           "final_activation_params": cfg["final_activation_params"]})
    rvq = {("bins" if k == "card" else k): cfg[k]
           for k in ("n_q", "q_dropout", "card", "decay", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code")}
    rvq.update(orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False)
    return {"compression_model": "encodec", "sample_rate": cfg["sample_rate"], "channels": cfg["channels"],
            "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": cfg["sample_rate"],
                        "channels": cfg["channels"], "causal": cfg["causal"], "renormalize": cfg["normalize"]},
            "seanet": seanet, "rvq": rvq}


def export_audiocraft_encodec(codec: Codec, path: str | Path) -> Path:
    """Write ``codec`` as audiocraft's ``compression_state_dict.bin`` (yaml ``xp.cfg`` + ``best_state``)."""
    from omegaconf import OmegaConf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    package = {"best_state": codec_state_to_audiocraft(codec),
               "xp.cfg": OmegaConf.to_yaml(OmegaConf.create(codec_config_to_audiocraft(codec))),
               "version": "ostinato", "exported": True}
    torch.save(package, path)
    return path


# the parts of an audiocraft xp.cfg that build its EnCodec; the rest (dora.dir: /checkpoint/${oc.env:USER}/...,
# datasets, solver settings) is never read, so never resolved
AUDIOCRAFT_CODEC_KEYS = ("compression_model", "encodec", "seanet", "rvq", "sample_rate", "channels")


def _plain_config(cfg: Any, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """A config (yaml string, mapping or OmegaConf) as plain containers; with ``keys``, only those top-level keys
    are resolved and kept. An interpolation that does not resolve is a ValueError naming its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if OmegaConf.is_config(cfg):
        node = cfg
    elif isinstance(cfg, (str, Mapping)):
        node = OmegaConf.create(cfg if isinstance(cfg, str) else dict(cfg))
    else:
        raise ValueError(f"xp.cfg must be a yaml string, a dict or an OmegaConf config, got {type(cfg).__name__}")
    out: dict[str, Any] = {}
    for key in list(node.keys()) if keys is None else [k for k in keys if k in node]:
        try:
            value = node[key]
            out[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as e:
            reason = str(e).splitlines()[0]
            raise ValueError(f"xp.cfg: {getattr(e, 'full_key', None) or key} does not resolve ({reason}); set what it "
                             "refers to, or pass the config explicitly") from None
    return out


class PickledFileError(ValueError):
    """A file that weights-only loading refuses (it pickles Python objects): loadable only with trust."""


def _load_package(path: Path, trust: bool) -> Any:
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch.save's zip nor its legacy pickle
        raise ValueError(f"{path}: not a PyTorch checkpoint (a torch.save file); give audiocraft's exported "
                         "state_dict.bin / compression_state_dict.bin")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise PickledFileError(f"{path} holds pickled Python objects (such as an OmegaConf config) that "
                             "weights_only loading refuses; if you trust this file, call "
                             "load_audiocraft_encodec(..., trust=True)") from e
    return torch.load(path, map_location="cpu", weights_only=False)


def load_audiocraft_encodec(path: str | Path, config: Mapping[str, Any] | None = None, trust: bool = False) -> Codec:
    """audiocraft ``compression_state_dict.bin`` -> ``Codec`` in eval mode.

    The file is loaded with ``weights_only=True``; files that pickle objects (an OmegaConf ``xp.cfg``) need
    ``trust=True`` (arbitrary code execution risk). ``config`` replaces the file's ``xp.cfg``: either an audiocraft
    experiment config (with ``seanet`` and ``rvq`` sections) or ``Codec.build`` kwargs. The file may also
    be a bare state dict when ``config`` is given.
    """
    path = Path(path)
    package = _load_package(path, trust)
    if not isinstance(package, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(package).__name__}")
    if "pretrained" in package and "best_state" not in package:
        raise ValueError(f"{path} only references the pretrained model {package['pretrained']!r} (as audiocraft's "
                         "released MusicGens ship it): download that transformers EncodecModel folder and give it "
                         "instead (ostinato import --codec FOLDER; load_transformers_encodec)")
    state = package.get("best_state", package)
    if config is None:
        if "xp.cfg" not in package:
            raise ValueError(f"{path} has no 'xp.cfg': pass config=")
        config = _plain_config(package["xp.cfg"], AUDIOCRAFT_CODEC_KEYS)
    else:
        config = _plain_config(config)
    kwargs = audiocraft_config_to_codec_kwargs(config) if "seanet" in config else dict(config)
    codec = Codec.build(**kwargs)
    load_codec_state(codec, audiocraft_state_to_codec(state), source=str(path))
    return codec.eval()
