"""Issue 16, item 1 (data): damaged, missing and corrupt data ends in a count or one line, never a traceback wall."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from ostinato.data.streams import WARN_FIRST, DataError, TrainStream
from ostinato.engine.callbacks import Throughput
from tests.disks import tmpfs
from tests.runner import make_env, train, xp_folder
from tests.synth import write_shards
from tests.test_loader import _dm


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
    from ostinato.encoding.tokens import tokenize
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
    from ostinato.encoding.arrays import encode_shards
    from ostinato.families.musika import MusikaAutoencoderFamily

    write_shards(tmp_path / "s", n_shards=2, per_shard=6, sample_rate=24000, seconds=0.2)
    _truncate(tmp_path / "s" / "shard-000000.tar")
    lost = 6 - _readable(tmp_path / "s" / "shard-000000.tar")
    torch.manual_seed(0)
    ae = MusikaAutoencoderFamily(24000, 1, autoencoder=dict(hop=240, dimension=16, n_filters=16, ratios=[4, 2]))
    m = encode_shards(ae.model.eval(), tmp_path / "s", tmp_path / "a", progress=False)
    assert lost >= 2 and m.total_samples == 12 - lost
    assert m.source["samples"] == m.total_samples and m.source["skipped"] == lost


# ------------------------------------------------------------------------------------------------- prep shards


def _audio_folder(folder: Path, seconds: float = 3.0) -> Path:
    """Two intact wavs of a 440 Hz tone with noise (noise keeps the Ogg large enough to cut mid-stream)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(24000 * seconds)) / 24000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype("float32")
    sf.write(folder / "a.wav", x, 24000)
    sf.write(folder / "b.wav", x[::-1].copy(), 24000)
    return folder


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``ostinato ARGV`` in this process: (exit code, stderr)."""
    from ostinato.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_prep_shards_reports_a_cut_ogg_and_a_wav_shorter_than_its_header(tmp_path: Path):
    import soundfile as sf

    from ostinato.data.shards import build_shards

    src = _audio_folder(tmp_path / "src", seconds=6.0)
    x, sr = sf.read(src / "a.wav", dtype="float32")
    sf.write(src / "c.ogg", x, sr, format="OGG", subtype="VORBIS")
    _truncate(src / "c.ogg", 0.4)
    _truncate(src / "b.wav", 0.4)  # the RIFF header still claims 6 s
    m = build_shards(src, tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cut = {e["source"]: e["reason"] for e in report["truncated"]}
    assert set(cut) == {"b.wav", "c.ogg"}
    assert "claims 6.000 s" in cut["b.wav"] and "end-of-stream" in cut["c.ogg"]
    assert all("kept what decodes" in r for r in cut.values())
    assert m.total_samples == 3 and report["skipped"] == []


def test_prep_shards_cli_says_files_were_cut_short(tmp_path: Path, capsys):
    src = _audio_folder(tmp_path / "src")
    _truncate(src / "b.wav", 0.5)
    from ostinato.cli import main

    main(["prep", "shards", str(src), str(tmp_path / "out")])
    assert "1 files cut short (kept what decodes), e.g. b.wav" in capsys.readouterr().out


def test_prep_shards_says_src_is_a_file(tmp_path: Path, capsys):
    src = _audio_folder(tmp_path / "src")
    code, err = _run_cli(capsys, "prep", "shards", str(src / "a.wav"), str(tmp_path / "out"))
    line = _one_line_error(err)
    assert code == 2 and "is a file, not a folder" in line and str(src) in line
    code, err = _run_cli(capsys, "prep", "shards", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2 and "does not exist" in _one_line_error(err)


def test_prep_shards_says_out_is_a_file(tmp_path: Path, capsys):
    src = _audio_folder(tmp_path / "src")
    (tmp_path / "out").write_text("x")
    code, err = _run_cli(capsys, "prep", "shards", str(src), str(tmp_path / "out"))
    assert code == 2 and "is a file, not a folder" in _one_line_error(err)


@pytest.mark.parametrize("argv, flag", [
    (["prep", "shards", "S", "O", "--files-per-shard", "0"], "--files-per-shard"),
    (["prep", "shards", "S", "O", "--workers", "0"], "--workers"),
    (["prep", "shards", "S", "O", "--workers", "-2"], "--workers"),
    (["prep", "shards", "S", "O", "--seconds", "0"], "--seconds"),
    (["prep", "shards", "S", "O", "--overlap", "-1"], "--overlap"),
    (["prep", "shards", "S", "O", "--sample-rate", "0"], "--sample-rate"),
    (["prep", "shards", "S", "O", "--files-per-shard", "many"], "--files-per-shard"),
    (["prep", "corpus", "--hours", "0"], "--hours"),
    (["prep", "corpus", "--seconds", "-1"], "--seconds"),
    (["prep", "corpus", "--files-per-shard", "0"], "--files-per-shard"),
    (["prep", "corpus", "--workers", "0"], "--workers"),
    (["prep", "semantic", "S", "O", "--k", "1"], "--k"),
    (["prep", "semantic", "S", "O", "--frame-rate", "0"], "--frame-rate"),
    (["prep", "semantic", "S", "O", "--iterations", "0"], "--iterations"),
    (["prep", "mulan", "--mulan", "M", "--n-q", "0"], "--n-q"),
    (["prep", "mulan", "--mulan", "M", "--card", "1"], "--card"),
    (["prep", "mulan", "--mulan", "M", "--seconds", "0"], "--seconds"),
    (["tokenize", "S", "O", "--codec", "C", "--batch-size", "0"], "--batch-size"),
    (["tokenize", "S", "O", "--codec", "C", "--workers", "-1"], "--workers"),
    (["tokenize", "S", "O", "--codec", "C", "--n-q", "0"], "--n-q"),
    (["encode", "S", "O", "--model", "M", "--batch-size", "0"], "--batch-size"),
])
def test_out_of_range_numbers_are_refused_before_any_work(capsys, argv: list[str], flag: str):
    code, err = _run_cli(capsys, *argv)
    assert code == 2 and f"argument {flag}" in _one_line_error(err)


def test_overlap_not_below_segment_is_one_line(tmp_path: Path, capsys):
    src = _audio_folder(tmp_path / "src")
    code, err = _run_cli(capsys, "prep", "shards", str(src), str(tmp_path / "out"), "--seconds", "1",
                         "--overlap", "1")
    assert code == 2 and "overlap_seconds must be in [0, segment_seconds)" in _one_line_error(err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_every_file_undecodable_is_one_line_naming_the_report(tmp_path: Path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.wav").write_bytes(b"RIFF not really")
    code, err = _run_cli(capsys, "prep", "shards", str(tmp_path / "src"), str(tmp_path / "out"),
                         "--sample-rate", "24000", "--channels", "mono")
    line = _one_line_error(err)
    assert code == 2 and "every audio file was skipped" in line and "report.json" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_library_checks_the_same_numbers(tmp_path: Path):
    from ostinato.encoding.arrays import encode_shards
    from ostinato.encoding.tokens import tokenize

    with pytest.raises(ValueError, match="--batch-size 0"):
        tokenize("codec", tmp_path, tmp_path / "t", batch_size=0)
    with pytest.raises(ValueError, match="--batch-size 0"):
        encode_shards("model", tmp_path, tmp_path / "a", batch_size=0)


# ------------------------------------------------------------------------- read-only, full disk, interrupted


def test_prep_shards_into_a_read_only_folder_is_one_line(tmp_path: Path, capsys):
    src = _audio_folder(tmp_path / "src")
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        code, err = _run_cli(capsys, "prep", "shards", str(src), str(ro / "out"))
        line = _one_line_error(err)
        assert code == 2 and "read-only file system" in line and str(ro / "out") in line
        code, err = _run_cli(capsys, "prep", "shards", str(src), str(ro))
        line = _one_line_error(err)
        assert code == 2 and "read-only file system" in line and str(ro) in line
        assert list(ro.iterdir()) == []


def test_prep_shards_on_a_full_disk_is_one_line_and_leaves_no_shard(tmp_path: Path, capsys):
    src = _audio_folder(tmp_path / "src", seconds=8.0)  # about 750 kB of FLAC: more than the 256 kB disk
    with tmpfs(tmp_path / "full", "size=256k") as full:
        code, err = _run_cli(capsys, "prep", "shards", str(src), str(full), "--files-per-shard", "1")
        line = _one_line_error(err)
        assert code == 2 and "no space left on device" in line and str(full) in line
        assert not (full / "manifest.json").exists() and not list(full.glob(".*.tmp"))
        for marker in full.glob("shard-*.json"):  # a shard written before the disk filled is complete
            tar = full / json.loads(marker.read_text())["shard"]
            assert tar.stat().st_size == json.loads(marker.read_text())["bytes"]


def test_tokenize_sweeps_temp_files_of_a_killed_run_and_refuses_a_read_only_out(tmp_path: Path, capsys):
    from ostinato.encoding.tokens import tokenize
    from tests.synth import write_tiny_encodec

    write_shards(tmp_path / "s", n_shards=2, per_shard=2, sample_rate=24000, seconds=0.2)
    codec = str(write_tiny_encodec(tmp_path / "codec"))
    out = tmp_path / "t"
    out.mkdir()
    stale = [out / ".shard-000001.tar.k1ll3d.tmp", out / ".shard-000001.json.k1ll3d.tmp"]
    for p in stale:  # what a SIGKILL while writing shard 1 leaves (atomic writes: never the final name)
        p.write_bytes(b"half a shard")
    other = out / "notes.txt"
    other.write_text("mine")
    m = tokenize(codec, tmp_path / "s", out, workers=0, progress=False)
    assert m.total_samples == 4 and not any(p.exists() for p in stale) and other.read_text() == "mine"
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        code, err = _run_cli(capsys, "tokenize", str(tmp_path / "s"), str(ro / "t"), "--codec", codec)
        line = _one_line_error(err)
        assert code == 2 and "read-only file system" in line and str(ro / "t") in line


# ------------------------------------------------------------------------------ wrong inputs of the other verbs


def test_a_file_that_is_no_shard_is_refused(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("not a tar")
    code, err = _run_cli(capsys, "tokenize", str(tmp_path / "notes.txt"), str(tmp_path / "t"), "--codec", "x")
    line = _one_line_error(err)
    assert code == 2 and "is not a shard" in line and "ostinato prep shards" in line


def test_tokenize_of_shards_where_nothing_decodes_is_one_line_and_writes_no_manifest(tmp_path: Path, capsys):
    from tests.synth import write_tiny_encodec

    write_shards(tmp_path / "s", n_shards=1, per_shard=3, sample_rate=24000, corrupt={0, 1, 2})
    code, err = _run_cli(capsys, "tokenize", str(tmp_path / "s"), str(tmp_path / "t"), "--codec",
                         str(write_tiny_encodec(tmp_path / "codec")), "--workers", "0")
    line = _one_line_error(err)
    assert code == 2 and "no sample of" in line and "3 skipped" in line
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_prep_semantic_checks_out_before_fitting(tmp_path: Path, capsys, caplog):
    write_shards(tmp_path / "s", n_shards=1, per_shard=2)
    (tmp_path / "out").write_text("x")
    with caplog.at_level(logging.INFO):
        code, err = _run_cli(capsys, "prep", "semantic", str(tmp_path / "s"), str(tmp_path / "out"), "--k", "2",
                             "--workers", "0")
    assert code == 2 and "is a file, not a folder" in _one_line_error(err)
    assert "k-means pass" not in caplog.text


def test_prep_mulan_checks_out_before_loading(tmp_path: Path, capsys):
    (tmp_path / "shards" / "train").mkdir(parents=True)
    (tmp_path / "out").write_text("x")
    code, err = _run_cli(capsys, "prep", "mulan", "--mulan", "nothing", "--shards", str(tmp_path / "shards"),
                         "--out", str(tmp_path / "out"))
    line = _one_line_error(err)
    assert code == 2 and "--out" in line and "is a file, not a folder" in line


def test_prep_corpus_checks_out_and_the_soundfont_before_rendering(tmp_path: Path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = _run_cli(capsys, "prep", "corpus", "--out", str(tmp_path / "afile"), "--hours", "0.01")
    assert code == 2 and "is a file, not a folder" in _one_line_error(err)
    code, err = _run_cli(capsys, "prep", "corpus", "--out", str(tmp_path / "c"), "--hours", "0.01",
                         "--soundfont", str(tmp_path / "afile"))
    assert code == 2 and "is not a SoundFont 2 (.sf2) file" in _one_line_error(err)
    assert not (tmp_path / "c" / "audio").exists()


def test_tokenize_on_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temp(tmp_path: Path, capsys):
    from tests.synth import write_tiny_encodec

    write_shards(tmp_path / "s", n_shards=4, per_shard=8, sample_rate=24000, seconds=1.0)
    codec = str(write_tiny_encodec(tmp_path / "codec"))
    with tmpfs(tmp_path / "full", "size=24k") as full:
        code, err = _run_cli(capsys, "tokenize", str(tmp_path / "s"), str(full), "--codec", codec, "--workers", "0")
        line = _one_line_error(err)
        assert code == 2 and "no space left on device" in line and str(full) in line and ".tmp" not in line
        assert not list(full.glob(".*.tmp")) and not (full / "manifest.json").exists()


def test_prep_shards_metadata_table_missing_or_of_another_kind_is_one_line(tmp_path: Path, capsys):
    src = _audio_folder(tmp_path / "src")
    code, err = _run_cli(capsys, "prep", "shards", str(src), str(tmp_path / "o1"), "--metadata",
                         str(tmp_path / "absent.csv"))
    assert code == 2 and "absent.csv" in _one_line_error(err)
    (tmp_path / "table.xlsx").write_text("x")
    code, err = _run_cli(capsys, "prep", "shards", str(src), str(tmp_path / "o2"), "--metadata",
                         str(tmp_path / "table.xlsx"))
    assert code == 2 and "must be .csv, .tsv or .jsonl" in _one_line_error(err)


def test_eval_shard_deleted_while_training_is_counted_not_raised(tmp_path: Path):
    write_shards(tmp_path / "s", n_shards=2, per_shard=8)
    dm = _dm(tmp_path / "s")
    (tmp_path / "s" / "shard-000000.tar").unlink()  # after setup: the run had started
    batches = list(dm.val_dataloader())
    assert sum(len(b) for b in batches) == 16 and sum(b.skipped for b in batches) == 8
    assert sorted(m["index"] for b in batches for m in b.meta if "index" in m) == list(range(8, 16))


# ------------------------------------------------------------------------------- token and array shards (A2)


def _write_token_shards(folder: Path, per_shard: int = 8, frames: int = 200) -> None:
    """One token shard of ``per_shard`` random [4, frames] code samples, in ``ostinato tokenize``'s layout."""
    import webdataset as wds

    from ostinato.data.tokens import CodecInfo, TokenManifest, TokenShard, encode_codes

    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as w:
        for i in range(per_shard):
            w.write({"__key__": f"s{i:05d}", "codes.npy": encode_codes(torch.randint(0, 256, (4, frames))),
                     "json": json.dumps({"caption": f"clip {i}", "index": i}).encode()})
    codec = CodecInfo(id="synthetic", hash="0", sample_rate=24000, channels=1, frame_rate=75.0, n_q=4,
                      card=256)
    TokenManifest(shards=[TokenShard("shard-000000.tar", per_shard, per_shard * frames)], codec=codec).save(folder)


def _write_array_shards(folder: Path, per_shard: int = 8, frames: int = 100) -> None:
    """One array shard of ``per_shard`` float16 latents [8, frames] at 50 Hz, in ``ostinato encode``'s layout."""
    import webdataset as wds

    from ostinato.data.arrays import ArrayManifest, ArrayShard, ModelInfo, StreamInfo, encode_array

    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as w:
        for i in range(per_shard):
            w.write({"__key__": f"s{i:05d}", "latent.npy": encode_array(torch.randn(8, frames)),
                     "json": json.dumps({"caption": f"clip {i}", "index": i}).encode()})
    ArrayManifest(shards=[ArrayShard("shard-000000.tar", per_shard, per_shard * frames)],
                  streams={"latent": StreamInfo(rate=50.0, channels=8, dtype="float16")},
                  model=ModelInfo(id="synthetic", hash="0", kind="musika_autoencoder", sample_rate=24000,
                                  channels=1)).save(folder)


@pytest.mark.parametrize("kind", ["tokens", "arrays"])
def test_truncated_token_or_array_tar_counts_every_sample_it_lost(tmp_path: Path, kind: str):
    from ostinato.data.arrays import ArrayDataModule
    from ostinato.data.token_datamodule import TokenDataModule

    (_write_token_shards if kind == "tokens" else _write_array_shards)(tmp_path / "s")
    _truncate(tmp_path / "s" / "shard-000000.tar")
    lost = 8 - _readable(tmp_path / "s" / "shard-000000.tar")
    module = TokenDataModule if kind == "tokens" else ArrayDataModule
    dm = module(tmp_path / "s", segment_seconds=0.5, batch_size=2, batches_per_epoch=8, num_workers=0,
                shuffle_buffer=2)
    dm.setup("fit")
    # every read of the shard gives the samples before the damage (2 batches of 2) and then counts what it lost
    counted = [b.skipped for b in dm.train_dataloader() if b.skipped]
    assert lost >= 2 and counted and all(c == lost for c in counted)


def test_prep_semantic_counts_every_sample_a_truncated_shard_lost(tmp_path: Path):
    from ostinato.encoding.semantic import fit_semantic_tokenizer

    write_shards(tmp_path / "s", n_shards=2, per_shard=8, corrupt={0})
    _truncate(tmp_path / "s" / "shard-000001.tar")
    lost = 8 - _readable(tmp_path / "s" / "shard-000001.tar")
    tokenizer = fit_semantic_tokenizer(tmp_path / "s", None, features="mfcc", k=2, iterations=1, workers=0,
                                       progress=False)
    assert lost >= 2 and tokenizer.fit_stats["skipped"] == 1 + lost and tokenizer.fit_stats["clips"] == 16 - 1 - lost
    assert any("shard-000001.tar" in r for r in tokenizer.fit_stats["skipped_samples"])


# ------------------------------------------------------------------- a validation or test split wholly corrupt (A2)


class _Evaluating(_Counting):
    def test_step(self, batch, batch_idx):
        self.seen["valid"] += batch.skipped


def _cpu_trainer(**kw) -> L.Trainer:
    return L.Trainer(max_epochs=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[Throughput()],
                     accelerator="cpu", **kw)


def test_every_valid_or_test_sample_corrupt_stops_with_one_line_naming_the_folder(tmp_path: Path):
    write_shards(tmp_path / "train", n_shards=1, per_shard=8)
    write_shards(tmp_path / "bad", n_shards=2, per_shard=4, corrupt=set(range(8)))
    dm = _dm(tmp_path / "train", valid=tmp_path / "bad", test=tmp_path / "bad", batches_per_epoch=2)
    for run in (lambda: _cpu_trainer().fit(_Evaluating(), datamodule=dm),
                lambda: _cpu_trainer().validate(_Evaluating(), datamodule=dm, verbose=False),
                lambda: _cpu_trainer().test(_Evaluating(), datamodule=dm, verbose=False)):
        with pytest.raises(DataError) as e:
            run()
        message = str(e.value)
        assert "\n" not in message and f"samples in {tmp_path / 'bad'} failed to decode" in message
        assert "every one of the 8" in message and "metrics would be those of silence" in message


