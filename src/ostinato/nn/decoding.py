"""Autoregressive generation with a ``CodebookLM`` through a codebook pattern.

``generate`` decodes step by step with a ``KVCache`` (or, with ``use_cache=False``, by re-running the whole prefix
every step, a slow reference path). At sequence step s the model reads the K tokens of step s and its logits
predict step s + 1; a token is sampled only where the pattern has a code at step s + 1 (``valid_mask``), the
special token (``card``) is kept elsewhere, and positions holding prompt codes are teacher-forced, so the first
P output frames are the prompt exactly. All steps before the first one that needs sampling are fed at once
(prefill).

Conditioning is cross-attention states ``cond [B, Tc, D]`` and/or a ``prefix [B, P, dim]`` of embeddings
prepended to every window (melody chroma, style tokens). A prefix may be a function ``(start_frame, n_frames) ->
[B, P, dim]`` so that each sliding window gets the part of a time-aligned condition (the melody) it covers. A
``step_cond`` (a Jukebox upsampler's upper codes) is added to the input of every step instead: row t of
``fn(start_frame, n_frames) -> [B, n_frames, dim]`` on the window's step t (the one whose logits predict frame t of
a one-codebook parallel pattern); every CFG row keeps it (it is no part of the null condition).

Classifier-free guidance runs in one batched forward over ``[cond; uncond]`` (2B rows) and mixes the two halves
with ``cfg_logits``. The unconditional half is ``zeros_like(cond)`` with an all-False mask, so cross-attention
contributes nothing (SDPA yields zeros for fully masked rows, and the values of a zero input are zero without
Linear biases), or with ``null_mask`` (audiocraft's null condition: zero states attended, which with biased keys
and values is not nothing), and a zero prefix (the null condition the family trains with), unless the prefix function
returns a pair ``(prefix, null_prefix)`` (MusicLM's coarse stage: MuLaN tokens dropped, semantic tokens kept). CFG
is skipped (single B-row forward) when there is no condition or ``cfg_scale == 1``. With ``cfg_beta`` set,
MusicGen-Style's double CFG runs 3B rows: ``[text + prefix; prefix only; nothing]`` mixed by ``double_cfg_logits``.

Long outputs (audiocraft's sliding window, ``MusicGen._generate_tokens``): with ``max_window_frames = W`` and
``extend_stride_frames = stride``, the first window decodes ``W`` frames; then, while frames are missing, the last
``W - stride`` frames become the prompt of a fresh window (new cache, positions restart at 0) that adds up to
``stride`` frames. ``CodebookLM`` has no positional limit of its own (sinusoidal / RoPE), so ``W`` defaults to
None = one window of ``n_frames``.

Backends of the cached path (``GenerationParams.backend``): ``"cache"`` runs the model's own forward with a
``KVCache`` every step (the reference); ``"static"`` runs ``ostinato.nn.fast_decoding``'s static-shape decode step
(fused inference weights in ``GenerationParams.dtype``, CFG mixing and Gumbel-max sampling inside the step);
``"graph"`` replays that step as a CUDA graph. ``"auto"`` (default) is ``"graph"`` on CUDA and ``"cache"``
elsewhere (and for sharded FSDP modules). Greedy decoding gives the same tokens on every backend; seeded
sampling is reproducible per backend but draws differently on the fast ones.

``generate_chained`` is UnlimitedMusicGen-style chaining: independent segments of ``segment_frames`` each prompted
with the last ``overlap_frames`` of the previous segment; decode every segment separately and join the audio with
``crossfade``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import math

import torch
from torch import Tensor

from ostinato.nn.fast_decoding import ATTENTIONS, SamplingSpec, fast_decoder
from ostinato.nn.sampling import cfg_logits, double_cfg_logits, sample_next
from ostinato.nn.patterns import CodebookPattern
from ostinato.nn.transformer import CodebookLM

__all__ = ["GenerationParams", "ChainedCodes", "generate", "generate_chained", "crossfade", "resolve_backend"]

Progress = Callable[[int, int], None]
# (start_frame, n_frames) -> [B, P, dim], or a pair (prefix, null prefix) when CFG must keep part of the prefix, or
# a triple (prefix, style-only prefix, null prefix) for double CFG when the text is in the prefix (MusicGen-Style)
PrefixFn = Callable[[int, int], "Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]"]
# (start_frame, n_frames) -> [B, n_frames, dim] added to the inputs of the window's steps
StepCondFn = Callable[[int, int], Tensor]


@dataclass
class GenerationParams:
    """Sampling settings.

    Attributes:
        temperature: ``>= 0``; ``0`` = greedy argmax.
        top_k, top_p: filtering (``top_k >= 0``, ``top_p`` in [0, 1]; ``0`` disables; top-k first, then top-p).
        cfg_scale: classifier-free guidance scale ``>= 0`` (1 = off); alpha of double CFG.
        cfg_beta: MusicGen-Style double CFG (None = plain CFG): weight of the text given the prefix (style).
        seed: seeds a private ``torch.Generator`` (same seed -> same codes); None uses the global RNG.
        extend_stride_frames: frames added per extra window once ``max_window_frames`` is exceeded
            (default ``max(1, W // 2)``).
        max_window_frames: most frames one window decodes (None = unlimited).
        backend: cached decoding with ``"cache"`` (the model's forward), ``"static"`` (the fast static step),
            ``"graph"`` (that step as a CUDA graph) or ``"auto"`` (graph on CUDA, else cache).
        dtype: weights of the fast backends: ``"bf16"``, ``"fp16"``, ``"fp32"`` or None (the autocast dtype when
            autocast is on, else the model's).
        compile: ``torch.compile`` mode of the fast step (``"default"``, ``"max-autotune-no-cudagraphs"``) or None
            (eager kernels); compiled once per window shape, tens of seconds.
        kv_bucket: a fast step attends to its filled cache positions rounded up to a multiple of this (0 = the
            whole window every step; a compiled step always does).
        attention: the fast step's one-query attention kernel: ``"bmm"``, ``"sdpa"`` or ``"auto"`` (the faster of
            both, timed at each graph capture; ``"bmm"`` eagerly).
    """

    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    cfg_scale: float = 3.0
    cfg_beta: float | None = None
    seed: int | None = None
    extend_stride_frames: int | None = None
    max_window_frames: int | None = None
    backend: str = "auto"
    dtype: str | None = None
    compile: str | None = None
    kv_bucket: int = 64
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name, ok, rule in (("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
                               ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                               ("top_p", 0 <= self.top_p <= 1, "in [0, 1] (0 = off)"),
                               ("cfg_scale", self.cfg_scale >= 0, ">= 0 (1 = no guidance)"),
                               ("cfg_beta", self.cfg_beta is None or self.cfg_beta >= 0, ">= 0 or None"),
                               ("backend", self.backend in BACKENDS, f"one of {', '.join(BACKENDS)}"),
                               ("dtype", self.dtype is None or self.dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
                               ("kv_bucket", self.kv_bucket >= 0, ">= 0 (0 = the whole window)"),
                               ("attention", self.attention in ATTENTIONS, f"one of {', '.join(ATTENTIONS)}")):
            if not ok:
                raise ValueError(f"generation {name}={getattr(self, name)!r}: must be {rule}")


BACKENDS = ("auto", "cache", "static", "graph")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sharded(model: torch.nn.Module) -> bool:
    """True for FSDP-wrapped modules (their parameters are shards until a forward gathers them)."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return True
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def resolve_backend(model: CodebookLM, params: GenerationParams) -> tuple[str, torch.dtype]:
    """``(backend, inference dtype)`` that ``generate`` uses for ``model`` with ``params``."""
    if params.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {params.backend!r}")
    p = next(model.parameters())
    backend = params.backend
    if backend == "auto":
        backend = "graph" if p.device.type == "cuda" and not _sharded(model) else "cache"
    if backend == "graph" and p.device.type != "cuda":
        raise ValueError(f"backend='graph' needs a CUDA model, this one is on {p.device}")
    if params.dtype is not None:
        if params.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {params.dtype!r}")
        return backend, DTYPES[params.dtype]
    if torch.is_autocast_enabled(p.device.type):
        return backend, torch.get_autocast_dtype(p.device.type)
    return backend, p.dtype


@dataclass
class ChainedCodes:
    """Result of ``generate_chained``.

    Attributes:
        codes: ``[B, K, T]`` joined codes (each overlap counted once).
        segments: per segment ``[B, K, L_i]``; segment i > 0 starts with the last ``overlap_frames`` frames of
            segment i - 1 (identical codes).
        overlap_frames: frames shared by consecutive segments.
        starts: frame offset of every segment inside ``codes``.
    """

    codes: Tensor
    segments: list[Tensor]
    overlap_frames: int
    starts: list[int] = field(default_factory=list)


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


class _Decoder:
    """Shared state of one ``generate`` call (conditioning, RNG, progress accounting)."""

    def __init__(self, model: CodebookLM, pattern: CodebookPattern, b: int, cond: Tensor | None,
                 cond_mask: Tensor | None, prefix: Tensor | PrefixFn | None, params: GenerationParams,
                 generator: torch.Generator | None, use_cache: bool, progress: Progress | None,
                 null_mask: Tensor | None = None, step_cond: StepCondFn | None = None) -> None:
        self.model, self.pattern, self.b, self.params = model, pattern, b, params
        self.generator, self.use_cache, self.progress = generator, use_cache, progress
        self.device = next(model.parameters()).device
        self.prefix = prefix
        has_cond = cond is not None or prefix is not None
        self.cfg_on = has_cond and params.cfg_scale != 1.0
        self.double = self.cfg_on and params.cfg_beta is not None
        if self.double and prefix is None:
            raise ValueError("double CFG (cfg_beta) needs both a text condition and a prefix (style)")
        if cond is not None and cond_mask is None:
            cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        self.rows = (3 if self.double else 2) if self.cfg_on else 1
        if self.cfg_on and cond is not None and cond_mask is not None:
            zeros = torch.zeros_like(cond)
            off = torch.zeros_like(cond_mask, dtype=torch.bool) if null_mask is None else null_mask.bool()
            self.cond = torch.cat([cond, zeros] + ([zeros] if self.double else []))
            self.cond_mask = torch.cat([cond_mask.bool(), off] + ([off] if self.double else []))
        else:
            self.cond, self.cond_mask = cond, cond_mask
        self.done, self.total = 0, 0
        self.backend, self.dtype = resolve_backend(model, params) if use_cache else ("none", torch.float32)
        self.step_cond = step_cond

    def window_step_cond(self, start: int, n_frames: int, steps: int) -> Tensor | None:
        """The step condition of one window: ``[rows * B, steps, dim]``, zeros past ``n_frames``."""
        if self.step_cond is None:
            return None
        sc = self.step_cond(start, n_frames).to(self.device)
        sc = torch.nn.functional.pad(sc[:, :steps], (0, 0, 0, steps - min(steps, sc.shape[1])))
        return torch.cat([sc] * self.rows) if self.rows > 1 else sc

    def window_prefix(self, start: int, n_frames: int) -> Tensor | None:
        """The prefix rows of one window: ``[rows * B, P, dim]`` (full; [prefix only]; zeros)."""
        if self.prefix is None:
            return None
        pre = self.prefix(start, n_frames) if callable(self.prefix) else self.prefix
        partial = null = None
        if isinstance(pre, tuple) and len(pre) == 3:  # text in the prefix: double CFG's style-only row drops it
            pre, partial, null = pre
        elif isinstance(pre, tuple):  # (prefix, its null condition): only a part of the prefix is guided
            pre, null = pre
        pre = pre.to(self.device)
        if not self.cfg_on:
            return pre
        if self.double and self.cond is None and partial is None:
            raise ValueError("double CFG (cfg_beta) needs a text condition: cross-attended, or in the prefix with "
                             "its style-only rows")
        null = torch.zeros_like(pre) if null is None else null.to(self.device)
        partial = pre if partial is None else partial.to(self.device)
        return torch.cat([pre] + ([partial] if self.double else []) + [null])

    def _logits(self, inp: Tensor, cache, prefix: Tensor | None, step_cond: Tensor | None = None) -> Tensor:
        # inp [B, K, s] -> [B, K, card] for the step after inp; step_cond [rows * B, s, dim]
        if self.cfg_on:
            inp = torch.cat([inp] * self.rows)
        extra = {} if step_cond is None else {"step_cond": step_cond}
        logits = self.model(inp, self.cond, self.cond_mask, cache=cache, prefix=prefix, **extra)[:, :, -1]
        if self.double:
            full, partial, null = logits.float().split(self.b)
            assert self.params.cfg_beta is not None
            logits = double_cfg_logits(full, partial, null, self.params.cfg_scale, self.params.cfg_beta)
        elif self.cfg_on:
            cond_l, uncond_l = logits.float().split(self.b)
            logits = cfg_logits(cond_l, uncond_l, self.params.cfg_scale)
        return logits

    def segment(self, n_frames: int, prompt: Tensor | None, start: int = 0) -> Tensor:
        """Decode one window of ``n_frames`` frames, starting at output frame ``start``, whose first frames are
        ``prompt [B, K, P]``."""
        model, pattern, b, p = self.model, self.pattern, self.b, self.params
        k, special = model.cfg.n_q, model.special
        steps = pattern.max_steps(n_frames)
        valid = pattern.valid_mask(n_frames, self.device)  # [K, S]
        seq = torch.full((b, k, steps), special, dtype=torch.long, device=self.device)
        forced = torch.zeros_like(valid)
        if prompt is not None and prompt.shape[-1] > 0:
            n_p = prompt.shape[-1]
            pos = pattern.positions(n_frames)[:, :n_p].to(self.device)  # [K, P]
            seq.scatter_(2, pos.unsqueeze(0).expand(b, k, n_p), prompt.to(self.device, torch.long))
            forced.scatter_(1, pos, True)
        free = (valid & ~forced).any(0)  # steps with at least one code to sample
        free[0] = False
        idx = free.nonzero()
        base = self.done
        if idx.numel() == 0:
            self._tick(base + steps - 1)
            out, _ = pattern.revert(seq, n_frames)
            return out
        first = int(idx[0])
        prefix = self.window_prefix(start, n_frames)
        n_prefix = 0 if prefix is None else prefix.shape[1]
        step_cond = self.window_step_cond(start, n_frames, steps)
        if self.backend in ("static", "graph"):
            seq = self._fast_segment(seq, valid, forced, first, prefix, base, step_cond)
            out, _ = pattern.revert(seq, n_frames)
            return out
        cache = model.make_cache(self.rows * b, n_prefix + steps) if self.use_cache else None
        for s in range(first - 1, steps - 1):
            if cache is None:
                lo, pre = 0, prefix
            elif s == first - 1:
                lo, pre = 0, prefix
            else:
                lo, pre = s, None
            inp = seq[:, :, lo:s + 1]
            logits = self._logits(inp, cache, pre, None if step_cond is None else step_cond[:, lo:s + 1])
            if bool(free[s + 1]):
                tok = sample_next(logits, p.temperature, p.top_k, p.top_p, self.generator)  # [B, K]
                sampled = torch.where(valid[:, s + 1], tok, torch.full_like(tok, special))
                seq[:, :, s + 1] = torch.where(forced[:, s + 1], seq[:, :, s + 1], sampled)
            self._tick(base + s + 1)
        out, _ = pattern.revert(seq, n_frames)
        return out

    def _fast_segment(self, seq: Tensor, valid: Tensor, forced: Tensor, first: int, prefix: Tensor | None,
                      base: int, step_cond: Tensor | None = None) -> Tensor:
        """The decoding loop of ``segment`` on a ``FastDecoder``: prefill up to ``first``, then one static step
        (or graph replay) per sequence step; returns the window's ``seq [B, K, S]``."""
        p, steps = self.params, seq.shape[-1]
        spec = SamplingSpec(rows=self.rows, cfg_scale=p.cfg_scale if self.cfg_on else 1.0,
                            cfg_beta=p.cfg_beta if self.double else None, temperature=p.temperature,
                            top_k=p.top_k, top_p=p.top_p)
        cond_len = 0 if self.cond is None else self.cond.shape[1]
        dec = fast_decoder(self.model, self.dtype, self.b, steps, 0 if prefix is None else prefix.shape[1],
                           cond_len, spec, graph=self.backend == "graph", compile_mode=p.compile,
                           step_cond=step_cond is not None, kv_bucket=p.kv_bucket, attention=p.attention)
        dec.start(seq, valid, forced, first, self.cond, self.cond_mask, prefix, self.generator, step_cond)
        self._tick(base + first)
        for s in range(first, steps - 1):
            dec.step(s)
            self._tick(base + s + 1)
        return dec.result()

    def _tick(self, done: int) -> None:
        self.done = done
        if self.progress is not None:
            self.progress(done, self.total)


def _window_plan(n_frames: int, n_prompt: int, window: int | None, stride: int | None) -> list[tuple[int, int]]:
    """``[(frames decoded in the window, frames kept from before as its prompt), ...]``."""
    if window is None or n_frames <= window:
        return [(n_frames, n_prompt)]
    if window < 1:
        raise ValueError(f"max_window_frames must be >= 1, got {window}")
    stride = max(1, window // 2) if stride is None else stride
    if not 0 < stride <= window:
        raise ValueError(f"extend_stride_frames must be in [1, {window}], got {stride}")
    if n_prompt >= window:
        raise ValueError(f"prompt of {n_prompt} frames leaves no room in a window of {window} frames")
    plan, have, keep = [(window, n_prompt)], window, window - stride
    while have < n_frames:
        add = min(stride, n_frames - have)
        plan.append((keep + add, keep))
        have += add
    return plan


def _batch_size(cond: Tensor | None, prompt: Tensor | None, prefix: Tensor | PrefixFn | None,
                batch_size: int) -> int:
    sizes = {t.shape[0] for t in (cond, prompt, prefix) if isinstance(t, Tensor)}
    if len(sizes) > 1:
        raise ValueError(f"cond, prompt and prefix batch sizes differ: {sorted(sizes)}")
    return sizes.pop() if sizes else batch_size


def _generate(model: CodebookLM, pattern: CodebookPattern, n_frames: int, cond: Tensor | None,
              cond_mask: Tensor | None, prompt: Tensor | None, params: GenerationParams, batch_size: int,
              progress: Progress | None, use_cache: bool, generator: torch.Generator | None,
              prefix: Tensor | PrefixFn | None = None, frame_offset: int = 0,
              null_mask: Tensor | None = None, step_cond: StepCondFn | None = None) -> Tensor:
    if pattern.n_q != model.cfg.n_q:
        raise ValueError(f"pattern has {pattern.n_q} codebooks, model {model.cfg.n_q}")
    n_prompt = 0 if prompt is None else prompt.shape[-1]
    if prompt is not None and (prompt.dim() != 3 or prompt.shape[1] != model.cfg.n_q):
        raise ValueError(f"prompt must be [B, {model.cfg.n_q}, P], got {tuple(prompt.shape)}")
    if n_prompt > n_frames:
        raise ValueError(f"prompt ({n_prompt} frames) longer than n_frames ({n_frames})")
    b = _batch_size(cond, prompt, prefix, batch_size)
    dec = _Decoder(model, pattern, b, cond, cond_mask, prefix, params, generator, use_cache, progress, null_mask,
                   step_cond)
    plan = _window_plan(n_frames, n_prompt, params.max_window_frames, params.extend_stride_frames)
    dec.total = sum(pattern.max_steps(frames) - 1 for frames, _ in plan)
    out = dec.segment(plan[0][0], prompt, frame_offset)
    for frames, keep in plan[1:]:
        start = out.shape[-1] - keep
        seg = dec.segment(frames, out[:, :, start:] if keep > 0 else None, frame_offset + start)
        out = torch.cat([out, seg[:, :, keep:]], dim=-1)
    return out


@torch.no_grad()
def generate(model: CodebookLM, pattern: CodebookPattern, n_frames: int, *, cond: Tensor | None = None,
             cond_mask: Tensor | None = None, prompt: Tensor | None = None,
             params: GenerationParams | None = None, batch_size: int = 1, progress: Progress | None = None,
             use_cache: bool = True, prefix: Tensor | PrefixFn | None = None,
             null_mask: Tensor | None = None, step_cond: StepCondFn | None = None) -> Tensor:
    """Sample ``codes [B, K, n_frames]`` (prompt included) from ``model`` through ``pattern``.

    Args:
        cond: ``[B, Tc, cond_dim]`` cross-attention conditioning; ``cond_mask [B, Tc]`` bool (None = all valid).
        prompt: ``[B, K, P]`` codes to continue; they are the first P frames of the output.
        params: ``GenerationParams`` (default: its defaults).
        batch_size: B when neither ``cond`` nor ``prompt`` fixes it.
        progress: called as ``progress(done_steps, total_steps)`` over all windows' sequence steps.
        use_cache: KV-cached decoding (default) or a full recompute of the prefix every step (reference path).
        prefix: ``[B, P, dim]`` prepended embeddings, or ``fn(start_frame, n_frames)`` giving them per window.
        null_mask: ``[B, Tc]`` bool: the positions of the CFG null condition (zero states) cross-attention attends
            (None = none).
        step_cond: ``fn(start_frame, n_frames) -> [B, n_frames, dim]`` added to the inputs of each window's steps
            (see the module docstring).
    """
    params = GenerationParams() if params is None else params
    was_training = model.training
    model.eval()
    try:
        gen = _make_generator(params.seed, next(model.parameters()).device)
        return _generate(model, pattern, n_frames, cond, cond_mask, prompt, params, batch_size, progress,
                         use_cache, gen, prefix, null_mask=null_mask, step_cond=step_cond)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_chained(model: CodebookLM, pattern: CodebookPattern, n_frames: int, *, segment_frames: int,
                     overlap_frames: int, cond: Tensor | None = None, cond_mask: Tensor | None = None,
                     prompt: Tensor | None = None, params: GenerationParams | None = None, batch_size: int = 1,
                     progress: Progress | None = None, use_cache: bool = True,
                     prefix: Tensor | PrefixFn | None = None, null_mask: Tensor | None = None) -> ChainedCodes:
    """UnlimitedMusicGen-style chaining: segments of ``segment_frames`` (the last one may be shorter), each
    prompted with the last ``overlap_frames`` of the previous one, ``n_frames`` frames in all.

    Decode ``result.segments`` one by one and join the audio with ``crossfade(wavs, overlap_frames * hop)``;
    ``null_mask`` as in ``generate``.
    """
    params = GenerationParams() if params is None else params
    if not 0 <= overlap_frames < segment_frames:
        raise ValueError(f"need 0 <= overlap_frames < segment_frames, got {overlap_frames}, {segment_frames}")
    was_training = model.training
    model.eval()
    try:
        gen = _make_generator(params.seed, next(model.parameters()).device)
        spans, have = [(0, min(segment_frames, n_frames))], min(segment_frames, n_frames)
        while have < n_frames:  # (start frame, length) of every segment
            length = overlap_frames + min(segment_frames - overlap_frames, n_frames - have)
            spans.append((have - overlap_frames, length))
            have += length - overlap_frames
        tracker = _ChainProgress(progress, pattern, spans, overlap_frames, params)
        segs: list[Tensor] = []
        for i, (start, length) in enumerate(spans):
            tail = prompt if i == 0 else (segs[-1][:, :, segs[-1].shape[-1] - overlap_frames:]
                                          if overlap_frames else None)
            segs.append(_generate(model, pattern, length, cond, cond_mask, tail, params, batch_size,
                                  tracker.for_segment(i), use_cache, gen, prefix, start, null_mask))
        starts = [start for start, _ in spans]
        codes = torch.cat([segs[0]] + [s[:, :, overlap_frames:] for s in segs[1:]], dim=-1)
        return ChainedCodes(codes=codes, segments=segs, overlap_frames=overlap_frames, starts=starts)
    finally:
        model.train(was_training)


class _ChainProgress:
    """Turns per-segment progress into one count over all segments of a chained generation."""

    def __init__(self, progress: Progress | None, pattern: CodebookPattern, spans: list[tuple[int, int]],
                 overlap: int, params: GenerationParams) -> None:
        self.progress = progress
        self.sizes = []
        for i, (_, length) in enumerate(spans):
            plan = _window_plan(length, overlap if i else 0, params.max_window_frames, params.extend_stride_frames)
            self.sizes.append(sum(pattern.max_steps(frames) - 1 for frames, _ in plan))
        self.total = sum(self.sizes)

    def for_segment(self, i: int) -> Progress | None:
        if self.progress is None:
            return None
        before, report = sum(self.sizes[:i]), self.progress
        return lambda done, _total: report(before + done, self.total)


def crossfade(wavs: list[Tensor], overlap_samples: int, mode: str = "linear") -> Tensor:
    """Join ``wavs`` (each ``[B, C, T_i]``) whose consecutive ends/starts overlap by ``overlap_samples``.

    Over each overlap the previous signal fades out and the next fades in, with ``t = (n + 0.5) / N``:

    * ``"linear"`` (default): gains ``1 - t`` / ``t`` (sum 1): exact for identical (correlated) overlaps, which is
      the case for chained segments whose overlap was decoded from the same codes.
    * ``"equal_power"``: gains ``cos(pi t / 2)`` / ``sin(pi t / 2)`` (squares sum to 1): constant loudness for
      uncorrelated overlaps, up to +3 dB in the middle of correlated ones.

    Returns ``[B, C, sum(T_i) - (len(wavs) - 1) * overlap_samples]``.
    """
    if not wavs:
        raise ValueError("no signals to crossfade")
    if mode not in ("linear", "equal_power"):
        raise ValueError(f"mode must be 'linear' or 'equal_power', got {mode!r}")
    n = int(overlap_samples)
    out = wavs[0]
    for w in wavs[1:]:
        if n == 0:
            out = torch.cat([out, w], dim=-1)
            continue
        if n < 0 or n > out.shape[-1] or n > w.shape[-1]:
            raise ValueError(f"overlap {n} does not fit signals of {out.shape[-1]} and {w.shape[-1]} samples")
        t = (torch.arange(n, device=w.device, dtype=torch.float64) + 0.5) / n
        if mode == "linear":
            fin, fout = t, 1.0 - t
        else:
            fin, fout = torch.sin(0.5 * math.pi * t), torch.cos(0.5 * math.pi * t)
        fin, fout = fin.to(w.dtype), fout.to(w.dtype)
        mixed = out[..., -n:] * fout + w[..., :n] * fin
        out = torch.cat([out[..., :-n], mixed, w[..., n:]], dim=-1)
    return out
