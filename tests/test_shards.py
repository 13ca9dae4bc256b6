"""Folder -> WebDataset shards: audio round trip, mixed folders, metadata, segmenting, resume and refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from ostinato.data.audio import convert_channels, flac_precision, load_audio, resample
from ostinato.data.manifest import Manifest
from ostinato.data.shards import build_shards, iter_shard_samples, sample_key, segment_bounds


def tone(sr: int, seconds: float, channels: int = 1, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """[T, C] float32: a sine per channel plus a little noise, peak well below 1."""
    t = np.arange(round(sr * seconds)) / sr
    rng = np.random.default_rng(seed)
    chans = [0.4 * np.sin(2 * np.pi * freq * (c + 1) * t) + 0.03 * rng.standard_normal(t.size)
             for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)


def write(path: Path, data: np.ndarray, sr: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, **kwargs)
    return path


def expected(path: Path, sample_rate: int, channels: int) -> torch.Tensor:
    wav, sr = load_audio(path)
    return resample(convert_channels(wav, channels), sr, sample_rate).clamp(-1, 1)


def samples_of(out: Path) -> dict[str, tuple[torch.Tensor, int, dict]]:
    manifest = Manifest.load(out)
    return {key: (wav, sr, meta) for shard in manifest.shard_paths(out)
            for key, wav, sr, meta in iter_shard_samples(shard)}


def by_source(samples: dict[str, tuple[torch.Tensor, int, dict]]) -> dict[str, list[tuple[torch.Tensor, dict]]]:
    grouped: dict[str, list[tuple[torch.Tensor, dict]]] = {}
    for wav, _, meta in samples.values():
        grouped.setdefault(meta["source"], []).append((wav, meta))
    return {src: sorted(items, key=lambda item: item[1]["segment"]) for src, items in grouped.items()}


def build(src: Path, out: Path, **kwargs) -> Manifest:
    return build_shards(src, out, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("bits", [16, 24])
def test_round_trip_within_flac_precision(tmp_path: Path, bits: int) -> None:
    src = tmp_path / "src"
    stereo = write(src / "stereo.wav", tone(44100, 1.0, channels=2), 44100)
    mono = write(src / "mono.flac", tone(22050, 0.8, freq=330.0, seed=1), 22050)

    manifest = build(src, tmp_path / "out", sample_rate=48000, channels="stereo", bits=bits)

    assert (manifest.sample_rate, manifest.channels, manifest.total_samples) == (48000, 2, 2)
    got = by_source(samples_of(tmp_path / "out"))
    for path in (stereo, mono):
        (wav, meta), = got[path.name]
        want = expected(path, 48000, 2)
        assert wav.shape == want.shape
        assert (wav - want).abs().max().item() <= flac_precision(bits) * 1.01
        assert meta["duration"] == pytest.approx(want.shape[-1] / 48000)
        assert (meta["sample_rate"], meta["channels"], meta["offset"], meta["segment"]) == (48000, 2, 0.0, 0)


# ------------------------------------------------------------------------------------------------ mixed folder


def make_mixed_folder(src: Path) -> dict[str, tuple[int, float, bool]]:
    """Writes the folder; returns {relative path: (source rate, seconds, lossless)} of the decodable files."""
    files = {
        "a/low.wav": (8000, 2.0, 1, {}),
        "a/voice.ogg": (16000, 1.5, 1, {"format": "OGG", "subtype": "VORBIS"}),
        "b/song.mp3": (22050, 2.0, 2, {"format": "MP3"}),
        "b/take 1.v2.flac": (44100, 1.0, 2, {}),
        "b/loud.WAV": (44100, 1.25, 2, {"subtype": "PCM_24"}),
        "c/hi.flac": (48000, 1.0, 1, {}),
    }
    for i, (rel, (sr, seconds, channels, kwargs)) in enumerate(files.items()):
        write(src / rel, tone(sr, seconds, channels, freq=110.0 * (i + 1), seed=i), sr, **kwargs)
    good_flac = write(src / "c/full.flac", tone(44100, 2.0, 2), 44100).read_bytes()
    (src / "c/full.flac").unlink()
    (src / "c/broken.flac").write_bytes(good_flac[: len(good_flac) // 2])
    (src / "notes.wav").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 8)
    (src / "readme.md").write_text("not audio\n")
    return {rel: (sr, seconds, "format" not in kwargs) for rel, (sr, seconds, _, kwargs) in files.items()}


def test_mixed_folder_writes_good_files_and_reports_bad_ones(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    good = make_mixed_folder(src)

    with caplog.at_level("WARNING", logger="ostinato.data.shards"):
        manifest = build(src, out, files_per_shard=3)

    # 44.1 kHz and stereo are the most common among readable headers (the truncated flac's header included)
    assert (manifest.sample_rate, manifest.channels) == (44100, 2)
    assert manifest.source["files"] == 8 and manifest.skipped == 2
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest.total_samples == len(good)
    assert manifest.total_seconds == pytest.approx(sum(seconds for _, seconds, _ in good.values()), abs=0.05)
    assert Manifest.load(out).to_dict() == manifest.to_dict()

    report = json.loads((out / "report.json").read_text())
    assert sorted(e["source"] for e in report["skipped"]) == ["c/broken.flac", "notes.wav"]
    assert all("cannot decode" in e["reason"] for e in report["skipped"])
    assert report["ignored"] == ["readme.md"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "c/broken.flac" in warned and "notes.wav" in warned

    samples = samples_of(out)
    got = by_source(samples)
    assert sorted(got) == sorted(good)
    for rel, (sr, seconds, lossless) in good.items():
        (wav, meta), = got[rel]
        assert (meta["sample_rate"], meta["channels"], wav.shape[0]) == (44100, 2, 2)
        assert meta["duration"] == pytest.approx(wav.shape[-1] / 44100)
        if lossless:
            want = expected(src / rel, 44100, 2)
            assert wav.shape == want.shape
            assert (wav - want).abs().max().item() <= flac_precision(16) * 1.01
        else:
            assert abs(wav.shape[-1] - seconds * 44100) <= 0.1 * seconds * 44100

    for key in samples:
        assert "." not in key and "/" not in key
    assert sample_key("b/take 1.v2.flac", 0) in samples
    loaded = list(wds.WebDataset(manifest.shard_paths(out), shardshuffle=False))
    assert sorted(s["__key__"] for s in loaded) == sorted(samples)
    assert all(set(s) >= {"flac", "json"} for s in loaded)


# ------------------------------------------------------------------------------------------------ metadata


def test_sidecars_and_csv_table_land_in_sample_json(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i, name in enumerate(["x", "y", "z", "w"]):
        write(src / f"{name}.wav", tone(16000, 0.5, seed=i), 16000)
    (src / "x.json").write_text(json.dumps({"genre": "jazz", "caption": "json caption", "bpm": 90}))
    (src / "x.txt").write_text("  txt caption\n")
    (src / "y.json").write_text(json.dumps({"composer": "Anon", "instruments": ["piano"]}))
    (src / "z.json").write_text("{not json")
    table = tmp_path / "meta.csv"
    table.write_text("path,description,composer\n"
                     "y.wav,table caption,Bach\n"
                     "./z.wav,,Satie\n"
                     "gone.wav,ghost,Nobody\n")

    build(src, tmp_path / "out", metadata=table)

    meta = {m["source"]: m for _, _, m in samples_of(tmp_path / "out").values()}
    assert meta["x.wav"]["caption"] == "txt caption"  # txt beats the sidecar json
    assert (meta["x.wav"]["genre"], meta["x.wav"]["bpm"]) == ("jazz", 90)
    assert meta["y.wav"]["caption"] == "table caption"  # description column -> caption
    assert meta["y.wav"]["composer"] == "Bach"  # the table beats the sidecar json
    assert meta["y.wav"]["instruments"] == ["piano"]
    assert meta["z.wav"]["composer"] == "Satie" and meta["z.wav"]["caption"] == ""
    assert meta["w.wav"]["caption"] == "" and "composer" not in meta["w.wav"]

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    issues = {e["source"]: e["reason"] for e in report["metadata_issues"]}
    assert set(issues) == {"meta.csv:4", "z.json"}
    assert "gone.wav" in issues["meta.csv:4"]
    overrides = {(e["source"], e["field"]): (e["old"], e["new"]) for e in report["metadata_overrides"]}
    assert overrides == {("x.wav", "caption"): ("json caption", "txt caption"),
                         ("y.wav", "composer"): ("Anon", "Bach")}


def test_jsonl_table_keeps_types(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "d/a.flac", tone(16000, 0.5), 16000)
    table = tmp_path / "meta.jsonl"
    table.write_text(json.dumps({"file": "d/a.flac", "text": "a caption", "bpm": 120.5, "instruments": ["oboe"]})
                     + "\n")

    build(src, tmp_path / "out", metadata=table)

    (_, _, meta), = samples_of(tmp_path / "out").values()
    assert (meta["caption"], meta["bpm"], meta["instruments"]) == ("a caption", 120.5, ["oboe"])


# ------------------------------------------------------------------------------------------------ segmenting


@pytest.mark.parametrize(("frames", "min_seconds", "bounds"), [
    (100, None, [(0, 40), (30, 70), (60, 100)]),  # the last full window ends the file: no tail
    (90, None, [(0, 40), (30, 70), (60, 90)]),
    (80, None, [(0, 40), (30, 70), (60, 80)]),  # tail of exactly min_segment_seconds is kept
    (79, None, [(0, 40), (30, 70)]),
    (79, 1.0, [(0, 40), (30, 70), (60, 79)]),
    (15, None, []),
    (25, None, [(0, 25)]),
])
def test_segment_bounds(frames: int, min_seconds: float | None, bounds: list[tuple[int, int]]) -> None:
    assert segment_bounds(frames, 10, 4.0, 1.0, min_seconds) == bounds


def test_segments_with_overlap(tmp_path: Path) -> None:
    src, sr = tmp_path / "src", 8000
    lengths = {"ten.wav": 10.0, "nine.wav": 9.0, "short_tail.wav": 7.9, "tiny.wav": 1.5}
    for i, (name, seconds) in enumerate(lengths.items()):
        write(src / name, tone(sr, seconds, seed=i), sr)

    manifest = build(src, tmp_path / "out", segment_seconds=4.0, overlap_seconds=1.0)

    got = by_source(samples_of(tmp_path / "out"))
    durations = {rel: [m["duration"] for _, m in items] for rel, items in got.items()}
    assert durations == {"ten.wav": [4.0, 4.0, 4.0], "nine.wav": [4.0, 4.0, 3.0], "short_tail.wav": [4.0, 4.0]}
    assert [m["offset"] for _, m in got["nine.wav"]] == [0.0, 3.0, 6.0]
    assert [m["segment"] for _, m in got["nine.wav"]] == [0, 1, 2]
    source = load_audio(src / "nine.wav")[0]
    for wav, meta in got["nine.wav"]:
        start = round(meta["offset"] * sr)
        want = source[:, start:start + wav.shape[-1]]
        assert wav.shape[-1] == round(meta["duration"] * sr)
        assert (wav - want).abs().max().item() <= flac_precision(16) * 1.01
    assert manifest.total_samples == 8 and manifest.total_seconds == pytest.approx(31.0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(e["source"], "shorter" in e["reason"]) for e in report["skipped"]] == [("tiny.wav", True)]


# ------------------------------------------------------------------------------------------------ resume


CHILD = textwrap.dedent("""
    import pathlib, sys, time
    import ostinato.data.shards as shards

    src, out, block, flag = sys.argv[1:5]
    real_load = shards.load_audio

    def load_then_hang(path):
        if pathlib.Path(path).name == block:  # hang inside a shard so the kill lands mid-build
            pathlib.Path(flag).write_text("hanging")
            time.sleep(300)
        return real_load(path)

    shards.load_audio = load_then_hang
    shards.build_shards(src, out, files_per_shard=2, workers=1, progress=False, segment_seconds=0.3)
