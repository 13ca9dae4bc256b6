"""MusicGen-style language model over K parallel codebook streams, with a static KV cache.

Architecture (numerically identical to transformers' ``MusicgenForCausalLM``, see ``ostinato.interop.musicgen``):

    x = sum_k Emb_k(codes[:, k])            K embeddings of ``card + 1`` rows (row ``card`` = special / pad / BOS)
      + PE(offset + s)                      sinusoidal [cos | sin] (or RoPE inside self-attention)
    for each layer (pre-norm):
      x = x + SelfAttn(LN(x))               causal, SDPA, no Linear bias
      x = x + CrossAttn(LN(x), cond)        optional, keys/values from ``cond [B, Tc, cond_dim]``
      x = x + fc2(act(fc1(LN(x))))          no Linear bias
    logits_k = Head_k(LN(x))                K heads, ``dim -> card``, no bias

LayerNorms have an affine weight and bias (``eps = layer_norm_eps``). transformers' ``scale_embedding`` flag is
ignored by its own forward pass (the embedding scale is computed but never applied), so there is none here.

Initialisation (``init``): "audiocraft" (default, MusicGen's ``weight_init=gaussian, depthwise_init=current,
zero_bias_init``): truncated normal (+-3 std) with ``std = 1 / sqrt(fan_in)``, divided by ``sqrt(2 (i + 1))`` inside
layer ``i``, embeddings ``1 / sqrt(dim)``, biases 0; or "transformers": every weight ~ N(0, ``init_std``).
LayerNorms start at 1 / 0. Imported weights replace either.

``KVCache`` preallocates ``[B, H, max_len, head_dim]`` key/value buffers per layer; new keys are written with
``index_copy_`` and queries attend to the whole buffer under a position mask, so a one-token decoding step has
static shapes (CUDA-graph friendly). Cross-attention keys/values are computed on the first cached call and reused.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ostinato.nn.patterns import CodebookPattern

__all__ = [
    "LMConfig", "LM_PRESETS", "lm_config", "KVCache", "CodebookLM", "sinusoidal_embedding", "generate_greedy",
    "set_sdpa_priority", "prefer_cudnn_attention",
]

_ACTIVATIONS: dict[str, Any] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

LM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, num_heads=4, num_layers=2, ffn_dim=256),
    "small": dict(dim=1024, num_heads=16, num_layers=24, ffn_dim=4096),
    "medium": dict(dim=1536, num_heads=24, num_layers=48, ffn_dim=6144),
    "large": dict(dim=2048, num_heads=32, num_layers=48, ffn_dim=8192),
}


@dataclass
class LMConfig:
    """Hyper-parameters of ``CodebookLM``; the defaults are MusicGen-small's."""

    n_q: int = 4
    card: int = 2048
    dim: int = 1024
    num_heads: int = 16
    num_layers: int = 24
    ffn_dim: int = 4096
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "gelu"
    cross_attention: bool = True
    cond_dim: int | None = None
    positional: Literal["sin", "rope"] = "sin"
    max_period: float = 10_000.0
    bias: bool = False
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    init: Literal["audiocraft", "transformers"] = "audiocraft"
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} not divisible by num_heads {self.num_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(_ACTIVATIONS)}")
        if self.positional not in ("sin", "rope"):
            raise ValueError(f"positional must be 'sin' or 'rope', got {self.positional!r}")
        if self.init not in ("audiocraft", "transformers"):
            raise ValueError(f"init must be 'audiocraft' or 'transformers', got {self.init!r}")

    @property
    def special(self) -> int:
        """Id of the special (empty / pad / BOS) token: ``card``."""
        return self.card

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the conditioning that cross-attention reads."""
        return self.dim if self.cond_dim is None else self.cond_dim

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LMConfig:
        """``LMConfig.preset("small", n_q=4, card=2048)``; names: tiny, small, medium, large."""
        if name not in LM_PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(LM_PRESETS)}")
        return cls(**{**LM_PRESETS[name], **overrides})

    def with_(self, **changes: Any) -> LMConfig:
        return replace(self, **changes)


def lm_config(lm: Mapping[str, Any] | None, *, n_q: int, card: int, cross_attention: bool) -> LMConfig:
    """``{preset: tiny, dim: 128, ...}`` or plain ``LMConfig`` kwargs -> ``LMConfig``; ``n_q`` and ``card`` come from
    the model's own keys (declared once: an ``lm.n_q`` / ``lm.card`` that differs is refused)."""
    kw = dict(lm or {})
    for key in ("n_q", "card"):
        if key in kw and int(kw.pop(key)) != {"n_q": n_q, "card": card}[key]:
            raise ValueError(f"family.lm.{key} differs from family.{key}: set family.{key} only")
    kw.setdefault("cross_attention", cross_attention)
    preset = kw.pop("preset", None)
    if preset:
        return LMConfig.preset(preset, n_q=n_q, card=card, **kw)
    return LMConfig(n_q=n_q, card=card, **kw)


