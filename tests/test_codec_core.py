"""Codec core: padded convs, SEANet shapes, RVQ training behaviour (DDP included), transformers/audiocraft import."""
from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from ostinato.interop.encodec import (export_audiocraft_encodec, load_audiocraft_encodec,
                                      load_transformers_encodec)
from ostinato.models.codec import Codec
from ostinato.nn.conv import NormConv1d, NormConvTranspose1d
from ostinato.nn.quantization import ResidualVectorQuantizer
from ostinato.nn.seanet import SEANetDecoder, SEANetEncoder
from tests.helpers import free_port

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

TINY = dict(dimension=16, n_filters=4, ratios=[4, 2], n_q=3, card=32)


def tiny_codec(**overrides: Any) -> Codec:
    return Codec.build(**{"sample_rate": 8000, **TINY, **overrides})


# ----- convolutions and SEANet shapes -----

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_conv_lengths_are_ceil_of_stride(causal: bool, pad_mode: str) -> None:
    for kernel, stride, dilation in [(7, 1, 1), (3, 1, 4), (8, 4, 1), (10, 5, 1), (4, 2, 1)]:
        conv = NormConv1d(2, 3, kernel, stride=stride, dilation=dilation, causal=causal, pad_mode=pad_mode,
                          norm="weight_norm")
        for length in [1, 2, 5, 16, 17, 33]:
            assert conv(torch.randn(1, 2, length)).shape == (1, 3, math.ceil(length / stride))
        if stride > 1:
            convtr = NormConvTranspose1d(3, 2, kernel, stride=stride, causal=causal, norm="time_group_norm")
            assert convtr(torch.randn(2, 3, 6)).shape == (2, 2, 6 * stride)


def test_causal_conv_ignores_the_future_and_centered_does_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64)
    y = x.clone()
    y[..., 40:] += 1.0
    for causal in (True, False):
        conv = NormConv1d(1, 4, 8, stride=4, causal=causal, norm="weight_norm")
        a, b = conv(x), conv(y)
        same_before = torch.equal(a[..., :10], b[..., :10])  # frames 0..9 end at sample 39
        assert same_before is causal


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lstm", [0, 2])
@pytest.mark.parametrize("channels", [1, 2])
def test_seanet_frame_counts(causal: bool, lstm: int, channels: int) -> None:
    kw = dict(channels=channels, dimension=16, n_filters=4, ratios=[5, 4, 2], causal=causal, lstm=lstm)
    encoder, decoder = SEANetEncoder(**kw), SEANetDecoder(**kw)
    assert encoder.hop_length == 40
    assert any(isinstance(m, torch.nn.LSTM) for m in encoder.modules()) == bool(lstm)
    for length in [1, 39, 40, 41, 333, 1000]:
        z = encoder(torch.randn(2, channels, length))
        frames = math.ceil(length / 40)
        assert z.shape == (2, 16, frames)
        assert decoder(z).shape == (2, channels, frames * 40)
    codec = Codec(encoder, decoder, ResidualVectorQuantizer(16, 2, 8, kmeans_init=False), 16000, channels).eval()
    out = codec(torch.randn(1, channels, 333))
    assert out.recon.shape == (1, channels, 333) and out.codes.shape == (1, 2, 9)
    with pytest.raises(ValueError, match="expected audio"):
        codec(torch.randn(1, 3 - channels, 333))


def test_causal_encoder_frames_only_see_the_past() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 400)
    y = x.clone()
    y[..., 200:] += 0.5  # frames 0..4 of hop 40 end before sample 200
    for causal in (True, False):
        # zero padding: reflect padding mirrors later samples into the left border
        encoder = SEANetEncoder(dimension=8, n_filters=4, ratios=[5, 4, 2], causal=causal, lstm=1,
                                pad_mode="constant")
        unchanged = torch.allclose(encoder(x)[..., :5], encoder(y)[..., :5], atol=0, rtol=0)
        assert unchanged is causal


# ----- residual vector quantizer -----

