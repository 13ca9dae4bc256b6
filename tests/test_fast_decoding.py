"""ostinato.nn.fast_decoding: the static-shape decode step (the function a CUDA graph captures, run eagerly here)
against the model's own cached and uncached decoding: same greedy tokens, same logits, the same sampling
distribution; weight refresh, dtypes and backend selection. Graph replay itself needs CUDA: bench/
musicgen_vs_transformers.py asserts there that replayed and eager steps give identical tokens."""
from __future__ import annotations

import pytest
import torch

from ostinato.nn.fast_decoding import FastDecoder, SamplingSpec, fast_decoder, gumbel_topk_sample, inference_weights
from ostinato.nn.decoding import GenerationParams, generate, resolve_backend
from ostinato.nn.sampling import cfg_logits, filter_logits
from ostinato.nn.patterns import DelayPattern, UnrollPattern
from ostinato.nn.transformer import CodebookLM, LMConfig

K, CARD = 4, 32


def make_model(positional: str = "sin", bias: bool = False, seed: int = 0) -> CodebookLM:
    torch.manual_seed(seed)
    cfg = LMConfig.preset("tiny", n_q=K, card=CARD, dim=32, num_heads=2, num_layers=2, ffn_dim=64,
                          cross_attention=True, cond_dim=16, init="transformers", init_std=0.3,
                          positional=positional, bias=bias)
    model = CodebookLM(cfg).eval()
    with torch.no_grad():  # non-zero biases: the null CFG rows must still get nothing from cross-attention
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> CodebookLM:
    return make_model()


@pytest.fixture(scope="module")
def cond() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 5, 16, generator=g) * 3.0
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return c, mask


def greedy(backend: str, **kw) -> GenerationParams:
    return GenerationParams(temperature=0.0, backend=backend, **kw)


@pytest.mark.parametrize("positional,bias", [("sin", False), ("rope", True)])
@pytest.mark.parametrize("pattern", [DelayPattern(K), UnrollPattern(K)], ids=type)
def test_static_greedy_tokens_equal_cached_and_uncached(positional, bias, pattern, cond) -> None:
    model = make_model(positional, bias)
    c, m = cond
    prefix = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))
    for kw in ({"cfg_scale": 1.0}, {"cfg_scale": 3.0}, {"cfg_scale": 3.0, "cfg_beta": 2.0}):
        args = dict(cond=c, cond_mask=m, prefix=prefix)
        fast = generate(model, pattern, 7, params=greedy("static", **kw), **args)
        cached = generate(model, pattern, 7, params=greedy("cache", **kw), **args)
        uncached = generate(model, pattern, 7, params=greedy("cache", **kw), use_cache=False, **args)
        assert fast.shape == (2, K, 7)
        assert torch.equal(fast, cached) and torch.equal(fast, uncached), kw


def test_static_prompt_and_sliding_windows_match_cache(model, cond) -> None:
    c, m = cond
    pattern = DelayPattern(K)
    prompt = torch.randint(0, CARD, (2, K, 4), generator=torch.Generator().manual_seed(2))
    for kw in ({}, {"max_window_frames": 8, "extend_stride_frames": 3}):
        fast = generate(model, pattern, 14, cond=c, cond_mask=m, prompt=prompt, params=greedy("static", **kw))
        ref = generate(model, pattern, 14, cond=c, cond_mask=m, prompt=prompt, params=greedy("cache", **kw))
        assert torch.equal(fast[:, :, :4], prompt) and torch.equal(fast, ref), kw


