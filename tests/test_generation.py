"""ostinato.generation: sampling filters, CFG, KV-cached pattern decoding, continuation, sliding window, chaining."""
from __future__ import annotations

import math

import pytest
import torch

from ostinato.nn.decoding import GenerationParams, crossfade, generate, generate_chained
from ostinato.nn.sampling import cfg_logits, double_cfg_logits, filter_logits, sample_next
from ostinato.nn.patterns import DelayPattern, ParallelPattern, UnrollPattern
from ostinato.nn.transformer import CodebookLM, LMConfig, generate_greedy

K, CARD = 4, 32
GREEDY = GenerationParams(temperature=0.0, cfg_scale=1.0)


@pytest.fixture(scope="module")
def model() -> CodebookLM:
    torch.manual_seed(0)
    cfg = LMConfig.preset("tiny", n_q=K, card=CARD, dim=32, num_heads=2, num_layers=2, ffn_dim=64,
                          cross_attention=True, cond_dim=16, init="transformers", init_std=0.3)
    return CodebookLM(cfg).eval()


@pytest.fixture(scope="module")
def cond() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 5, 16, generator=g) * 3.0
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return c, mask


# ----------------------------------------------------------------------------------------------- sampling


def test_top_k_draws_stay_in_top_k_set() -> None:
    g = torch.Generator().manual_seed(0)
    row = torch.randn(CARD, generator=g)
    logits = row.expand(6000, CARD)
    toks = sample_next(logits, temperature=1.5, top_k=5, generator=g)
    top5 = set(torch.topk(row, 5).indices.tolist())
    assert toks.dtype == torch.int64 and toks.shape == (6000,)
    assert set(toks.tolist()) == top5  # never outside, and every member reachable
    assert torch.isinf(filter_logits(row, top_k=5)).sum() == CARD - 5


def test_top_p_draws_stay_in_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    logits = probs.log().expand(5000, 6)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_p=0.3, generator=g).tolist()) == {0}  # the top token is always kept
    # top-k is applied first, then top-p on the renormalised survivors
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    assert set(sample_next(logits[:, perm], top_k=2, top_p=0.6, generator=g).tolist()) == {1}


def test_temperature_zero_is_argmax_and_seeding_reproduces() -> None:
    logits = torch.randn(3, 7, CARD, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=3), logits.argmax(-1))
    a = sample_next(logits, generator=torch.Generator().manual_seed(5))
    b = sample_next(logits, generator=torch.Generator().manual_seed(5))
    c = sample_next(logits, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 7) and torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_formulas() -> None:
    g = torch.Generator().manual_seed(3)
    full, part, unc = (torch.randn(2, 4, CARD, generator=g) for _ in range(3))
    torch.testing.assert_close(cfg_logits(full, unc, 3.0), unc + 3.0 * (full - unc))
    torch.testing.assert_close(cfg_logits(full, unc, 1.0), full)
    torch.testing.assert_close(double_cfg_logits(full, part, unc, 3.0, 1.0), cfg_logits(full, unc, 3.0))
    torch.testing.assert_close(double_cfg_logits(full, part, unc, 2.0, 4.0),
                               unc + 2.0 * (part + 4.0 * (full - part) - unc))


# -------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("pattern", [DelayPattern(K), UnrollPattern(K), ParallelPattern(K)], ids=type)
def test_cached_equals_full_recompute(model, cond, pattern) -> None:
    c, m = cond
    for params in (GREEDY, GenerationParams(temperature=0.0, cfg_scale=3.0)):
        fast = generate(model, pattern, 7, cond=c, cond_mask=m, params=params, use_cache=True)
        slow = generate(model, pattern, 7, cond=c, cond_mask=m, params=params, use_cache=False)
        assert fast.shape == (2, K, 7) and torch.equal(fast, slow)
    # without CFG it is the reference greedy decoder of the transformer module
    ref, _ = generate_greedy(model, pattern, 7, cond=c, cond_mask=m)
    assert torch.equal(generate(model, pattern, 7, cond=c, cond_mask=m, params=GREEDY), ref)