def clustered(n: int, dim: int, centers: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Latents [B=2, dim, n // 2] around a few centres."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, dim, generator=g) * 5 if centers is None else centers
    pick = torch.randint(0, len(centers), (n,), generator=g)
    points = centers[pick] + 0.05 * torch.randn(n, dim, generator=g)
    return points.view(2, n // 2, dim).permute(0, 2, 1).contiguous()


def test_kmeans_init_on_first_training_batch_only() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=6, n_q=2, card=4, kmeans_iters=20)
    cb = rvq.layers[0].codebook
    assert not bool(cb.inited) and torch.count_nonzero(cb.embed) == 0
    z = clustered(200, 6)
    rvq.eval()(z)
    assert not bool(cb.inited) and torch.count_nonzero(cb.embed) == 0
    rvq.train()(z)
    assert bool(cb.inited) and bool(rvq.layers[1].codebook.inited)
    # k-means fixed point: each used code is the mean of the batch vectors it quantizes.
    points = z.permute(0, 2, 1).reshape(-1, 6)
    codes = torch.cdist(points, cb.embed).argmin(dim=1)
    for code in codes.unique():
        assert torch.allclose(points[codes == code].mean(dim=0), cb.embed[code], atol=1e-3)
    assert math.isclose(float(cb.cluster_size.sum()), 200, rel_tol=1e-3)
    before = cb.embed.clone()
    rvq(z)  # second batch: EMA, no re-initialisation
    assert torch.allclose(cb.embed, before, atol=0.05)


def test_ema_moves_codebook_towards_data_in_training_and_never_in_eval() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=4, n_q=1, card=8, kmeans_init=False, threshold_ema_dead_code=0,
                                  decay=0.8)
    target = torch.full((1, 4), 3.0)
    z = clustered(64, 4, centers=target)
    cb = rvq.layers[0].codebook
    used = int(rvq.encode(z)[0, 0, 0])
    rvq.eval()
    state = {k: v.clone() for k, v in rvq.state_dict().items()}
    for _ in range(3):
        rvq(z)
    assert all(torch.equal(state[k], v) for k, v in rvq.state_dict().items())
    rvq.train()
    distances = []
    for _ in range(5):
        rvq(z)
        distances.append(float((cb.embed[used] - target[0]).norm()))
    assert distances[-1] < 0.5 * float((state["layers.0.codebook.embed"][used] - target[0]).norm())
    assert all(a > b for a, b in zip(distances, distances[1:]))
    assert int(rvq.steps) == 5


def test_dead_codes_are_replaced_by_batch_vectors() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=4, n_q=1, card=8, kmeans_init=False, threshold_ema_dead_code=2.0)
    cb = rvq.layers[0].codebook
    z = clustered(64, 4)
    points = z.permute(0, 2, 1).reshape(-1, 4)
    with torch.no_grad():
        cb.embed[:4] = points[:4]
        cb.embed[4:] = 1e3  # never the nearest: their counts decay below the threshold
        cb.cluster_size[:4] = 100.0
        cb.cluster_size[4:] = 0.0
        cb.embed_avg.copy_(cb.embed * cb.cluster_size[:, None])
    out = rvq.train()(z)
    assert float(out.metrics["replaced_q0"]) == 4.0
    distance_to_batch = torch.cdist(cb.embed, points).min(dim=1).values
    assert torch.all(distance_to_batch[4:] == 0)  # replaced rows are batch vectors
    assert torch.all(cb.embed[4:].abs() < 100)
    assert torch.all(cb.cluster_size[4:] == 2.0)
    assert torch.all(cb.cluster_size[:4] > 2.0)  # live codes kept their statistics


def test_q_dropout_varies_n_q_and_is_deterministic_per_step() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=4, n_q=6, card=8, kmeans_init=False, q_dropout=True).train()
    z = torch.randn(2, 4, 10)
    first = [rvq(z).codes.shape[1] for _ in range(12)]
    assert len(set(first)) > 2 and all(1 <= k <= 6 for k in first)
    assert first == [rvq.sampled_n_q(step) for step in range(12)]
    rvq.steps.zero_()
    assert [rvq(z).codes.shape[1] for _ in range(12)] == first
    assert all(rvq(z, n_q=2).codes.shape[1] <= 2 for _ in range(8))
    rvq.eval()
    assert rvq(z).codes.shape[1] == 6


def test_penalty_round_trip_and_straight_through_gradient() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=8, n_q=4, card=16)
    z = torch.randn(2, 8, 30, requires_grad=True)
    out = rvq.train()(z)
    assert out.penalty.item() > 0 and out.penalty.requires_grad
    assert out.codes.shape == (2, 4, 30) and out.codes.dtype == torch.int64
    weight = torch.randn_like(z)
    (out.quantized * weight).sum().backward()
    assert torch.allclose(z.grad, weight)  # identity gradient
    rvq.eval()
    with torch.no_grad():
        res = rvq(z)
        codes = rvq.encode(z)
        assert torch.equal(codes, res.codes)
        assert torch.equal(rvq.decode(codes), res.quantized)
        assert torch.equal(rvq.decode(codes[:, :2]), rvq(z, n_q=2).quantized)
        # more codebooks, smaller error
        errors = [float((rvq.decode(codes[:, :k]) - z).pow(2).mean()) for k in range(1, 5)]
        assert errors == sorted(errors, reverse=True)


