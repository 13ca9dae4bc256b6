"""MusicGen LM core: patterns, KV cache, transformers parity (logits and greedy tokens), weight import."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ostinato.interop.musicgen import load_transformers_musicgen, load_transformers_musicgen_decoder
from ostinato.nn.patterns import (
    DelayPattern, ParallelPattern, UnrollPattern, deinterleave_stereo, interleave_stereo, stereo_delays,
)
from ostinato.nn.transformer import CodebookLM, LMConfig, generate_greedy, sinusoidal_embedding

K, CARD, DIM = 4, 64, 64


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.manual_seed(0)
    cfg = MusicgenDecoderConfig(
        num_codebooks=K, vocab_size=CARD, hidden_size=DIM, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128,
        max_position_embeddings=256, dropout=0.0, activation_function="gelu", pad_token_id=CARD, bos_token_id=CARD)
    hf = MusicgenForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("musicgen_decoder")
    hf.save_pretrained(folder)
    return hf, folder


def _inputs(b: int = 2, t: int = 7, tc: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CARD, (b, K, t), generator=g)
    seq, _ = DelayPattern(K).build(codes, CARD)
    enc = torch.randn(b, tc, DIM, generator=g)
    enc_mask = torch.ones(b, tc, dtype=torch.bool)
    enc_mask[1, 3:] = False
    return seq, enc, enc_mask


# ----------------------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("pattern", [DelayPattern(4), DelayPattern(4, [0, 2, 2, 5]), ParallelPattern(4),
                                     UnrollPattern(4), DelayPattern(4, stereo_delays(2))])
@pytest.mark.parametrize("t", [1, 5, 8])
def test_pattern_round_trip(pattern: DelayPattern, t: int) -> None:
    codes = torch.randint(0, CARD, (3, 4, t))
    seq, mask = pattern.build(codes, CARD)
    assert seq.shape == (3, 4, pattern.max_steps(t)) and mask.shape == (4, pattern.max_steps(t))
    assert int(mask.sum()) == 4 * t  # every code once, nothing else
    assert bool((seq[:, ~mask] == CARD).all()) and bool((seq[:, :, 0] == CARD).all())
    back, valid = pattern.revert(seq)
    assert torch.equal(back, codes) and bool(valid.all())
    # model outputs: step s predicts step s + 1
    onehot = torch.nn.functional.one_hot(seq.clamp(max=CARD - 1), CARD).float()
    shifted = torch.roll(onehot, shifts=-1, dims=2)
    logits, lvalid = pattern.revert_logits(shifted, t)
    assert torch.equal(logits.argmax(-1), codes) and bool(lvalid.all())


def test_delay_pattern_matches_transformers(hf_folder: tuple[object, Path]) -> None:
    hf, _ = hf_folder
    t, b = 6, 2
    codes = torch.randint(0, CARD, (b, K, t))
    pat = DelayPattern(K)
    seq, mask = pat.build(codes, CARD)
    # transformers' prompts start with the BOS step: prompt = [BOS | codes]
    prompt = torch.cat([torch.full((b, K, 1), CARD), codes], dim=2).reshape(b * K, t + 1)
    _, ref = hf.build_delay_pattern_mask(prompt, pad_token_id=CARD, max_length=pat.max_steps(t))
    assert torch.equal(ref.reshape(b, K, -1), seq)
    # and the mask of valid positions (-1 in transformers' pattern with an empty prompt)
    _, empty = hf.build_delay_pattern_mask(torch.full((K, 1), CARD), pad_token_id=CARD, max_length=pat.max_steps(t))
    assert torch.equal(empty == -1, mask)


def test_pattern_partial_revert_and_stereo() -> None:
    pat = DelayPattern(3)
    codes = torch.randint(0, CARD, (2, 3, 5))
    seq, _ = pat.build(codes, CARD)
    part, valid = pat.revert(seq[:, :, :4], 5)  # only 4 of 9 steps generated yet
    assert valid.tolist() == [[True, True, True, False, False], [True, True, False, False, False],
                              [True, False, False, False, False]]
    assert torch.equal(part[:, valid], codes[:, valid])
    left, right = torch.randint(0, CARD, (2, 2, 3, 7))
    both = interleave_stereo(left, right)
    assert torch.equal(both[:, 0], left[:, 0]) and torch.equal(both[:, 1], right[:, 0])
    assert torch.equal(both[:, 4], left[:, 2]) and torch.equal(both[:, 5], right[:, 2])
    l2, r2 = deinterleave_stereo(both)
    assert torch.equal(l2, left) and torch.equal(r2, right)
    assert stereo_delays(3) == [0, 0, 1, 1, 2, 2]


# ------------------------------------------------------------------------------------------- transformer
def test_sinusoids_match_transformers() -> None:
    from transformers.models.musicgen.modeling_musicgen import MusicgenSinusoidalPositionalEmbedding as Ref

    for dim in (64, 33):
        ref = Ref.get_embedding(50, dim)
        assert torch.equal(sinusoidal_embedding(torch.arange(50), dim), ref)


@pytest.mark.parametrize("positional", ["sin", "rope"])
def test_cached_decoding_equals_full_forward(positional: str) -> None:
    torch.manual_seed(0)
    cfg = LMConfig.preset("tiny", n_q=K, card=CARD, cond_dim=24, positional=positional)
    lm = CodebookLM(cfg).eval()
    seq = torch.randint(0, CARD + 1, (2, K, 11))
    cond, cond_mask = torch.randn(2, 6, 24), torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    with torch.no_grad():
        full = lm(seq, cond, cond_mask)
        cache = lm.make_cache(2, 16)
        parts = [lm(seq[:, :, :4], cond, cond_mask, cache=cache)]  # prefill 4 steps
        parts += [lm(seq[:, :, s:s + 1], cache=cache) for s in range(4, 11)]  # cross k/v come from the cache
        inc = torch.cat(parts, dim=2)
        # an offset without cache equals the cached positions
        tail = lm(seq[:, :, 4:], cond, cond_mask, offset=4)
    assert full.shape == (2, K, 11, CARD)
    assert cache.length == 11
    assert (full - inc).abs().max().item() <= 1e-5
    # the suffix alone sees no prefix, so it differs; causality: prefix logits ignore later steps
    assert (tail - full[:, :, 4:]).abs().max().item() > 1e-3
    with torch.no_grad():
        changed = seq.clone()
        changed[:, :, 8:] = (changed[:, :, 8:] + 1) % CARD
        again = lm(changed, cond, cond_mask)
    assert torch.equal(again[:, :, :8], full[:, :, :8]) and not torch.allclose(again[:, :, 8:], full[:, :, 8:])
    # masked conditioning frames must not matter
    with torch.no_grad():
        cond2 = cond.clone()
        cond2[1, 2:] = 100.0
        assert torch.allclose(lm(seq, cond2, cond_mask), full, atol=1e-6)
    cache.reset()
    assert cache.length == 0 and cache.cross[0] is None


def test_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    cfg = LMConfig.preset("tiny", n_q=2, card=16)
    lm = CodebookLM(cfg).train()
    lm_ck = CodebookLM(cfg.with_(checkpointing=True)).train()
    lm_ck.load_state_dict(lm.state_dict())
    seq, cond = torch.randint(0, 17, (2, 2, 9)), torch.randn(2, 3, cfg.dim)
    grads = []
    for model in (lm, lm_ck):
        model.zero_grad()
        model(seq, cond).logsumexp(-1).mean().backward()
        grads.append(model.layers[0].fc1.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(ValueError, match="cache overflow"):
        lm.eval()(seq, cache=lm.make_cache(2, 4))


def test_presets() -> None:
    small, large = LMConfig.preset("small"), LMConfig.preset("large", n_q=8)
    assert (small.dim, small.num_layers, small.num_heads) == (1024, 24, 16)
    assert (large.dim, large.num_layers, large.num_heads, large.n_q) == (2048, 48, 32, 8)
    assert LMConfig.preset("medium").dim == 1536
    with pytest.raises(ValueError):
        LMConfig(dim=100, num_heads=16)


# ------------------------------------------------------------------------------------- transformers parity
def test_decoder_logits_parity(hf_folder: tuple[object, Path]) -> None:
    hf, folder = hf_folder
    lm, cfg = load_transformers_musicgen_decoder(folder)
    assert (cfg.n_q, cfg.card, cfg.dim, cfg.num_layers, cfg.ffn_dim) == (K, CARD, DIM, 2, 128)
    seq, enc, enc_mask = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=seq.reshape(-1, seq.shape[-1]), encoder_hidden_states=enc,
                 encoder_attention_mask=enc_mask.long()).logits.reshape(*seq.shape, CARD)
        ours = lm(seq, enc, enc_mask)
        ref_nocond = hf(input_ids=seq.reshape(-1, seq.shape[-1])).logits.reshape(*seq.shape, CARD)
        ours_nocond = lm(seq)
    assert (ref - ours).abs().max().item() <= 1e-4
    assert (ref_nocond - ours_nocond).abs().max().item() <= 1e-4
    assert (ref - ref_nocond).abs().max().item() > 1e-3  # conditioning matters


def test_import_is_strict(hf_folder: tuple[object, Path]) -> None:
    hf, folder = hf_folder
    state = {k: v for k, v in hf.state_dict().items()}
    config = hf.config.to_dict()
    lm, _ = load_transformers_musicgen_decoder(state, config)
    assert torch.equal(lm.heads[1].weight, state["lm_heads.1.weight"])
    broken = dict(state)
    del broken["model.decoder.layers.1.fc2.weight"]
    broken["model.decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"layers\.1\.fc2\.weight.*model\.decoder\.extra\.weight"):
        load_transformers_musicgen_decoder(broken, config)


def test_import_conditional_generation_layout(hf_folder: tuple[object, Path], tmp_path: Path) -> None:
    """A ``MusicgenForConditionalGeneration``-shaped folder (decoder under ``decoder.``, ``enc_to_dec_proj``,
    text/audio encoder weights ignored), written with safetensors like ``save_pretrained``."""
    import json

    from safetensors.torch import save_file

    hf, _ = hf_folder
    state = {f"decoder.{k}": v.clone() for k, v in hf.state_dict().items()}
    state["enc_to_dec_proj.weight"], state["enc_to_dec_proj.bias"] = torch.randn(DIM, 32), torch.randn(DIM)
    state["text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(32, 32)
    state["audio_encoder.quantizer.layers.0.codebook.embed"] = torch.randn(CARD, 8)
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {"model_type": "musicgen", "decoder": hf.config.to_diff_dict(), "text_encoder": {"d_model": 32}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = load_transformers_musicgen(tmp_path)
    assert out.audio_channels == 1 and out.enc_to_dec_proj is not None
    assert torch.equal(out.enc_to_dec_proj.bias, state["enc_to_dec_proj.bias"])
    seq, _, enc_mask = _inputs()
    text_states = torch.randn(2, 5, 32)
    with torch.no_grad():
        enc = out.enc_to_dec_proj(text_states)
        ref = hf(input_ids=seq.reshape(-1, seq.shape[-1]), encoder_hidden_states=enc,
                 encoder_attention_mask=enc_mask.long()).logits.reshape(*seq.shape, CARD)
        assert (out.lm(seq, enc, enc_mask) - ref).abs().max().item() <= 1e-4


def test_greedy_generation_parity(hf_folder: tuple[object, Path]) -> None:
    """Our cached greedy decoding == transformers' generate (no cache) == manual loop over transformers' cached
    forward with an encoder attention mask."""
    hf, folder = hf_folder
    lm, _ = load_transformers_musicgen_decoder(folder)
    _, enc, enc_mask = _inputs(seed=3)
    b, new_tokens = enc.shape[0], 10
    pat = DelayPattern(K)
    n_frames = new_tokens + 1 - K  # transformers: max_length = 1 + new_tokens = max_steps(n_frames)
    with torch.no_grad():
        ref = hf.generate(torch.full((b * K, 1), CARD), do_sample=False, max_new_tokens=new_tokens,
                          num_return_sequences=1, decoder_start_token_id=CARD, pad_token_id=CARD, bos_token_id=CARD,
                          encoder_hidden_states=enc, attention_mask=torch.ones(b, 1, dtype=torch.long),
                          use_cache=False)
    codes, seq = generate_greedy(lm, pat, n_frames, cond=enc)
    assert codes.shape == ref.shape == (b, K, n_frames)
    assert torch.equal(codes, ref)
    assert len(torch.unique(codes)) > 3  # not a degenerate constant sequence

    # with a padded conditioning mask, against a manual greedy loop over transformers' KV-cached forward
    codes_m, seq_m = generate_greedy(lm, pat, n_frames, cond=enc, cond_mask=enc_mask)
    codes_nc, _ = generate_greedy(lm, pat, n_frames, cond=enc, cond_mask=enc_mask, use_cache=False)
    assert torch.equal(codes_m, codes_nc)
    valid = pat.valid_mask(n_frames)
    ref_seq, past = torch.full_like(seq_m, CARD), None
    with torch.no_grad():
        for s in range(seq_m.shape[-1] - 1):
            out = hf(input_ids=ref_seq[:, :, s:s + 1].reshape(b * K, 1), encoder_hidden_states=enc,
                     encoder_attention_mask=enc_mask.long(), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits.reshape(b, K, 1, CARD)[:, :, -1].argmax(-1)
            ref_seq[:, :, s + 1] = torch.where(valid[:, s + 1], nxt, CARD)
    assert torch.equal(seq_m, ref_seq)
    assert not torch.equal(codes_m[1], codes[1])  # the mask changed the conditioning of item 1


def test_audiocraft_initialisation_scales_with_depth() -> None:
    torch.manual_seed(0)
    cfg = LMConfig(n_q=2, card=64, dim=256, num_heads=4, num_layers=4, ffn_dim=512)
    assert cfg.init == "audiocraft"
    lm = CodebookLM(cfg)
    for i, layer in enumerate(lm.layers):
        for lin in (layer.self_attn.q_proj, layer.fc1, layer.fc2):
            want = 1 / (lin.in_features ** 0.5) / (2 * (i + 1)) ** 0.5
            w = lin.weight
            assert abs(float(w.std()) / want - 0.986) < 0.05  # a +-3 std truncated normal keeps ~0.986 std
            assert float(w.abs().max()) <= 3 * want + 1e-6
    emb_want = 1 / 256 ** 0.5
    assert abs(float(lm.emb[0].weight.std()) / emb_want - 0.986) < 0.03
    ref = CodebookLM(cfg.with_(init="transformers", init_std=0.02))
    assert abs(float(ref.layers[3].fc1.weight.std()) - 0.02) < 0.002
