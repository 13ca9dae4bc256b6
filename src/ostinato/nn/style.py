"""MusicGen-Style's style conditioner ("Audio Conditioning for Music Generation via Discrete Bottleneck Features").

A short excerpt (1.5 to 4.5 s in training) of a reference audio is turned into a few LM-width tokens prepended to
the LM input::

    frozen features [B, T, feature_dim]        codec latents (``codec_latent_features``) or an HF encoder
      -> Linear -> + sinusoids -> TransformerEncoder     [B, T, width]   trainable
      -> BatchNorm (no affine)                          keeps the RVQ input at a fixed scale
      -> residual VQ (n_q codebooks; eval: eval_q)       the discrete bottleneck
      -> keep every ``downsample``-th frame             [B, ceil(T / downsample), width]
      -> Linear                                         [B, ceil(T / downsample), dim]

Fewer codebooks at inference (``eval_q``) pass less information, so the generation follows the style more loosely.
Defaults follow audiocraft's ``StyleConditioner``: width 512, 8 layers, 8 heads, 6 codebooks of 1024 codes, 3 at
eval, downsampling by 15, excerpts of 1.5 to 4.5 s, dead-code threshold 0.1. With ``norm_bias`` (LayerNorms with a
bias, as audiocraft's) and ``q_dropout`` the state dict holds an audiocraft MusicGen-Style conditioner under the same
names but three (``embed`` -> ``input_proj``, ``batch_norm`` -> ``norm``, ``rvq.vq.layers`` -> ``rvq.layers``;
``ostinato.interop.musicgen_style`` maps them).

MERT (``m-a-p/MERT-v1-95M``, the features of audiocraft's MusicGen-Style) is published with remote code, a HuBERT
whose options (CQT features, DeepNorm, attention relaxation) are all off in the v1 models: ``HFAudioFeatures`` loads
such a folder into transformers' own ``HubertModel``, without running its code.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ostinato.nn.resample import resample, resample_audiocraft
from ostinato.nn.quantization import ResidualVectorQuantizer
from ostinato.nn.transformer import sinusoidal_embedding

__all__ = ["StyleConditioner", "HFAudioFeatures", "codec_latent_features", "mert_hubert_config", "MERT_MODEL_TYPE"]


class StyleConditioner(nn.Module):
    """Frozen features of a style excerpt -> ``(tokens [B, ceil(T / downsample), dim], penalty [])``.

    Args:
        feature_dim: width of the frozen input features.
        dim: width of the output tokens (the LM's).
        width, num_layers, num_heads: the trainable transformer encoder (feed-forward 4 * width, GELU, pre-norm).
        n_q, card: the residual VQ bottleneck; all ``n_q`` codebooks are used in training.
        eval_q: codebooks used in eval mode (1 <= eval_q <= n_q).
        downsample: one token per ``downsample`` feature frames.
        excerpt_seconds: (min, max) excerpt length drawn in training; ``eval_excerpt_seconds``: the eval length.
        commitment_weight: scale of the RVQ commitment loss returned as ``penalty``.
        norm_bias: LayerNorms with a bias in the encoder (audiocraft's); off in ostinato's own design.
        q_dropout: in training, each batch uses a random number of codebooks in [1, n_q] (audiocraft's).
        null_tokens: tokens of the "no style" condition at generation; None = as many as an eval excerpt gives
            (ostinato trains with that), 1 for audiocraft imports (its null style is one zero token).
        mask_excerpt: the LM loss leaves out the frames the excerpt was cut from (audiocraft's ``compute_mask``),
            so that the LM cannot learn to copy it.
    """

    def __init__(self, feature_dim: int, dim: int, width: int = 512, num_layers: int = 8, num_heads: int = 8,
                 n_q: int = 6, card: int = 1024, eval_q: int = 3, downsample: int = 15,
                 excerpt_seconds: tuple[float, float] = (1.5, 4.5), eval_excerpt_seconds: float = 3.0,
                 commitment_weight: float = 1.0, norm_bias: bool = False, q_dropout: bool = False,
                 null_tokens: int | None = None, mask_excerpt: bool = False) -> None:
        super().__init__()
        if n_q < 1:
            raise ValueError(f"n_q must be >= 1, got {n_q}")
        if not 1 <= eval_q <= n_q:
            raise ValueError(f"eval_q={eval_q} must be in [1, n_q={n_q}]: lower eval_q or raise n_q")
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        if width % num_heads:
            raise ValueError(f"width={width} must be a multiple of num_heads={num_heads}")
        lo, hi = (float(s) for s in excerpt_seconds)
        if not 0 < lo <= hi:
            raise ValueError(f"excerpt_seconds must be (min, max) with 0 < min <= max, got {excerpt_seconds}")
        if eval_excerpt_seconds <= 0:
            raise ValueError(f"eval_excerpt_seconds must be > 0, got {eval_excerpt_seconds}")
        if null_tokens is not None and null_tokens < 1:
            raise ValueError(f"null_tokens must be >= 1 or None, got {null_tokens}")
        self.config: dict[str, Any] = dict(
            feature_dim=feature_dim, dim=dim, width=width, num_layers=num_layers, num_heads=num_heads, n_q=n_q,
            card=card, eval_q=eval_q, downsample=downsample, excerpt_seconds=(lo, hi),
            eval_excerpt_seconds=float(eval_excerpt_seconds), commitment_weight=commitment_weight,
            norm_bias=norm_bias, q_dropout=q_dropout, null_tokens=null_tokens, mask_excerpt=mask_excerpt)
        self.feature_dim = feature_dim
        self.dim = dim
        self.width = width
        self.n_q = n_q
        self.eval_q = eval_q
        self.downsample = downsample
        self.excerpt_seconds = (lo, hi)
        self.eval_excerpt_seconds = float(eval_excerpt_seconds)
        self.null_tokens = null_tokens
        self.mask_excerpt = bool(mask_excerpt)

        self.input_proj = nn.Linear(feature_dim, width)
        layer = nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True, bias=False)
        # No final LayerNorm: the BatchNorm right after normalises the output anyway.
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        if norm_bias:  # torch's bias=False drops the LayerNorm biases too; audiocraft's keep theirs
            for block in self.transformer.layers:
                block.norm1 = nn.LayerNorm(width, eps=block.norm1.eps)
                block.norm2 = nn.LayerNorm(width, eps=block.norm2.eps)
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.rvq = ResidualVectorQuantizer(width, n_q=n_q, card=card, threshold_ema_dead_code=0.1,
                                           commitment_weight=commitment_weight, q_dropout=q_dropout)
        self.output_proj = nn.Linear(width, dim)

    def num_tokens(self, num_feature_frames: int) -> int:
        """Tokens produced from ``num_feature_frames`` frames: ceil(frames / downsample)."""
        return -(-int(num_feature_frames) // self.downsample)

    def forward(self, features: Tensor, mask: Tensor | None = None, n_q: int | None = None) -> tuple[Tensor, Tensor]:
        """features [B, T, feature_dim], mask [B, T] bool (True = valid, padding at the end) ->
        (tokens [B, ceil(T / downsample), dim], penalty []).

        ``n_q``: codebooks used; default all in training mode, ``eval_q`` in eval mode. Padded frames take no
        part in attention, in the BatchNorm statistics, in the codebook updates nor in the penalty.
        """
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"expected features [B, T, {self.feature_dim}], got {tuple(features.shape)}")
        b, t, _ = features.shape
        if t < 1:
            raise ValueError("the style excerpt is shorter than one feature frame; give a longer excerpt")
        if n_q is None:
            n_q = self.n_q if self.training else self.eval_q
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q must be in [1, {self.n_q}], got {n_q}")
        if mask is not None:
            if mask.shape != (b, t):
                raise ValueError(f"expected mask [{b}, {t}], got {tuple(mask.shape)}")
            mask = mask.to(device=features.device, dtype=torch.bool)
            if not bool(mask.any(dim=1).all()):
                raise ValueError("a style excerpt has no valid frame in its mask; drop it or give a longer one")

        x = self.input_proj(features.to(self.input_proj.weight.dtype))
        positions = torch.arange(t, device=x.device)
        x = x + sinusoidal_embedding(positions, self.width).to(x.dtype)
        x = self.transformer(x, src_key_padding_mask=None if mask is None else ~mask)

        # BatchNorm and RVQ work frame by frame: run them on the valid frames only, [N, width].
        flat = x.reshape(b * t, self.width) if mask is None else x[mask]
        flat = self.norm(flat)
        quantized = self.rvq(flat.t().unsqueeze(0), n_q=n_q)
        flat = quantized.quantized.squeeze(0).t()
        if mask is None:
            z = flat.reshape(b, t, self.width)
        else:
            z = flat.new_zeros(b, t, self.width).masked_scatter(mask[..., None], flat)

        # Strided like audiocraft: each token stays one quantized frame, keeping the bottleneck discrete.
        tokens = self.output_proj(z[:, ::self.downsample])
        return tokens, quantized.penalty

    def excerpt(self, num_frames: int, frame_rate: float, generator: torch.Generator | None = None,
                train: bool = True) -> tuple[int, int]:
        """(start, length) in feature frames of the style excerpt of an item of ``num_frames`` frames.

        Training: length uniform in ``excerpt_seconds``, start uniform over the valid positions. Eval:
        ``eval_excerpt_seconds`` from the start. The length is clipped to ``num_frames``.
        """
        if frame_rate <= 0:
            raise ValueError(f"frame_rate must be > 0, got {frame_rate}")
        if num_frames < 1:
            raise ValueError(f"the item has {num_frames} feature frames; the style excerpt needs at least one")
        if train:
            lo, hi = self.excerpt_seconds
            seconds = lo + (hi - lo) * float(torch.rand((), generator=generator))
        else:
            seconds = self.eval_excerpt_seconds
        length = min(int(seconds * frame_rate), int(num_frames))
        if length < 1:
            raise ValueError(f"an excerpt of {seconds:.3f} s at {frame_rate} frames/s is shorter than one frame; "
                             "raise excerpt_seconds / eval_excerpt_seconds")
        start = 0
        if train and num_frames > length:
            start = int(torch.randint(0, int(num_frames) - length + 1, (), generator=generator))
        return start, length

    def ema_excluded(self, prefix: str = "") -> list[str]:
        """State-dict names of the RVQ buffers (codebooks, step counter), which a weight EMA must not average."""
        return self.rvq.ema_excluded(prefix=f"{prefix}rvq.")


def codec_latent_features(quantizer_decode: Callable[[Tensor], Tensor], codes: Tensor) -> Tensor:
    """Codec codes [B, K, T] -> their continuous latents [B, T, D] float32, without gradient.

    ``quantizer_decode`` maps codes [B, K, T] to latents [B, D, T] (e.g. ``codec.quantizer.decode``).
    """
    if codes.dim() != 3:
        raise ValueError(f"expected codes [B, K, T], got {tuple(codes.shape)}")
    with torch.no_grad():
        latents = quantizer_decode(codes)
    if latents.dim() != 3 or latents.shape[0] != codes.shape[0] or latents.shape[-1] != codes.shape[-1]:
        raise ValueError(f"quantizer_decode must map codes [B, K, T] to [B, D, T]; got {tuple(latents.shape)} "
                         f"from {tuple(codes.shape)}")
    return latents.float().transpose(1, 2).contiguous()


class HFAudioFeatures:
    """A frozen HF audio encoder (HuBERT, MERT, wav2vec2...) from a local folder.

    Not an ``nn.Module`` on purpose: assigned to a module it is not registered, so it is not trained, not in
    checkpoints and not averaged by the EMA. It follows the device of its input.

    Args:
        path: folder saved with ``save_pretrained`` (``config.json``; ``preprocessor_config.json`` for the rate).
        layer: which hidden state to return (0 = the encoder's input, the projected conv features; None = last).
        trust_remote_code: run the folder's own modelling code; without it a MERT-v1 folder (``model_type``
            ``mert_model``) is loaded into transformers' ``HubertModel``.
        normalize: zero-mean unit-variance input per item; None = the folder's ``do_normalize`` (audiocraft's
            MusicGen-Style feeds MERT raw audio: False).
        resampler: "ostinato" (``resample``) or "audiocraft" (``resample_audiocraft``, what its imports need).
    """

    def __init__(self, path: str, layer: int | None = None, trust_remote_code: bool = False,
                 normalize: bool | None = None, resampler: str = "ostinato") -> None:
        if resampler not in ("ostinato", "audiocraft"):
            raise ValueError(f"resampler={resampler!r}: use ostinato or audiocraft")
        self.resample = resample if resampler == "ostinato" else resample_audiocraft
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no config.json: give a local folder saved with "
                                    "save_pretrained (models are never downloaded)")
        self.path = str(folder)
        raw = json.loads((folder / "config.json").read_text())
        mert = raw.get("model_type") == MERT_MODEL_TYPE and not trust_remote_code
        config = mert_hubert_config(folder, raw) if mert else _auto_config(self.path, trust_remote_code)
        preprocessor = folder / "preprocessor_config.json"
        prep: dict[str, Any] = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        rate = prep.get("sampling_rate") or getattr(config, "sampling_rate", None) or getattr(config, "sample_rate",
                                                                                             None)
        if not rate:
            raise ValueError(f"no sample rate for {self.path}: write sampling_rate into {preprocessor} (e.g. save "
                             "the model's Wav2Vec2FeatureExtractor there)")
        strides = getattr(config, "conv_stride", None)
        kernels = getattr(config, "conv_kernel", None)
        if not strides or not kernels:
            raise ValueError(f"{folder / 'config.json'} has no conv_stride / conv_kernel: not a wav2vec2-like "
                             "audio encoder")
        num_layers = int(config.num_hidden_layers)
        if layer is not None and not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(f"layer={layer} out of range: the encoder has hidden states 0..{num_layers}")
        self.sample_rate = int(rate)
        self.dim = int(config.hidden_size)
        hop = math.prod(int(s) for s in strides)
        self.frame_rate = self.sample_rate / hop
        # Shortest input giving one frame: the receptive field of the conv feature extractor.
        self.min_samples = 1 + sum((int(k) - 1) * math.prod(int(s) for s in strides[:i])
                                   for i, k in enumerate(kernels))
        self.normalize = bool(prep.get("do_normalize", False)) if normalize is None else bool(normalize)
        self.layer = layer
        model = _load_mert(folder, config) if mert else _auto_model(self.path, trust_remote_code)
        self.model = model.eval().requires_grad_(False)

    def num_frames(self, num_samples: int) -> int:
        """Frames the encoder gives for ``num_samples`` samples at ``sample_rate``."""
        n = int(num_samples)
        for k, s in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            n = (n - int(k)) // int(s) + 1
        return max(n, 0)

    def __call__(self, wav: Tensor, sample_rate: int) -> Tensor:
        """wav [B, C, T] at ``sample_rate`` -> features [B, F, dim] float32 (mono, resampled), no gradient."""
        if wav.dim() != 3:
            raise ValueError(f"expected wav [B, C, T], got {tuple(wav.shape)}")
        x = self.resample(wav.detach().float().mean(dim=1), int(sample_rate), self.sample_rate)
        if x.shape[-1] < self.min_samples:
            raise ValueError(f"{wav.shape[-1]} samples at {sample_rate} Hz is shorter than one frame of "
                             f"{self.path} ({self.min_samples} samples at {self.sample_rate} Hz); give a longer "
                             "excerpt")
        if self.normalize:  # what the folder's feature extractor does (do_normalize), per item
            x = (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, keepdim=True, correction=0) + 1e-7)
        if next(self.model.parameters()).device != x.device:
            self.model.to(x.device)
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            out = self.model(x, output_hidden_states=self.layer is not None)
        hidden = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        return hidden.float()


# ----- MERT without remote code --------------------------------------------------------------------------------

MERT_MODEL_TYPE = "mert_model"
# MERTConfig options whose code differs from HuBERT's; the values under which it is HuBERT's (those of MERT-v1)
_MERT_HUBERT_VALUES: dict[str, Any] = {"feature_extractor_cqt": False, "deepnorm": False}
_MERT_ONLY_KEYS = ("feature_extractor_cqt", "feature_extractor_cqt_bins", "deepnorm", "attention_relax",
                   "sample_rate", "model_type", "architectures", "auto_map")


def mert_hubert_config(folder: Path, raw: dict[str, Any]) -> Any:
    """A MERT folder's ``config.json`` contents -> the ``HubertConfig`` that computes the same model.

    MERT's ``MERTModel`` subclasses transformers' ``HubertModel``; with CQT features, DeepNorm and attention
    relaxation off (MERT-v1-95M / 330M) its forward is HuBERT's. Other settings are refused (one line naming the key).
    """
    from transformers import HubertConfig

    for key, value in _MERT_HUBERT_VALUES.items():
        if bool(raw.get(key, value)) != value:
            raise ValueError(f"{folder / 'config.json'}: {key}={raw[key]!r} needs MERT's own code; set "
                             "trust_remote_code: true (with its modelling files in the folder)")
    if float(raw.get("attention_relax", -1.0)) > 0:
        raise ValueError(f"{folder / 'config.json'}: attention_relax={raw['attention_relax']!r} needs MERT's own "
                         "code; set trust_remote_code: true (with its modelling files in the folder)")
    config = HubertConfig(**{k: v for k, v in raw.items() if k not in _MERT_ONLY_KEYS})
    config.sample_rate = raw.get("sample_rate")
    return config


def _load_mert(folder: Path, config: Any) -> nn.Module:
    """A MERT folder's weights in a ``HubertModel``; every weight of either side must find its match."""
    from transformers import HubertModel

    class MertAsHubert(HubertModel):  # HuBERT's forward; MERT's prefix, should its file carry one
        base_model_prefix = MERT_MODEL_TYPE

    model, info = MertAsHubert.from_pretrained(folder, config=config, local_files_only=True,
                                               output_loading_info=True)
    bad = {k: sorted(v)[:8] for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{folder}: its weights do not fit a HuBERT of its config.json ({bad}); set "
                         "trust_remote_code: true (with MERT's modelling files in the folder)")
    return model


def _auto_config(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def _auto_model(path: str, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