def test_cached_logits_match_full_forward_every_step(model, cond) -> None:
    c, m = cond
    pattern = DelayPattern(K)
    codes = generate(model, pattern, 6, cond=c, cond_mask=m, params=GenerationParams(seed=0, cfg_scale=1.0))
    seq, _ = pattern.build(codes, model.special)
    full = model(seq, c, m)
    cache = model.make_cache(2, seq.shape[-1])
    steps = [model(seq[:, :, s:s + 1], c, m, cache=cache) for s in range(seq.shape[-1])]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-5, rtol=1e-5)


def test_cfg_changes_output_and_matches_manual_two_forwards(model, cond) -> None:
    c, m = cond
    pattern = DelayPattern(K)
    n = 8
    cfg3 = generate(model, pattern, n, cond=c, cond_mask=m, params=GenerationParams(temperature=0.0, cfg_scale=3.0))
    cfg1 = generate(model, pattern, n, cond=c, cond_mask=m, params=GREEDY)
    uncond = generate(model, pattern, n, params=GREEDY, batch_size=2)
    assert not torch.equal(cfg3, cfg1)
    assert not torch.equal(cfg1, uncond)

    # manual: two separate full forwards (cond / same cond with an all-False mask), combined, argmax
    steps = pattern.max_steps(n)
    valid = pattern.valid_mask(n)
    seq = torch.full((2, K, steps), model.special, dtype=torch.long)
    off = torch.zeros_like(m)
    with torch.no_grad():
        for s in range(steps - 1):
            lc = model(seq[:, :, :s + 1], c, m)[:, :, -1]
            lu = model(seq[:, :, :s + 1], c, off)[:, :, -1]
            nxt = (lu + 3.0 * (lc - lu)).argmax(-1)
            seq[:, :, s + 1] = torch.where(valid[:, s + 1], nxt, torch.full_like(nxt, model.special))
    manual, _ = pattern.revert(seq, n)
    assert torch.equal(cfg3, manual)


@pytest.mark.parametrize("pattern", [DelayPattern(K), UnrollPattern(K)], ids=type)
def test_continuation_keeps_prompt(model, cond, pattern) -> None:
    c, m = cond
    prompt = torch.randint(0, CARD, (2, K, 5), generator=torch.Generator().manual_seed(4))
    for use_cache in (True, False):
        out = generate(model, pattern, 12, cond=c, cond_mask=m, prompt=prompt,
                       params=GenerationParams(seed=1, top_k=0), use_cache=use_cache)
        assert out.shape == (2, K, 12)
        assert torch.equal(out[:, :, :5], prompt)
        assert ((out >= 0) & (out < CARD)).all()
    # greedy: continuing a greedy output from its own first frames reproduces it exactly
    full = generate(model, pattern, 10, cond=c, cond_mask=m, params=GREEDY)
    cont = generate(model, pattern, 10, cond=c, cond_mask=m, prompt=full[:, :, :4], params=GREEDY)
    assert torch.equal(cont, full)
    with pytest.raises(ValueError):
        generate(model, pattern, 3, prompt=prompt, params=GREEDY)


def test_seeds(model, cond) -> None:
    c, m = cond
    p = DelayPattern(K)
    run = lambda seed: generate(model, p, 10, cond=c, cond_mask=m,  # noqa: E731
                                params=GenerationParams(seed=seed, top_k=0, cfg_scale=2.0))
    a, b, d = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_sliding_window_three_windows_long(model, cond, monkeypatch) -> None:
    c, m = cond
    pattern = DelayPattern(K)
    w, stride, n = 6, 4, 18
    resets: list[int] = []
    real_forward = model.forward

    def counting_forward(codes, cond=None, cond_mask=None, cache=None, offset=0, prefix=None):
        if cache is not None and cache.length == 0:
            resets.append(codes.shape[-1])
        return real_forward(codes, cond, cond_mask, cache=cache, offset=offset, prefix=prefix)

    monkeypatch.setattr(model, "forward", counting_forward)
    calls: list[tuple[int, int]] = []
    params = GenerationParams(temperature=0.0, cfg_scale=2.0, max_window_frames=w, extend_stride_frames=stride)
    out = generate(model, pattern, n, cond=c, cond_mask=m, params=params, progress=lambda d, t: calls.append((d, t)))
    assert out.shape == (2, K, n)
    assert ((out >= 0) & (out < CARD)).all()
    assert len(resets) == 1 + math.ceil((n - w) / stride)  # 4 windows, each with a fresh cache
    assert resets[0] == 1 and all(r > 1 for r in resets[1:])  # later windows prefill their kept frames
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1][0] == calls[-1][1]

    monkeypatch.undo()
    # the first window is the plain generation; the second continues the last (w - stride) frames
    plain = generate(model, pattern, w, cond=c, cond_mask=m, params=params)
    assert torch.equal(out[:, :, :w], plain)
    keep = w - stride
    nxt = generate(model, pattern, w, cond=c, cond_mask=m, prompt=out[:, :, w - keep:w], params=params)
    assert torch.equal(out[:, :, w:w + stride], nxt[:, :, keep:])
    # not the same as decoding everything in one window
    assert not torch.equal(out, generate(model, pattern, n, cond=c, cond_mask=m,
                                         params=GenerationParams(temperature=0.0, cfg_scale=2.0)))