def test_step_logits_match_the_full_forward_with_cfg(model, cond) -> None:
    """Teacher-forced: every step's guided logits equal CFG over two full causal forwards of the model."""
    c, m = cond
    pattern = DelayPattern(K)
    codes = torch.randint(0, CARD, (2, K, 6), generator=torch.Generator().manual_seed(3))
    seq, _ = pattern.build(codes, model.special)  # [B, K, S]
    steps = seq.shape[-1]
    everything = torch.ones(K, steps, dtype=torch.bool)  # forced everywhere: the sequence is teacher-forced
    spec = SamplingSpec(rows=2, cfg_scale=3.0, temperature=0.0)
    dec = FastDecoder(model, inference_weights(model, torch.float32), 2, steps, 0, 5, spec)
    cond2 = torch.cat([c, torch.zeros_like(c)])
    mask2 = torch.cat([m, torch.zeros_like(m)])
    got = [dec.start(seq, everything, everything, 1, cond2, mask2, None, None)]
    got += [dec.step(s).clone() for s in range(1, steps - 1)]
    with torch.no_grad():
        full = model(seq[:, :, :-1], c, m)  # [B, K, S-1, card]
        null = model(seq[:, :, :-1], c, torch.zeros_like(m))
    want = cfg_logits(full, null, 3.0)
    torch.testing.assert_close(torch.stack(got, dim=2), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(dec.result(), seq)  # forced positions are never overwritten


def test_gumbel_topk_draws_follow_the_filtered_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    row = torch.randn(CARD, generator=g)
    n = 20000
    spec = SamplingSpec(temperature=1.3, top_k=5)
    toks = gumbel_topk_sample(row.expand(n, CARD), spec, torch.rand(n, 5, generator=g))
    top5 = torch.topk(row, 5).indices
    assert set(toks.tolist()) == set(top5.tolist())
    want = torch.softmax(filter_logits(row / 1.3, top_k=5), dim=-1)
    freq = torch.bincount(toks, minlength=CARD).float() / n
    assert (freq - want).abs().max() < 0.015
    # top-p after top-k, and no filtering at all
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    nucleus = gumbel_topk_sample(probs.log().expand(n, 6), SamplingSpec(top_p=0.85), torch.rand(n, 6, generator=g))
    assert set(nucleus.tolist()) == {0, 1, 2}
    plain = gumbel_topk_sample(probs.log().expand(n, 6), SamplingSpec(), torch.rand(n, 6, generator=g))
    assert (torch.bincount(plain, minlength=6).float() / n - probs).abs().max() < 0.015
    logits = torch.randn(3, K, CARD, generator=g)
    assert torch.equal(gumbel_topk_sample(logits, SamplingSpec(temperature=0.0), None), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_stays_in_top_k(model, cond) -> None:
    c, m = cond
    pattern = DelayPattern(K)
    run = lambda seed: generate(model, pattern, 10, cond=c, cond_mask=m,  # noqa: E731
                                params=GenerationParams(seed=seed, top_k=3, backend="static"))
    a, b, other = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert a.min() >= 0 and a.max() < CARD


def test_inference_weights_follow_parameter_updates(cond) -> None:
    model = make_model(seed=7)
    c, m = cond
    pattern = DelayPattern(K)
    params = greedy("static", cfg_scale=3.0)
    before = generate(model, pattern, 8, cond=c, cond_mask=m, params=params)
    weights = inference_weights(model, torch.float32)
    with torch.no_grad():  # an optimizer step changes parameters in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    after = generate(model, pattern, 8, cond=c, cond_mask=m, params=params)
    assert inference_weights(model, torch.float32) is weights  # refreshed in place, decoders stay valid
    assert torch.equal(after, generate(model, pattern, 8, cond=c, cond_mask=m, params=greedy("cache", cfg_scale=3.0)))
    assert not torch.equal(before, after)


def test_bf16_inference_weights_stay_close(model, cond) -> None:
    c, m = cond
    pattern = DelayPattern(K)
    codes = torch.randint(0, CARD, (2, K, 5), generator=torch.Generator().manual_seed(9))
    seq, _ = pattern.build(codes, model.special)
    steps = seq.shape[-1]
    forced = torch.ones(K, steps, dtype=torch.bool)
    dec = fast_decoder(model, torch.bfloat16, 2, steps, 0, 5, SamplingSpec(temperature=0.0), graph=False)
    assert dec.w.heads.dtype == torch.bfloat16 and dec.kv[0].dtype == torch.bfloat16
    got = [dec.start(seq, forced, forced, 1, c, m, None, None)] + [dec.step(s).clone() for s in range(1, steps - 1)]
    with torch.no_grad():
        want = model(seq[:, :, :-1], c, m)
    err = (torch.stack(got, dim=2) - want).abs().max() / want.abs().max()
    assert err < 0.05


def test_backend_and_dtype_selection(model) -> None:
    assert resolve_backend(model, GenerationParams()) == ("cache", torch.float32)
    assert resolve_backend(model, GenerationParams(backend="static", dtype="bf16")) == ("static", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_backend(model, GenerationParams(backend="static")) == ("static", torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend(model, GenerationParams(backend="graph"))
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(model, GenerationParams(backend="fast"))
    with pytest.raises(ValueError, match="dtype"):
        resolve_backend(model, GenerationParams(backend="static", dtype="int8"))


def test_compiled_step_matches_the_eager_step(cond) -> None:
    """The step torch.compile'd (what a CUDA graph then captures on GPU) decodes like the eager step."""
    torch.manual_seed(3)
    cfg = LMConfig.preset("tiny", n_q=K, card=CARD, dim=32, num_heads=2, num_layers=1, ffn_dim=64,
                          cross_attention=True, cond_dim=16, init="transformers", init_std=0.3)
    model = CodebookLM(cfg).eval()
    c, m = cond
    pattern = DelayPattern(K)
    eager = generate(model, pattern, 6, cond=c, cond_mask=m, params=greedy("static", cfg_scale=3.0))
    compiled = generate(model, pattern, 6, cond=c, cond_mask=m,
                        params=greedy("static", cfg_scale=3.0, compile="default"))
    assert torch.equal(compiled, eager)
    sampled = [generate(model, pattern, 6, cond=c, cond_mask=m,
                        params=GenerationParams(seed=2, top_k=4, backend="static", compile=mode)) for mode in
               (None, "default")]
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("attention", ["bmm", "sdpa"])
def test_bucketed_attention_gives_the_whole_buffers_tokens(model, cond, attention) -> None:
    """A step that attends to its filled cache positions rounded up to 4 (several lengths over a window, with a
    prefix and a sliding window) draws the tokens of one that attends to the whole buffer, greedy and sampled."""
    c, m = cond
    prefix = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))
    args = dict(cond=c, cond_mask=m, prefix=prefix)
    for kw in ({"temperature": 0.0}, {"seed": 3, "top_k": 10}, {"seed": 5, "max_window_frames": 9,
                                                               "extend_stride_frames": 4}):
        whole = generate(model, DelayPattern(K), 17, params=GenerationParams(backend="static", kv_bucket=0, **kw),
                         **args)
        bucketed = generate(model, DelayPattern(K), 17, params=GenerationParams(backend="static", kv_bucket=4,
                                                                                  attention=attention, **kw), **args)
        assert torch.equal(whole, bucketed), kw
    ref = generate(model, DelayPattern(K), 17, params=greedy("cache"), **args)
    assert torch.equal(ref, generate(model, DelayPattern(K), 17, params=greedy("static", kv_bucket=4,
                                                                               attention=attention), **args))


def test_a_step_attends_to_its_position_rounded_up_to_the_bucket(model) -> None:
    spec = SamplingSpec(temperature=0.0)
    dec = FastDecoder(model, inference_weights(model, torch.float32), 1, 40, 3, 0, spec, kv_bucket=16)
    assert dec.max_len == 48  # 3 + 40 rounded up to 16
    assert [dec.attended(s) for s in (0, 12, 13, 28, 29, 39)] == [16, 16, 32, 32, 48, 48]
    assert FastDecoder(model, inference_weights(model, torch.float32), 1, 40, 3, 0, spec, kv_bucket=0).attended(0) \
        == 48
    with pytest.raises(ValueError, match="attention must be one of"):
        FastDecoder(model, inference_weights(model, torch.float32), 1, 40, 3, 0, spec, attention="flash")
    with pytest.raises(ValueError, match="generation attention='flash': must be one of auto, bmm, sdpa"):
        GenerationParams(attention="flash")
