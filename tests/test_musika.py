"""The Musika family: spectrogram autoencoder, latent array shards, the latent GAN (hinge + adaptive R1), seamless
parallel-window generation of ten minutes, and train / resume / export / generate / eval through the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from ostinato.data.arrays import ArrayBatch, ArrayDataModule, ArrayManifest
from ostinato.families.musika import MusikaAutoencoderFamily, MusikaFamily
from ostinato.generation.musika import seam_statistics
from ostinato.metrics.fad import FrechetAudioDistance
from ostinato.models.musika import (Musika, MusikaGenerator, SpectralAutoencoder, coordinate_field, istft_same,
                                    window_coordinates)
from tests.runner import cli, train, xp_folders
from tests.synth import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast, and never stalls a busy core

SR = 24000
AE = dict(hop=240, dimension=16, n_filters=16, ratios=[4, 2])  # 12.5 latent frames / s
GAN = dict(generator=dict(coord_dim=16, style_dim=16, channels=48, up_ratios=[2, 2], up_channels=[32, 32], blocks=2,
                          dilations=[1, 2]), discriminator=dict(channels=[32, 32, 32]))


def tones(n: int, seconds: float, seed: int) -> torch.Tensor:
    """``[n, 1, T]`` sums of two steady tones with random pitches and levels."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(round(seconds * SR)) / SR
    f = 110 * 2 ** (torch.rand(n, 2, 1, generator=g) * 3)
    a = 0.1 + 0.2 * torch.rand(n, 2, 1, generator=g)
    return (a * torch.sin(2 * torch.pi * f * t)).sum(1, keepdim=True)


# -- building blocks ----------------------------------------------------------------------------------------------
def test_istft_inverts_the_stft_framing_and_chunked_decoding_matches():
    import torch.nn.functional as F

    x = 0.1 * torch.randn(2, 4800)
    n_fft, hop = 960, 240
    pad = (n_fft - hop) // 2
    spec = torch.stft(F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0], n_fft, hop,
                      window=torch.hann_window(n_fft), center=False, return_complex=True)
    assert spec.shape[-1] == 4800 // hop
    assert (istft_same(spec, n_fft, hop) - x).abs().max() < 1e-5
    torch.manual_seed(0)
    ae = SpectralAutoencoder(SR, **AE).eval()
    assert ae.hop_length == 1920 and ae.frame_rate == 12.5
    wav = tones(2, 1.0, 0)
    with torch.no_grad():
        out = ae(wav)
        assert out.recon.shape == wav.shape and out.latents.shape == (2, 16, 13) and out.latents.abs().max() <= 1
        assert out.logmag.shape == out.target.shape == (2, 481, 13 * 8)
        z = torch.tanh(torch.randn(1, 16, 50))
        whole, chunked = ae.decode(z), ae.decode_chunked(z, chunk=7)
    assert whole.shape == (1, 1, 50 * 1920) and (whole - chunked).abs().max() < 1e-5 * whole.abs().max() + 1e-7


def test_windows_with_their_halo_are_exact_crops_of_the_whole_field():
    torch.manual_seed(0)
    g = MusikaGenerator(dimension=16, **GAN["generator"]).eval()
    anchors, style = torch.randn(2, 16, 12), torch.randn(2, 16)
    length, spacing = 4, 6
    starts = [g.halo + i * length for i in range(8)]
    with torch.no_grad():
        whole = g(coordinate_field(anchors, spacing, 0, 60), style)
        coords = window_coordinates(anchors, spacing, starts, length, g.halo)
        windows = g.windows(coords, style.repeat_interleave(len(starts), dim=0))
    stitched = windows.view(2, 8, 16, -1).permute(0, 2, 1, 3).reshape(2, 16, -1)
    lo = g.halo * g.upsample
    assert (stitched - whole[..., lo:lo + 8 * length * g.upsample]).abs().max() < 1e-5
    # the field passes through its anchors and keeps a Gaussian vector's norm
    field = coordinate_field(anchors, spacing, 0, 60)
    assert torch.allclose(field[..., ::spacing], anchors[..., :10], atol=1e-5)


