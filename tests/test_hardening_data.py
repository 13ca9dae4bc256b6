"""Issue 16, item 1 (data): damaged, missing and corrupt data ends in a count or one line, never a traceback wall."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from ostinato.data import AudioDataModule
from ostinato.data.streams import WARN_FIRST, DataError, TrainStream
from ostinato.engine.callbacks import Throughput
from tests.runner import make_env, train, xp_folder
from tests.synth import write_shards


def _dm(spec, **kw) -> AudioDataModule:
    args = dict(train=spec, valid=spec, sample_rate=16000, channels=1, segment_seconds=0.5, batch_size=4,
                batches_per_epoch=5, num_workers=0, shuffle_buffer=8)
    args.update(kw)
    dm = AudioDataModule(**args)
    dm.setup("fit")
    return dm


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _readable(path: Path) -> int:
    """Samples of a (possibly truncated) tar that can still be read."""
    from ostinato.data.sources import iter_raw_samples

    n = 0
    try:
        for _ in iter_raw_samples(str(path)):
            n += 1
    except Exception:  # noqa: BLE001 - the damage ends the count
        pass
    return n


# ------------------------------------------------------------------------------------------ validation split


@pytest.mark.parametrize("spec", ["manifest", "brace"])
def test_truncated_eval_tar_is_skipped_and_counted(tmp_path: Path, spec: str):
    write_shards(tmp_path / "s", n_shards=2, per_shard=8)
    _truncate(tmp_path / "s" / "shard-000001.tar")
    lost = 8 - _readable(tmp_path / "s" / "shard-000001.tar")
    assert lost > 0
    where = tmp_path / "s" if spec == "manifest" else str(tmp_path / "s" / "shard-{000000..000001}.tar")
    dm = _dm(where, test=where)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        if spec == "manifest":  # the manifest says 16: the lost samples are blanks of length 0, and counted
            assert sum(len(b) for b in batches) == 16
            assert sum(b.skipped for b in batches) == lost
            assert sum(int((b.lengths == 0).sum()) for b in batches) == lost
        else:  # no manifest: the readable samples are the evaluation set
            assert sum(len(b) for b in batches) == 16 - lost


def test_truncated_eval_tar_is_dealt_equally_over_ranks(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=2, per_shard=8)
    _truncate(tmp_path / "s" / "shard-000000.tar", 0.3)
    counts = []
    for rank in (0, 1):
        dm = _dm(tmp_path / "s", rank=rank, world_size=2, batch_size=4, eval_batch_size=4)
        batches = list(dm.val_dataloader())
        counts.append((sum(len(b) for b in batches), len(batches)))
    assert counts == [(8, 4), (8, 4)]  # 16 samples, 8 per rank, eval_batch_size 4 is 2 per rank


def test_truncated_valid_tar_does_not_stop_training(tmp_path: Path):
    env = make_env(tmp_path)
    _truncate(tmp_path / "data" / "demo" / "shards" / "valid" / "shard-000001.tar")
    lost = 8 - _readable(tmp_path / "data" / "demo" / "shards" / "valid" / "shard-000001.tar")
    run = ["experiment=codec_tiny", "trainer.max_steps=2", "data.batches_per_epoch=2", "data.num_workers=0",
           "data.eval_segment_seconds=0.5", "data.eval_batch_size=8", "trainer.checkpoint_every_steps=0"]
    proc = train(env, *run, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ReadError" not in proc.stderr.split("skipped corrupt data")[0]
    with open(xp_folder(env, *run) / "csv" / "metrics.csv") as f:
        counted = [float(r["data/valid_corrupt_skipped"]) for r in csv.DictReader(f)
                   if r.get("data/valid_corrupt_skipped")]
    assert counted and all(c == lost for c in counted)


# ------------------------------------------------------------------------------------------- training split


def _stream(folder: Path, **kw) -> TrainStream:
    args = dict(sample_rate=16000, channels=1, segment_seconds=0.5, batch_size=2, batches_per_epoch=1000,
                shuffle_buffer=2)
    args.update(kw)
    return TrainStream(sorted(str(p) for p in folder.glob("shard-*.tar")), **args)


def test_truncated_train_tar_counts_every_sample_it_lost(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=1, per_shard=8)
    _truncate(tmp_path / "s" / "shard-000000.tar")
    lost = 8 - _readable(tmp_path / "s" / "shard-000000.tar")
    batches = list(_dm(tmp_path / "s", batches_per_epoch=6, shuffle_buffer=2).train_dataloader())
    skipped = sum(b.skipped for b in batches)
    assert lost >= 2 and skipped >= lost and skipped % lost == 0  # each read of the shard loses the same tail


def test_shard_deleted_while_training_is_named_once_and_the_run_goes_on(tmp_path: Path, caplog):
    write_shards(tmp_path / "s", n_shards=3, per_shard=4)
    batches = iter(_stream(tmp_path / "s"))
    next(batches)
    (tmp_path / "s" / "shard-000001.tar").unlink()
    with caplog.at_level(logging.WARNING):
        indices = {m["index"] for _ in range(40) for m in next(batches).meta}
    gone = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1 and "shard-000001.tar" in gone[0]
    assert {0, 8} <= indices  # both remaining shards still feed the run


def test_every_shard_deleted_stops_with_one_line_naming_the_folder(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=2, per_shard=4)
    batches = iter(_stream(tmp_path / "s"))
    next(batches)
    for p in (tmp_path / "s").glob("shard-*.tar"):
        p.unlink()
    with pytest.raises(DataError, match=f"every shard in {tmp_path / 's'} is gone") as e:
        for _ in range(40):
            next(batches)
    assert "\n" not in str(e.value)


def test_every_sample_corrupt_stops_early_with_few_warnings(tmp_path: Path, caplog):
    write_shards(tmp_path / "s", n_shards=2, per_shard=4, corrupt=set(range(8)))
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as e:
        list(_dm(tmp_path / "s").train_dataloader())
    message = str(e.value)
    assert "every sample" in message and "failed to decode" in message and str(tmp_path / "s") in message
    assert "\n" not in message
    assert len(caplog.records) <= WARN_FIRST + 1


def test_every_truncated_shard_stops_instead_of_looping(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=2, per_shard=4)
    for p in (tmp_path / "s").glob("shard-*.tar"):
        _truncate(p, 0.001)
    with pytest.raises(DataError, match="no sample could be read"):
        next(iter(_stream(tmp_path / "s")))


def test_every_sample_too_short_stops_instead_of_looping(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=1, per_shard=4, seconds=0.1)
    with pytest.raises(DataError, match="data.segment_seconds"):
        next(iter(_stream(tmp_path / "s")))


def test_every_sample_corrupt_stops_training_with_one_line(tmp_path: Path):
    env = make_env(tmp_path)
    for split in ("train", "valid", "test"):
        write_shards(tmp_path / "data" / "demo" / "shards" / split, n_shards=2, per_shard=8, sample_rate=24000,
                     corrupt=set(range(16)))
    proc = train(env, "experiment=codec_tiny", "trainer.max_steps=2", "data.num_workers=1",
                 "trainer.validate_first=false", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "every sample" in last and "failed to decode" in last and "shards/train" in last
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("skipped corrupt data") <= WARN_FIRST


# ---------------------------------------------------------------------------------------- data/corrupt_skipped


class _Counting(L.LightningModule):
    """Records what every batch says it skipped, and what the epoch's logged sum says."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"train": 0, "valid": 0}
        self.logged: dict[str, float] = {}

    def training_step(self, batch, batch_idx):
        self.seen["train"] += batch.skipped
        return (self.w * batch.audio.mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.seen["valid"] += batch.skipped

    def on_train_epoch_end(self) -> None:
        self.logged = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("data/")}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_corrupt_skipped_counts_every_sample_of_the_epoch(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=2, per_shard=16, corrupt=set(range(0, 32, 2)))
    module = _Counting()
    trainer = L.Trainer(max_epochs=1, limit_val_batches=None, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Throughput()], accelerator="cpu")
    trainer.fit(module, datamodule=_dm(tmp_path / "s", batches_per_epoch=12))
    assert module.seen["train"] > 5 and module.seen["valid"] == 16
    assert module.logged["data/corrupt_skipped"] == module.seen["train"]
    assert module.logged["data/valid_corrupt_skipped"] == 16


