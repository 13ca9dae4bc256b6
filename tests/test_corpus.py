"""The demo-corpus renderer: real music21 pieces through real fluidsynth, kept to a few seconds of audio."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ostinato.recipes import corpus as corpus_mod
from ostinato.data.captions import dance_genre, describe, is_traditional, key_name, tempo_word
from ostinato.recipes.corpus import CorpusSummary, PieceRef, assign_splits, find_soundfont, render_corpus

MONO_RATE, STEREO_RATE = 16000, 32000
MANIFEST_FIELDS = {"caption", "source", "offset", "duration", "segment", "sample_rate", "channels", "genre",
                   "instruments", "bpm", "key", "composer", "title", "piece", "split"}


def sidecars(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "audio").glob("*/*.json"))]


def file_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mono(tmp_path_factory) -> tuple[Path, CorpusSummary]:
    out = tmp_path_factory.mktemp("mono")
    summary = render_corpus(out, sample_rate=MONO_RATE, hours=0.02, seed=0, workers=2, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def stereo(tmp_path_factory) -> tuple[Path, CorpusSummary]:
    out = tmp_path_factory.mktemp("stereo")
    summary = render_corpus(out, sample_rate=STEREO_RATE, channels="stereo", hours=0.008, seed=3, workers=1,
                            progress=False)
    return out, summary


def test_mono_clips_have_exact_length_and_rate_and_are_not_silent(mono):
    out, summary = mono
    flacs = sorted((out / "audio").glob("*/*.flac"))
    assert len(flacs) == summary.total_clips >= 7  # 72 s of audio in 10 s clips
    for path in flacs:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        assert sr == MONO_RATE
        assert data.shape == (10 * MONO_RATE, 1)
        assert float(np.sqrt(np.mean(data**2))) > 0.01, path
        assert path.with_suffix(".json").exists()


def test_stereo_clips_at_another_rate(stereo):
    out, summary = stereo
    flacs = sorted((out / "audio").glob("*/*.flac"))
    assert summary.channels == 2 and summary.sample_rate == STEREO_RATE
    assert len(flacs) == summary.total_clips >= 3
    differing_channels = 0
    for path in flacs:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        assert sr == STEREO_RATE
        assert data.shape == (10 * STEREO_RATE, 2)
        assert float(np.sqrt(np.mean(data**2))) > 0.01, path
        differing_channels += int(np.abs(data[:, 0] - data[:, 1]).max() > 1e-3)
    assert differing_channels > 0  # panning and reverb make real stereo, not duplicated mono
    assert {m["channels"] for m in sidecars(out)} == {2}


def test_sidecars_follow_the_manifest_schema(mono):
    out, _ = mono
    for meta in sidecars(out):
        assert MANIFEST_FIELDS <= set(meta)
        assert (out / "audio" / meta["source"]).is_file()
        assert meta["source"].startswith(f"{meta['split']}/")
        assert meta["sample_rate"] == MONO_RATE and meta["channels"] == 1
        assert meta["duration"] == 10.0 and meta["offset"] == pytest.approx(10.0 * meta["segment"])
        assert isinstance(meta["bpm"], int) and 30 <= meta["bpm"] <= 220
        assert re.fullmatch(r"[A-G](-flat|-sharp)? (major|minor)", meta["key"]), meta["key"]
        assert len(meta["programs"]) >= 1 and all(0 <= p <= 127 for p in meta["programs"])
        assert meta["soundfont"].endswith(".sf2")


@pytest.mark.parametrize("fixture", ["mono", "stereo"])
def test_captions_agree_with_metadata(fixture, request):
    out, _ = request.getfixturevalue(fixture)
    for meta in sidecars(out):
        caption = meta["caption"].lower()
        composer = "traditional" if is_traditional(meta["composer"]) else meta["composer"].lower()
        assert composer in caption
        assert meta["genre"].lower() in caption
        for instrument in meta["instruments"]:
            assert instrument.lower() in caption
        assert re.search(rf"\b{meta['bpm']} bpm\b", caption)
        assert tempo_word(meta["bpm"]) in caption
        assert meta["key"].lower() in caption


def test_splits_are_disjoint_by_piece_and_all_used(mono):
    out, summary = mono
    pieces_by_split: dict[str, set[str]] = {}
    for meta in sidecars(out):
        pieces_by_split.setdefault(meta["split"], set()).add(meta["piece"])
    assert set(pieces_by_split) == {"train", "valid", "test"}
    train, valid, test = (pieces_by_split[s] for s in ("train", "valid", "test"))
    assert not (train & valid or train & test or valid & test)
    assert summary.pieces == {s: len(p) for s, p in pieces_by_split.items()}


def test_corpus_json_records_options_and_summary(mono):
    out, summary = mono
    saved = json.loads((out / "corpus.json").read_text())
    assert saved["options"]["seed"] == 0 and saved["options"]["sample_rate"] == MONO_RATE
    assert saved["options"]["hours"] == 0.02 and saved["options"]["channels"] == "mono"
    assert saved["summary"]["clips"] == summary.clips
    assert sum(p["clips"] for p in saved["pieces"]) == summary.total_clips
    assert summary.total_hours == pytest.approx(summary.total_clips * 10 / 3600, abs=1e-3)
    assert len({m["genre"] for m in sidecars(out)}) >= 3  # the plan mixes collections from the start
    text = summary.format()
    for word in ("clips", "train", "valid", "test", summary.examples[0]):
        assert word in text


def test_existing_corpus_needs_overwrite_unless_options_match(mono):
    out, summary = mono
    before = file_hashes(out)
    with pytest.raises(FileExistsError, match=r"corpus\.json.*--overwrite"):
        render_corpus(out, sample_rate=MONO_RATE, hours=0.03, seed=0, workers=2, progress=False)
    again = render_corpus(out, sample_rate=MONO_RATE, hours=0.02, seed=0, workers=1, progress=False)
    assert again == summary
    assert file_hashes(out) == before


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    options = dict(hours=0.006, sample_rate=MONO_RATE, progress=False)
    a, b = tmp_path / "a", tmp_path / "b"
    render_corpus(a, seed=5, workers=1, **options)
    render_corpus(b, seed=5, workers=2, **options)
    assert file_hashes(a) == file_hashes(b)
    assert len(file_hashes(a)) >= 7  # corpus.json and at least 3 clips with sidecars

    render_corpus(b, seed=6, workers=1, overwrite=True, **options)
    rerendered = file_hashes(b)
    assert rerendered != file_hashes(a)
    clip_files = {k for k in rerendered if k.endswith(".flac")}
    assert len(clip_files) == render_corpus(b, seed=6, workers=1, **options).total_clips  # no stale clips


@pytest.mark.parametrize("rate", [44000, 8000, 96000])
def test_invalid_sample_rate_raises(tmp_path, rate):
    with pytest.raises(ValueError, match=r"sample_rate must be one of 16000, 22050, 24000, 32000, 44100, 48000"):
        render_corpus(tmp_path, sample_rate=rate, progress=False)
    assert not (tmp_path / "corpus.json").exists()


def test_invalid_options_raise(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        render_corpus(tmp_path, channels="surround", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction"):
        render_corpus(tmp_path, valid_fraction=0.6, test_fraction=0.5, progress=False)


def test_unrenderable_piece_is_skipped_and_counted(tmp_path):
    bogus = PieceRef("bogus/piece", "chorale", "chorale", str(tmp_path / "missing.mxl"), None, "Bogus",
                     "Nobody", "baroque chorale")
    real = corpus_mod.discover_pieces()["chorale"][0]
    font, fluidsynth = str(find_soundfont()), corpus_mod.find_fluidsynth()
    tasks = [corpus_mod.RenderTask(ref, 1, MONO_RATE, False, 10.0, 11.0, font, fluidsynth, str(tmp_path))
             for ref in (bogus, real)]
    kept, skipped = corpus_mod._collect(tasks, workers=1, target_seconds=10.0, min_pieces=1, progress=False)
    assert [r.piece for r in skipped] == ["bogus/piece"] and skipped[0].error
    assert [r.piece for r in kept] == [real.piece] and kept[0].clips


def test_assign_splits_is_seeded_disjoint_and_fills_every_split():
    pieces = [f"p{i}" for i in range(40)]
    splits = assign_splits(pieces, seed=1, valid_fraction=0.05, test_fraction=0.1)
    assert splits == assign_splits(list(reversed(pieces)), seed=1, valid_fraction=0.05, test_fraction=0.1)
    assert splits != assign_splits(pieces, seed=2, valid_fraction=0.05, test_fraction=0.1)
    counts = {s: list(splits.values()).count(s) for s in ("train", "valid", "test")}
    assert counts == {"train": 34, "valid": 2, "test": 4}
    assert set(assign_splits(["a", "b", "c"], 0, 0.05, 0.05).values()) == {"train", "valid", "test"}
    assert set(assign_splits(["a", "b"], 0, 0.05, 0.05).values()) <= {"train", "valid", "test"}
    assert "train" in assign_splits(["a", "b"], 0, 0.05, 0.05).values()


def test_soundfont_resolution(tmp_path, monkeypatch):
    font = tmp_path / "mine.sf2"
    font.write_bytes(b"RIFF\x04\x00\x00\x00sfbk")
    assert find_soundfont(font) == font.resolve()
    monkeypatch.setenv("OSTINATO_SOUNDFONT", str(font))
    assert find_soundfont() == font.resolve()
    monkeypatch.setenv("OSTINATO_SOUNDFONT", str(tmp_path / "absent.sf2"))
    with pytest.raises(FileNotFoundError, match="OSTINATO_SOUNDFONT"):
        find_soundfont()
    monkeypatch.delenv("OSTINATO_SOUNDFONT")
    assert find_soundfont().name in ("FluidR3_GM.sf2", "TimGM6mb.sf2", "default.sf2", "default-GM.sf2")


@pytest.mark.parametrize("bpm,word", [(40, "largo"), (65, "largo"), (66, "adagio"), (76, "andante"),
                                      (107, "andante"), (108, "moderato"), (120, "allegro"), (168, "presto")])
def test_tempo_word(bpm, word):
    assert tempo_word(bpm) == word


def test_key_names_and_dance_genres():
    assert key_name(7, "major") == "G major"
    assert key_name(3, "major") == "E-flat major" and key_name(3, "minor") == "E-flat minor"
    assert key_name(6, "major") == "F-sharp major" and key_name(8, "minor") == "G-sharp minor"
    assert key_name(-2, "major") == "B-flat major"  # transposed below C wraps around
    with pytest.raises(ValueError):
        key_name(0, "dorian")
    assert dance_genre("Acacia -- Reel", "fiddle tune") == "irish reel"
    assert dance_genre("slip jig", "x") == "irish slip jig" and dance_genre("double jig", "x") == "irish jig"
    assert dance_genre("The Fair Maid", "fiddle tune") == "fiddle tune"


def test_describe_names_everything_with_varied_templates():
    meta = {"genre": "baroque chorale", "composer": "Johann Sebastian Bach", "instruments": ["choir", "church organ"],
            "bpm": 92, "key": "G major", "title": "Chorale BWV 1.6"}
    captions = {describe(meta, np.random.default_rng(i)) for i in range(30)}
    assert len(captions) >= 5
    for caption in captions:
        for part in ("baroque chorale", "Johann Sebastian Bach", "choir", "church organ", "92 BPM", "andante",
                     "G major"):
            assert part.lower() in caption.lower(), caption
    folk = describe({**meta, "composer": "Traditional", "genre": "european folk song"}, np.random.default_rng(0))
    assert "traditional european folk song" in folk.lower() and "by Traditional" not in folk
    assert describe(meta, np.random.default_rng(4)) == describe(meta, np.random.default_rng(4))


def test_finished_corpus_needs_no_synthesizer(mono, monkeypatch):
    """A corpus rendered on one machine is used on another without fluidsynth or a soundfont (a GPU node)."""
    import ostinato.recipes.corpus as corpus

    out, summary = mono
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    monkeypatch.setattr(corpus, "SOUNDFONT_CANDIDATES", ())
    monkeypatch.delenv(corpus.SOUNDFONT_ENV, raising=False)
    again = render_corpus(out, sample_rate=MONO_RATE, hours=0.02, seed=0, workers=1, progress=False)
    assert again.total_clips == summary.total_clips
    with pytest.raises(corpus.MissingSynthesizer):  # other options do need the synthesizer
        render_corpus(out, sample_rate=MONO_RATE, hours=0.03, seed=0, workers=1, progress=False)