def test_the_model_finds_its_autoencoder_and_refuses_a_wrong_one(tmp_path):
    from ostinato.models.musika import recorded_autoencoder

    (tmp_path / "export" / "ae").mkdir(parents=True)
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "manifest.json").write_text(json.dumps({"model": {"id": "//sig/abc"}}))
    assert recorded_autoencoder({"family": {"autoencoder": "ae"}}, tmp_path / "export") == str(tmp_path / "export/ae")
    assert recorded_autoencoder({"family": {"autoencoder": "ae"}}, None) == "ae"  # relative to the working dir
    assert recorded_autoencoder({"family": {}, "data": {"train": str(tmp_path / "latents")}}) == "//sig/abc"
    assert recorded_autoencoder({"family": {}, "data": {"train": str(tmp_path)}}) is None
    model = Musika.build(16, 16, GAN["generator"])
    assert model.coarse_window == 4 and model.anchor_spacing == 4 and model.dimension == 16
    with pytest.raises(ValueError, match="multiple of the generator's upsampling 4"):
        Musika.build(16, 18, GAN["generator"])
    with pytest.raises(ValueError, match="no autoencoder recorded"):
        model.generate(1.0)
    model.latent_rate.fill_(25.0)
    with pytest.raises(ValueError, match="trained on latents at 25 Hz but the autoencoder's are at 12.5 Hz"):
        model.attach(SpectralAutoencoder(SR, **AE))
    with pytest.raises(ValueError, match="not a Musika autoencoder"):
        model.attach(torch.nn.Linear(2, 2))
    model.latent_rate.fill_(12.5)
    ae = SpectralAutoencoder(SR, **AE)
    model.attach(ae).to(torch.float64)  # the attached autoencoder moves along
    assert next(model.autoencoder.parameters()).dtype == torch.float64 and model.autoencoder is ae
    assert model.float().generate(0.5, seed=0).shape == (1, 1, SR // 2)
    assert set(model.state_dict()) == {"latent_rate"} | {f"generator.{k}" for k in model.generator.state_dict()}


def test_adaptive_gradient_penalty_follows_the_discriminators_certainty():
    gan = MusikaFamily(dimension=16, window=16, gp_max_weight=10.0, gp_rate=0.1, **GAN)
    assert float(gan.gp_weight) == 10.0
    for _ in range(3):  # D barely separates real from fake: the penalty relaxes
        gan.adapt_gp_weight(torch.tensor([0.1]), torch.tensor([0.0]))
    assert float(gan.gp_weight) == pytest.approx(7.0)
    for _ in range(5):  # D is sure (margin 1.9 of 2): the penalty grows back, capped at the maximum
        gan.adapt_gp_weight(torch.tensor([1.0]), torch.tensor([-0.9]))
    assert float(gan.gp_weight) == pytest.approx(10.0)


# -- training on fixed batches: losses fall ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_autoencoder() -> MusikaAutoencoderFamily:
    torch.manual_seed(0)
    family = MusikaAutoencoderFamily(SR, 1, autoencoder=AE)
    opt = torch.optim.Adam(family.model.parameters(), 2e-3)
    x = tones(8, 0.64, 1)
    history = []
    for step in range(40):
        losses = family.losses(x, family.model(x), adversarial=False)
        total = sum(family.weights[k] * v for k, v in losses.items())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: round(float(v.detach()), 3) for k, v in losses.items()})
    print("autoencoder losses, first -> last:", history[0], "->", history[-1])
    family.history = history
    return family.eval()


def test_autoencoder_losses_fall_on_a_fixed_batch(trained_autoencoder):
    first, last = trained_autoencoder.history[0], trained_autoencoder.history[-1]
    total = lambda h: sum(h[k] * w for k, w in trained_autoencoder.weights.items() if k in h)  # noqa: E731
    assert total(last) < 0.6 * total(first) and last["spec"] < first["spec"]
    assert last["mel"] < 0.7 * first["mel"] and last["stft"] < 0.7 * first["stft"]


