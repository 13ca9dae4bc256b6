"""The codec family through the engine: DDP keeps codebooks identical, and tokenize -> decode reproduces the
codec's own reconstructions (for an ostinato codec and for an imported transformers EnCodec)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

import ostinato
from ostinato.data.tokens import TokenManifest, iter_token_samples
from ostinato.interop.codecs import load_codec
from ostinato.models.codec import Codec
from ostinato.data.shards import iter_shard_samples
from ostinato.encoding.tokens import tokenize
from tests.runner import train, xp_folder

TINY = ["family=codec_tiny", "optim=adam_gan", "data.segment_seconds=0.25", "trainer.gradient_clip_val=0",
        "family.disc_warmup_steps=2", "family.codec.card=32", "ema.decay=0.9"]


def test_ddp_codec_keeps_codebooks_identical(env, tmp_path):
    dump = tmp_path / "dump"
    train({**env, "OSTINATO_DUMP": str(dump)}, *TINY, "trainer.max_steps=6", "trainer.strategy=ddp",
          "trainer.accelerator=cpu", "family._target_=tests.engine_models.RankDumpCodec", ddp=2)
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 6
    codebooks = [k for k in r0["state"] if "quantizer" in k and k.endswith(("embed", "embed_avg", "cluster_size"))]
    assert len(codebooks) == 3 * 4
    assert all(bool(v) for k, v in r0["state"].items() if k.endswith("inited"))  # k-means ran
    for key, value in r0["state"].items():  # codebooks, generator and discriminator weights alike
        assert torch.equal(value, r1["state"][key]), key


def test_tokenize_then_decode_reproduces_reconstructions(env, tmp_path):
    train(env, *TINY, "trainer.max_steps=4")
    folder = xp_folder(env, *TINY, "trainer.max_steps=4")
    export = tmp_path / "codec"
    subprocess.run([sys.executable, "-m", "ostinato.cli", "export", str(folder), str(export)], env=env,
                   check=True, capture_output=True)
    shards = f"{env['OSTINATO_DATA']}/demo/shards/valid"
    out = tmp_path / "tokens"
    proc = subprocess.run([sys.executable, "-m", "ostinato.cli", "tokenize", shards, str(out), "--codec",
                           str(export), "--workers", "1", "--batch-size", "3"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = TokenManifest.load(out)
    codec = load_codec(export)
    model = ostinato.load(export)  # the inference model, no Lightning
    assert type(model) is Codec and not isinstance(model, L.LightningModule)
    assert torch.equal(model.decode(torch.zeros(1, 4, 3, dtype=torch.long)),
                       codec.decode(torch.zeros(1, 4, 3, dtype=torch.long)))
    assert manifest.codec.frame_rate == codec.frame_rate == 75 and manifest.codec.n_q == 4
    assert manifest.total_samples == 16
    audio = {key: wav for shard in sorted(Path(shards).glob("*.tar"))
             for key, wav, _, _ in iter_shard_samples(shard)}
    checked = 0
    for shard in manifest.shards:
        for key, codes, meta in iter_token_samples(str(out / shard.name)):
            wav = audio[key][None]
            with torch.no_grad():
                recon = codec(wav).recon
                decoded = codec.decode(codes[None])[..., : wav.shape[-1]]
            assert meta["frames"]["codes"] == codes.shape[-1] == codec.num_frames(wav.shape[-1])
            assert (decoded - recon).abs().max() < 1e-5
            checked += 1
    assert checked == 16
    again = subprocess.run([sys.executable, "-m", "ostinato.cli", "tokenize", shards, str(out), "--codec",
                            str(export)], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_tokenize_with_an_imported_transformers_encodec(env, tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.EncodecConfig(sampling_rate=24000, audio_channels=1, num_filters=8,
                                     upsampling_ratios=[8, 5, 4, 2], codebook_size=64, hidden_size=16,
                                     codebook_dim=16, num_lstm_layers=1, target_bandwidths=[1.8],
                                     use_causal_conv=False, normalize=False)
    transformers.EncodecModel(cfg).save_pretrained(tmp_path / "hf")
    shards = f"{env['OSTINATO_DATA']}/demo/shards/test"
    manifest = tokenize(str(tmp_path / "hf"), shards, tmp_path / "tokens", workers=0, progress=False)
    assert manifest.codec.card == 64 and manifest.total_samples == 16
    first = next(iter_token_samples(str(tmp_path / "tokens" / manifest.shards[0].name)))
    assert first[1].dtype == torch.int64 and int(first[1].max()) < 64 and json.dumps(first[2])

    # two device processes (one shard each) write the same tokens as one process
    split = tokenize(str(tmp_path / "hf"), shards, tmp_path / "tokens2", workers=0, devices=["cpu", "cpu"],
                     progress=False)
    assert [s.name for s in split.shards] == [s.name for s in manifest.shards]
    for shard in manifest.shards:
        one = list(iter_token_samples(str(tmp_path / "tokens" / shard.name)))
        two = list(iter_token_samples(str(tmp_path / "tokens2" / shard.name)))
        assert [k for k, _, _ in one] == [k for k, _, _ in two]
        assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(one, two))


def test_the_gan_step_updates_both_sides_and_counts_generator_steps():
    """CodecFamily through the one GAN step (families/gan.py): after the discriminator's warm-up each batch updates
    the discriminator (its raw optimizer) and the codec; only the codec's updates are training steps."""
    from torch.utils.data import DataLoader

    from ostinato.data.batch import AudioBatch
    from ostinato.families.codec import CodecFamily
    from ostinato.families.gan import GANFamily

    torch.manual_seed(0)
    family = CodecFamily(sample_rate=8000, codec=dict(dimension=8, n_filters=2, ratios=[4, 2], lstm=0, n_q=2, card=16),
                         discriminator={"kinds": ["msstft"], "msstft": {"filters": 2, "max_filters": 4, "n_ffts": [128],
                                                                        "hop_lengths": [32], "win_lengths": [128]}},
                         disc_warmup_steps=2, optim={"name": "adam", "lr": 1e-3})
    assert isinstance(family, GANFamily) and isinstance(family.model, Codec)
    assert not isinstance(family.model, L.LightningModule) and family.sample_rate == 8000
    disc = {k: v.clone() for k, v in family.discriminator.state_dict().items()}
    codec = {k: v.clone() for k, v in family.model.state_dict().items()}
    batch = AudioBatch(0.1 * torch.randn(2, 1, 800), torch.full((2,), 800), ["", ""], [{}, {}])

    def fit(steps: int) -> None:
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(family, DataLoader([batch] * 8, batch_size=None))
        assert trainer.global_step == steps

    fit(2)  # the warm-up: the discriminator waits
    assert all(torch.equal(v, family.discriminator.state_dict()[k]) for k, v in disc.items())
    assert any(not torch.equal(v, family.model.state_dict()[k]) for k, v in codec.items())
    fit(4)
    assert any(not torch.equal(v, family.discriminator.state_dict()[k]) for k, v in disc.items())
