"""Fast KV-cached decoding for ``CodebookLM``: one static-shape decode step that runs eagerly or replays as a
CUDA graph.

``FastDecoder`` owns everything one decoding window needs at fixed addresses: inference weights
(``InferenceWeights``: the model's parameters in the inference dtype, with the self-attention q/k/v projections
fused into one matrix and the K heads into one ``[K * card, dim]`` matrix), a self-attention cache
``[R, H, L, head_dim]`` per layer, cross-attention keys/values ``[R, H, Tc, head_dim]``, the sequence
``[B, K, S]``, the pattern masks, uniform noise for sampling, and the step counter (a device tensor). ``step()``
reads the tokens of step s, writes the new keys/values at position ``n_prefix + s``, attends to the filled part
of the buffer rounded up to a multiple of ``kv_bucket`` positions (under a length mask), mixes the CFG rows,
samples (Gumbel-max over the top-k logits: the same distribution as ``sample_next``, drawn from noise that was
generated outside the step) and writes step s + 1 into the sequence, then advances the counter: no shapes change
and nothing is read back to the host, so the step can be captured in a CUDA graph and replayed for every token.

On CPU (and with ``backend="static"``) the same ``step`` runs eagerly; with ``backend="graph"`` it is captured once
per attended length (the first step that needs it) and replayed; the graphs share one memory pool. Attending to
the filled part only halves the cache traffic of a window on average, which dominates large batches (at batch 128
with CFG, 256 rows x 24 layers of keys and values are ~25 MB per position). The one-query attention is two
batched matrix-vector products (``"bmm"``) or SDPA's fused kernel (``"sdpa"``); ``"auto"`` times both graphs
at each length's capture on a GPU and keeps the faster (eagerly: ``"bmm"``). Greedy decoding gives the same
tokens as the reference paths (``generate`` with the dynamic cache or without a cache); logits agree to the
rounding of the fused matrices. Sampled tokens differ from ``sample_next``'s draws for the same seed (another way
of drawing from the same distribution); replay and eager draw identical tokens from the same seed.

Decoders are cached on the model per window shape and sampling settings; inference weights are refreshed in
place (the graphs stay valid) whenever a parameter of the model changed since the last call.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ostinato.nn.sampling import cfg_logits, double_cfg_logits
from ostinato.nn.transformer import _ACTIVATIONS, CodebookLM, _apply_rope, sinusoidal_embedding

__all__ = ["InferenceWeights", "SamplingSpec", "FastDecoder", "fast_decoder", "gumbel_topk_sample", "ATTENTIONS"]

_CACHE_KEY = "_ostinato_fast_decoders"
_WEIGHTS_KEY = "_ostinato_inference_weights"
_MAX_DECODERS = 4
_NOISE_BYTES = 64 << 20  # at most this much uniform noise is generated at once
ATTENTIONS = ("auto", "bmm", "sdpa")  # the one-query attention kernels of a decoding step


class InferenceWeights:
    """The parameters of a ``CodebookLM`` in one dtype, laid out for decoding.

    Per layer: ``qkv [3D, D]`` (rows ordered head, then q/k/v, then head_dim, so that one projection gives
    ``[.., H, 3, head_dim]``), ``o``; cross-attention ``cq``, ``ck``, ``cv``, ``co``; ``fc1``, ``fc2``; LayerNorm
    weights/biases; optional Linear biases. The attention scale ``1 / sqrt(head_dim)`` is folded into the q rows
    (``qkv`` and ``cq``; exact for power-of-two head sizes). ``emb [K, card + 1, D]``, ``heads [K * card, D]``.
    Tensors that need no conversion alias the model's parameters; the others are copies that ``refresh`` updates
    in place when the model's parameters changed (``Tensor._version``).
    """

    def __init__(self, model: CodebookLM, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        self._pairs: list[tuple[Tensor, Tensor, float]] = []
        self.scale = 1.0 / math.sqrt(model.cfg.head_dim)
        self._params = list(model.parameters())
        self.pointers = self._read_pointers()
        self.layers = [self._layer(block) for block in model.layers]
        self.emb = self._stack([e.weight for e in model.emb])  # [K, card + 1, D]
        self.heads = self._stack([h.weight for h in model.heads]).flatten(0, 1)  # [K * card, D]
        self.out_norm = (self._own(model.out_norm.weight), self._own(model.out_norm.bias))
        self._copy_in()

    def _read_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def _read_pointers(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self._params)

    def stale(self, model: CodebookLM) -> bool:
        """True when the model's parameters were replaced (moved, re-created): build new weights then."""
        params = list(model.parameters())
        return len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params)) \
            or self._read_pointers() != self.pointers

    def _own(self, p: Tensor | None, scale: float = 1.0) -> Tensor | None:
        if p is None:
            return None
        if p.dtype == self.dtype and scale == 1.0:
            return p.detach()
        out = torch.empty_like(p, dtype=self.dtype)
        self._pairs.append((out, p, scale))
        return out

    def _stack(self, ps: list[Tensor | None]) -> Tensor | None:
        if ps[0] is None:
            return None
        out = torch.empty(len(ps), *ps[0].shape, dtype=self.dtype, device=ps[0].device)
        self._pairs += [(out[i], p, 1.0) for i, p in enumerate(ps)]
        return out

    def _qkv(self, ps: list[Tensor | None], heads: int) -> Tensor | None:
        """q, k, v weights ``[D, D]`` (or biases ``[D]``) -> ``[H, 3, Dh, ...]`` flattened to ``[3D, ...]``."""
        if ps[0] is None:
            return None
        rest = ps[0].shape[1:]
        out = torch.empty(heads, 3, ps[0].shape[0] // heads, *rest, dtype=self.dtype, device=ps[0].device)
        self._pairs += [(out[:, i], p, self.scale if i == 0 else 1.0) for i, p in enumerate(ps)]
        return out.flatten(0, 2)

    def _layer(self, block: torch.nn.Module) -> dict[str, Tensor | None]:
        sa, w, h = block.self_attn, {}, block.cfg.num_heads
        w["qkv"] = self._qkv([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight], h)
        w["qkv_b"] = self._qkv([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias], h)
        w["o"], w["o_b"] = self._own(sa.out_proj.weight), self._own(sa.out_proj.bias)
        w["ln1"], w["ln1_b"] = self._own(block.norm_self.weight), self._own(block.norm_self.bias)
        ca = block.cross_attn
        if ca is not None:
            for name, lin in (("cq", ca.q_proj), ("ck", ca.k_proj), ("cv", ca.v_proj), ("co", ca.out_proj)):
                scale = self.scale if name == "cq" else 1.0
                w[name], w[name + "_b"] = self._own(lin.weight, scale), self._own(lin.bias, scale)
            w["ln2"], w["ln2_b"] = self._own(block.norm_cross.weight), self._own(block.norm_cross.bias)
        w["ln3"], w["ln3_b"] = self._own(block.norm_ffn.weight), self._own(block.norm_ffn.bias)
        w["fc1"], w["fc1_b"] = self._own(block.fc1.weight), self._own(block.fc1.bias)
        w["fc2"], w["fc2_b"] = self._own(block.fc2.weight), self._own(block.fc2.bias)
        return w

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copy the model's parameters in again if any changed; True when something was copied."""
        if self._read_versions() == self._versions:
            return False
        self._copy_in()
        return True

    @torch.no_grad()
    def _copy_in(self) -> None:
        for dst, src, scale in self._pairs:
            src = src.detach().reshape(dst.shape)
            dst.copy_(src * scale if scale != 1.0 else src)
        self._versions = self._read_versions()


def inference_weights(model: CodebookLM, dtype: torch.dtype) -> InferenceWeights:
    """The model's ``InferenceWeights`` in ``dtype`` (built once, refreshed when the parameters changed)."""
    store: dict[torch.dtype, InferenceWeights] = model.__dict__.setdefault(_WEIGHTS_KEY, {})
    device = next(model.parameters()).device
    w = store.get(dtype)
    if w is None or w.heads.device != device or w.stale(model):
        w = store[dtype] = InferenceWeights(model, dtype)
    else:
        w.refresh()
    return w


@dataclass(frozen=True)
class SamplingSpec:
    """What one decoding step does with the logits: CFG rows and their mixing, then the draw."""

    rows: int = 1  # 1 (no CFG), 2 ([cond; uncond]) or 3 (double CFG: [full; partial; null])
    cfg_scale: float = 1.0
    cfg_beta: float | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def candidates(self, card: int) -> int:
        """How many tokens a draw chooses among (its noise width): top-k, or every token."""
        if self.temperature <= 0:
            return 0
        return self.top_k if 0 < self.top_k < card else card

    def mix(self, logits: Tensor, b: int) -> Tensor:
        """``[rows * B, ...]`` -> ``[B, ...]`` float32 guided logits (``_Decoder._logits``' formulas)."""
        if self.rows == 1:
            return logits.float()
        if self.rows == 3:
            full, partial, null = logits.float().split(b)
            return double_cfg_logits(full, partial, null, self.cfg_scale, float(self.cfg_beta))
        cond_l, uncond_l = logits.float().split(b)
        return cfg_logits(cond_l, uncond_l, self.cfg_scale)


def gumbel_topk_sample(logits: Tensor, spec: SamplingSpec, uniform: Tensor | None) -> Tensor:
    """One token per row of ``logits [..., card]`` (float) -> int64 ``[...]``, with static shapes.

    Temperature, top-k, then top-p as in ``sample_next``; the draw is Gumbel-max, ``argmax(l / T + g)`` with
    ``g = -log(-log(u))`` from ``uniform [..., n]`` (``n = spec.candidates(card)``), which samples the softmax of the
    filtered logits exactly. ``temperature <= 0`` is argmax (``uniform`` unused).
    """
    if spec.temperature <= 0:
        return logits.argmax(dim=-1)
    card = logits.shape[-1]
    x = logits / spec.temperature
    n = spec.candidates(card)
    nucleus = 0.0 < spec.top_p < 1.0
    if n == card and not nucleus:
        return torch.argmax(x - torch.log(-torch.log(uniform)), dim=-1)
    vals, idx = torch.topk(x, n, dim=-1, sorted=nucleus)  # the nucleus needs them sorted, largest first
    if nucleus:
        probs = torch.softmax(vals, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= spec.top_p
        drop[..., 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    choice = torch.argmax(vals - torch.log(-torch.log(uniform)), dim=-1, keepdim=True)
    return idx.gather(-1, choice).squeeze(-1)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class FastDecoder:
    """Static state and the decode step of one window shape (see the module docstring).

    Args:
        model: the ``CodebookLM``; ``weights``: its ``InferenceWeights``.
        b: batch size B (the model runs ``spec.rows * B`` rows).
        steps: sequence steps S of the window; ``n_prefix``: prefix embeddings P before them.
        cond_len: cross-attention length Tc (0 = no cross-attention).
        spec: CFG and sampling settings.
        graph: capture the step in a CUDA graph on its first call and replay it afterwards.
        compile_mode: ``torch.compile`` the step first (None = eager kernels), e.g. ``"default"`` or
            ``"max-autotune-no-cudagraphs"`` (fused layer norms, residuals and softmaxes; tuned matrix-vector
            kernels); the capture then records the compiled kernels.
        step_cond: the window comes with a ``[R, S, D]`` condition added to the input of every step (a Jukebox
            upsampler's upper codes), held in a static buffer that ``start`` fills.
        kv_bucket: a step attends to the first ``ceil((position + 1) / kv_bucket) * kv_bucket`` cache positions
            (0: the whole buffer, every step; what a compiled step does, so that it compiles once).
        attention: the one-query attention kernel: ``"bmm"``, ``"sdpa"`` or ``"auto"`` (see the module docstring).
    """

    def __init__(self, model: CodebookLM, weights: InferenceWeights, b: int, steps: int, n_prefix: int,
                 cond_len: int, spec: SamplingSpec, graph: bool = False, compile_mode: str | None = None,
                 step_cond: bool = False, kv_bucket: int = 64, attention: str = "auto") -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        cfg = model.cfg
        self.cfg, self.w, self.spec, self.b = cfg, weights, spec, b
        self.steps, self.n_prefix, self.cond_len = steps, n_prefix, cond_len
        self.rows = spec.rows * b
        dev, dt = weights.heads.device, weights.dtype
        self.device, self.dtype = dev, dt
        self.act = _ACTIVATIONS[cfg.activation]
        self.max_len = _round_up(n_prefix + steps, 16)
        r, h, dh = self.rows, cfg.num_heads, cfg.head_dim
        # keys and values of a position side by side: one write per layer and step
        self.kv = [torch.zeros(r, h, self.max_len, 2, dh, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
        self.cross = cond_len > 0 and cfg.cross_attention
        if self.cross:
            self.ckeys = [torch.zeros(r, h, cond_len, dh, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
            self.cvalues = [torch.zeros(r, h, cond_len, dh, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
            self.cross_bias = torch.zeros(r, 1, 1, cond_len, device=dev, dtype=dt)
            self.cross_bias_heads = torch.zeros(r * h, 1, cond_len, device=dev, dtype=dt)
        self.key_pos = torch.arange(self.max_len, device=dev)
        self._zero = torch.zeros((), device=dev, dtype=dt)
        self._ninf = torch.full((), float("-inf"), device=dev, dtype=dt)
        self.sinusoids = None
        if cfg.positional == "sin":
            self.sinusoids = sinusoidal_embedding(self.key_pos, cfg.dim, cfg.max_period).to(dt)  # [L, D]
        self.offsets = (torch.arange(cfg.n_q, device=dev) * (cfg.card + 1))[None, :, None]  # [1, K, 1]
        self.seq = torch.full((b, cfg.n_q, steps), cfg.card, dtype=torch.long, device=dev)
        self.valid = torch.zeros(cfg.n_q, steps, dtype=torch.bool, device=dev)
        self.forced = torch.zeros_like(self.valid)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_cond = torch.zeros(self.rows, steps, cfg.dim, device=dev, dtype=dt) if step_cond else None
        self.n_noise = spec.candidates(cfg.card)
        per_step = max(1, b * cfg.n_q * max(1, self.n_noise) * 4)
        self.noise_steps = max(1, min(steps, _NOISE_BYTES // per_step))
        self.noise = torch.rand(self.noise_steps, b, cfg.n_q, max(1, self.n_noise), device=dev)
        self.generator: torch.Generator | None = None
        self.use_graph = graph
        self.kv_bucket = 0 if compile_mode is not None else max(0, int(kv_bucket))
        self.attention = "bmm" if compile_mode is not None and attention == "auto" else attention  # compile once
        self._step_fn = self._step
        if compile_mode is not None:
            self._step_fn = torch.compile(self._step, mode=None if compile_mode == "default" else compile_mode,
                                          fullgraph=True, dynamic=False)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # attended length -> graph, its logits
        self._pool = None
        self.chosen: dict[int, str] = {}  # attended length -> the attention kernel its step uses

    # -- the network, functionally ---------------------------------------------------------------------------
    @staticmethod
    def _linear_add(x: Tensor, h: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """``x + h @ w.T (+ bias)``. Eagerly one GEMM with the residual as its accumulator (when there is no
        bias); compiled, the addition is left to fuse into the next layer norm."""
        if bias is not None or torch.compiler.is_compiling():
            return x + F.linear(h, w, bias)
        return torch.addmm(x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), w.t()).view(x.shape)

    @staticmethod
    def _decode_attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, kernel: str = "bmm") -> Tensor:
        """One query per row: ``q [N, 1, Dh]`` (pre-scaled) over ``k, v [N, T, Dh]`` with the additive ``bias``
        (``[.., 1, T]``) -> ``[N, 1, Dh]``. Eagerly two batched matrix-vector products around a softmax (``"bmm"``)
        or SDPA's fused kernel (``"sdpa"``); compiled, products and sums that fuse with the softmax into a few
        reduction kernels."""
        if kernel == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[0], 1, k.shape[1]),
                                                  scale=1.0)
        if torch.compiler.is_compiling():
            p = torch.softmax((q * k).sum(-1).unsqueeze(1) + bias, dim=-1)  # [N, 1, T]
            return (p.transpose(1, 2) * v).sum(1, keepdim=True)
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) + bias, dim=-1)
        return torch.bmm(p, v)


    def forward(self, x: Tensor, positions: Tensor, bias: Tensor, kernel: str = "bmm") -> Tensor:
        """``x [R, S, D]`` at ``positions [S]`` with the self-attention mask ``bias [S, T]`` (0 / -inf) over the
        first T cache positions -> ``[R, S, D]`` before the output norm; writes the new keys/values into the cache.
        S = 1 (a decoding step) attends with the one-query ``kernel``, S > 1 (prefill) with SDPA."""
        cfg, eps = self.cfg, self.cfg.layer_norm_eps
        r, s, d = x.shape
        hd, nh = cfg.head_dim, cfg.num_heads
        step = s == 1
        length = bias.shape[-1]
        for i, w in enumerate(self.w.layers):
            h = F.layer_norm(x, (d,), w["ln1"], w["ln1_b"], eps)
            qkv = F.linear(h, w["qkv"], w["qkv_b"]).view(r, s, nh, 3, hd)
            q = qkv[:, :, :, 0]  # [R, S, H, Dh]
            if cfg.positional == "rope":
                q = _apply_rope(q.transpose(1, 2), positions, cfg.max_period).transpose(1, 2)
                k = _apply_rope(qkv[:, :, :, 1].transpose(1, 2), positions, cfg.max_period)
                self.kv[i][:, :, positions, 0] = k
                self.kv[i][:, :, positions, 1] = qkv[:, :, :, 2].transpose(1, 2)
            else:  # keys and values of the new positions in one write
                self.kv[i][:, :, positions] = qkv[:, :, :, 1:].transpose(1, 2)
            keys, values = self.kv[i][:, :, :length, 0], self.kv[i][:, :, :length, 1]  # [R, H, T, Dh]
            if step:
                att = self._decode_attend(q.reshape(r * nh, 1, hd), keys.reshape(r * nh, -1, hd),
                                          values.reshape(r * nh, -1, hd), bias, kernel).view(r, 1, d)
            else:
                att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=bias, scale=1.0)
                att = att.transpose(1, 2).reshape(r, s, d)
            x = self._linear_add(x, att, w["o"], w["o_b"])
            if self.cross:
                h = F.layer_norm(x, (d,), w["ln2"], w["ln2_b"], eps)
                q = F.linear(h, w["cq"], w["cq_b"])
                if step:
                    att = self._decode_attend(q.view(r * nh, 1, hd), self.ckeys[i].view(r * nh, -1, hd),
                                              self.cvalues[i].view(r * nh, -1, hd), self.cross_bias_heads)
                    att = att.view(r, 1, d)
                else:
                    att = F.scaled_dot_product_attention(q.view(r, s, nh, hd).transpose(1, 2), self.ckeys[i],
                                                         self.cvalues[i], attn_mask=self.cross_bias, scale=1.0)
                    att = att.transpose(1, 2).reshape(r, s, d)
                x = self._linear_add(x, att, w["co"], w["co_b"])
            h = self.act(F.linear(F.layer_norm(x, (d,), w["ln3"], w["ln3_b"], eps), w["fc1"], w["fc1_b"]))
            x = self._linear_add(x, h, w["fc2"], w["fc2_b"])
        return x

    def embed(self, codes: Tensor, positions: Tensor, prefix: Tensor | None = None,
              step_cond: Tensor | None = None) -> Tensor:
        """``codes [R, K, S]`` (+ ``step_cond [R, S, D]``, + ``prefix [R, P, D]``) -> ``[R, P + S, D]`` with
        positions added."""
        x = F.embedding(codes + self.offsets, self.w.emb.flatten(0, 1)).sum(dim=1)  # [R, S, D]
        if step_cond is not None:
            x = x + step_cond
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if self.sinusoids is not None:
            x = x + self.sinusoids.index_select(0, positions)
        return x

    def head(self, x: Tensor) -> Tensor:
        """``[R, S, D]`` -> logits ``[R, K, S, card]``."""
        cfg = self.cfg
        x = F.layer_norm(x, (cfg.dim,), self.w.out_norm[0], self.w.out_norm[1], cfg.layer_norm_eps)
        logits = F.linear(x, self.w.heads)  # [R, S, K * card]
        return logits.view(*x.shape[:2], cfg.n_q, cfg.card).transpose(1, 2)

    def _self_bias(self, positions: Tensor, length: int | None = None) -> Tensor:
        keys = self.key_pos if length is None else self.key_pos[:length]
        return torch.where(keys[None, :] <= positions[:, None], self._zero, self._ninf)  # [S, T]

    def attended(self, s: int) -> int:
        """How many cache positions the step of sequence step ``s`` attends to (its position rounded up)."""
        if not self.kv_bucket:
            return self.max_len
        return min(self.max_len, (self.n_prefix + s) // self.kv_bucket * self.kv_bucket + self.kv_bucket)

    # -- one window ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, seq: Tensor, valid: Tensor, forced: Tensor, first: int, cond: Tensor | None,
              cond_mask: Tensor | None, prefix: Tensor | None, generator: torch.Generator | None,
              step_cond: Tensor | None = None) -> Tensor:
        """Load a window (``seq [B, K, S]`` with the prompt, ``valid``/``forced [K, S]``, cond ``[R, Tc, kv]``,
        mask ``[R, Tc]``, prefix ``[R, P, D]``, ``step_cond [R, S, D]`` when the decoder was built for one), prefill
        steps ``0 .. first - 1`` and sample step ``first``.

        Returns the guided logits ``[B, K, card]`` that predicted step ``first``.
        """
        self.generator = generator
        self.seq.copy_(seq)
        self.valid.copy_(valid)
        self.forced.copy_(forced)
        if self.cross:
            assert cond is not None and cond_mask is not None
            cond = cond.to(self.dtype)
            attend = cond_mask.bool()
            empty = ~attend.any(dim=1)  # rows that attend to nothing get exactly zero from cross-attention
            attend = attend.clone()
            attend[:, 0] |= empty
            keep = (~empty).to(self.dtype)[:, None, None, None]
            r, t = cond.shape[:2]
            for i, w in enumerate(self.w.layers):
                k = F.linear(cond, w["ck"], w["ck_b"]).view(r, t, self.cfg.num_heads, -1).transpose(1, 2)
                v = F.linear(cond, w["cv"], w["cv_b"]).view(r, t, self.cfg.num_heads, -1).transpose(1, 2)
                self.ckeys[i].copy_(k)
                self.cvalues[i].copy_(v * keep)
            self.cross_bias.copy_(torch.where(attend, 0.0, float("-inf"))[:, None, None, :].to(self.dtype))
            self.cross_bias_heads.view(r, -1, t).copy_(self.cross_bias.view(r, 1, t))
        self._refill_noise()
        n = self.n_prefix + first
        positions = torch.arange(n, device=self.device)
        codes = self.seq[:, :, :first].repeat(self.spec.rows, 1, 1)
        add = None
        if self.step_cond is not None:
            if step_cond is None or step_cond.shape != self.step_cond.shape:
                got = None if step_cond is None else tuple(step_cond.shape)
                raise ValueError(f"this decoder takes a step_cond of {tuple(self.step_cond.shape)}, got {got}")
            self.step_cond.copy_(step_cond)
            add = self.step_cond[:, :first]
        x = self.forward(self.embed(codes, positions, prefix, add), positions, self._self_bias(positions))
        logits = self.head(x[:, -1:])[:, :, 0]  # [R, K, card]
        self.step_index.fill_(first - 1)
        return self._finish(logits)

    def _refill_noise(self) -> None:
        if self.n_noise:
            self.noise.uniform_(generator=self.generator)

    def _finish(self, logits: Tensor) -> Tensor:
        """Mix the CFG rows, draw, write step ``s + 1`` of the sequence, advance ``s``."""
        spec, s = self.spec, self.step_index
        mixed = spec.mix(logits, self.b)  # [B, K, card]
        uniform = self.noise.index_select(0, torch.remainder(s, self.noise_steps))[0] if self.n_noise else None
        tok = gumbel_topk_sample(mixed, spec, uniform)  # [B, K]
        nxt = s + 1
        cur = self.seq.index_select(2, nxt)[..., 0]
        v, f = self.valid.index_select(1, nxt)[:, 0], self.forced.index_select(1, nxt)[:, 0]
        new = torch.where(f, cur, torch.where(v, tok, torch.full_like(tok, self.cfg.card)))
        self.seq[:, :, nxt] = new[..., None]
        s.add_(1)
        return mixed

    def _step(self, length: int | None = None, kernel: str = "bmm") -> Tensor:
        s = self.step_index
        positions = s + self.n_prefix
        codes = self.seq.index_select(2, s).repeat(self.spec.rows, 1, 1)  # [R, K, 1]
        add = None if self.step_cond is None else self.step_cond.index_select(1, s)  # [R, 1, D]
        x = self.forward(self.embed(codes, positions, None, add), positions, self._self_bias(positions, length),
                         kernel)
        return self._finish(self.head(x)[:, :, 0])

    @torch.no_grad()
    def step(self, s: int) -> Tensor:
        """Decode sequence step ``s`` (its tokens predict step ``s + 1``); ``s`` must follow the last one.

        Returns the guided logits ``[B, K, card]`` (a static buffer when replaying a graph).
        """
        if self.n_noise and s % self.noise_steps == 0:
            self._refill_noise()
        length = self.attended(s)
        if not self.use_graph:
            kernel = "bmm" if self.attention == "auto" else self.attention
            self.chosen.setdefault(length, kernel)
            return self._step_fn(length, kernel)
        if length not in self._graphs:
            self._capture(length)
        graph, logits = self._graphs[length]
        graph.replay()
        return logits

    def _graph_of(self, length: int, kernel: str) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        saved = self.step_index.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up (and compilation): the same step again (each rewrites what it wrote)
                self._step_fn(length, kernel)
                self.step_index.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step_fn(length, kernel)
        self.step_index.copy_(saved)
        return graph, logits

    def _replay_seconds(self, graph: torch.cuda.CUDAGraph, repeats: int = 5) -> float:
        """Seconds per replay of ``graph`` at the current step (restored after each: a step rewrites what it
        wrote, so repeating it leaves the state as one step would)."""
        saved = self.step_index.clone()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        self.step_index.copy_(saved)
        start.record()
        for _ in range(repeats):
            graph.replay()
            self.step_index.copy_(saved)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    def _capture(self, length: int) -> None:
        kernels = ATTENTIONS[1:] if self.attention == "auto" else (self.attention,)
        best: tuple[float, str, tuple[torch.cuda.CUDAGraph, Tensor]] | None = None
        for kernel in kernels:
            try:
                captured = self._graph_of(length, kernel)
            except RuntimeError:  # a kernel this GPU or build cannot capture: "auto" keeps the other
                if len(kernels) == 1 or kernel == kernels[0]:
                    raise
                continue
            seconds = self._replay_seconds(captured[0]) if len(kernels) > 1 else 0.0
            if best is None or seconds < best[0]:
                best = (seconds, kernel, captured)
        assert best is not None
        self.chosen[length] = best[1]
        self._graphs[length] = best[2]

    def result(self) -> Tensor:
        """The window's sequence ``[B, K, S]`` (a copy)."""
        return self.seq.clone()


def fast_decoder(model: CodebookLM, dtype: torch.dtype, b: int, steps: int, n_prefix: int, cond_len: int,
                 spec: SamplingSpec, graph: bool, compile_mode: str | None = None,
                 step_cond: bool = False, kv_bucket: int = 64, attention: str = "auto") -> FastDecoder:
    """A cached ``FastDecoder`` for this window shape and sampling spec (a few are kept per model)."""
    weights = inference_weights(model, dtype)
    store: OrderedDict = model.__dict__.setdefault(_CACHE_KEY, OrderedDict())
    key = (dtype, b, steps, n_prefix, cond_len, spec, graph, compile_mode, weights.heads.device, step_cond,
           kv_bucket, attention)
    dec = store.get(key)
    if dec is None or dec.w is not weights:
        dec = store[key] = FastDecoder(model, weights, b, steps, n_prefix, cond_len, spec, graph, compile_mode,
                                       step_cond, kv_bucket, attention)
        while len(store) > _MAX_DECODERS:
            store.popitem(last=False)
    store.move_to_end(key)
    return dec