class _FixedLatents(L.LightningDataModule):
    def __init__(self, batch: ArrayBatch, steps: int):
        super().__init__()
        self.batch, self.steps = batch, steps

    def train_dataloader(self):
        return DataLoader([self.batch] * self.steps, batch_size=None)


def _fd(gan: MusikaFamily, real: torch.Tensor) -> float:
    fd = FrechetAudioDistance(real.shape[1])
    fd.update(real.transpose(1, 2).reshape(-1, real.shape[1]), real=True)
    with torch.no_grad():
        fake = gan.model.latents(real.shape[-1] * 4, batch=8, seed=1)
    fd.update(fake.transpose(1, 2).reshape(-1, real.shape[1]))
    return float(fd.compute())


@pytest.fixture(scope="module")
def trained_gan(trained_autoencoder) -> MusikaFamily:
    torch.manual_seed(0)
    with torch.no_grad():
        latents = trained_autoencoder.model.encode(tones(16, 2.6, 2))  # [16, 16, 33]
    batch = ArrayBatch({"latents": latents}, {"latents": torch.full((16,), latents.shape[-1])},
                       [{} for _ in range(16)])
    gan = MusikaFamily(dimension=16, window=32, gp_rate=0.01, optim={"name": "adam", "lr": 2e-3, "betas": [0.5, 0.9]},
                       optim_disc={"name": "adam", "lr": 2e-3, "betas": [0.5, 0.9]}, **GAN)
    gan.model.latent_rate.fill_(trained_autoencoder.model.frame_rate)
    before = _fd(gan, latents)
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(gan, datamodule=_FixedLatents(batch, 60))
    gan.fd = (before, _fd(gan, latents))
    print(f"latent Frechet distance to the fixed batch: {before:.4g} -> {gan.fd[1]:.4g}; "
          f"R1 weight {float(gan.gp_weight):.2f}")
    return gan.eval()


def test_gan_moves_towards_the_real_latents(trained_gan):
    before, after = trained_gan.fd
    assert after < 0.5 * before


def test_ten_minutes_have_no_seams_and_the_control_has(trained_autoencoder, trained_gan):
    ae = trained_autoencoder.model
    model = trained_gan.model.attach(ae)
    assert isinstance(model, Musika) and not isinstance(model, L.LightningModule)
    assert set(model.state_dict()) == {"latent_rate"} | {f"generator.{k}" for k in model.generator.state_dict()}
    joint = model.window * ae.hop_length  # samples per window
    phase = model.generator.upsample * ae.hop_length
    params = dict(seed=0, batch_windows=128)
    wav = model.generate(600.0, **params)
    assert wav.shape == (1, 1, 600 * SR) and bool(torch.isfinite(wav).all())
    stitched = seam_statistics(wav[0], SR, joint, phase)
    control = seam_statistics(model.generate(600.0, **params, independent_windows=True)[0], SR, joint, phase)
    print("stitched windows:", stitched)
    print("independent windows (control):", control)
    assert stitched["joints"] > 200
    # joints are like the inside of windows ...
    assert stitched["ks_pvalue"] > 0.01 and stitched["joints_above_p99"] <= 0.03
    # ... and the test sees seams where windows do not share a style and a coordinate field
    assert control["ks_pvalue"] < 1e-4 and control["joint_median"] > control["inside_median"]
    again = model.generate(20.0, **params)  # seeded: a shorter piece is the same beginning
    assert torch.allclose(again[..., :15 * SR], wav[..., :15 * SR], atol=1e-5)


# -- through the CLI ---------------------------------------------------------------------------------------------
AE_CLI = ["experiment=musika_autoencoder_tiny", "family.autoencoder.n_filters=8", "family.autoencoder.dimension=8",
          "data.segment_seconds=0.64", "data.eval_segment_seconds=1.0", "data.eval_batch_size=8",
          "trainer.validate_first=false", "data.batches_per_epoch=3"]  # an epoch ends at step 3: validation runs