def test_codec_gradient_reaches_encoder_and_penalty_is_positive() -> None:
    torch.manual_seed(0)
    codec = tiny_codec().train()
    wav = torch.randn(2, 1, 800)
    out = codec(wav)
    loss = (out.recon - wav).pow(2).mean() + out.penalty
    loss.backward()
    first = codec.encoder.model[0].conv.parametrizations.weight.original1
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert out.penalty.item() > 0
    assert set(out.metrics) >= {"n_q", "bandwidth_kbps", "perplexity_q0", "replaced_q2"}


def test_vq_math_is_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=32, n_q=4, card=256, kmeans_init=False).eval()
    z = torch.randn(4, 32, 100).bfloat16()
    reference = rvq.encode(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = rvq.encode(z)
        out = rvq.train()(z)
    assert torch.equal(codes, reference)
    assert torch.equal(out.codes, reference)
    assert out.quantized.dtype == torch.bfloat16
    assert all(b.dtype in (torch.float32, torch.bool, torch.int64) for b in rvq.buffers())


# ----- DDP -----

DDP_CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(dimension=8, n_q=3, card=16, kmeans_init=True, threshold_ema_dead_code=2.0, q_dropout=True),
    "ema": dict(dimension=8, n_q=2, card=16, kmeans_init=False, threshold_ema_dead_code=0.0),
}
DDP_STEPS = 3


def ddp_batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(2, 8, 20, generator=g) * (1 + 2 * rank) + 3 * rank


