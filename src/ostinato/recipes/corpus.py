"""The demo corpus: music21's bundled scores rendered to captioned audio clips with fluidsynth.

Pipeline per piece (one worker process each): parse the score with music21, pick a rendition (ensemble palette
of General MIDI programs, tempo, transposition, loudness, stereo placement, reverb) from a generator seeded by
``(seed, piece id)``, write the MIDI with mido, synthesize it with the fluidsynth CLI, trim and peak-normalize
the audio, cut it into clips of exactly ``clip_seconds`` and drop near-silent ones. The main process takes
finished pieces in a seeded plan order until ``hours`` of audio are reached, splits them by piece into
train/valid/test and writes::

    out/audio/{train,valid,test}/<clip>.flac   FLAC, 16 bit
    out/audio/{train,valid,test}/<clip>.json   metadata sidecar (schema of ostinato.data.manifest + render params)
    out/corpus.json                            options, summary, pieces and skipped pieces

The same options and seed give byte-identical files with the same soundfont, fluidsynth and music21 versions,
independent of ``workers``. Re-running into a finished folder with identical options returns its summary;
other options need ``overwrite=True``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing as mp
import multiprocessing.pool
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import mido
import numpy as np
import torch
from music21 import bar, chord, common, converter, expressions, harmony, meter, stream, tempo
from music21 import corpus as m21corpus
from tqdm import tqdm

from ostinato.data.audio import convert_channels, encode_flac, load_audio
from ostinato.data.captions import dance_genre, describe, key_name
from ostinato.data.sources import output_folder
from ostinato.errors import UserError
from ostinato.fileio import atomic_write_bytes, atomic_write_json, read_json

log = logging.getLogger(__name__)

SAMPLE_RATES = (16000, 22050, 24000, 32000, 44100, 48000)
SPLITS = ("train", "valid", "test")
CORPUS_NAME = "corpus.json"
FORMAT = "ostinato.demo-corpus/1"
SOUNDFONT_ENV = "OSTINATO_SOUNDFONT"
SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
)

MAX_PIECE_SECONDS = 120.0  # longer pieces are cut so one quartet movement cannot dominate an hour
FLUIDSYNTH_GAIN = 0.4  # float output does not clip; the level is normalized afterwards
PEAK = 0.85  # about -1.4 dBFS
TRIM_DB = -60.0  # leading/trailing audio quieter than this (relative to the peak) is silence
SILENCE_RMS = 0.005  # clips quieter than about -46 dBFS RMS are dropped
TICKS_PER_QUARTER = 480

INSTRUMENTS: dict[str, int] = {
    "piano": 0, "harpsichord": 6, "hammered dulcimer": 15, "church organ": 19, "accordion": 21,
    "harmonica": 22, "classical guitar": 24, "acoustic guitar": 25, "violin": 40, "fiddle": 40, "viola": 41,
    "cello": 42, "harp": 46, "string ensemble": 48, "choir": 52, "voice": 53, "trumpet": 56, "trombone": 57,
    "tuba": 58, "french horn": 60, "oboe": 68, "bassoon": 70, "clarinet": 71, "flute": 73, "recorder": 74,
    "tin whistle": 78, "banjo": 105, "bagpipes": 109,
}


@dataclass(frozen=True)
class Palette:
    """An ensemble: ``parts`` spread over the score's parts top to bottom; each of ``doubles`` plays every part."""

    parts: tuple[str, ...]
    doubles: tuple[str, ...] = ()
    weight: float = 1.0

    def instruments(self) -> list[str]:
        return list(dict.fromkeys(self.parts + self.doubles))


def _p(*parts: str, doubles: tuple[str, ...] = (), weight: float = 1.0) -> Palette:
    return Palette(tuple(parts), doubles, weight)


STRING_QUARTET = ("violin", "violin", "viola", "cello")


@dataclass(frozen=True)
class Style:
    genre: str
    bpm: tuple[int, int]  # in beats of the time signature (see _beat_quarters)
    transpose: int  # largest transposition in semitones, either way
    palettes: tuple[Palette, ...]
    duple_dance: bool = False  # 4/4 dance tunes are counted in two (half-note beats)


STYLES: dict[str, Style] = {
    "chorale": Style("baroque chorale", (56, 96), 3, (
        _p("church organ", weight=3), _p("choir", weight=2), _p("choir", doubles=("church organ",), weight=2),
        _p(*STRING_QUARTET, weight=2), _p("flute", "oboe", "clarinet", "bassoon"),
        _p("trumpet", "french horn", "trombone", "tuba"), _p("piano"), _p("harpsichord"),
        _p("string ensemble"), _p("flute", "clarinet", "french horn", "bassoon"),
    )),
    "mass": Style("renaissance mass", (48, 76), 2, (
        _p("choir", weight=4), _p("voice"), _p("choir", doubles=("church organ",), weight=2),
        _p("church organ"), _p("trumpet", "trombone", "trombone", "tuba"),
        _p("recorder", "recorder", "viola", "cello"), _p("string ensemble"),
    )),
    "madrigal": Style("renaissance madrigal", (80, 120), 2, (
        _p("voice", weight=3), _p("choir"), _p("violin", "violin", "viola", "viola", "cello", weight=2),
        _p("recorder", "recorder", "recorder", "viola", "cello"), _p("voice", doubles=("classical guitar",)),
        _p("harpsichord"), _p("voice", doubles=("harpsichord",)),
    )),
    "quartet": Style("classical string quartet", (92, 132), 1, (
        _p(*STRING_QUARTET, weight=6), _p("string ensemble"),
    )),
    "romantic_quartet": Style("romantic string quartet", (84, 126), 1, (
        _p(*STRING_QUARTET, weight=6), _p("string ensemble"),
    )),
    "dance": Style("fiddle tune", (90, 115), 2, (
        _p("fiddle", weight=4), _p("tin whistle", weight=2), _p("flute"), _p("accordion", weight=2),
        _p("fiddle", doubles=("accordion",), weight=2), _p("fiddle", doubles=("tin whistle",)),
        _p("fiddle", doubles=("acoustic guitar",)), _p("banjo"), _p("harp"), _p("piano"),
        _p("hammered dulcimer"), _p("harmonica", weight=0.5), _p("bagpipes", weight=0.5),
    ), duple_dance=True),
    "folk_song": Style("european folk song", (66, 108), 4, (
        _p("voice", weight=2), _p("flute", weight=2), _p("clarinet"), _p("oboe"), _p("recorder"),
        _p("classical guitar"), _p("acoustic guitar"), _p("piano", weight=2), _p("accordion"), _p("harp"),
        _p("violin"), _p("voice", doubles=("classical guitar",)),
    )),
}