GAN_CLI = ["experiment=musika_tiny", "family.dimension=8", "family.window=8", "family.generator.channels=32",
           "family.generator.up_channels=[16,16]", "family.discriminator.channels=[16,16]", "data.segment_seconds=0.64",
           "data.eval_segment_seconds=1.0", "data.eval_batch_size=8", "trainer.validate_first=false",
           "data.batches_per_epoch=3"]  # an epoch ends at step 3: validation runs


def test_cli_trains_resumes_exports_encodes_generates_and_evaluates(env, tmp_path, capsys):
    from ostinato.encoding.arrays import encode_shards
    from ostinato.engine.weights import export
    from ostinato.evaluation.runner import run_suite
    from tests.synth import write_tiny_encodec

    data = Path(env["OSTINATO_DATA"]) / "demo"
    ae_folder, folder, folder6 = xp_folders(env, [*AE_CLI, "trainer.max_steps=3"], [*GAN_CLI, "trainer.max_steps=3"],
                                             [*GAN_CLI, "trainer.max_steps=6"])
    train(env, *AE_CLI, "trainer.max_steps=3")
    export(ae_folder, tmp_path / "ae")  # what `ostinato export` runs

    # latents: one array shard per audio shard, a corrupt sample skipped and counted, a crashed run resumed at
    # the first unfinished shard, complete folders kept
    write_shards(tmp_path / "bad", n_shards=2, per_shard=4, sample_rate=SR, corrupt={2})
    out = tmp_path / "bad_latents"
    m = encode_shards(str(tmp_path / "ae"), tmp_path / "bad", out, progress=False)
    assert m.total_samples == 7 and m.source["skipped"] == 1 and m.streams["latents"].channels == 8
    for name in ("shard-000001.tar", "shard-000001.json", "manifest.json"):  # as if killed while writing shard 1
        (out / name).unlink()
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    m = encode_shards(str(tmp_path / "ae"), tmp_path / "bad", out, progress=False)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept and (out / "shard-000001.tar").is_file()
    assert m.total_samples == 7 and m.source["skipped"] == 1
    with pytest.raises(FileExistsError, match="--overwrite"):
        encode_shards(str(tmp_path / "ae"), tmp_path / "bad", tmp_path / "bad_latents", progress=False)
    for split in ("train", "valid", "test"):
        encode_shards(str(tmp_path / "ae"), data / "shards" / split, data / "latents" / split, progress=False)
    manifest = ArrayManifest.load(data / "latents" / "train")
    assert manifest.model.kind == "musika_autoencoder" and manifest.streams["latents"].rate == 12.5
    dm = ArrayDataModule(data / "latents" / "train", segment_seconds=0.64, batch_size=4, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch.arrays["latents"].shape == (4, 8, 8) and batch.arrays["latents"].dtype == torch.float32

    train(env, *GAN_CLI, "trainer.max_steps=3")
    # resume mid-way: the 3-step checkpoint placed in the 6-step experiment's folder continues to step 6 with both
    # optimizers, the adaptive R1 weight and the EMA restored
    first = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    (folder6 / "checkpoints").mkdir(parents=True)
    shutil.copy(folder / "checkpoints" / "last.ckpt", folder6 / "checkpoints" / "last.ckpt")
    resumed = train(env, *GAN_CLI, "trainer.max_steps=6")
    assert "resuming" in resumed.stderr
    last = torch.load(folder6 / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 3 and last["global_step"] == 6 and len(last["optimizer_states"]) == 2
    assert not torch.equal(last["state_dict"]["gp_weight"], torch.tensor(10.0))  # the switch kept moving
    export(folder, tmp_path / "gan")
    out = tmp_path / "gen"
    cli(env, "generate", "--family", "musika", "--model", str(tmp_path / "gan"), "--seconds", "20", "--seed", "3",
         "--out", str(out), "--quiet")
    wav, sr = sf.read(out / "000.wav", dtype="float32")
    record = json.loads((out / "000.json").read_text())
    own = tmp_path / "gan" / "autoencoder"  # the export carries the autoencoder its latents record
    assert (own / "model.safetensors").is_file() and (tmp_path / "gan" / "config.yaml").read_text().count(
        "autoencoder: autoencoder") == 1
    assert sr == SR and wav.shape == (20 * SR,) and record["autoencoder"] == str(own)
    import ostinato

    ae = ostinato.load(tmp_path / "ae")  # the inference models, no Lightning
    assert type(ae) is SpectralAutoencoder and not isinstance(ae, L.LightningModule)
    model = ostinato.load(tmp_path / "gan")
    assert type(model) is Musika and model.frame_rate == 12.5 and model.autoencoder_ref == str(own)
    assert "autoencoder" not in "".join(model.state_dict())  # attached on first use, never part of the weights
    clip = model.generate(2.0, seed=3)  # its autoencoder, loaded on first use
    assert clip.shape == (1, 1, 2 * SR) and isinstance(model.autoencoder, SpectralAutoencoder)
    shutil.copytree(tmp_path / "gan", tmp_path / "moved" / "gan")  # relocatable: the copy decodes with its own
    (tmp_path / "ae").rename(tmp_path / "ae_away")
    try:
        assert torch.equal(ostinato.load(tmp_path / "moved" / "gan").generate(2.0, seed=3), clip)
    finally:
        (tmp_path / "ae_away").rename(tmp_path / "ae")
    from ostinato.nn.decoding import GenerationParams
    from ostinato.generation.musika import generate_clips
    from ostinato.generation.request import GenerationRequest

    def request(**kw):
        return GenerationRequest(model=str(tmp_path / "gan"), **kw)

    with pytest.raises(ValueError, match="unconditional"):
        generate_clips(request(prompts=["x"]), lambda done, total: None)
    clips = {}
    for t in (0.5, 2.0, None):
        wav_t, _, (rec,) = generate_clips(request(prompts=[], duration=2, params=GenerationParams(seed=3),
                                                  truncation=t), lambda done, total: None)
        clips[t] = wav_t
        assert rec["truncation"] == float(t or 2)
    assert not torch.equal(clips[0.5], clips[2.0])  # the bound reaches the latents
    assert torch.equal(clips[None], clips[2.0])  # the default is Musika's 2
    assert torch.allclose(clips[None], clip, atol=1e-6)  # generate_clips is the model's generate
    with pytest.raises(ValueError, match="--truncation"):
        generate_clips(request(prompts=[], truncation=-1.0), lambda done, total: None)
    from ostinato.cli import main

    with pytest.raises(SystemExit) as exit_:  # a Musika flag given to another family is refused, not ignored
        main(["generate", "--semantic", "s", "--coarse", "c", "--fine", "f", "--truncation", "1", "--out",
              str(tmp_path / "x")])
    assert exit_.value.code == 2 and "--truncation is a Musika setting" in capsys.readouterr().err

    encodec = write_tiny_encodec(tmp_path / "encodec")
    result = run_suite("musika_demo", str(tmp_path / "gan"), tmp_path / "eval", progress=False,
                       overrides=["num_samples=2", "seconds=1.0", f"embedding=codec:{encodec}",
                                  f"reference={data / 'shards' / 'test'}"],
                       cache=tmp_path / "cache")
    assert result["kind"] == "unconditional" and result["settings"]["family"] == "musika"
    # the seed diversity is in every Musika eval (a collapsed GAN: log-mel cosine near 1 whatever its FAD)
    assert result["metrics"]["diversity_pairs"] == 1
    assert -1 <= result["metrics"]["diversity_spectral_sim_mean"] <= 1
    assert result["metrics"]["fad"] >= 0 and len(list((tmp_path / "eval" / "generated").glob("*.wav"))) == 2