def set_sdpa_priority(names: list[str]) -> list[int]:
    """Make ``F.scaled_dot_product_attention`` try its kernels in this order (``cudnn``, ``flash``, ``efficient``,
    ``math``; kernels left out keep their relative order after them). Process-wide, like torch's own setting;
    returns the previous order (for ``torch._C._set_sdp_priority_order``)."""
    from torch.nn.attention import SDPBackend

    known = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown SDPA backends {unknown}; known: {sorted(known)}")
    previous = list(torch._C._get_sdp_priority_order())
    order = [int(known[n]) for n in names]
    torch._C._set_sdp_priority_order(order + [b for b in previous if b not in order])
    return previous


_SELF_ATTENTION_KERNELS: list[Any] | None = None  # SDPA priority of the causal self-attention on CUDA


def prefer_cudnn_attention(enable: bool = True) -> bool:
    """On Hopper or newer GPUs, run the causal self-attention of ``CodebookLM`` training (no cache) with cuDNN
    attention first (faster than flash attention for MusicGen's training shapes); True when it does from now on.

    Only the self-attention, whose length is fixed by the training segment: cuDNN builds (and compiles) a kernel
    per new shape, and cross-attention lengths (tokenized texts) change from batch to batch. ``enable=False``
    restores torch's own order everywhere.
    """
    global _SELF_ATTENTION_KERNELS
    _SELF_ATTENTION_KERNELS = None
    if not enable or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return False
    if not torch.backends.cudnn.is_available():
        return False
    from torch.nn.attention import SDPBackend

    _SELF_ATTENTION_KERNELS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return True


def sinusoidal_embedding(positions: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """MusicGen / tensor2tensor sinusoids: ``[cos(p w_i) | sin(p w_i)]``, ``w_i = max_period^(-i/(dim/2-1))``.

    Args:
        positions: ``[S]`` positions (any numeric dtype).
    Returns:
        ``[S, dim]`` float32 (a zero column is appended for odd ``dim``).
    """
    half = dim // 2
    scale = math.log(max_period) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.int64).float() * -scale)
    angles = positions.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _apply_rope(x: Tensor, positions: Tensor, max_period: float) -> Tensor:
    """Rotary embedding (rotate-half convention). ``x [B, H, S, Dh]``, ``positions [S]``."""
    dh = x.shape[-1]
    half = dh // 2
    freqs = max_period ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # [S, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    if dh % 2:
        out = torch.cat([out, x[..., -1:]], dim=-1)
    return out


class KVCache:
    """Static key/value cache for incremental decoding.

    Attributes:
        keys, values: per layer ``[B, H, max_len, head_dim]`` self-attention buffers.
        cross: per layer ``(k, v)`` of cross-attention, each ``[B, H, Tc, head_dim]``, or None before the first
            call with conditioning.
        cross_mask: ``[B, 1, 1, Tc]`` bool or None.
        length: number of positions already written (the position offset of the next call).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, num_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.cross_mask: Tensor | None = None
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        """Forget everything (buffers are kept, their stale contents are masked out)."""
        self.length = 0
        self.cross = [None] * len(self.cross)
        self.cross_mask = None


class _Attention(nn.Module):
    """Multi-head attention; ``kv_dim`` is the width of the key/value source (cross-attention conditioning)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, dim // num_heads, dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:  # [B, S, D] -> [B, H, S, Dh]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """``src [B, T, kv_dim]`` -> keys, values ``[B, H, T, Dh]``."""
        return self._heads(self.k_proj(src)), self._heads(self.v_proj(src))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """``q [B, H, S, Dh]`` over ``k, v [B, H, T, Dh]`` -> ``[B, S, D]`` after the output projection."""
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        b, h, s, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, s, h * dh))