DANCE_BPM: dict[str, tuple[int, int]] = {
    "irish reel": (100, 120), "irish jig": (104, 124), "irish slip jig": (104, 124),
    "irish set dance": (80, 100), "irish slide": (110, 130), "scottish strathspey": (60, 76),
    "hornpipe": (72, 92), "clog dance": (76, 96), "highland fling": (70, 90), "polka": (100, 120),
    "waltz": (132, 168), "march": (100, 120), "irish air": (56, 80),
}
UNCOUNTED_IN_TWO = {"waltz", "irish air"}

# Quarter-note tempo ranges of the tempo words found in classical scores; the first word in the text wins.
TEMPO_TEXT_BPM: dict[str, tuple[int, int]] = {
    "prestissimo": (180, 200), "presto": (168, 190), "vivace": (150, 170), "allegretto": (104, 118),
    "allegro": (124, 156), "moderato": (108, 118), "andantino": (80, 100), "andante": (76, 100),
    "adagio": (58, 72), "largo": (48, 60), "lento": (52, 64), "grave": (44, 56), "menuetto": (112, 132),
    "minuet": (112, 132), "scherzo": (150, 175), "intermezzo": (100, 120),
}


@dataclass(frozen=True)
class Group:
    """Pieces drawn together in the plan; ``share`` of the audio time, ``piece_seconds`` a typical length."""

    share: float
    piece_seconds: float


GROUPS: dict[str, Group] = {
    "chorale": Group(0.20, 45.0),
    "mass": Group(0.15, 110.0),
    "madrigal": Group(0.10, 120.0),
    "quartet": Group(0.20, 120.0),
    "dance": Group(0.20, 35.0),
    "folk_song": Group(0.15, 25.0),
}

COMPOSERS: dict[str, str] = {
    "bach": "Johann Sebastian Bach",
    "palestrina": "Giovanni Pierluigi da Palestrina",
    "monteverdi": "Claudio Monteverdi",
    "haydn": "Joseph Haydn",
    "mozart": "Wolfgang Amadeus Mozart",
    "beethoven": "Ludwig van Beethoven",
    "schumann_robert": "Robert Schumann",
}
TRADITIONAL = "Traditional"
QUARTET_FOLDERS = ("haydn", "mozart", "beethoven", "schumann_robert")
QUARTET_MAX_BYTES = 70_000  # bigger .mxl movements take seconds to parse
ESSEN_GENRES = {"han": "chinese folk song", "irl": "irish folk song", "kinder": "german children's song",
                "lot": "european folk song", "lux": "european folk song"}
ESSEN_EXCLUDED = ("test", "variant")
MASS_SECTIONS = {"Agnus": "Agnus Dei", "Benedictus": "Benedictus", "Credo": "Credo", "Gloria": "Gloria",
                 "Kyrie": "Kyrie", "Sanctus": "Sanctus"}


# ----------------------------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class PieceRef:
    """One renderable piece of the music21 corpus."""

    piece: str  # stable id, e.g. "bach/bwv66.6", "oneills1850/0123", "essenFolksong/altdeu10/3"
    group: str  # key of GROUPS
    style: str  # key of STYLES
    path: str
    number: int | None  # tune number inside a multi-tune ABC file
    title: str
    composer: str
    genre: str


def _corpus_root() -> Path:
    return Path(common.getCorpusFilePath())


def _folder_files(paths: Iterable[Path], root: Path) -> dict[str, list[Path]]:
    by_folder: dict[str, list[Path]] = {}
    for path in sorted(paths):
        rel = path.relative_to(root)
        by_folder.setdefault(rel.parts[0], []).append(path)
    return by_folder