# ---------------------------------------------------------------------------------------- tokenize and encode


def test_tokenize_counts_every_sample_a_truncated_shard_lost(tmp_path: Path, caplog):
    from ostinato.tokenize import tokenize
    from tests.synth import write_tiny_encodec

    write_shards(tmp_path / "s", n_shards=2, per_shard=6, sample_rate=24000, seconds=0.2, corrupt={1})
    _truncate(tmp_path / "s" / "shard-000001.tar")
    lost = 6 - _readable(tmp_path / "s" / "shard-000001.tar")
    with caplog.at_level(logging.WARNING):
        m = tokenize(str(write_tiny_encodec(tmp_path / "codec")), tmp_path / "s", tmp_path / "t", workers=0,
                     progress=False)
    assert lost >= 2 and m.total_samples == 12 - 1 - lost
    assert m.source["samples"] == m.total_samples and m.source["skipped"] == 1 + lost
    assert m.source["skipped_by_shard"] == {str(tmp_path / "s" / "shard-000000.tar"): 1,
                                            str(tmp_path / "s" / "shard-000001.tar"): lost}
    assert any("shard-000001.tar" in r.getMessage() and f"{lost} samples skipped" in r.getMessage()
               for r in caplog.records)


def test_encode_counts_every_sample_a_truncated_shard_lost(tmp_path: Path):
    from ostinato.encode import encode_shards
    from ostinato.families.musika import MusikaAutoencoderFamily

    write_shards(tmp_path / "s", n_shards=2, per_shard=6, sample_rate=24000, seconds=0.2)
    _truncate(tmp_path / "s" / "shard-000000.tar")
    lost = 6 - _readable(tmp_path / "s" / "shard-000000.tar")
    torch.manual_seed(0)
    ae = MusikaAutoencoderFamily(24000, 1, autoencoder=dict(hop=240, dimension=16, n_filters=16, ratios=[4, 2]))
    m = encode_shards(ae.eval(), tmp_path / "s", tmp_path / "a", progress=False)
    assert lost >= 2 and m.total_samples == 12 - lost
    assert m.source["samples"] == m.total_samples and m.source["skipped"] == lost