def run_rvq(config: str, batches: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[int]]:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(**DDP_CONFIGS[config]).train()
    n_qs = [rvq(z).codes.shape[1] for z in batches]
    return rvq.state_dict(), n_qs


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        for name in DDP_CONFIGS:
            state, n_qs = run_rvq(name, [ddp_batch(rank, s) for s in range(DDP_STEPS)])
            torch.save({"state": state, "n_qs": n_qs}, Path(out_dir) / f"{name}_{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_ddp_keeps_codebooks_identical_across_ranks(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    stage0 = [f"layers.0.codebook.{b}" for b in ("embed", "cluster_size", "embed_avg")]
    for name in DDP_CONFIGS:
        r0, r1 = (torch.load(tmp_path / f"{name}_{r}.pt") for r in range(2))
        assert r0["n_qs"] == r1["n_qs"]
        for key, value in r0["state"].items():
            assert torch.equal(value, r1["state"][key]), (name, key)
        alone = [run_rvq(name, [ddp_batch(r, s) for s in range(DDP_STEPS)])[0] for r in range(2)]
        for key in stage0:  # the sync matters: ranks alone diverge, and the synced result is neither
            assert not torch.allclose(alone[0][key], alone[1][key]), (name, key)
            assert not torch.allclose(r0["state"][key], alone[0][key]), (name, key)
            assert not torch.allclose(r0["state"][key], alone[1][key]), (name, key)
    full = torch.load(tmp_path / "full_0.pt")["n_qs"]
    assert full == [ResidualVectorQuantizer(**DDP_CONFIGS["full"]).sampled_n_q(s) for s in range(DDP_STEPS)]
    # Without k-means and dead codes, summing statistics over ranks equals training on both batches at once.
    state = torch.load(tmp_path / "ema_0.pt")["state"]
    together, _ = run_rvq("ema", [torch.cat([ddp_batch(0, s), ddp_batch(1, s)]) for s in range(DDP_STEPS)])
    for key, value in together.items():
        assert torch.allclose(state[key].float(), value.float(), rtol=1e-5, atol=1e-5), key


# ----- codec -----

def test_codec_config_properties_and_normalize() -> None:
    torch.manual_seed(0)
    codec = tiny_codec(normalize=True, channels=2, encoder={"n_residual_layers": 2}).eval()
    assert (codec.hop_length, codec.frame_rate, codec.n_q, codec.card) == (8, 1000.0, 3, 32)
    assert math.isclose(codec.bandwidth_kbps(), 15.0)
    rebuilt = Codec.build(**json.loads(json.dumps(codec.config)))
    assert rebuilt.config == codec.config
    assert rebuilt.state_dict().keys() == codec.state_dict().keys()
    assert len(codec.encoder.model) == len(rebuilt.encoder.model) > len(tiny_codec().encoder.model)
    with pytest.raises(ValueError, match="unknown keys"):
        Codec.build(sample_rate=8000, n_filter=4)
    wav = torch.randn(2, 2, 100) * torch.tensor([0.1, 3.0])[:, None, None]
    with torch.no_grad():
        encoded = codec.encode(wav)
        out = codec(wav)
        assert encoded.scale is not None and encoded.scale.shape == (2, 1)
        assert encoded.scale[1, 0] > 10 * encoded.scale[0, 0]
        assert torch.equal(encoded.codes, out.codes)
        assert torch.allclose(codec.decode(encoded.codes, encoded.scale)[..., :100], out.recon)
        # the codes of a scaled signal are those of the signal: normalization at work
        assert torch.equal(codec.encode(wav * 7).codes, encoded.codes)
    excluded = codec.ema_excluded(prefix="model.")
    assert set(excluded) == {f"model.{n}" for n, _ in codec.named_buffers()}
    assert "model.quantizer.layers.0.codebook.embed" in excluded


# ----- transformers import -----

def randomize_transformers(model: Any, wav: torch.Tensor) -> None:
    """Non-trivial weight-norm gains and biases; random codebooks, inited, shrinking like the residuals."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original0"):
                p.mul_(torch.empty_like(p).uniform_(0.5, 2.0))
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
        scale = float(model.encoder(wav).std())
        for k, layer in enumerate(model.quantizer.layers):
            cb = layer.codebook
            cb.embed.normal_().mul_(scale * 0.8 ** k)
            cb.embed_avg.copy_(cb.embed)
            cb.cluster_size.uniform_(1, 5)
            cb.inited.fill_(1.0)


TRANSFORMERS_CONFIGS = {
    "musicgen32k": dict(sampling_rate=32000, audio_channels=1, num_filters=16, upsampling_ratios=[8, 5, 4, 4],
                        codebook_size=2048, hidden_size=128, codebook_dim=128, num_lstm_layers=2,
                        use_causal_conv=False, norm_type="weight_norm", pad_mode="reflect", use_conv_shortcut=False,
                        normalize=False, target_bandwidths=[2.2], compress=2, residual_kernel_size=3,
                        trim_right_ratio=1.0),
    "encodec24k": dict(sampling_rate=24000, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2],
                       codebook_size=1024, use_causal_conv=True, use_conv_shortcut=True, normalize=False,
                       norm_type="weight_norm", pad_mode="reflect", target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0]),
}


@pytest.mark.parametrize("name", list(TRANSFORMERS_CONFIGS))
def test_transformers_parity(name: str, tmp_path: Path) -> None:
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    config = EncodecConfig(**TRANSFORMERS_CONFIGS[name])
    reference = EncodecModel(config).eval()
    wav = 0.3 * torch.randn(1, 1, config.sampling_rate + 37)
    randomize_transformers(reference, wav)
    reference.save_pretrained(tmp_path)
    codec = load_transformers_encodec(tmp_path)
    assert codec.n_q == config.num_quantizers and codec.card == config.codebook_size
    assert codec.frame_rate == config.sampling_rate / config.hop_length
    with torch.no_grad():
        for bandwidth in config.target_bandwidths:
            ref = reference.encode(wav, bandwidth=bandwidth)
            n_q = reference.quantizer.get_num_quantizers_for_bandwidth(bandwidth)
            ours = codec.encode(wav, n_q=n_q)
            assert ours.codes.shape == (1, n_q, math.ceil(wav.shape[-1] / codec.hop_length))
            assert torch.equal(ours.codes, ref.audio_codes[0])
            assert len(torch.unique(ours.codes[:, -1])) > 5  # the last stage is not degenerate
            ref_audio = reference.decode(ref.audio_codes, ref.audio_scales).audio_values
            assert (codec.decode(ours.codes) - ref_audio).abs().max() <= 1e-4
        ref_full = reference(wav, bandwidth=config.target_bandwidths[-1])
        out = codec(wav)
    assert torch.equal(out.codes, ref_full.audio_codes[0])
    assert out.recon.shape == ref_full.audio_values.shape == wav.shape
    assert (out.recon - ref_full.audio_values).abs().max() <= 1e-4


def test_transformers_import_legacy_names_and_errors(tmp_path: Path) -> None:
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    config = EncodecConfig(sampling_rate=16000, num_filters=4, upsampling_ratios=[4, 2], hidden_size=16,
                           codebook_size=32, target_bandwidths=[20.0], num_lstm_layers=1)
    reference = EncodecModel(config).eval()
    wav = torch.randn(1, 1, 999)
    randomize_transformers(reference, wav)
    reference.save_pretrained(tmp_path)
    modern = load_transformers_encodec(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    legacy = {k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v for k, v in weights.items()}
    assert any(k.endswith("weight_g") for k in legacy)
    save_file(legacy, tmp_path / "model.safetensors")
    imported = load_transformers_encodec(tmp_path)
    with torch.no_grad():
        assert torch.equal(imported(wav).recon, modern(wav).recon)
    assert all(bool(layer.codebook.inited) for layer in imported.quantizer.layers)

    del legacy["decoder.layers.0.conv.bias"]
    save_file(legacy, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['decoder.model.0.conv.bias'\]"):
        load_transformers_encodec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "chunk_length_s": 1.0, "overlap": 0.01}))
    with pytest.raises(ValueError, match="chunk"):
        load_transformers_encodec(tmp_path)


# ----- audiocraft import -----

AUDIOCRAFT_CASES = {
    "causal_conv_shortcut": (dict(causal=True, true_skip=False, pad_mode="constant", trim_right_ratio=0.5),
                             {"encoder.model.1.shortcut.conv.conv.bias", "decoder.model.3.convtr.convtr.weight_g",
                              "decoder.model.15.conv.conv.weight_v", "encoder.model.1.block.1.conv.conv.weight_v"}),
    "group_norm": (dict(norm="time_group_norm", disable_norm_outer_blocks=1),
                   {"encoder.model.3.conv.norm.weight", "decoder.model.3.convtr.norm.bias",
                    "encoder.model.0.conv.conv.weight", "decoder.model.15.conv.conv.bias"}),
}


@pytest.mark.parametrize("case", list(AUDIOCRAFT_CASES))
def test_audiocraft_round_trip(case: str, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    overrides, expected_names = AUDIOCRAFT_CASES[case]
    codec = Codec.build(sample_rate=32000, dimension=16, n_filters=4, ratios=[8, 5, 4, 4], n_q=4, card=64,
                              **overrides)
    codec.train()(0.1 * torch.randn(2, 1, 6400))  # k-means and EMA give every buffer a non-trivial value
    with torch.no_grad():
        for name, p in codec.named_parameters():
            if name.endswith(("original0", "norm.weight")):
                p.mul_(torch.empty_like(p).uniform_(0.5, 2.0))
    codec.eval()
    path = export_audiocraft_encodec(codec, tmp_path / "compression_state_dict.bin")
    package = torch.load(path, weights_only=True)
    assert isinstance(package["xp.cfg"], str)
    rvq = yaml.safe_load(package["xp.cfg"])["rvq"]  # audiocraft names the codebook size bins
    assert rvq["bins"] == codec.card == 64 and "card" not in rvq
    names = set(package["best_state"])
    assert expected_names | {"encoder.model.13.lstm.weight_ih_l1", "quantizer.vq.layers.3._codebook.embed_avg",
                             "quantizer.vq.layers.0._codebook.inited"} <= names
    assert package["best_state"]["quantizer.vq.layers.0._codebook.inited"].dtype == torch.float32

    imported = load_audiocraft_encodec(path)
    assert imported.config == codec.config
    for key, value in codec.state_dict().items():
        assert key == "quantizer.steps" or torch.equal(imported.state_dict()[key], value), key
    wav = torch.randn(1, 1, 7000)
    with torch.no_grad():
        assert torch.equal(imported(wav).recon, codec(wav).recon)

    # An OmegaConf object in the file needs trust; a bare state dict needs a config.
    cfg = OmegaConf.create(package["xp.cfg"])
    pickled = tmp_path / "pickled.bin"
    torch.save({**package, "xp.cfg": cfg}, pickled)
    with pytest.raises(ValueError, match=r"pickled\.bin.*trust=True"):
        load_audiocraft_encodec(pickled)
    assert load_audiocraft_encodec(pickled, trust=True).config == codec.config
    bare = tmp_path / "bare.bin"
    torch.save(package["best_state"], bare)
    assert load_audiocraft_encodec(bare, config=codec.config).config == codec.config