def _stem_id(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _chorales(files: list[Path], root: Path) -> list[PieceRef]:
    refs, seen = [], set()
    for path in files:
        match = re.fullmatch(r"bwv(\d+(?:\.\d+)?)(?:-.*)?", path.stem)
        if path.suffix != ".mxl" or match is None or match.group(1) in seen:
            continue
        seen.add(match.group(1))
        refs.append(PieceRef(_stem_id(path, root), "chorale", "chorale", str(path), None,
                             f"Chorale BWV {match.group(1)}", COMPOSERS["bach"], STYLES["chorale"].genre))
    return refs


def _masses(files: list[Path], root: Path) -> list[PieceRef]:
    refs = []
    for path in files:
        section = MASS_SECTIONS.get(path.stem.split("_")[0])
        if path.suffix == ".krn" and section:
            refs.append(PieceRef(_stem_id(path, root), "mass", "mass", str(path), None, section,
                                 COMPOSERS["palestrina"], STYLES["mass"].genre))
    return refs


def _madrigals(files: list[Path], root: Path) -> list[PieceRef]:
    refs = []
    for path in files:
        match = re.fullmatch(r"madrigal\.(\d+)\.(\d+)", path.stem)
        if path.suffix == ".mxl" and match:
            title = f"Madrigal, Book {match.group(1)} No. {match.group(2)}"
            refs.append(PieceRef(_stem_id(path, root), "madrigal", "madrigal", str(path), None, title,
                                 COMPOSERS["monteverdi"], STYLES["madrigal"].genre))
    return refs


def _quartet_title(work: str, movement: str) -> str:
    if m := re.fullmatch(r"opus(\d+)no(\d+)", work):
        name = f"Op. {m.group(1)} No. {m.group(2)}"
    elif m := re.fullmatch(r"k(\d+)", work):
        name = f"K. {m.group(1)}"
    else:
        name = work
    number = re.sub(r"\D", "", movement)
    return f"String Quartet {name}, movement {number}" if number else f"String Quartet {name}"


def _quartets(folder: str, files: list[Path], root: Path) -> list[PieceRef]:
    style = "romantic_quartet" if folder == "schumann_robert" else "quartet"
    refs = []
    for path in files:
        rel = path.relative_to(root)
        if (path.suffix != ".mxl" or len(rel.parts) != 3 or not rel.parts[2].startswith("movement")
                or path.stat().st_size > QUARTET_MAX_BYTES or rel.parts[1] == "k545"):
            continue
        refs.append(PieceRef(_stem_id(path, root), "quartet", style, str(path), None,
                             _quartet_title(rel.parts[1], path.stem), COMPOSERS[folder], STYLES[style].genre))
    return refs


@dataclass(frozen=True)
class AbcTune:
    number: int
    title: str
    rhythm: str
    notes: str


def _abc_tunes(path: Path) -> list[AbcTune]:
    """Reference number, first title and rhythm of every tune in an ABC file, read without music21."""
    tunes: list[AbcTune] = []
    number, fields = None, {}
    for line in path.read_text(encoding="latin-1").splitlines() + ["X:"]:
        m = re.match(r"([A-Za-z]):\s*(.*)", line)
        if not m:
            continue
        key, value = m.group(1), m.group(2).strip()
        if key == "X":
            if number is not None:
                tunes.append(AbcTune(number, fields.get("T", ""), fields.get("R", ""), fields.get("N", "")))
            number = int(value) if value.isdigit() else None
            fields = {}
        elif key in ("T", "R", "N") and key not in fields:
            fields[key] = value
    return tunes


def _folk_title(title: str) -> str:
    """'ACROBAT'S -- HORNPIPE' -> "Acrobat's": the tune type goes to the genre, capitals are tamed."""
    title = re.sub(r"\s*--.*$", "", title).strip()
    if title.isupper():
        title = " ".join(word.capitalize() for word in title.split())
    return title or "Untitled"


def _title_key(title: str) -> str:
    words = re.sub(r"[^a-z ]+", "", title.lower()).split()
    return " ".join(w for w in words if w not in {"the", "a"})


def _dance_tunes(by_folder: dict[str, list[Path]], root: Path) -> list[PieceRef]:
    """ryansMammoth (one tune a file) and O'Neill's 1850 (numbered tunes); a title seen before is a duplicate."""
    refs, seen_titles, seen_numbers = [], set(), set()

    def add(piece: str, path: Path, number: int | None, tune: AbcTune, default: str) -> None:
        title = _folk_title(tune.title)
        key = _title_key(tune.title)
        if key in seen_titles:
            return
        seen_titles.add(key)
        genre = dance_genre(tune.rhythm or tune.title, default)
        if genre == default and re.search(r"\bslow", tune.notes.lower()):
            genre = "irish air"
        refs.append(PieceRef(piece, "dance", "dance", str(path), number, title, TRADITIONAL, genre))

    for path in by_folder.get("ryansMammoth", []):
        tunes = _abc_tunes(path) if path.suffix == ".abc" else []
        if len(tunes) == 1 and not re.search(r"_[A-G]$", path.stem):
            add(_stem_id(path, root), path, None, tunes[0], "fiddle tune")
    for path in by_folder.get("oneills1850", []):
        for tune in _abc_tunes(path) if path.suffix == ".abc" else []:
            if tune.number not in seen_numbers:
                seen_numbers.add(tune.number)
                add(f"oneills1850/{tune.number:04d}", path, tune.number, tune, "irish folk tune")
    return refs


def _folk_songs(files: list[Path], root: Path) -> list[PieceRef]:
    refs = []
    for path in files:
        if path.suffix != ".abc" or path.stem.startswith(ESSEN_EXCLUDED):
            continue
        genre = next((g for prefix, g in ESSEN_GENRES.items() if path.stem.startswith(prefix)), "german folk song")
        stem, seen = _stem_id(path, root), set()
        for tune in _abc_tunes(path):
            if tune.number in seen:
                continue
            seen.add(tune.number)
            refs.append(PieceRef(f"{stem}/{tune.number}", "folk_song", "folk_song", str(path),
                                 tune.number, _folk_title(tune.title), TRADITIONAL, genre))
    return refs


def discover_pieces() -> dict[str, list[PieceRef]]:
    """Every usable piece of the bundled music21 corpus, by plan group, in sorted order."""
    root = _corpus_root()
    by_folder = _folder_files(m21corpus.getPaths(), root)
    catalog = {
        "chorale": _chorales(by_folder.get("bach", []), root),
        "mass": _masses(by_folder.get("palestrina", []), root),
        "madrigal": _madrigals(by_folder.get("monteverdi", []), root),
        "quartet": [r for f in QUARTET_FOLDERS for r in _quartets(f, by_folder.get(f, []), root)],
        "dance": _dance_tunes(by_folder, root),
        "folk_song": _folk_songs(by_folder.get("essenFolksong", []), root),
    }
    return {group: refs for group, refs in catalog.items() if refs}


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed from ``seed`` and labels, stable across processes and Python versions."""
    text = ":".join(str(x) for x in (seed, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def plan_pieces(catalog: dict[str, list[PieceRef]], seed: int, piece_seconds_cap: float) -> list[PieceRef]:
    """All pieces, each group shuffled with the seed, interleaved so that every prefix of the plan splits its
    expected audio time between the groups by their ``share`` (weighted fair queueing on expected seconds)."""
    rng = np.random.default_rng(derive_seed(seed, "plan"))
    queues = {g: deque(refs[i] for i in rng.permutation(len(refs))) for g, refs in sorted(catalog.items())}
    cost = {g: min(GROUPS[g].piece_seconds, piece_seconds_cap) for g in queues}
    finish = {g: cost[g] / GROUPS[g].share for g in queues}
    plan: list[PieceRef] = []
    while queues:
        group = min(queues, key=lambda g: (finish[g], g))
        plan.append(queues[group].popleft())
        finish[group] += cost[group] / GROUPS[group].share
        if not queues[group]:
            del queues[group]
    return plan


# ----------------------------------------------------------------------------------------------- rendition


@dataclass(frozen=True)
class RenderTask:
    ref: PieceRef
    seed: int
    sample_rate: int
    stereo: bool
    clip_seconds: float
    max_seconds: float
    soundfont: str
    fluidsynth: str
    workdir: str  # scratch folder of the run, removed by the main process


@dataclass
class Clip:
    segment: int
    flac: bytes
    meta: dict[str, Any]


@dataclass
class PieceResult:
    piece: str
    clips: list[Clip] = field(default_factory=list)
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(c.meta["duration"] for c in self.clips)


@dataclass(frozen=True)
class Rendition:
    instruments: list[str]
    tracks: list[tuple[int, str, bool]]  # (part index, instrument, is a doubling)
    bpm: int
    quarters_per_minute: float
    transpose: int
    velocity_scale: float
    reverb: int
    pan_spread: float


def _parse(ref: PieceRef) -> stream.Score:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = converter.parse(ref.path, number=ref.number) if ref.number is not None else converter.parse(ref.path)
    if isinstance(score, stream.Opus):
        score = score.scores[0]
    if not isinstance(score, stream.Score) or not score.parts:
        raise ValueError("no playable parts")
    return score


def _time_signature(score: stream.Score) -> meter.TimeSignature | None:
    return score.recurse().getElementsByClass(meter.TimeSignature).first()


def _beat_quarters(ts: meter.TimeSignature | None, count_in_two: bool) -> float:
    """Quarter notes per counted beat: the time signature's beat, 4/4 dance tunes counted in half notes."""
    if ts is None:
        return 1.0
    beat = float(ts.beatDuration.quarterLength)
    if count_in_two and (ts.numerator, ts.denominator) == (4, 4):
        beat *= 2.0
    return beat


def _tempo_text_range(score: stream.Score, ts: meter.TimeSignature | None) -> tuple[int, int] | None:
    """The BPM range of the first tempo word written in the score, scaled to the time signature's beat."""
    texts = [m.text for m in score.recurse().getElementsByClass(tempo.MetronomeMark) if m.text]
    texts += [t.content for t in score.recurse().getElementsByClass(expressions.TextExpression)][:8]
    for text in texts:
        found = [(m.start(), w) for w in TEMPO_TEXT_BPM for m in re.finditer(rf"\b{w}\b", str(text).lower())]
        if found:
            lo, hi = TEMPO_TEXT_BPM[min(found)[1]]
            beat = _beat_quarters(ts, False)
            factor = 2.0 / 3.0 if beat in (1.5, 3.0) else 0.6 if beat >= 2.0 else 1.0
            return round(lo * factor), round(hi * factor)
    return None


def _choose_palette(style: Style, rng: np.random.Generator) -> Palette:
    p = np.array([pal.weight for pal in style.palettes])
    return style.palettes[int(rng.choice(len(style.palettes), p=p / p.sum()))]


def _tracks(palette: Palette, n_parts: int) -> list[tuple[int, str, bool]]:
    """(part, instrument, doubling) per MIDI track; palette parts spread evenly from top to bottom voice."""
    m = len(palette.parts)
    tracks = []
    for i in range(n_parts):
        j = 0 if n_parts == 1 else round(i * (m - 1) / (n_parts - 1))
        tracks.append((i, palette.parts[j], False))
    tracks += [(i, name, True) for name in palette.doubles for i in range(n_parts)]
    return tracks


def choose_rendition(ref: PieceRef, score: stream.Score, rng: np.random.Generator) -> Rendition:
    style = STYLES[ref.style]
    ts = _time_signature(score)
    palette = _choose_palette(style, rng)
    counted_in_two = style.duple_dance and ref.genre not in UNCOUNTED_IN_TWO
    lo, hi = DANCE_BPM.get(ref.genre, style.bpm) if ref.style == "dance" else style.bpm
    if ref.group == "quartet":
        lo, hi = _tempo_text_range(score, ts) or (lo, hi)
    bpm = int(rng.integers(lo, hi + 1))
    return Rendition(
        instruments=palette.instruments(),
        tracks=_tracks(palette, len(score.parts)),
        bpm=bpm,
        quarters_per_minute=bpm * _beat_quarters(ts, counted_in_two),
        transpose=int(rng.integers(-style.transpose, style.transpose + 1)),
        velocity_scale=round(float(rng.uniform(0.75, 1.1)), 3),
        reverb=int(rng.integers(20, 90)),
        pan_spread=float(rng.uniform(20.0, 50.0)) * (1 if rng.random() < 0.5 else -1),
    )


def analyze_key(score: stream.Score, transpose: int) -> str:
    """Key of the whole score (Krumhansl-Schmuckler), moved by ``transpose`` semitones: 'E-flat major'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = score.analyze("key")
    return key_name(k.tonic.pitchClass + transpose, k.mode)


def _expanded(score: stream.Score, max_quarters: float) -> stream.Score:
    """Repeats written out, for pieces shorter than the cap (expandRepeats deep-copies: slow on long scores)."""
    if score.highestTime >= max_quarters or not score.recurse().getElementsByClass(bar.Repeat).first():
        return score
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return score.expandRepeats()
    except Exception:  # music21 rejects malformed repeat structures; play them as written
        return score


def part_notes(part: stream.Part) -> list[tuple[float, float, int]]:
    """(start, end, MIDI pitch) in quarter notes, ties merged; chord symbols and grace notes are not played."""
    events: list[list[float]] = []
    open_ties: dict[int, int] = {}
    for element in part.flatten().notes:
        if isinstance(element, harmony.Harmony) or element.duration.isGrace or element.quarterLength <= 0:
            continue
        start = float(element.offset)
        end = start + float(element.quarterLength)
        subnotes = element.notes if isinstance(element, chord.Chord) else [element]
        for note in subnotes:
            if not hasattr(note, "pitch"):
                continue
            tie = (note.tie or element.tie).type if (note.tie or element.tie) else None
            pitch = int(note.pitch.midi)
            if tie in ("stop", "continue") and pitch in open_ties:
                events[open_ties[pitch]][1] = end
                if tie == "stop":
                    del open_ties[pitch]
                continue
            events.append([start, end, pitch])
            if tie in ("start", "continue"):
                open_ties[pitch] = len(events) - 1
    return [(s, e, int(p)) for s, e, p in events]


def build_midi(parts: list[list[tuple[float, float, int]]], rendition: Rendition, max_quarters: float,
               rng: np.random.Generator) -> mido.MidiFile:
    """A type-1 MIDI file: one tempo, one track (and channel, 9 skipped) per (part, instrument)."""
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_QUARTER)
    meta = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(rendition.quarters_per_minute))])
    midi.tracks.append(meta)
    channels = [c for c in range(16) if c != 9]
    by_instrument = len(rendition.tracks) > len(channels)
    names = list(dict.fromkeys(name for _, name, _ in rendition.tracks))
    n_parts = max(1, len(parts))
    for t, (part, name, doubling) in enumerate(rendition.tracks):
        channel = channels[names.index(name) if by_instrument else t]
        position = part / (n_parts - 1) - 0.5 if n_parts > 1 else 0.0
        pan = int(np.clip(64 + rendition.pan_spread * (position - (0.3 if doubling else 0.0)), 0, 127))
        track = mido.MidiTrack([
            mido.Message("program_change", channel=channel, program=INSTRUMENTS[name]),
            mido.Message("control_change", channel=channel, control=10, value=pan),
            mido.Message("control_change", channel=channel, control=91, value=rendition.reverb),
        ])
        base = 84.0 * rendition.velocity_scale * (0.8 if doubling else 1.0)
        _append_notes(track, parts[part], channel, base, rendition.transpose, max_quarters, rng)
        midi.tracks.append(track)
    return midi


def _append_notes(track: mido.MidiTrack, notes: list[tuple[float, float, int]], channel: int, base_velocity: float,
                  transpose: int, max_quarters: float, rng: np.random.Generator) -> None:
    events: list[tuple[int, int, int, int]] = []  # (tick, on?, pitch, velocity): offs sort before ons
    for start, end, pitch in notes:
        pitch += transpose
        if start >= max_quarters or not 0 <= pitch <= 127:
            continue
        on = round(start * TICKS_PER_QUARTER)
        off = max(on + 1, round(min(end, max_quarters) * TICKS_PER_QUARTER))
        velocity = int(np.clip(round(base_velocity + rng.normal(0.0, 4.0)), 1, 127))
        events += [(on, 1, pitch, velocity), (off, 0, pitch, 0)]
    now = 0
    for tick, is_on, pitch, velocity in sorted(events):
        kind = "note_on" if is_on else "note_off"
        track.append(mido.Message(kind, channel=channel, note=pitch, velocity=velocity, time=tick - now))
        now = tick


def synthesize(midi: mido.MidiFile, task: RenderTask, workdir: Path) -> torch.Tensor:
    """fluidsynth fast render -> float32 tensor [2, T] at ``task.sample_rate``."""
    mid_path, wav_path = workdir / "piece.mid", workdir / "piece.wav"
    midi.save(str(mid_path))
    cmd = [task.fluidsynth, "-ni", "-q", "-g", str(FLUIDSYNTH_GAIN), "-r", str(task.sample_rate),
           "-o", "synth.dynamic-sample-loading=1",  # load only the samples of the presets played
           "-T", "wav", "-O", "float", "-F", str(wav_path), task.soundfont, str(mid_path)]
    timeout = 60.0 + 2.0 * task.max_seconds
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not wav_path.exists():
        raise RuntimeError(f"fluidsynth exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    wav, sr = load_audio(wav_path)
    if sr != task.sample_rate:
        raise RuntimeError(f"fluidsynth wrote {sr} Hz instead of {task.sample_rate} Hz")
    return wav


def trim_and_normalize(wav: torch.Tensor) -> torch.Tensor:
    """Cut leading/trailing audio below TRIM_DB of the peak, then scale the peak to PEAK."""
    peak = float(wav.abs().max())
    if peak <= 0.0:
        return wav[:, :0]
    loud = (wav.abs().amax(dim=0) > peak * 10.0 ** (TRIM_DB / 20.0)).nonzero().flatten()
    wav = wav[:, int(loud[0]): int(loud[-1]) + 1]
    return wav * (PEAK / peak)


def cut_clips(wav: torch.Tensor, clip_samples: int) -> list[tuple[int, torch.Tensor]]:
    """(segment, [C, clip_samples]) for every whole clip whose RMS is at least SILENCE_RMS; the tail is dropped."""
    clips = []
    for segment in range(wav.shape[-1] // clip_samples):
        clip = wav[:, segment * clip_samples:(segment + 1) * clip_samples]
        if float(clip.pow(2).mean().sqrt()) >= SILENCE_RMS:
            clips.append((segment, clip))
    return clips


def render_piece(task: RenderTask) -> PieceResult:
    """Parse, render and cut one piece; raises on failure (see _render_task)."""
    ref = task.ref
    rng = np.random.default_rng(task.seed)
    score = _parse(ref)
    rendition = choose_rendition(ref, score, rng)
    key = analyze_key(score, rendition.transpose)
    max_quarters = task.max_seconds * rendition.quarters_per_minute / 60.0
    parts = [part_notes(p) for p in _expanded(score, max_quarters).parts]
    if not any(parts):
        raise ValueError("no notes")
    midi = build_midi(parts, rendition, max_quarters, rng)
    with tempfile.TemporaryDirectory(prefix="piece-", dir=task.workdir) as tmp:
        wav = synthesize(midi, task, Path(tmp))
    wav = trim_and_normalize(wav if task.stereo else convert_channels(wav, "mono"))
    clip_samples = round(task.clip_seconds * task.sample_rate)
    meta = {
        "genre": ref.genre, "instruments": rendition.instruments, "bpm": rendition.bpm, "key": key,
        "composer": ref.composer, "title": ref.title, "piece": ref.piece,
    }
    caption_rng = np.random.default_rng(derive_seed(task.seed, "captions"))
    clips = []
    for segment, audio in cut_clips(wav, clip_samples):
        clip_meta = {
            "caption": describe(meta, caption_rng), **meta, "split": None, "segment": segment,
            "offset": round(segment * clip_samples / task.sample_rate, 6),
            "duration": round(clip_samples / task.sample_rate, 6), "sample_rate": task.sample_rate,
            "channels": int(audio.shape[0]), "source": None, "collection": ref.piece.split("/")[0],
            "programs": [INSTRUMENTS[name] for _, name, _ in rendition.tracks],
            "transpose": rendition.transpose, "velocity_scale": rendition.velocity_scale,
            "soundfont": Path(task.soundfont).name,
        }
        clips.append(Clip(segment, encode_flac(audio.to(torch.float32), task.sample_rate), clip_meta))
    return PieceResult(ref.piece, clips, None, meta)


def _render_task(task: RenderTask) -> PieceResult:
    """Worker entry point: a failing piece becomes a result with ``error`` set, never an exception."""
    try:
        result = render_piece(task)
    except Exception as e:
        return PieceResult(task.ref.piece, error=f"{type(e).__name__}: {e}".strip()[:500])
    if not result.clips:
        result.error = "no clip: shorter than one clip or silent"
    return result


def _init_worker() -> None:
    torch.set_num_threads(1)  # idle OpenMP threads spin and steal the other workers' cores


def _pool(workers: int) -> mp.pool.Pool:
    """A forkserver pool (spawn where there is none): safe next to torch, and the server imports this module
    once, so workers start in milliseconds instead of re-importing torch and music21 each."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = mp.get_context("spawn")
    return ctx.Pool(workers, initializer=_init_worker)


def _ordered_results(tasks: list[RenderTask], workers: int) -> Iterator[PieceResult]:
    """Results in task order, with a window of tasks running ahead so one slow piece does not idle the other
    workers. Closing the iterator terminates the pool."""
    if workers <= 1:
        for task in tasks:
            yield _render_task(task)
        return
    pool = _pool(workers)
    try:
        pending: deque = deque()
        upcoming = iter(tasks)
        for task in upcoming:
            pending.append(pool.apply_async(_render_task, (task,)))
            if len(pending) >= 4 * workers + 4:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append(pool.apply_async(_render_task, (nxt,)))
            yield result
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------------------------- corpus


@dataclass
class CorpusSummary:
    """What ``render_corpus`` wrote; ``format()`` is the human-readable version."""

    out: str
    sample_rate: int
    channels: int
    clip_seconds: float
    seed: int
    clips: dict[str, int]
    seconds: dict[str, float]
    pieces: dict[str, int]
    total_hours: float
    genres: dict[str, int]  # clips per genre
    examples: list[str]  # a few captions
    skipped: int  # pieces that failed or gave no clip

    @property
    def total_clips(self) -> int:
        return sum(self.clips.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusSummary:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def format(self) -> str:
        layout = "mono" if self.channels == 1 else "stereo"
        lines = [f"demo corpus: {self.out}",
                 f"  {self.total_clips} clips of {self.clip_seconds:g} s = {self.total_hours:.2f} h, "
                 f"{self.sample_rate} Hz {layout}, seed {self.seed}, {self.skipped} pieces skipped"]
        for split in SPLITS:
            lines.append(f"  {split:<5}  {self.clips.get(split, 0):>5} clips  "
                         f"{self.seconds.get(split, 0.0) / 3600:6.2f} h  {self.pieces.get(split, 0):>4} pieces")
        total = max(1, self.total_clips)
        shares = ", ".join(f"{g} {100 * n / total:.0f}%" for g, n in sorted(self.genres.items(), key=lambda x: -x[1]))
        lines.append(f"  genres: {shares}")
        lines.append("  captions:")
        lines += [f"    - {c}" for c in self.examples]
        return "\n".join(lines)


INSTALL_HINT = "on Debian/Ubuntu: apt-get install fluidsynth fluid-soundfont-gm"


class MissingSynthesizer(UserError, FileNotFoundError):
    """fluidsynth or a General MIDI soundfont, which rendering the demo corpus needs, is not there."""


def find_soundfont(soundfont: str | Path | None = None) -> Path:
    """An explicit path, else $OSTINATO_SOUNDFONT, else the first installed of SOUNDFONT_CANDIDATES."""
    if soundfont is not None or os.environ.get(SOUNDFONT_ENV):
        path = Path(soundfont if soundfont is not None else os.environ[SOUNDFONT_ENV]).expanduser()
        if not path.is_file():
            origin = "--soundfont" if soundfont is not None else f"${SOUNDFONT_ENV}"
            raise MissingSynthesizer(f"{origin} {path} is not a file; give the path of a General MIDI .sf2 soundfont "
                                     f"({INSTALL_HINT} installs /usr/share/sounds/sf2/FluidR3_GM.sf2)")
        with open(path, "rb") as f:
            head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"sfbk":  # fluidsynth would quietly render with another font
            origin = "--soundfont" if soundfont is not None else f"${SOUNDFONT_ENV}"
            raise MissingSynthesizer(f"{origin} {path} is not a SoundFont 2 (.sf2) file; give a General MIDI .sf2 "
                                     f"({INSTALL_HINT} installs /usr/share/sounds/sf2/FluidR3_GM.sf2)")
        return path.resolve()
    for candidate in SOUNDFONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate).resolve()
    raise MissingSynthesizer(f"no General MIDI soundfont found (looked in {', '.join(SOUNDFONT_CANDIDATES)}); "
                             f"install one ({INSTALL_HINT}) or set ${SOUNDFONT_ENV} to a .sf2 file")


def find_fluidsynth() -> str:
    """The fluidsynth program on PATH, which renders the demo corpus."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise MissingSynthesizer(f"the fluidsynth program is not on PATH; install it ({INSTALL_HINT})")
    return exe


def _validate(sample_rate: int, channels: str, hours: float, clip_seconds: float, valid_fraction: float,
              test_fraction: float, workers: int | None) -> None:
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))} Hz, got {sample_rate!r}")
    if channels not in ("mono", "stereo"):
        raise ValueError(f"channels must be 'mono' or 'stereo', got {channels!r}")
    if not hours > 0 or not math.isfinite(hours):
        raise ValueError(f"hours must be a positive number, got {hours!r}")
    if not clip_seconds > 0 or clip_seconds > MAX_PIECE_SECONDS:
        raise ValueError(f"clip_seconds must be in (0, {MAX_PIECE_SECONDS:g}], got {clip_seconds!r}")
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction and test_fraction must be >= 0 with a sum below 1, "
                         f"got {valid_fraction!r} and {test_fraction!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")


def _split_dirs(out: Path) -> list[Path]:
    return [out / "audio" / split for split in SPLITS]


def _finished(out: Path, options: dict[str, Any]) -> CorpusSummary | None:
    """The finished corpus in ``out`` rendered with these options (any soundfont, on any machine), else None."""
    manifest = out / CORPUS_NAME
    if not manifest.is_file():
        return None
    saved = read_json(manifest)
    if {k: v for k, v in (saved.get("options") or {}).items() if k in options} != options:
        return None
    return CorpusSummary.from_dict({**saved["summary"], "out": str(out)})


def _existing(out: Path, options: dict[str, Any], overwrite: bool) -> CorpusSummary | None:
    """The finished corpus with identical options, or None once ``out`` is free to write; raises otherwise."""
    manifest = out / CORPUS_NAME
    leftovers = [p for p in _split_dirs(out) if p.is_dir() and any(p.iterdir())]
    if not overwrite:
        if manifest.exists():
            saved = read_json(manifest)
            if saved.get("options") == options:
                return CorpusSummary.from_dict({**saved["summary"], "out": str(out)})
            raise FileExistsError(f"{manifest} already exists with other options; pass --overwrite "
                                  "(overwrite=True) to replace that corpus")
        if leftovers:
            raise FileExistsError(f"{out / 'audio'} holds clips of an unfinished render (no {manifest}); "
                                  "pass --overwrite (overwrite=True) to replace them")
        return None
    manifest.unlink(missing_ok=True)
    for path in leftovers:
        shutil.rmtree(path)
    return None


def assign_splits(pieces: list[str], seed: int, valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """piece -> split. Seeded shuffle; with >= 3 pieces each split whose fraction is > 0 gets at least one."""
    order = sorted(pieces)
    rng = np.random.default_rng(derive_seed(seed, "splits"))
    order = [order[i] for i in rng.permutation(len(order))]
    n = len(order)
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    if n >= 3:
        n_valid = max(n_valid, 1 if valid_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    while n_valid + n_test > max(0, n - 1):
        if n_valid >= n_test and n_valid > 0:
            n_valid -= 1
        else:
            n_test -= 1
    splits = ["valid"] * n_valid + ["test"] * n_test + ["train"] * (n - n_valid - n_test)
    return dict(zip(order, splits, strict=True))


def clip_name(piece: str, segment: int) -> str:
    """File stem of a clip: the piece id made filename- and WebDataset-key-safe (no dots), plus the segment."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', piece).strip('_')}_{segment:03d}"


def _collect(tasks: list[RenderTask], workers: int, target_seconds: float, min_pieces: int,
             progress: bool) -> tuple[list[PieceResult], list[PieceResult]]:
    """Take results in plan order until ``target_seconds`` and ``min_pieces`` are reached: (kept, skipped)."""
    kept: list[PieceResult] = []
    skipped: list[PieceResult] = []
    seconds = 0.0
    bar = tqdm(total=round(target_seconds), unit="s", desc="rendering demo corpus", disable=not progress)
    results = _ordered_results(tasks, workers)
    try:
        for result in results:
            if result.error:
                log.warning("skipped %s: %s", result.piece, result.error)
                skipped.append(result)
            else:
                kept.append(result)
                bar.update(min(result.seconds, max(0.0, target_seconds - seconds)))
                seconds += result.seconds
            if seconds >= target_seconds and len(kept) >= min_pieces:
                break
    finally:
        results.close()
        bar.close()
    if seconds < target_seconds:
        log.warning("the corpus ran out of pieces at %.0f of %.0f s", seconds, target_seconds)
    return kept, skipped


def _write(out: Path, kept: list[PieceResult], splits: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Write every clip and sidecar; returns the metadata written, by split."""
    written: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for result in kept:
        split = splits[result.piece]
        for clip in result.clips:
            name = clip_name(result.piece, clip.segment)
            meta = {**clip.meta, "split": split, "source": f"{split}/{name}.flac"}
            atomic_write_bytes(out / "audio" / split / f"{name}.flac", clip.flac)
            atomic_write_json(out / "audio" / split / f"{name}.json", meta)
            written[split].append(meta)
    return written


def _example_captions(kept: list[PieceResult], count: int = 5) -> list[str]:
    examples, genres = [], set()
    for result in kept:
        if result.meta["genre"] not in genres:
            genres.add(result.meta["genre"])
            examples.append(result.clips[0].meta["caption"])
        if len(examples) == count:
            break
    return examples


def _summarize(out: Path, options: dict[str, Any], kept: list[PieceResult], skipped: list[PieceResult],
               written: dict[str, list[dict[str, Any]]]) -> CorpusSummary:
    seconds = {s: round(sum(m["duration"] for m in metas), 3) for s, metas in written.items()}
    return CorpusSummary(
        out=str(out), sample_rate=options["sample_rate"], channels=1 if options["channels"] == "mono" else 2,
        clip_seconds=options["clip_seconds"], seed=options["seed"],
        clips={s: len(metas) for s, metas in written.items()}, seconds=seconds,
        pieces={s: len({m["piece"] for m in metas}) for s, metas in written.items()},
        total_hours=round(sum(seconds.values()) / 3600.0, 4),
        genres=dict(sorted(Counter(m["genre"] for metas in written.values() for m in metas).items())),
        examples=_example_captions(kept), skipped=len(skipped),
    )


def render_corpus(out: str | Path, *, sample_rate: int = 24000, channels: Literal["mono", "stereo"] = "mono",
                  hours: float = 1.0, clip_seconds: float = 10.0, seed: int = 0, workers: int | None = None,
                  soundfont: str | Path | None = None, valid_fraction: float = 0.05, test_fraction: float = 0.05,
                  overwrite: bool = False, progress: bool = True) -> CorpusSummary:
    """Render about ``hours`` of music21 corpus pieces into captioned ``clip_seconds`` FLAC clips under ``out``.

    Raises FileExistsError when ``out`` holds a corpus made with other options (or an unfinished one) and
    ``overwrite`` is False; with identical options that corpus's summary is returned without rendering.
    ``workers`` defaults to os.cpu_count(); the output does not depend on it.
    """
    _validate(sample_rate, channels, hours, clip_seconds, valid_fraction, test_fraction, workers)
    out = Path(out)
    options = {"sample_rate": int(sample_rate), "channels": channels, "hours": float(hours),
               "clip_seconds": float(clip_seconds), "seed": int(seed), "valid_fraction": float(valid_fraction),
               "test_fraction": float(test_fraction)}
    finished = None if overwrite or soundfont is not None else _finished(out, options)
    if finished is not None:  # a machine without fluidsynth (a GPU node) runs on a corpus rendered elsewhere
        return finished
    font = find_soundfont(soundfont)
    output_folder(out, "--out")  # before the rendering: a file there, a read-only or full disk
    fluidsynth = find_fluidsynth()
    options["soundfont"] = str(font)
    existing = _existing(out, options, overwrite)
    if existing is not None:
        return existing

    started = time.monotonic()
    target = hours * 3600.0
    clips_per_piece = max(1, round(min(MAX_PIECE_SECONDS, target / 10.0) / clip_seconds))
    max_seconds = clips_per_piece * clip_seconds + 1.0  # the second covers the trimmed attack and release
    plan = plan_pieces(discover_pieces(), seed, max_seconds)
    min_pieces = 3 if valid_fraction > 0 or test_fraction > 0 else 1
    with tempfile.TemporaryDirectory(prefix="ostinato-corpus-") as workdir:
        tasks = [RenderTask(ref, derive_seed(seed, ref.piece), int(sample_rate), channels == "stereo",
                            float(clip_seconds), max_seconds, str(font), fluidsynth, workdir) for ref in plan]
        kept, skipped = _collect(tasks, workers or os.cpu_count() or 1, target, min_pieces, progress)
    rendered = time.monotonic()

    splits = assign_splits([r.piece for r in kept], seed, valid_fraction, test_fraction)
    written = _write(out, kept, splits)
    summary = _summarize(out, options, kept, skipped, written)
    pieces = [{"piece": r.piece, "split": splits[r.piece], "title": r.meta["title"], "composer": r.meta["composer"],
               "genre": r.meta["genre"], "clips": len(r.clips)} for r in kept]
    atomic_write_json(out / CORPUS_NAME, {
        "format": FORMAT, "options": options, "summary": {k: v for k, v in summary.to_dict().items() if k != "out"},
        "pieces": pieces,
        "skipped": [{"piece": r.piece, "reason": r.error} for r in skipped],
    })
    log.info("rendered %d clips in %.1f s, wrote them in %.1f s", summary.total_clips, rendered - started,
             time.monotonic() - rendered)
    return summary