def test_chained_segments(model, cond) -> None:
    c, m = cond
    res = generate_chained(model, DelayPattern(K), 20, segment_frames=8, overlap_frames=3, cond=c, cond_mask=m,
                           params=GenerationParams(seed=3, top_k=10, cfg_scale=2.0))
    assert res.codes.shape == (2, K, 20)
    assert [s.shape[-1] for s in res.segments] == [8, 8, 8, 5]
    assert res.starts == [0, 5, 10, 15] and res.overlap_frames == 3
    for i, seg in enumerate(res.segments):
        assert torch.equal(res.codes[:, :, res.starts[i]:res.starts[i] + seg.shape[-1]], seg)
        if i:
            assert torch.equal(seg[:, :, :3], res.segments[i - 1][:, :, -3:])
    again = generate_chained(model, DelayPattern(K), 20, segment_frames=8, overlap_frames=3, cond=c, cond_mask=m,
                             params=GenerationParams(seed=3, top_k=10, cfg_scale=2.0))
    assert torch.equal(again.codes, res.codes)


def test_crossfade_length_and_continuity() -> None:
    sr, f, n_ov = 8000, 220.0, 400
    lengths = [2000, 1500, 1800]
    t0, wavs = 0, []
    for length in lengths:  # consecutive segments share n_ov samples of the same sine
        t = torch.arange(t0, t0 + length, dtype=torch.float64) / sr
        wavs.append(torch.sin(2 * math.pi * f * t).expand(2, 1, length).clone())
        t0 += length - n_ov
    out = crossfade(wavs, n_ov)
    assert out.shape == (2, 1, sum(lengths) - 2 * n_ov)
    max_step = max(w.diff(dim=-1).abs().max() for w in wavs)
    assert out.diff(dim=-1).abs().max() <= max_step + 1e-9
    # naive concatenation of the same segments jumps at the joins (so the check above can fail)
    naive = torch.cat([wavs[0]] + [w[..., n_ov:] for w in wavs[1:]], dim=-1)
    assert naive.shape == out.shape
    # mismatched phases: a hard cut jumps, the fades stay smooth; equal-power gains keep constant power
    a = torch.sin(2 * math.pi * f * torch.arange(1000, dtype=torch.float64) / sr).view(1, 1, -1)
    b = torch.sin(2 * math.pi * f * torch.arange(1000, dtype=torch.float64) / sr + 2.0).view(1, 1, -1)
    assert torch.cat([a, b[..., n_ov:]], dim=-1).diff(dim=-1).abs().max() > 2 * a.diff(dim=-1).abs().max()
    for mode in ("linear", "equal_power"):
        mixed = crossfade([a, b], n_ov, mode=mode)
        assert mixed.shape[-1] == 2000 - n_ov
        assert mixed.diff(dim=-1).abs().max() <= 1.5 * a.diff(dim=-1).abs().max()
    ones = torch.ones(1, 1, n_ov, dtype=torch.float64)
    gains_in = crossfade([torch.zeros_like(ones), ones], n_ov, mode="equal_power")
    gains_out = crossfade([ones, torch.zeros_like(ones)], n_ov, mode="equal_power")
    torch.testing.assert_close(gains_in ** 2 + gains_out ** 2, torch.ones_like(ones))