class _Block(nn.Module):
    """Pre-norm decoder layer: causal self-attention, optional cross-attention, FFN."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.self_attn = _Attention(cfg.dim, cfg.num_heads, cfg.dim, cfg.bias, cfg.attention_dropout)
        self.norm_self = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.cross_attn: _Attention | None = None
        self.norm_cross: nn.LayerNorm | None = None
        if cfg.cross_attention:
            self.cross_attn = _Attention(cfg.dim, cfg.num_heads, cfg.kv_dim, cfg.bias, cfg.attention_dropout)
            self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.norm_ffn = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)
        self.act = _ACTIVATIONS[cfg.activation]

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.cfg.dropout, self.training)

    def forward(self, x: Tensor, positions: Tensor, cond: Tensor | None = None, cond_mask: Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``x [B, S, D]``, ``positions [S]`` (absolute), ``cond [B, Tc, kv_dim]``, ``cond_mask [B, 1, 1, Tc]``."""
        attn = self.self_attn
        h = self.norm_self(x)
        q = attn._heads(attn.q_proj(h))
        k, v = attn.project_kv(h)
        if self.cfg.positional == "rope":
            q = _apply_rope(q, positions, self.cfg.max_period)
            k = _apply_rope(k, positions, self.cfg.max_period)
        if cache is None and _SELF_ATTENTION_KERNELS is not None and x.is_cuda:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(_SELF_ATTENTION_KERNELS, set_priority=True):
                h = attn.attend(q, k, v, None, causal=True)
        elif cache is None:
            h = attn.attend(q, k, v, None, causal=True)
        else:
            kb, vb = cache.keys[layer], cache.values[layer]
            kb.index_copy_(2, positions, k.to(kb.dtype))
            vb.index_copy_(2, positions, v.to(vb.dtype))
            key_pos = torch.arange(cache.max_len, device=x.device)
            mask = key_pos[None, :] <= positions[:, None]  # [S, max_len]
            h = attn.attend(q, kb, vb, mask, causal=False)
        x = x + self._drop(h)

        if self.cross_attn is not None and self.norm_cross is not None:
            kv: tuple[Tensor, Tensor] | None
            if cache is not None and cache.cross[layer] is not None:
                kv, cmask = cache.cross[layer], cache.cross_mask
            elif cond is not None:
                kv, cmask = self.cross_attn.project_kv(cond), cond_mask
                if cache is not None:
                    cache.cross[layer] = kv
            else:
                kv, cmask = None, None
            if kv is not None:
                h = self.norm_cross(x)
                q = self.cross_attn._heads(self.cross_attn.q_proj(h))
                x = x + self._drop(self.cross_attn.attend(q, kv[0], kv[1], cmask, causal=False))

        h = self.fc2(F.dropout(self.act(self.fc1(self.norm_ffn(x))), self.cfg.activation_dropout, self.training))
        return x + self._drop(h)


