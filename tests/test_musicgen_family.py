"""The MusicGen family on token shards: the token loader, the text conditioner, the masked LM loss, and a real
`ostinato train experiment=musicgen_tiny` run that overfits a repeated token pattern."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch
import transformers
import webdataset as wds

from ostinato.data.token_datamodule import TokenBatch, TokenDataModule
from ostinato.data.tokens import CodecInfo, TokenManifest, TokenShard, encode_codes
from ostinato.families.musicgen import MusicGenFamily
from ostinato.nn.conditioners import TextConditioner, description
from tests.runner import train, xp_folder

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

CODEC = CodecInfo(id="synthetic", hash="0", sample_rate=24000, channels=1, frame_rate=75.0, n_q=4, card=256)
TINY_LM = {"preset": "tiny", "dim": 32, "num_heads": 2, "num_layers": 1, "ffn_dim": 64}
META = {"caption": "A baroque chorale for organ.", "genre": "baroque chorale", "instruments": ["organ", "choir"],
        "bpm": 92, "key": "G major"}


def pattern_codes(frames: int, n_q: int = 4, period: int = 8) -> torch.Tensor:
    """A short repeating pattern: codebook k, frame t -> (t % period) * 3 + 11 k."""
    t = torch.arange(frames)
    return torch.stack([(t % period) * 3 + 11 * k for k in range(n_q)])


def write_token_shards(folder: Path, frames: list[int], *, per_shard: int = 4, fixed: bool = False,
                       first_index: int = 0) -> TokenManifest:
    """Token shards in ``ostinato tokenize``'s layout: item i has ``frames[i]`` frames and caption 'clip i'."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(len(frames) + first_index)
    shards = []
    for s in range(0, len(frames), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        chunk = frames[s:s + per_shard]
        with wds.TarWriter(str(folder / name)) as w:
            for j, f in enumerate(chunk):
                i = first_index + s + j
                codes = pattern_codes(f) if fixed else torch.randint(0, 256, (4, f), generator=gen)
                meta = {**META, "caption": f"clip {i}", "index": i, "frames": f, "frame_rate": 75.0}
                w.write({"__key__": f"s{i:05d}", "codes.npy": encode_codes(codes), "json": json.dumps(meta).encode()})
        shards.append(TokenShard(name=name, samples=len(chunk), frames=sum(chunk)))
    manifest = TokenManifest(shards=shards, codec=CODEC)
    manifest.save(folder)
    return manifest


# -- data ----------------------------------------------------------------------------------------------------
def test_token_datamodule_ranks_get_equal_batches_of_different_samples(tmp_path):
    # 16 training items: 12 long ones, 2 a bit short (padded), 2 under half a segment (dropped)
    frames = [100] * 12 + [30, 30, 10, 10]
    write_token_shards(tmp_path / "train", frames)
    write_token_shards(tmp_path / "valid", [50, 20, 60, 80, 90], first_index=100)
    per_rank = []
    for rank in (0, 1):
        dm = TokenDataModule(tmp_path / "train", tmp_path / "valid", segment_seconds=0.5, batch_size=4,
                             batches_per_epoch=6, num_workers=0, shuffle_buffer=4, rank=rank, world_size=2)
        dm.setup("fit")
        assert dm.codec.n_q == 4 and dm.codec.card == 256 and dm.codec.frame_rate == 75.0
        batches = list(dm.train_dataloader())
        evals = list(dm.val_dataloader())
        per_rank.append((batches, evals))
        assert len(batches) == 6
        b = batches[0]
        assert isinstance(b, TokenBatch) and b.codes.shape == (2, 4, 38) and b.codes.dtype == torch.int64
        assert b.mask.shape == (2, 38)
        lengths = torch.cat([x.lengths for x in batches])
        assert set(lengths.tolist()) <= {38, 30}  # 10-frame items are dropped, 30-frame ones padded
        for x in batches:
            for codes, n in zip(x.codes, x.lengths):
                assert bool((codes[:, n:] == 0).all())
        assert all(x.captions == [f"clip {m['index']}" for m in x.meta] for x in batches)
    (b0, e0), (b1, e1) = per_rank
    keys0 = [m["__key__"] for x in b0 for m in x.meta]
    keys1 = [m["__key__"] for x in b1 for m in x.meta]
    assert keys0 != keys1
    # evaluation: 5 items -> 2 per rank, crops from frame 0, the same count on both ranks
    assert sum(len(x) for x in e0) == sum(len(x) for x in e1) == 2
    idx0 = [m["index"] for x in e0 for m in x.meta]
    idx1 = [m["index"] for x in e1 for m in x.meta]
    assert set(idx0).isdisjoint(idx1) and all(m["offset_frames"] == 0 for x in e0 for m in x.meta)
    assert e0[0].lengths.tolist() == [38, 38] and e1[0].lengths.tolist() == [20, 38]


def test_token_datamodule_rejects_splits_from_different_codecs(tmp_path):
    write_token_shards(tmp_path / "train", [100] * 4)
    other = write_token_shards(tmp_path / "valid", [100] * 4)
    other.codec = CodecInfo(**{**CODEC.__dict__, "n_q": 8})
    other.save(tmp_path / "valid")
    dm = TokenDataModule(tmp_path / "train", tmp_path / "valid", segment_seconds=0.5, batch_size=2,
                         num_workers=0)
    with pytest.raises(ValueError, match="same codec"):
        dm.setup("fit")


# -- text ----------------------------------------------------------------------------------------------------
def test_description_merges_fields_and_drops_them():
    assert description(META) == ("A baroque chorale for organ. genre: baroque chorale. instruments: organ, choir. "
                                 "bpm: 92. key: G major")
    assert description({"genre": "folk", "bpm": 120.0}) == "genre: folk. bpm: 120"
    assert description(META, random.Random(0), field_dropout=1.0) == "A baroque chorale for organ"
    assert description({}) == ""


def test_text_conditioner_loads_minilm_offline():
    cond = TextConditioner(dim=24, max_length=16)
    texts = ["a baroque chorale for organ", "an irish reel on fiddle and flute at a fast tempo", ""]
    out, mask = cond(texts)
    counts = [len(cond.tokenizer(t)["input_ids"]) for t in texts[:2]]
    assert out.shape == (3, max(counts), 24) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == counts + [0]  # the empty (null) condition has an all-False mask
    assert not torch.allclose(out[0, :2], out[1, :2])
    assert bool((out[2] == 0).all()) and bool((out[0, counts[0]:] == 0).all())
    assert [n for n, p in cond.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]
    assert set(cond.state_dict()) == {"proj.weight", "proj.bias"}  # the frozen encoder stays out of checkpoints
    out.sum().backward()
    assert cond.proj.weight.grad is not None


# -- loss ----------------------------------------------------------------------------------------------------
def test_loss_counts_only_valid_positions():
    torch.manual_seed(0)
    family = MusicGenFamily(n_q=4, card=256, lm=TINY_LM, text=None)
    codes = torch.randint(0, 256, (2, 4, 10))
    lengths = torch.tensor([10, 6])
    ce, count = family.compute_losses(codes, lengths)
    assert ce.shape == (4,) and count.tolist() == [16] * 4 and torch.isfinite(ce).all()
    changed = codes.clone()
    changed[1, :, 6:] = torch.randint(0, 256, (4, 4))  # past item 1's length: neither target nor context
    assert torch.equal(family.compute_losses(changed, lengths)[0], ce)
    changed[1, 2, 3] = (codes[1, 2, 3] + 1) % 256  # a valid code: the loss moves
    assert not torch.equal(family.compute_losses(changed, lengths)[0], ce)
    # a null text condition equals no cross-attention input at all
    cfg_family = MusicGenFamily(n_q=4, card=256, lm={**TINY_LM, "cross_attention": True}, text=None)
    null = torch.zeros(2, 3, 32)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[:, 0] = True
    assert torch.allclose(cfg_family.compute_losses(codes, lengths, null, mask)[0],
                          cfg_family.compute_losses(codes, lengths)[0], atol=1e-6)


def test_family_checks_codebooks_against_the_token_manifest(tmp_path):
    write_token_shards(tmp_path / "train", [100] * 4)
    dm = TokenDataModule(tmp_path / "train", segment_seconds=0.5, batch_size=2, num_workers=0)
    family = MusicGenFamily(n_q=4, card=128, lm=TINY_LM, text=None)
    family._trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(ValueError, match=r"family.card=128 .* card=256; set family.card=256"):
        family.setup("fit")
    ok = MusicGenFamily(n_q=4, card=256, lm=TINY_LM, text=None)
    ok._trainer = SimpleNamespace(datamodule=dm)
    ok.setup("fit")
    assert ok.sample_rate == 24000


# -- end to end ----------------------------------------------------------------------------------------------
def test_musicgen_tiny_trains_and_overfits_a_repeated_pattern(env, tmp_path):
    data = tmp_path / "data"
    for i, split in enumerate(("train", "valid", "test")):
        write_token_shards(data / "demo" / "tokens" / split, [80] * 8, fixed=True, first_index=100 * i)
    run_env = {**env, "OSTINATO_DATA": str(data), "OSTINATO_OUTPUTS": str(tmp_path / "out"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = ["experiment=musicgen_tiny", "trainer.max_steps=40", "trainer.checkpoint_every_steps=40",
           "data.batches_per_epoch=20", "data.eval_batch_size=4", "family.lm.num_layers=2",
           "family.cfg_dropout=0.0", "ema.decay=0.9", "trainer.limit_val_batches=1"]
    train(run_env, *run)
    folder = xp_folder(run_env, *run)
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 40
    assert not any(k.startswith("text.encoder") for k in ckpt["state_dict"])
    history = json.loads((folder / "history.json").read_text())
    valid_ce = [float(e["valid"]["ce"]) for e in history if "ce" in e.get("valid", {})]
    assert len(valid_ce) >= 2 and all(torch.isfinite(torch.tensor(valid_ce)))
    assert valid_ce[-1] < valid_ce[0] - 1.0  # the untrained baseline (ln 256 = 5.5) against the trained model
    with open(folder / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    first, last = float(rows[0]["train/loss"]), float(rows[-1]["train/loss"])
    assert last < 0.5 * first, (first, last)
    assert all(rows[-1].get(f"train/ce_q{k}") and rows[-1].get(f"train/ppl_q{k}") for k in range(4))

    # text -> audio through the CLI, decoded by a codec of the same code layout (4 x 256 at 75 Hz)
    torch.manual_seed(0)
    hf = transformers.EncodecConfig(sampling_rate=24000, audio_channels=1, num_filters=8,
                                    upsampling_ratios=[8, 5, 4, 2], codebook_size=256, hidden_size=16,
                                    codebook_dim=16, num_lstm_layers=1, target_bandwidths=[2.4],
                                    use_causal_conv=False, normalize=False)
    transformers.EncodecModel(hf).save_pretrained(tmp_path / "codec")
    outs = []
    for name in ("gen_a", "gen_b"):
        cmd = [sys.executable, "-m", "ostinato.cli", "generate", "--model", str(folder), "--codec",
               str(tmp_path / "codec"), "--prompt", "a baroque chorale for organ", "--unconditional", "1",
               "--seconds", "1.0", "--seed", "7", "--top-k", "20", "--out", str(tmp_path / name)]
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(tmp_path / name)
    for i in range(2):
        wav, sr = sf.read(outs[0] / f"{i:03d}.wav")
        assert sr == 24000 and wav.shape == (24000,) and abs(wav).max() > 0
        meta = json.loads((outs[0] / f"{i:03d}.json").read_text())
        assert meta["seed"] == 7 and meta["top_k"] == 20 and meta["cfg_scale"] == 3.0
        assert (outs[0] / f"{i:03d}.wav").read_bytes() == (outs[1] / f"{i:03d}.wav").read_bytes()  # seeded
