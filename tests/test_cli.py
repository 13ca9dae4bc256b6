"""The `ostinato prep` verbs as a user calls them."""
from __future__ import annotations

import json

import pytest
import soundfile as sf

from ostinato.cli import main
from ostinato.data import AudioDataModule, Manifest
from tests.synth import tone


def test_prep_corpus_renders_shards_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["prep", "corpus", "--out", str(out), "--hours", "0.02", "--workers", "1", "--sample-rate", "16000"])
    text = capsys.readouterr().out
    assert "clips of 10 s" in text and "captions:" in text and "train" in text
    summary = json.loads((out / "corpus.json").read_text())
    for split in ("train", "valid", "test"):
        m = Manifest.load(out / "shards" / split)
        assert m.sample_rate == 16000 and m.channels == 1 and m.total_samples >= 1
    assert sum(Manifest.load(out / "shards" / s).total_samples for s in ("train", "valid", "test")) == \
        sum(summary["summary"]["clips"].values())
    dm = AudioDataModule(train=out / "shards" / "train", sample_rate=16000, segment_seconds=2.0, batch_size=2,
                         batches_per_epoch=2, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.audio.shape == (2, 1, 32000) and all(batch.captions)


def test_prep_shards_cli_and_refusal(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        sf.write(src / f"song{i}.wav", tone(220 + 50 * i, 1.5, 22050).T.numpy(), 22050)
        (src / f"song{i}.txt").write_text(f"song number {i}")
    out = tmp_path / "out"
    main(["prep", "shards", str(src), str(out), "--sample-rate", "16000", "--seconds", "1.0"])
    m = Manifest.load(out)
    assert m.sample_rate == 16000 and m.total_samples == 6  # 1.0 s + a 0.5 s tail per file
    with pytest.raises(SystemExit) as exit_info:
        main(["prep", "shards", str(src), str(out)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_encode_verb_is_the_array_shard_writer(capsys, tmp_path) -> None:
    import pytest

    from ostinato.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["encode", str(tmp_path / "missing"), str(tmp_path / "out"), "--model", str(tmp_path / "nothing")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"no shards at {tmp_path / 'missing'}" in err