# ----------------------------------------------------------------------------------------------- prefix


def _prefix(b: int = 2, p: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(b, p, 32, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_prefix_cached_logits_match_full_forward_and_change_output(model, cond) -> None:
    c, m = cond
    pattern, pre = DelayPattern(K), _prefix()
    codes = generate(model, pattern, 6, cond=c, cond_mask=m, prefix=pre, params=GenerationParams(seed=0))
    seq, _ = pattern.build(codes, model.special)
    full = model(seq, c, m, prefix=pre)
    assert full.shape == (2, K, seq.shape[-1], CARD)
    cache = model.make_cache(2, pre.shape[1] + seq.shape[-1])
    steps = [model(seq[:, :, :1], c, m, cache=cache, prefix=pre)]
    steps += [model(seq[:, :, s:s + 1], c, m, cache=cache) for s in range(1, seq.shape[-1])]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-4, rtol=1e-4)
    for params in (GREEDY, GenerationParams(temperature=0.0, cfg_scale=3.0)):
        fast = generate(model, pattern, 7, cond=c, cond_mask=m, prefix=pre, params=params)
        slow = generate(model, pattern, 7, cond=c, cond_mask=m, prefix=pre, params=params, use_cache=False)
        assert torch.equal(fast, slow)
    assert not torch.equal(generate(model, pattern, 8, cond=c, cond_mask=m, prefix=pre, params=GREEDY),
                           generate(model, pattern, 8, cond=c, cond_mask=m, params=GREEDY))


def test_prefix_function_gets_each_window_span(model) -> None:
    spans: list[tuple[int, int]] = []

    def prefix_fn(start: int, n: int) -> torch.Tensor:
        spans.append((start, n))
        return _prefix(seed=start)

    params = GenerationParams(temperature=0.0, cfg_scale=2.0, max_window_frames=6, extend_stride_frames=4)
    out = generate(model, DelayPattern(K), 14, prefix=prefix_fn, params=params, batch_size=2)
    assert out.shape == (2, K, 14)
    assert spans == [(0, 6), (4, 6), (8, 6)]  # window i covers output frames [start, start + n)
    spans.clear()
    res = generate_chained(model, DelayPattern(K), 20, segment_frames=8, overlap_frames=3, prefix=prefix_fn,
                           params=GenerationParams(temperature=0.0, cfg_scale=1.0), batch_size=2)
    assert res.codes.shape == (2, K, 20) and spans == [(0, 8), (5, 8), (10, 8), (15, 5)]


def test_double_cfg_matches_three_manual_forwards(model, cond) -> None:
    c, m = cond
    pattern, pre, n = DelayPattern(K), _prefix(), 6
    alpha, beta = 3.0, 2.0
    out = generate(model, pattern, n, cond=c, cond_mask=m, prefix=pre,
                   params=GenerationParams(temperature=0.0, cfg_scale=alpha, cfg_beta=beta))
    steps, valid = pattern.max_steps(n), pattern.valid_mask(n)
    seq = torch.full((2, K, steps), model.special, dtype=torch.long)
    off = torch.zeros_like(m)
    with torch.no_grad():
        for s in range(steps - 1):
            full = model(seq[:, :, :s + 1], c, m, prefix=pre)[:, :, -1]
            style = model(seq[:, :, :s + 1], torch.zeros_like(c), off, prefix=pre)[:, :, -1]
            null = model(seq[:, :, :s + 1], torch.zeros_like(c), off, prefix=torch.zeros_like(pre))[:, :, -1]
            nxt = double_cfg_logits(full, style, null, alpha, beta).argmax(-1)
            seq[:, :, s + 1] = torch.where(valid[:, s + 1], nxt, torch.full_like(nxt, model.special))
    manual, _ = pattern.revert(seq, n)
    assert torch.equal(out, manual)
    plain = generate(model, pattern, n, cond=c, cond_mask=m, prefix=pre,
                     params=GenerationParams(temperature=0.0, cfg_scale=alpha))
    assert not torch.equal(out, plain)
    with pytest.raises(ValueError, match="double CFG"):
        generate(model, pattern, n, cond=c, cond_mask=m, params=GenerationParams(cfg_scale=3.0, cfg_beta=1.0))