def test_a_partly_corrupt_valid_split_still_validates(tmp_path: Path):
    write_shards(tmp_path / "train", n_shards=1, per_shard=8)
    write_shards(tmp_path / "valid", n_shards=2, per_shard=4, corrupt=set(range(7)))
    module = _Counting()
    _cpu_trainer().fit(module, datamodule=_dm(tmp_path / "train", valid=tmp_path / "valid", batches_per_epoch=2))
    assert module.seen["valid"] == 7


@pytest.mark.parametrize("first", [True, False])
def test_every_valid_sample_corrupt_stops_training_with_one_line_and_keeps_the_checkpoint(tmp_path: Path,
                                                                                         first: bool):
    env = make_env(tmp_path)
    write_shards(tmp_path / "data" / "demo" / "shards" / "valid", n_shards=2, per_shard=8, sample_rate=24000,
                 corrupt=set(range(16)))
    run = ["experiment=codec_tiny", "trainer.max_steps=4", "data.batches_per_epoch=2", "data.num_workers=0",
           "data.eval_segment_seconds=0.5", "data.eval_batch_size=8", "trainer.checkpoint_every_steps=0",
           f"trainer.validate_first={str(first).lower()}"]
    proc = train(env, *run, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "every one of the 16 valid samples in" in last and "shards/valid failed to decode" in last
    assert "Traceback" not in proc.stderr
    kept = xp_folder(env, *run) / "checkpoints" / "last.ckpt"
    if first:  # validate_first: the broken split stops the run before any training
        assert not kept.exists() and "training so far is kept" not in last
    else:  # at the first epoch's end: the epoch's training is saved before the stop
        assert f"training so far is kept in {kept}" in last
        assert torch.load(kept, map_location="cpu", weights_only=False)["global_step"] > 0


# ------------------------------------------------------------------- MusicLM's joined token streams (A3)


def _whole_token_samples(path: Path) -> int:
    """Samples of a truncated token tar read whole, tokens and JSON (the cut may leave a last one without one)."""
    from ostinato.data.sources import iter_raw_samples

    n = 0
    try:
        for sample in iter_raw_samples(str(path)):
            n += "codes.npy" in sample and "json" in sample
    except Exception:  # noqa: BLE001 - the damage ends the count
        pass
    return n


@pytest.mark.parametrize("damaged", ["semantic", "codec"])
def test_truncated_musiclm_shard_counts_every_sample_its_group_lost(tmp_path: Path, damaged: str, caplog):
    from ostinato.data.musiclm_tokens import MuLaNTokens, MusicLMTokenDataModule
    from tests.test_musiclm import write_streams

    spec = write_streams(tmp_path / "t", [1.0] * 8)  # two shards of 4 clips per stream, joined by name and key
    shard = Path(spec[damaged]) / "shard-000000.tar"
    _truncate(shard)
    # the first stream (semantic) is read in order and keeps the whole samples before the damage; a damaged
    # codec shard (read whole before the join) loses its whole group
    lost = 4 - (_whole_token_samples(shard) if damaged == "semantic" else 0)
    dm = MusicLMTokenDataModule(spec, segment_seconds=0.4, batch_size=2, batches_per_epoch=12, num_workers=0,
                                shuffle_buffer=2)
    counted = [b.skipped for b in dm.train_dataloader() if b.skipped]
    assert lost >= 2 and counted and all(c % lost == 0 for c in counted), (lost, counted)
    assert str(shard) in caplog.text  # the damaged shard itself, not its group's index

    # a key that another stream lacks is left out by the join, not lost: nothing is counted
    clean = write_streams(tmp_path / "clean", [1.0] * 8)
    mulan = MuLaNTokens.load(clean["mulan"])
    MuLaNTokens(mulan.keys[1:], {ns: t[1:] for ns, t in mulan.tokens.items()}, mulan.card).save(clean["mulan"])
    dm = MusicLMTokenDataModule(clean, segment_seconds=0.4, batch_size=2, batches_per_epoch=12, num_workers=0,
                                shuffle_buffer=2)
    assert sum(b.skipped for b in dm.train_dataloader()) == 0


@pytest.mark.parametrize("damaged", ["semantic", "codec"])
def test_truncated_musiclm_valid_shard_is_counted_and_blanked_not_raised(tmp_path: Path, damaged: str):
    from ostinato.data.musiclm_tokens import MusicLMTokenDataModule
    from tests.test_musiclm import write_streams

    spec = write_streams(tmp_path / "t", [1.0] * 8)
    valid = write_streams(tmp_path / "v", [1.0] * 8, first=100)
    shard = Path(valid[damaged]) / "shard-000000.tar"
    _truncate(shard)
    lost = 4 - (_whole_token_samples(shard) if damaged == "semantic" else 0)
    dm = MusicLMTokenDataModule(spec, valid, segment_seconds=0.4, batch_size=2, batches_per_epoch=2, num_workers=0)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert sum(len(b) for b in batches) == 8 and sum(b.skipped for b in batches) == lost
    errors = [m["error"] for b in batches for m in b.meta if m.get("corrupt")]
    assert len(errors) == lost and all(str(shard) in e for e in errors)
