"""Caption text from structured music metadata: tempo words, key spelling, dance-tune genres, templates.

Everything here is pure (no I/O, no global random state) so the demo-corpus renderer and text conditioning
can share it. ``describe`` draws its template from the ``numpy.random.Generator`` it is given.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Lower bounds (BPM) of the Italian tempo words; the first row applies below the second's bound.
TEMPO_WORDS: tuple[tuple[int, str], ...] = (
    (0, "largo"),
    (66, "adagio"),
    (76, "andante"),
    (108, "moderato"),
    (120, "allegro"),
    (168, "presto"),
)

# Tonic spelling per pitch class: the enharmonic with the smaller key signature (F-sharp over G-flat at a tie).
_MAJOR_TONICS = ("C", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat", "B")
_MINOR_TONICS = ("C", "C-sharp", "D", "E-flat", "E", "F", "F-sharp", "G", "G-sharp", "A", "B-flat", "B")

# Dance-tune rhythms as folk collections name them (ABC ``R:`` field or title) -> genre words.
# Longer names first so "slip jig" wins over "jig".
DANCE_GENRES: tuple[tuple[str, str], ...] = (
    ("double jig", "irish jig"),
    ("slip jig", "irish slip jig"),
    ("slipjig", "irish slip jig"),
    ("set dance", "irish set dance"),
    ("strathspey", "scottish strathspey"),
    ("hornpipe", "hornpipe"),
    ("reel", "irish reel"),
    ("jig", "irish jig"),
    ("slide", "irish slide"),
    ("polka", "polka"),
    ("clog", "clog dance"),
    ("fling", "highland fling"),
    ("waltz", "waltz"),
    ("march", "march"),
    ("air", "irish air"),
)

_TRADITIONAL = {"", "traditional", "anonymous", "unknown"}
VOICES = {"choir", "voice", "voices", "vocals", "singer", "soprano", "alto", "tenor", "bass voice"}

_TEMPLATES: tuple[str, ...] = (
    "{A_genre}{by} for {instruments}, in {key}, at {bpm} BPM ({tempo}).",
    "{A_genre}{by}, {performed} {instruments} in {key}; {tempo} tempo, {bpm} BPM.",
    "{Tempo} {genre}{by} in {key} at {bpm} BPM, performed by {instruments}.",
    "{Instruments} {play} {a_genre}{by}, {key}, {bpm} BPM ({tempo}).",
    "{A_genre}{by}: {instruments}, {key}, {tempo} at {bpm} BPM.",
    "{Instrumental} {genre}{by} in {key}, {tempo} at {bpm} BPM, for {instruments}.",
)
_TITLED_TEMPLATES: tuple[str, ...] = (
    "\"{title}\", {a_genre}{by} for {instruments}, in {key} at {bpm} BPM ({tempo}).",
    "{A_genre}{by}, \"{title}\", {performed} {instruments} in {key}; {tempo}, {bpm} BPM.",
)


def tempo_word(bpm: float) -> str:
    """The Italian tempo word for ``bpm``: largo < 66 <= adagio < 76 <= andante < 108 <= moderato < 120
    <= allegro < 168 <= presto."""
    word = TEMPO_WORDS[0][1]
    for lower, name in TEMPO_WORDS:
        if bpm >= lower:
            word = name
    return word


def key_name(pitch_class: int, mode: str) -> str:
    """'E-flat major', 'F-sharp minor': ``pitch_class`` 0 = C, ``mode`` 'major' or 'minor'."""
    if mode not in ("major", "minor"):
        raise ValueError(f"mode must be 'major' or 'minor', got {mode!r}")
    tonics = _MAJOR_TONICS if mode == "major" else _MINOR_TONICS
    return f"{tonics[pitch_class % 12]} {mode}"


def dance_genre(text: str, default: str) -> str:
    """Genre words of a folk tune from its rhythm field or title ('Acacia -- Reel' -> 'irish reel')."""
    lowered = re.sub(r"[^a-z]+", " ", text.lower())
    for name, genre in DANCE_GENRES:
        if re.search(rf"\b{name}s?\b", lowered):
            return genre
    return default


def join_words(words: Sequence[str]) -> str:
    """['a'] -> 'a'; ['a', 'b'] -> 'a and b'; ['a', 'b', 'c'] -> 'a, b and c'."""
    words = list(words)
    if not words:
        return ""
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} and {words[-1]}"


def with_article(phrase: str) -> str:
    """'a baroque chorale', 'an irish reel', 'a european folk song'."""
    sounds_like_you = re.match(r"(eu|uni|use|one\b)", phrase.lower())
    vowel = phrase[:1].lower() in "aeiou" and not sounds_like_you
    return f"{'an' if vowel else 'a'} {phrase}"


def is_traditional(composer: str | None) -> bool:
    return (composer or "").strip().lower() in _TRADITIONAL


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe(meta: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A one-sentence caption from ``meta`` (genre, composer, instruments, bpm, key; title optional).

    The caption always names the genre words, the composer (or 'traditional'), every instrument, the BPM as a
    number, its tempo word and the key; ``rng`` picks among several phrasings.
    """
    genre = str(meta["genre"])
    composer = str(meta.get("composer") or "")
    instruments = [str(i) for i in meta["instruments"]]
    bpm = int(round(float(meta["bpm"])))
    if is_traditional(composer):
        genre, by = f"traditional {genre}", ""
    else:
        by = f" by {composer}"
    title = str(meta.get("title") or "").strip().replace('"', "'")
    templates = _TEMPLATES + (_TITLED_TEMPLATES if title else ())
    template = templates[int(rng.integers(len(templates)))]
    ensemble = join_words(instruments)
    vocal = [i in VOICES for i in instruments]
    fields = {
        "genre": genre,
        "a_genre": with_article(genre),
        "A_genre": _capitalize(with_article(genre)),
        "by": by,
        "instruments": ensemble,
        "Instruments": _capitalize(ensemble),
        "play": ("sings" if all(vocal) else "plays") if len(instruments) == 1 else ("sing" if all(vocal) else "play"),
        "performed": "sung by" if all(vocal) else "played on" if not any(vocal) else "performed by",
        "Instrumental": "Vocal" if any(vocal) else "Instrumental",
        "key": str(meta["key"]),
        "bpm": bpm,
        "tempo": tempo_word(bpm),
        "Tempo": _capitalize(tempo_word(bpm)),
        "title": title,
    }
    return template.format(**fields)
