"""Fast KV-cached decoding for ``CodebookLM``: one static-shape decode step that runs eagerly or replays as a
CUDA graph.

``FastDecoder`` owns everything one decoding window needs at fixed addresses: inference weights
(``InferenceWeights``: the model's parameters in the inference dtype, with the self-attention q/k/v projections
fused into one matrix and the K heads into one ``[K * card, dim]`` matrix), a self-attention cache
``[R, H, L, head_dim]`` per layer, cross-attention keys/values ``[R, H, Tc, head_dim]``, the sequence
``[B, K, S]``, the pattern masks, uniform noise for sampling, and the step counter (a device tensor). ``step()``
reads the tokens of step s, writes the new keys/values at position ``n_prefix + s``, attends to the whole
buffer under a length mask, mixes the CFG rows, samples (Gumbel-max over the top-k logits: the same
distribution as ``sample_next``, drawn from noise that was generated outside the step) and writes step s + 1
into the sequence, then advances the counter: no shapes change and nothing is read back to the host, so the
step can be captured once in a CUDA graph and replayed for every token.

On CPU (and with ``backend="static"``) the same ``step`` runs eagerly; with ``backend="graph"`` it is captured on
its first step and replayed. Greedy decoding gives the same tokens as the reference paths (``generate`` with the
dynamic cache or without a cache); logits agree to the rounding of the fused matrices. Sampled tokens differ from
``sample_next``'s draws for the same seed (another way of drawing from the same distribution); replay and eager
draw identical tokens from the same seed.

Decoders are cached on the model per window shape and sampling settings; inference weights are refreshed in
place (the graphs stay valid) whenever a parameter of the model changed since the last call.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ostinato.generation.sampling import cfg_logits, double_cfg_logits
from ostinato.nn.transformer import _ACTIVATIONS, CodebookLM, _apply_rope, sinusoidal_embedding

__all__ = ["InferenceWeights", "SamplingSpec", "FastDecoder", "fast_decoder", "gumbel_topk_sample"]

_CACHE_KEY = "_ostinato_fast_decoders"
_WEIGHTS_KEY = "_ostinato_inference_weights"
_MAX_DECODERS = 4
_NOISE_BYTES = 64 << 20  # at most this much uniform noise is generated at once


class InferenceWeights:
    """The parameters of a ``CodebookLM`` in one dtype, laid out for decoding.

    Per layer: ``qkv [3D, D]`` (q, k, v stacked), ``o``; cross-attention ``cq``, ``ck``, ``cv``, ``co``; ``fc1``,
    ``fc2``; LayerNorm weights/biases; optional Linear biases. ``emb [K, card + 1, D]``, ``heads [K * card, D]``.
    Tensors that need no conversion alias the model's parameters; the others are copies that ``refresh`` updates
    in place when the model's parameters changed (``Tensor._version``).
    """

    def __init__(self, model: CodebookLM, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._params = list(model.parameters())
        self.pointers = self._read_pointers()
        self.layers = [self._layer(block) for block in model.layers]
        self.emb = self._stack([e.weight for e in model.emb])  # [K, card + 1, D]
        self.heads = self._stack([h.weight for h in model.heads]).flatten(0, 1)  # [K * card, D]
        self.out_norm = (self._own(model.out_norm.weight), self._own(model.out_norm.bias))
        self._versions = self._read_versions()

    def _read_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def _read_pointers(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self._params)

    def stale(self, model: CodebookLM) -> bool:
        """True when the model's parameters were replaced (moved, re-created): build new weights then."""
        params = list(model.parameters())
        return len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params)) \
            or self._read_pointers() != self.pointers

    def _own(self, p: Tensor | None) -> Tensor | None:
        if p is None:
            return None
        if p.dtype == self.dtype:
            return p.detach()
        out = p.detach().to(self.dtype).clone()
        self._pairs.append((out, p))
        return out

    def _stack(self, ps: list[Tensor | None]) -> Tensor | None:
        if ps[0] is None:
            return None
        out = torch.cat([p.detach() for p in ps]).to(self.dtype).reshape(len(ps), *ps[0].shape)
        for i, p in enumerate(ps):
            self._pairs.append((out[i], p))
        return out

    def _layer(self, block: torch.nn.Module) -> dict[str, Tensor | None]:
        sa, w = block.self_attn, {}
        w["qkv"] = self._stack([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]).flatten(0, 1)
        b = self._stack([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias])
        w["qkv_b"] = None if b is None else b.flatten()
        w["o"], w["o_b"] = self._own(sa.out_proj.weight), self._own(sa.out_proj.bias)
        w["ln1"], w["ln1_b"] = self._own(block.norm_self.weight), self._own(block.norm_self.bias)
        ca = block.cross_attn
        if ca is not None:
            for name, lin in (("cq", ca.q_proj), ("ck", ca.k_proj), ("cv", ca.v_proj), ("co", ca.out_proj)):
                w[name], w[name + "_b"] = self._own(lin.weight), self._own(lin.bias)
            w["ln2"], w["ln2_b"] = self._own(block.norm_cross.weight), self._own(block.norm_cross.bias)
        w["ln3"], w["ln3_b"] = self._own(block.norm_ffn.weight), self._own(block.norm_ffn.bias)
        w["fc1"], w["fc1_b"] = self._own(block.fc1.weight), self._own(block.fc1.bias)
        w["fc2"], w["fc2_b"] = self._own(block.fc2.weight), self._own(block.fc2.bias)
        return w

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copy the model's parameters in again if any changed; True when something was copied."""
        versions = self._read_versions()
        if versions == self._versions:
            return False
        for dst, src in self._pairs:
            dst.copy_(src.detach().reshape(dst.shape))
        self._versions = self._read_versions()
        return True


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
    vals, idx = torch.topk(x, n, dim=-1)  # sorted, largest first
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
    """

    def __init__(self, model: CodebookLM, weights: InferenceWeights, b: int, steps: int, n_prefix: int,
                 cond_len: int, spec: SamplingSpec, graph: bool = False) -> None:
        cfg = model.cfg
        self.cfg, self.w, self.spec, self.b = cfg, weights, spec, b
        self.steps, self.n_prefix, self.cond_len = steps, n_prefix, cond_len
        self.rows = spec.rows * b
        dev, dt = weights.heads.device, weights.dtype
        self.device, self.dtype = dev, dt
        self.act = _ACTIVATIONS[cfg.activation]
        self.max_len = _round_up(n_prefix + steps, 16)
        shape = (self.rows, cfg.num_heads, self.max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
        self.cross = cond_len > 0 and cfg.cross_attention
        if self.cross:
            cshape = (self.rows, cfg.num_heads, cond_len, cfg.head_dim)
            self.ckeys = [torch.zeros(cshape, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
            self.cvalues = [torch.zeros(cshape, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
            self.cross_bias = torch.zeros(self.rows, 1, 1, cond_len, device=dev, dtype=dt)
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
        self.n_noise = spec.candidates(cfg.card)
        per_step = max(1, b * cfg.n_q * max(1, self.n_noise) * 4)
        self.noise_steps = max(1, min(steps, _NOISE_BYTES // per_step))
        self.noise = torch.rand(self.noise_steps, b, cfg.n_q, max(1, self.n_noise), device=dev)
        self.use_graph = graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: Tensor | None = None

    # -- the network, functionally ---------------------------------------------------------------------------
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [R, H, S, Dh]
        r, h, s, dh = out.shape
        return out.transpose(1, 2).reshape(r, s, h * dh)

    @staticmethod
    def _linear_add(x: Tensor, h: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """``x + h @ w.T (+ bias)``; one GEMM with the residual as its accumulator when there is no bias."""
        if bias is not None:
            return x + F.linear(h, w, bias)
        return torch.addmm(x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), w.t()).view(x.shape)

    def forward(self, x: Tensor, positions: Tensor, bias: Tensor) -> Tensor:
        """``x [R, S, D]`` at ``positions [S]`` with the self-attention mask ``bias [S, L]`` (0 / -inf) ->
        ``[R, S, D]`` before the output norm; writes the new keys/values into the cache."""
        cfg, eps = self.cfg, self.cfg.layer_norm_eps
        r, s, d = x.shape
        hd, nh = cfg.head_dim, cfg.num_heads
        for i, w in enumerate(self.w.layers):
            h = F.layer_norm(x, (d,), w["ln1"], w["ln1_b"], eps)
            qkv = F.linear(h, w["qkv"], w["qkv_b"]).view(r, s, 3, nh, hd)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [R, H, S, Dh]
            if cfg.positional == "rope":
                q = _apply_rope(q, positions, cfg.max_period)
                k = _apply_rope(k, positions, cfg.max_period)
            self.keys[i].index_copy_(2, positions, k)
            self.values[i].index_copy_(2, positions, v)
            x = self._linear_add(x, self._attend(q, self.keys[i], self.values[i], bias), w["o"], w["o_b"])
            if self.cross:
                h = F.layer_norm(x, (d,), w["ln2"], w["ln2_b"], eps)
                q = F.linear(h, w["cq"], w["cq_b"]).view(r, s, nh, hd).transpose(1, 2)
                att = self._attend(q, self.ckeys[i], self.cvalues[i], self.cross_bias)
                x = self._linear_add(x, att, w["co"], w["co_b"])
            h = self.act(F.linear(F.layer_norm(x, (d,), w["ln3"], w["ln3_b"], eps), w["fc1"], w["fc1_b"]))
            x = self._linear_add(x, h, w["fc2"], w["fc2_b"])
        return x

    def embed(self, codes: Tensor, positions: Tensor, prefix: Tensor | None = None) -> Tensor:
        """``codes [R, K, S]`` (+ ``prefix [R, P, D]``) -> ``[R, P + S, D]`` with positions added."""
        x = F.embedding(codes + self.offsets, self.w.emb.flatten(0, 1)).sum(dim=1)  # [R, S, D]
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

    def _self_bias(self, positions: Tensor) -> Tensor:
        return torch.where(self.key_pos[None, :] <= positions[:, None], self._zero, self._ninf)  # [S, L]

    # -- one window ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, seq: Tensor, valid: Tensor, forced: Tensor, first: int, cond: Tensor | None,
              cond_mask: Tensor | None, prefix: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Load a window (``seq [B, K, S]`` with the prompt, ``valid``/``forced [K, S]``, cond ``[R, Tc, kv]``,
        mask ``[R, Tc]``, prefix ``[R, P, D]``), prefill steps ``0 .. first - 1`` and sample step ``first``.

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
        self._refill_noise()
        n = self.n_prefix + first
        positions = torch.arange(n, device=self.device)
        codes = self.seq[:, :, :first].repeat(self.spec.rows, 1, 1)
        x = self.forward(self.embed(codes, positions, prefix), positions, self._self_bias(positions))
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
        self.seq.index_copy_(2, nxt, new[..., None])
        s.add_(1)
        return mixed

    def _step(self) -> Tensor:
        s = self.step_index
        positions = s + self.n_prefix
        codes = self.seq.index_select(2, s).repeat(self.spec.rows, 1, 1)  # [R, K, 1]
        x = self.forward(self.embed(codes, positions), positions, self._self_bias(positions))
        return self._finish(self.head(x)[:, :, 0])

    @torch.no_grad()
    def step(self, s: int) -> Tensor:
        """Decode sequence step ``s`` (its tokens predict step ``s + 1``); ``s`` must follow the last one.

        Returns the guided logits ``[B, K, card]`` (a static buffer when replaying a graph).
        """
        if self.n_noise and s % self.noise_steps == 0:
            self._refill_noise()
        if not self.use_graph:
            return self._step()
        if self._graph is None:
            self._capture()
        assert self._graph is not None and self._graph_logits is not None
        self._graph.replay()
        return self._graph_logits

    def _capture(self) -> None:
        saved = self.step_index.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: the same step twice (each rewrites what it wrote)
                self._step()
                self.step_index.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._step()
        self.step_index.copy_(saved)
        self._graph = graph

    def result(self) -> Tensor:
        """The window's sequence ``[B, K, S]`` (a copy)."""
        return self.seq.clone()


def fast_decoder(model: CodebookLM, dtype: torch.dtype, b: int, steps: int, n_prefix: int, cond_len: int,
                 spec: SamplingSpec, graph: bool) -> FastDecoder:
    """A cached ``FastDecoder`` for this window shape and sampling spec (a few are kept per model)."""
    weights = inference_weights(model, dtype)
    store: OrderedDict = model.__dict__.setdefault(_CACHE_KEY, OrderedDict())
    key = (dtype, b, steps, n_prefix, cond_len, spec, graph, weights.heads.device)
    dec = store.get(key)
    if dec is None or dec.w is not weights:
        dec = store[key] = FastDecoder(model, weights, b, steps, n_prefix, cond_len, spec, graph)
        while len(store) > _MAX_DECODERS:
            store.popitem(last=False)
    store.move_to_end(key)
    return dec
