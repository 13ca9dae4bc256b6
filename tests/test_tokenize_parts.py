"""``ostinato tokenize --part``: several processes (one per node under ``srun``) share the shards of one output;
the last to finish writes the manifest, and the result is what one process writes."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from ostinato.cli import main
from ostinato.encoding.tokens import tokenize
from ostinato.encoding.writer import parse_part
from ostinato.errors import UserError
from tests.synth import write_shards, write_tiny_encodec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("parts")
    write_shards(root / "shards", n_shards=3, per_shard=2, sample_rate=24000, seconds=0.2)
    return root / "shards", str(write_tiny_encodec(root / "codec"))


def test_parts_write_what_one_process_writes(audio: tuple[Path, str], tmp_path: Path) -> None:
    shards, codec = audio
    whole = tokenize(codec, shards, tmp_path / "whole", workers=0, progress=False)
    out = tmp_path / "parts"
    assert tokenize(codec, shards, out, workers=0, progress=False, part=(1, 2)) is None  # shard 1 of 0, 1, 2
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000001.tar"]
    assert not (out / "manifest.json").exists()
    last = tokenize(codec, shards, out, workers=0, progress=False, part=(0, 2))  # shards 0 and 2: the last part
    assert last is not None and (out / "manifest.json").is_file()
    assert last.to_dict() == whole.to_dict()
    for tar in sorted((tmp_path / "whole").glob("shard-*.tar")):
        assert _members(out / tar.name) == _members(tar)


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as f:
        return {m.name: f.extractfile(m).read() for m in f.getmembers() if m.isfile()}


def test_a_part_leaves_the_temp_files_of_other_parts(audio: tuple[Path, str], tmp_path: Path) -> None:
    shards, codec = audio
    out = tmp_path / "t"
    out.mkdir()
    theirs = [out / ".shard-000001.tar.inflight.tmp", out / ".manifest.json.inflight.tmp"]  # part 1's, mid-write
    mine = out / ".shard-000000.tar.k1ll3d.tmp"  # what a killed run of part 0 left
    for p in [*theirs, mine]:
        p.write_bytes(b"half")
    assert tokenize(codec, shards, out, workers=0, progress=False, part=(0, 2)) is None
    assert all(p.exists() for p in theirs) and not mine.exists()


def test_part_specs() -> None:
    assert parse_part("1/4") == (1, 4)
    assert parse_part("slurm", {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (3, 4)
    with pytest.raises(UserError, match="run the command under srun"):
        parse_part("slurm", {})
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(UserError, match="0 <= I < N"):
            parse_part(bad)


def test_cli_refuses_overwrite_with_a_part(audio: tuple[Path, str], tmp_path: Path, capsys) -> None:
    shards, codec = audio
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", str(shards), str(tmp_path / "t"), "--codec", codec, "--part", "0/2", "--overwrite"])
    code = exit_.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--overwrite with --part 0/2" in err[0], err