class CodebookLM(nn.Module):
    """Decoder LM over K codebooks (MusicGen's ``LMModel`` / transformers' ``MusicgenForCausalLM``)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)])
        self.layers = nn.ModuleList([_Block(cfg) for _ in range(cfg.num_layers)])
        self.out_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.heads = nn.ModuleList([nn.Linear(cfg.dim, cfg.card, bias=False) for _ in range(cfg.n_q)])
        self.apply(self._init_weights)
        if cfg.init == "audiocraft":
            for i, layer in enumerate(self.layers):
                layer.apply(lambda m, depth=i + 1: self._init_audiocraft(m, depth))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if self.cfg.init == "audiocraft":
                self._init_audiocraft(module, None)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @staticmethod
    def _init_audiocraft(module: nn.Module, depth: int | None) -> None:
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return
        fan_in = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
        std = 1.0 / math.sqrt(fan_in) / (math.sqrt(2 * depth) if depth else 1.0)
        nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def special(self) -> int:
        return self.cfg.card

    def make_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        """A ``KVCache`` for ``batch_size`` sequences of up to ``max_len`` steps, on this model's device/dtype."""
        p = next(self.parameters())
        return KVCache(self.cfg.num_layers, batch_size, self.cfg.num_heads, max_len, self.cfg.head_dim,
                       device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)

    def forward(self, codes: Tensor, cond: Tensor | None = None, cond_mask: Tensor | None = None,
                cache: KVCache | None = None, offset: int = 0, prefix: Tensor | None = None,
                step_cond: Tensor | None = None) -> Tensor:
        """Next-step logits.

        Args:
            codes: ``[B, K, S]`` int64 in ``[0, card]`` (``card`` = special token).
            cond: ``[B, Tc, cond_dim]`` cross-attention conditioning, or None (no cross-attention). With a cache
                it is only read on the first call (keys/values are cached).
            cond_mask: ``[B, Tc]`` bool, True = attend; None = all valid.
            cache: ``KVCache``; the call appends S positions at ``cache.length`` (prefill with S > 1, then steps
                of 1). Without a cache the attention is causal over the S given steps.
            offset: position of ``codes[..., 0]`` when no cache is given.
            prefix: ``[B, P, dim]`` embeddings prepended to the sequence (melody chroma, style tokens): they take
                positions ``offset .. offset + P - 1`` and the codes follow; no logits are returned for them.
                With a cache, pass it on the first (prefill) call only.
            step_cond: ``[B, S, dim]`` added to the embeddings of the S given steps (a Jukebox upsampler's upper
                codes: the condition of the step a position predicts sits on that position, not far back in a
                prefix).
        Returns:
            ``[B, K, S, card]`` logits; ``[:, :, s]`` predicts step s + 1.
        """
        b, k, s = codes.shape
        if k != self.cfg.n_q:
            raise ValueError(f"expected {self.cfg.n_q} codebooks, got {k}")
        n_prefix = 0 if prefix is None else prefix.shape[1]
        start = offset if cache is None else cache.length
        if cache is not None and start + n_prefix + s > cache.max_len:
            raise ValueError(f"cache overflow: {start} + {n_prefix + s} > max_len {cache.max_len}")
        positions = torch.arange(start, start + n_prefix + s, device=codes.device)

        x = self.emb[0](codes[:, 0])
        for i in range(1, k):
            x = x + self.emb[i](codes[:, i])
        if step_cond is not None:
            if step_cond.shape != (b, s, self.cfg.dim):
                raise ValueError(f"step_cond must be [{b}, {s}, {self.cfg.dim}], got {tuple(step_cond.shape)}")
            x = x + step_cond.to(x.dtype)
        if prefix is not None:
            if prefix.shape[0] != b or prefix.shape[2] != self.cfg.dim:
                raise ValueError(f"prefix must be [{b}, P, {self.cfg.dim}], got {tuple(prefix.shape)}")
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if self.cfg.positional == "sin":
            x = x + sinusoidal_embedding(positions, self.cfg.dim, self.cfg.max_period).to(x.dtype)
        x = F.dropout(x, self.cfg.dropout, self.training)

        mask4 = None
        if cond_mask is not None:
            mask4 = cond_mask.to(torch.bool)[:, None, None, :]
        if cache is not None and cache.cross_mask is None and cond is not None:
            cache.cross_mask = mask4

        use_ckpt = self.cfg.checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if use_ckpt:
                x = checkpoint(layer, x, positions, cond, mask4, None, i, use_reentrant=False)
            else:
                x = layer(x, positions, cond, mask4, cache, i)
        if cache is not None:
            cache.length = start + n_prefix + s

        x = self.out_norm(x[:, n_prefix:])
        return torch.stack([head(x) for head in self.heads], dim=1)


@torch.no_grad()
def generate_greedy(model: CodebookLM, pattern: CodebookPattern, n_frames: int, batch_size: int = 1,
                    cond: Tensor | None = None, cond_mask: Tensor | None = None,
                    use_cache: bool = True) -> tuple[Tensor, Tensor]:
    """Greedy (argmax) decoding of ``n_frames`` frames through ``pattern``.

    Starts from the all-special BOS step; at every step the argmax token is kept where the pattern has a code and
    replaced by the special token elsewhere (transformers' ``apply_delay_pattern_mask``).

    Args:
        cond: ``[B, Tc, cond_dim]`` (fixes the batch size), ``cond_mask [B, Tc]`` bool.
        use_cache: decode with a ``KVCache`` (one step at a time) or re-run the full prefix each step.
    Returns:
        ``(codes [B, K, T], sequence [B, K, S])``.
    """
    special = model.special
    b = cond.shape[0] if cond is not None else batch_size
    device = next(model.parameters()).device
    steps = pattern.max_steps(n_frames)
    valid = pattern.valid_mask(n_frames, device)  # [K, S]
    seq = torch.full((b, model.cfg.n_q, steps), special, dtype=torch.long, device=device)
    cache = model.make_cache(b, steps) if use_cache else None
    for s in range(steps - 1):
        if cache is not None:
            logits = model(seq[:, :, s:s + 1], cond, cond_mask, cache=cache)
        else:
            logits = model(seq[:, :, :s + 1], cond, cond_mask)
        nxt = logits[:, :, -1].argmax(dim=-1)  # [B, K]
        seq[:, :, s + 1] = torch.where(valid[:, s + 1], nxt, torch.full_like(nxt, special))
    codes, _ = pattern.revert(seq, n_frames)
    return codes, seq