""")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"child exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, "child never reached the hanging file"
        time.sleep(0.02)


def test_killed_run_resumes_and_matches_uninterrupted_run(tmp_path: Path) -> None:
    src, out, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    for i in range(24):
        write(src / f"f{i:02d}.wav", tone(8000, 0.5, freq=100.0 + 20 * i, seed=i), 8000)
    flag = tmp_path / "hanging"

    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), "f05.wav", str(flag)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(flag, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = sorted(p.name for p in out.glob("shard-*.json"))
    assert finished == ["shard-000000.json", "shard-000001.json"]
    assert not (out / "manifest.json").exists()
    assert list(out.glob(".shard-000002.tar.*.tmp"))  # the shard being written when killed
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in out.iterdir() if p.name.startswith(("shard-000000", "shard-000001"))}
    assert len(kept) == 4

    manifest = build(src, out, files_per_shard=2, workers=1, segment_seconds=0.3)

    assert {name: (out / name).stat().st_ino for name in kept} == {n: v[0] for n, v in kept.items()}
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == {n: v[1] for n, v in kept.items()}
    assert not list(out.glob(".*.tmp"))
    assert len(manifest.shards) == 12 and manifest.total_samples == 24 * 2

    reference = build(src, ref, files_per_shard=2, workers=2, segment_seconds=0.3)
    assert reference.to_dict() == manifest.to_dict()
    for shard in manifest.shards:
        assert (out / shard.name).read_bytes() == (ref / shard.name).read_bytes()


# ------------------------------------------------------------------------------------------------ refusals


def small_source(src: Path, n: int = 3) -> Path:
    for i in range(n):
        write(src / f"s{i}.wav", tone(8000, 0.5, seed=i), 8000)
    return src


def test_complete_output_is_refused_then_rebuilt_with_overwrite(tmp_path: Path) -> None:
    src, out = small_source(tmp_path / "src"), tmp_path / "out"
    first = build(src, out, files_per_shard=1)
    (out / "shard-000099.tar").write_bytes(b"stale shard of an older build")
    (out / "keep-me.txt").write_text("not ours")
    original = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000000.tar").write_bytes(b"damaged")

    with pytest.raises(FileExistsError, match=r"manifest\.json.*--overwrite"):
        build(src, out, files_per_shard=1)
    rebuilt = build(src, out, files_per_shard=1, overwrite=True)

    assert rebuilt.to_dict() == first.to_dict()
    assert (out / "shard-000000.tar").read_bytes() == original
    assert not (out / "shard-000099.tar").exists()
    assert (out / "keep-me.txt").read_text() == "not ours"


def test_partial_output_refuses_other_options_or_source(tmp_path: Path) -> None:
    src, out = small_source(tmp_path / "src"), tmp_path / "out"
    build(src, out, files_per_shard=1, segment_seconds=0.25)
    (out / "manifest.json").unlink()  # a partial build, as left by an interrupted run
    (out / "shard-000002.json").unlink()
    kept = (out / "shard-000000.tar").stat().st_mtime_ns

    with pytest.raises(ValueError, match=r"segment_seconds.*--overwrite"):
        build(src, out, files_per_shard=1, segment_seconds=0.2)
    write(src / "s9.wav", tone(8000, 0.5, seed=9), 8000)
    with pytest.raises(ValueError, match=r"source (files|hash).*--overwrite"):
        build(src, out, files_per_shard=1, segment_seconds=0.25)
    (src / "s9.wav").unlink()
    manifest = build(src, out, files_per_shard=1, segment_seconds=0.25)

    assert manifest.total_samples == 6 and len(manifest.shards) == 3
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept
