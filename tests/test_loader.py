"""The WebDataset loader: batch shapes, rank splits, resampling, corrupt and missing data."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ostinato.data import AudioBatch, AudioDataModule, resolve_shards
from tests.synth import write_shards


def _dm(spec, **kw) -> AudioDataModule:
    args = dict(train=spec, valid=spec, sample_rate=16000, channels=1, segment_seconds=0.5, batch_size=4,
                batches_per_epoch=5, num_workers=0, shuffle_buffer=8)
    args.update(kw)
    dm = AudioDataModule(**args)
    dm.setup("fit")
    return dm


def _indices(loader) -> list[int]:
    return [m["index"] for b in loader for m in b.meta]


def test_train_batches_have_documented_shapes(shard_dir: Path):
    batches = list(_dm(shard_dir).train_dataloader())
    assert len(batches) == 5
    b = batches[0]
    assert isinstance(b, AudioBatch)
    assert b.audio.shape == (4, 1, 8000) and b.audio.dtype == torch.float32
    assert b.lengths.tolist() == [8000] * 4
    assert b.mask.shape == (4, 8000) and bool(b.mask.all())
    assert b.captions == [f"clip {m['index']}" for m in b.meta]
    assert b.audio.abs().max() > 0.1


def test_workers_split_the_epoch_exactly(shard_dir: Path):
    loader = _dm(shard_dir, num_workers=2, batches_per_epoch=7).train_dataloader()
    assert len(loader) == 7
    assert len(list(loader)) == 7


def test_two_ranks_get_equal_batch_counts_and_different_samples(shard_dir: Path):
    r0 = _dm(shard_dir, rank=0, world_size=2, batch_size=4)
    r1 = _dm(shard_dir, rank=1, world_size=2, batch_size=4)
    b0, b1 = list(r0.train_dataloader()), list(r1.train_dataloader())
    assert len(b0) == len(b1) == 5
    assert b0[0].audio.shape[0] == 2  # global batch 4 over 2 ranks
    assert _indices(b0) != _indices(b1)
    v0, v1 = list(r0.val_dataloader()), list(r1.val_dataloader())
    assert len(v0) == len(v1)
    i0, i1 = _indices(v0), _indices(v1)
    assert len(i0) == len(i1) == 12 and not set(i0) & set(i1)
    assert sorted(i0 + i1) == list(range(24))


def test_indivisible_global_batch_is_refused(shard_dir: Path):
    with pytest.raises(ValueError, match="data.batch_size=5"):
        _dm(shard_dir, rank=0, world_size=2, batch_size=5)


def test_epochs_reseed_and_resume_state_round_trips(shard_dir: Path):
    dm = _dm(shard_dir)
    loader = dm.train_dataloader()
    first, second = _indices(loader), _indices(loader)
    assert first != second
    fresh = _dm(shard_dir)
    fresh.load_state_dict(dm.state_dict())
    third = _indices(dm.train_dataloader())
    assert _indices(fresh.train_dataloader()) == third


def test_validation_is_fixed_and_in_order(shard_dir: Path):
    dm = _dm(shard_dir, eval_batch_size=5)
    first, again = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert [len(b) for b in first] == [5, 5, 5, 5, 4]
    assert _indices(first) == list(range(24)) == _indices(again)
    assert torch.equal(first[0].audio, again[0].audio)


def test_resampling_and_channel_conversion(tmp_path: Path):
    write_shards(tmp_path / "s", sample_rate=8000, channels=1, n_shards=1)
    b = next(iter(_dm(tmp_path / "s", sample_rate=24000, channels=2).train_dataloader()))
    assert b.audio.shape == (4, 2, 12000)
    assert torch.equal(b.audio[:, 0], b.audio[:, 1])
    # the tone keeps its pitch after resampling: the spectral peak sits at the sample's frequency
    freq = 100 + 10 * b.meta[0]["index"]
    spec = torch.fft.rfft(b.audio[0, 0]).abs()
    assert abs(spec.argmax().item() * 24000 / 12000 - freq) <= 2


def test_short_samples_are_padded_or_dropped(tmp_path: Path):
    lengths = [0.2, 0.4, 1.0, 0.1] * 2
    write_shards(tmp_path / "s", n_shards=1, seconds=lengths)
    batches = list(_dm(tmp_path / "s", min_segment_ratio=0.5, segment_seconds=0.5).train_dataloader())
    seen = {m["index"] for b in batches for m in b.meta}
    assert seen <= {1, 2, 5, 6}  # 0.2 s and 0.1 s are under half of 0.5 s
    for b in batches:
        for n, m, row in zip(b.lengths.tolist(), b.meta, b.mask):
            assert n == (6400 if lengths[m["index"]] == 0.4 else 8000)
            assert int(row.sum()) == n


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, caplog):
    write_shards(tmp_path / "s", n_shards=1, per_shard=8, corrupt={2, 5})
    dm = _dm(tmp_path / "s", batches_per_epoch=6)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
    assert len(batches) == 6
    assert not {2, 5} & set(_indices(batches))
    assert sum(b.skipped for b in batches) >= 2
    assert "skipped corrupt data" in caplog.text
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 8
    zero = [n for b in val for n, m in zip(b.lengths.tolist(), b.meta) if m.get("corrupt")]
    assert zero == [0, 0]


def test_missing_shard_is_named(shard_dir: Path):
    spec = str(shard_dir / "shard-{000000..000004}.tar")
    with pytest.raises(FileNotFoundError, match="shard-000003.tar"):
        resolve_shards(spec)
    (shard_dir / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        _dm(shard_dir)


def test_brace_specs_lists_and_pipe_urls(shard_dir: Path):
    src = resolve_shards([str(shard_dir / "shard-{000000..000001}.tar"), shard_dir / "manifest.json"])
    assert len(src.urls) == 5 and src.num_samples is None
    pipe = f"pipe:cat {shard_dir}/shard-000000.tar"
    dm = _dm(pipe, valid=pipe)
    assert _indices(dm.val_dataloader()) == list(range(8))
