"""audiocraft's MusicGen-Style conditioner (``conditioners.self_wav`` of model ``style``) -> ostinato's
``StyleConditioner``.

audiocraft (``audiocraft/modules/conditioners.py``, ``StyleConditioner`` and its base ``FeatureExtractor``) turns
an excerpt of ``length`` seconds of the reference, resampled to 24 kHz mono and fed raw to MERT (frozen, loaded by
name, outside ``best_state``), into tokens::

    MERT last_hidden_state [B, T, 768] (75 Hz) -> embed (Linear) -> StreamingTransformer (+ sinusoids, pre-norm,
    GELU, no Linear bias) -> BatchNorm1d (no affine) -> RVQ (n_q_out codebooks in training, eval_q in eval)
    -> every ds_factor-th frame -> output_proj (Linear to the LM width)

and prepends them, then the T5 text, to the LM input (``fuser.prepend: [self_wav, description]``; the fuser walks
the conditions text first, each one put in front, so style ends up first). Names (``P`` =
``condition_provider.conditioners.self_wav.``, ours relative to ``MusicGen.style``):

    P.embed.{weight,bias}                          -> input_proj.{weight,bias}
    P.transformer.layers.{i}.*                     -> transformer.layers.{i}.* (the same torch layer names)
    P.batch_norm.{running_mean,running_var,num_batches_tracked} -> norm.*
    P.rvq.vq.layers.{k}._codebook.{inited,cluster_size,embed,embed_avg} -> rvq.layers.{k}.codebook.*
    P.output_proj.{weight,bias}                    -> output_proj.{weight,bias}
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["STYLE_PREFIX", "STYLE_DIR", "STYLE_FEATURES", "MERT_RATE", "is_style", "check_fuser", "style_kwargs",
           "style_state", "write_style_encoder"]

STYLE_PREFIX = "condition_provider.conditioners.self_wav."
STYLE_DIR = "style_encoder"
MERT_RATE = 24000  # audiocraft resamples the excerpt to 24 kHz whatever the MERT folder says
MERT_FRAME_RATE = 75.0  # its _downsampling_factor assumes MERT's 75 Hz
# how audiocraft runs MERT: raw audio (no do_normalize), its last hidden state, resampled by julius
STYLE_FEATURES = {"normalize": False, "layer": None, "resampler": "audiocraft"}
# transformer_scale -> (width, layers, heads), as the source's StyleConditioner.__init__ sets them
_SCALES = {"xsmall": (256, 4, 8), "default": (512, 8, 8), "large": (1024, 24, 16)}
_CODEBOOK = re.compile(r"^rvq\.vq\.layers\.(\d+)\._codebook\.(inited|cluster_size|embed|embed_avg)$")
_RENAMES = {"embed.": "input_proj.", "batch_norm.": "norm.", "transformer.": "transformer.",
            "output_proj.": "output_proj."}


def is_style(cfg: Mapping[str, Any]) -> bool:
    """Whether an audiocraft ``xp.cfg`` (plain containers) is a MusicGen-Style one."""
    self_wav = (cfg.get("conditioners") or {}).get("self_wav") or {}
    return isinstance(self_wav, Mapping) and self_wav.get("model") == "style"


def check_fuser(cfg: Mapping[str, Any]) -> None:
    """MusicGen-Style prepends style then text and has no cross-attention; anything else is refused."""
    fuser = dict(cfg.get("fuser") or {})
    prepend = list(fuser.get("prepend") or [])
    if sorted(prepend) not in (["description", "self_wav"], ["self_wav"]):
        raise ValueError(f"xp.cfg: fuser.prepend={prepend} is not supported for a style model (only "
                         "[self_wav, description])")
    for method in ("cross", "sum", "input_interpolate"):
        if fuser.get(method):
            raise ValueError(f"xp.cfg: fuser.{method}={fuser[method]} is not supported for a style model")


def style_kwargs(cfg: Mapping[str, Any], state: Mapping[str, Tensor]) -> dict[str, Any]:
    """``StyleConditioner`` kwargs of an audiocraft MusicGen-Style ``xp.cfg`` and its ``best_state`` (``features``,
    the MERT folder, is the caller's). Raises ``ValueError`` naming the ``conditioners.self_wav.style`` key of
    what ostinato does not reproduce."""
    style = dict(((cfg.get("conditioners") or {}).get("self_wav") or {}).get("style") or {})
    key = "xp.cfg: conditioners.self_wav.style"
    if style.get("model_name", "mert") != "mert":
        raise ValueError(f"{key}.model_name={style['model_name']!r} is not supported (only mert)")
    scale = style.get("transformer_scale", "default")
    if scale not in _SCALES:
        raise ValueError(f"{key}.transformer_scale={scale!r} is not supported ({', '.join(_SCALES)})")
    if not style.get("batch_norm", True):
        raise ValueError(f"{key}.batch_norm=false is not supported (only true)")
    if int(style.get("n_q_out", 6)) < 1:
        raise ValueError(f"{key}.n_q_out={style['n_q_out']} is not supported (no quantizer)")
    if float(style.get("rvq_threshold_ema_dead_code", 0.1)) != 0.1:
        raise ValueError(f"{key}.rvq_threshold_ema_dead_code={style['rvq_threshold_ema_dead_code']} is not "
                         "supported (only 0.1)")
    weight = state.get(STYLE_PREFIX + "embed.weight")
    if weight is None:
        raise ValueError(f"best_state has no {STYLE_PREFIX}embed.weight: not a MERT style conditioner")
    width, layers, heads = _SCALES[scale]
    lengths = [float(x) for x in (style.get("varying_lengths") or [1.5, 4.5])]
    return dict(feature_dim=int(weight.shape[1]), width=width, num_layers=layers, num_heads=heads,
                n_q=int(style.get("n_q_out", 6)), card=int(style.get("bins", 1024)),
                eval_q=int(style.get("eval_q", 3)), downsample=int(style.get("ds_factor", 15)),
                excerpt_seconds=lengths, eval_excerpt_seconds=float(style.get("length", 3.0)),
                norm_bias=True, q_dropout=bool(style.get("q_dropout", True)), null_tokens=1,
                mask_excerpt=bool(style.get("compute_mask", True)))


def style_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``best_state`` -> (the style conditioner's tensors in ``StyleConditioner`` names, everything else).

    audiocraft's ``inited`` is a float ``[1]``, ours a bool ``[]``; the RVQ's training-step counter (ours only)
    starts at 0. Unknown style keys keep their names, so that strict loading reports them.
    """
    style: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(STYLE_PREFIX):
            rest[key] = value
            continue
        name = key[len(STYLE_PREFIX):]
        if match := _CODEBOOK.match(name):
            if match[2] == "inited":
                value = value.reshape(()).bool()
            style[f"rvq.layers.{match[1]}.codebook.{match[2]}"] = value
            continue
        for old, new in _RENAMES.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        style[name] = value
    if style:
        style["rvq.steps"] = torch.zeros((), dtype=torch.long)
    return style, rest


def write_style_encoder(src: str | Path, dst: Path, feature_dim: int) -> None:
    """A local MERT folder (``--style-encoder``) -> ``dst`` (copied), checked: it loads (MERT-v1 as a HuBERT,
    without its remote code), gives ``feature_dim``-wide features at 75 Hz and takes 24 kHz audio."""
    from ostinato.nn.style import HFAudioFeatures

    src = Path(src).expanduser()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--style-encoder {src}: no config.json there; give a local MERT folder "
                                "(m-a-p/MERT-v1-95M saved with its preprocessor_config.json)")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.h5", "*.msgpack", "*.onnx", "flax_model*",
                                                            "tf_model*"))
    features = HFAudioFeatures(str(dst), normalize=False)
    if features.dim != feature_dim:
        raise ValueError(f"--style-encoder {src}: {features.dim}-dim features, but the checkpoint's style "
                         f"conditioner takes {feature_dim} (MERT-v1-95M's 768); give the MERT it was trained with")
    if features.sample_rate != MERT_RATE or features.frame_rate != MERT_FRAME_RATE:
        raise ValueError(f"--style-encoder {src}: {features.sample_rate} Hz in, {features.frame_rate:g} frames/s "
                         f"out; MusicGen-Style's MERT takes {MERT_RATE} Hz and gives {MERT_FRAME_RATE:g} frames/s")

