"""Evaluation suites: YAML files (OmegaConf) that say what to generate and how to score it.

A suite is ``kind: text_to_music`` (a MusicGen or a MusicLM bundle writes ``num_samples`` clips of ``seconds`` from
prompts) or ``kind: reconstruction`` (a codec re-encodes the reference clips) or ``kind: unconditional`` (a Musika
GAN or a Jukebox bundle writes ``num_samples`` clips of ``seconds``; Jukebox is conditioned on reference clip
``i``'s metadata, e.g. genre and composer) or ``kind: retrieval`` (a MuLaN ranks the reference clips against their
captions, both ways). Which families run which kind is the registry's (``Family.evaluate``). Every kind has the
same top-level keys (``TOP_KEYS``); a key that means nothing to a kind (``generation`` of a reconstruction,
``rerank`` of anything but text_to_music) is refused in one line naming it. Prompts (a retrieval suite's
captions) are the reference clips' ``description(meta)``, as MusicGen trains on them, unless ``prompts`` or
``prompts_file`` gives them. Item ``i`` pairs with reference clip ``i`` (shard order), which the paired metrics
(chroma, kld, mel, sisnr, stft), the melody condition and retrieval use. ``rerank: k`` (MusicLM) generates ``k``
candidates per prompt and keeps the one MuLaN scores highest. See ``evaluation/README.md`` for every key.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ostinato.errors import UserError, did_you_mean

__all__ = ["KINDS", "METRICS", "MetricSpec", "Suite", "SuiteError", "find_suite", "load_suite", "suites_dir"]

KINDS = ("text_to_music", "reconstruction", "unconditional", "retrieval")

# metric -> its settings and their defaults ("embedding": None = the suite's top-level ``embedding``)
METRICS: dict[str, dict[str, Any]] = {
    "fad": {"embedding": None, "per": "frame"},
    "fad_inf": {"embedding": None, "per": "frame", "num_points": 15, "min_n": None, "seed": 0,
                "protocol": "ostinato"},
    "per_song_fad": {"embedding": None, "bins": 20},
    "kad": {"embedding": None, "per": "clip", "bandwidth": None, "bandwidth_from": "reference"},
    "text_audio": {"embedding": None},
    "kld": {"classifier": None, "multilabel": False, "labels": None},
    "chroma": {"hop_seconds": 0.128, "argmax": False},
    "mel": {"n_mels": 80, "n_fft": 1024, "hop_length": 256},
    "stft": {"n_ffts": [2048, 1024, 512, 256], "hop_ratio": 0.25},
    "sisnr": {},
    "retrieval": {"ks": [1, 5, 10]},
    "diversity": {"max_clips": 32},
}
EMBEDDING_METRICS = ("fad", "fad_inf", "per_song_fad", "kad", "text_audio")
PAIRED_METRICS = ("chroma", "kld", "mel", "stft", "sisnr")
RECONSTRUCTION_ONLY = ("mel", "stft", "sisnr")
GENERATING_KINDS = ("text_to_music", "unconditional")
GENERATION_KEYS = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_beta", "seed", "truncation")
LONG_FORM_KEYS = ("mode", "window", "stride", "overlap")

TOP_KEYS = ("name", "description", "kind", "reference", "reference_max_items", "prompts", "prompts_file",
            "num_samples", "seconds", "batch_size", "embedding", "generation", "rerank", "long_form",
            "melody_from_reference", "metrics", "report")


class SuiteError(UserError, ValueError):
    """A suite that cannot run; the message starts with the suite file and the key."""


@dataclass
class MetricSpec:
    """One metric of a suite: its name and settings (defaults filled in)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str | None:
        """The embedding / classifier spec this metric runs on (``load_backend``), if any."""
        return self.options.get("embedding") or self.options.get("classifier")


@dataclass
class Suite:
    """A validated suite. ``config`` is the resolved YAML with overrides (what ``metrics.json`` records)."""

    name: str
    kind: str
    reference: str | list[str]
    num_samples: int | None
    seconds: float | None
    metrics: list[MetricSpec]
    prompts: list[str] | None = None
    reference_max_items: int | None = None
    batch_size: int = 8
    embedding: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    rerank: int = 1
    long_form: dict[str, Any] = field(default_factory=dict)
    melody_from_reference: bool | str = "auto"
    report: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> MetricSpec | None:
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.metrics]

    @property
    def needs_pairs(self) -> bool:
        """Whether item ``i`` must have reference clip ``i`` (paired metrics, captions as prompts, melody)."""
        return (self.kind in ("reconstruction", "retrieval") or self.prompts is None
                or self.melody_from_reference is True or any(m.name in PAIRED_METRICS for m in self.metrics))

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> Suite:
        """The same suite file with more ``key=value`` overrides applied on top."""
        base = OmegaConf.create(self.config)
        return _build(base, self.path, _as_config(overrides, self.path), _override_keys(overrides))


def suites_dir() -> Path:
    """``$OSTINATO_EVALUATION``, else the repository's ``evaluation/`` folder."""
    env = os.environ.get("OSTINATO_EVALUATION")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "evaluation"


def find_suite(suite: str | os.PathLike) -> Path:
    """A suite file path, or the name of one in ``suites_dir()`` (``demo`` -> ``evaluation/demo.yaml``)."""
    path = Path(suite)
    if path.is_file():
        return path
    for candidate in (suites_dir() / f"{suite}.yaml", suites_dir() / str(suite)):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in suites_dir().glob("*.yaml"))
    raise SuiteError(f"no evaluation suite {suite!r}{did_you_mean(str(suite), names)}: give a YAML file or one of "
                     f"{', '.join(names) or '(none)'} (from {suites_dir()})")


def load_suite(suite: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Suite:
    """Read, override (``["generation.cfg_scale=1", ...]`` or a nested mapping), resolve and validate a suite."""
    path = find_suite(suite)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:
        raise SuiteError(f"{path}: not a valid YAML file ({e})") from None
    if not isinstance(raw, DictConfig):
        raise SuiteError(f"{path}: a suite is a mapping of keys (kind, reference, metrics, ...), got a list")
    return _build(raw, path, _as_config(overrides or [], path), _override_keys(overrides or []))


def _as_config(overrides: Sequence[str] | Mapping[str, Any], path: Path | None) -> DictConfig:
    if isinstance(overrides, Mapping):
        return OmegaConf.create(dict(overrides))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SuiteError(f"{path}: override {bad[0]!r} is not key=value (e.g. generation.cfg_scale=1)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise SuiteError(f"{path}: cannot parse overrides {list(overrides)}: {e}") from None


def _override_keys(overrides: Sequence[str] | Mapping[str, Any]) -> set[str]:
    if isinstance(overrides, Mapping):
        return {str(k).split(".")[0] for k in overrides}
    return {o.split("=", 1)[0].split(".")[0] for o in overrides}


def _build(raw: DictConfig, path: Path | None, overrides: DictConfig, overridden: set[str]) -> Suite:
    where = str(path) if path is not None else "<suite>"

    def err(key: str, msg: str) -> SuiteError:
        origin = " (set by --set)" if key.split(".")[0] in overridden else ""
        return SuiteError(f"{where}: {key}{origin}: {msg}")

    if isinstance(raw.get("metrics"), ListConfig) and "metrics" in overrides:
        raw = raw.copy()
        raw.metrics = _metrics_as_mapping(OmegaConf.to_container(raw.metrics), err)
    try:
        merged = OmegaConf.merge(raw, overrides)
        cfg = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise err(str(key), str(e).splitlines()[0]) from None
    assert isinstance(cfg, dict)
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    if unknown:
        raise err(unknown[0], f"unknown key{did_you_mean(unknown[0], TOP_KEYS)}; a suite has: {', '.join(TOP_KEYS)}")

    kind = cfg.get("kind")
    if kind not in KINDS:
        raise err("kind", f"{kind!r}: use one of {', '.join(KINDS)}")
    reference = cfg.get("reference")
    if not reference or not isinstance(reference, (str, list)):
        raise err("reference", "missing: the reference audio shards (a folder with manifest.json, a manifest or a "
                               "brace pattern, or a list of these)")

    prompts = _prompts(cfg, path, err)
    if kind == "reconstruction" and prompts is not None:
        raise err("prompts", "a reconstruction suite re-encodes the reference clips; it takes no prompts")
    if kind == "unconditional" and prompts is not None:
        raise err("prompts", "an unconditional suite takes no prompts (Jukebox reads the reference clips' metadata)")
    num_samples = _int(cfg, "num_samples", err, minimum=1, optional=True)
    if num_samples is None and kind == "unconditional":
        raise err("num_samples", "missing: how many clips to generate")
    if num_samples is None and kind == "text_to_music":
        if prompts is None:
            raise err("num_samples", "missing: how many clips to generate (from the first reference captions)")
        num_samples = len(prompts)
    if kind == "retrieval" and prompts is not None:  # caption i belongs to clip i: never cycled
        num_samples = len(prompts) if num_samples is None else num_samples
        if num_samples > len(prompts):
            key = "prompts_file" if cfg.get("prompts_file") is not None else "prompts"
            raise err(key, f"{len(prompts)} captions for num_samples={num_samples} clips: caption i is clip i's; "
                           "give one per clip or lower num_samples")
    seconds = cfg.get("seconds")
    if seconds is None and kind in ("text_to_music", "unconditional"):
        raise err("seconds", "missing: the length of each generated clip in seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0):
        raise err("seconds", f"{seconds!r}: a positive number of seconds")

    embedding = cfg.get("embedding")
    if embedding is not None and not isinstance(embedding, str):
        raise err("embedding", f"{embedding!r}: a backend spec string such as codec:REF, vggish:/path.pth, hf:/folder")
    metrics = _metrics(cfg.get("metrics"), kind, embedding, err)
    melody = cfg.get("melody_from_reference", "auto")
    if melody not in (True, False, "auto"):
        raise err("melody_from_reference", f"{melody!r}: use true, false or auto (when the model has a melody "
                                           "conditioner)")
    if melody is True and kind != "text_to_music":
        raise err("melody_from_reference", "only text_to_music suites generate, so only they take a melody")

    generation = dict(cfg.get("generation") or {})
    if generation and kind not in GENERATING_KINDS:
        raise err("generation", f"a {kind} suite generates nothing; leave generation out")
    rerank = _int(cfg, "rerank", err, minimum=1, optional=True) or 1
    if rerank > 1 and kind != "text_to_music":
        raise err("rerank", f"{rerank}: {kind} suites have no prompts to rerank against; rerank is for "
                                     "text_to_music (MusicLM)")
    for key in generation:
        if key not in GENERATION_KEYS:
            raise err(f"generation.{key}", f"unknown generation setting{did_you_mean(key, GENERATION_KEYS)}; use "
                                           f"{', '.join(GENERATION_KEYS)}")
    try:  # the sampling settings' ranges, before any model loads
        from ostinato.nn.decoding import GenerationParams

        GenerationParams(**{k: v for k, v in generation.items() if k != "truncation"})
    except (TypeError, ValueError) as e:
        raise err("generation", str(e).removeprefix("generation ")) from None
    long_form = dict(cfg.get("long_form") or {})
    for key in long_form:
        if key not in LONG_FORM_KEYS:
            raise err(f"long_form.{key}", f"unknown key; use {', '.join(LONG_FORM_KEYS)}")
    if long_form.get("mode", "window") not in ("window", "chain"):
        raise err("long_form.mode", f"{long_form['mode']!r}: use window or chain")
    report = dict(cfg.get("report") or {})
    for key in report:
        if key not in ("max_items",):
            raise err(f"report.{key}", "unknown key; use max_items (clips shown in the spectrogram grid)")
    suite = Suite(
        name=str(cfg.get("name") or (path.stem if path is not None else "suite")), kind=kind, reference=reference,
        num_samples=num_samples, seconds=None if seconds is None else float(seconds), metrics=metrics,
        prompts=prompts, reference_max_items=_int(cfg, "reference_max_items", err, minimum=1, optional=True),
        batch_size=_int(cfg, "batch_size", err, minimum=1, optional=True) or 8, embedding=embedding,
        generation=generation, rerank=rerank, long_form=long_form, melody_from_reference=melody, report=report,
        description=str(cfg.get("description") or ""), path=path, config=cfg)
    return suite


def _int(cfg: Mapping[str, Any], key: str, err, minimum: int, optional: bool) -> int | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise err(key, f"{value!r}: an integer >= {minimum}")
    return value


def _prompts(cfg: Mapping[str, Any], path: Path | None, err) -> list[str] | None:
    prompts, file = cfg.get("prompts"), cfg.get("prompts_file")
    if prompts is not None and file is not None:
        raise err("prompts_file", "give prompts or prompts_file, not both")
    if file is not None:
        candidates = [Path(file)] + ([path.parent / file] if path is not None else [])
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise err("prompts_file", f"{file}: no such file (relative paths: to the current folder or the suite's)")
        prompts = [line.strip() for line in found.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise err("prompts_file", f"{found} holds no prompts (one per line)")
        return prompts
    if prompts is None:
        return None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise err("prompts", "a non-empty list of strings (or use prompts_file)")
    return prompts


def _metrics_as_mapping(value: Any, err) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    out: dict[str, Any] = {}
    for i, entry in enumerate(value if isinstance(value, list) else []):
        if isinstance(entry, str):
            out[entry] = {}
        elif isinstance(entry, Mapping) and len(entry) == 1:
            name, options = next(iter(entry.items()))
            out[str(name)] = options
        else:
            raise err(f"metrics[{i}]", f"{entry!r}: a metric name or {{name: {{settings}}}}")
    return out


def _metrics(value: Any, kind: str, embedding: str | None, err) -> list[MetricSpec]:
    if not value:
        raise err("metrics", f"missing: a list (or mapping) of metrics among {', '.join(METRICS)}")
    if not isinstance(value, (list, Mapping)):
        raise err("metrics", f"{value!r}: a list of metric names or a mapping name -> settings")
    specs = []
    for name, options in _metrics_as_mapping(value, err).items():
        key = f"metrics.{name}"
        if name not in METRICS:
            raise err(key, f"unknown metric; use {', '.join(METRICS)}")
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise err(key, f"{options!r}: settings are a mapping ({', '.join(METRICS[name]) or 'none'})")
        for opt in options:
            if opt not in METRICS[name]:
                allowed = ", ".join(METRICS[name]) or "none"
                raise err(f"{key}.{opt}", f"unknown setting of {name}; it takes: {allowed}")
        merged = {**METRICS[name], **options}
        if name in EMBEDDING_METRICS:
            merged["embedding"] = merged["embedding"] or embedding
            if not merged["embedding"]:
                raise err(f"{key}.embedding", "missing: set `embedding: codec:REF` (or vggish:, hf:, clap:) on the "
                                               "metric or at the top of the suite")
        if "per" in merged and merged["per"] not in ("frame", "clip"):
            raise err(f"{key}.per", f"{merged['per']!r}: use frame (every embedding frame is a point) or clip "
                                    "(one mean embedding per clip)")
        if name == "kad" and merged["bandwidth_from"] not in ("reference", "generated"):
            raise err(f"{key}.bandwidth_from", f"{merged['bandwidth_from']!r}: use reference (the median pairwise "
                                               "distance of the reference set; kadtk's README) or generated "
                                               "(kadtk 1.1.0's code)")
        if name == "kad" and merged["bandwidth"] is not None and not (
                isinstance(merged["bandwidth"], (int, float)) and not isinstance(merged["bandwidth"], bool)
                and merged["bandwidth"] > 0):
            raise err(f"{key}.bandwidth", f"{merged['bandwidth']!r}: a number > 0 (the Gaussian kernel's width), "
                                          "or null for the median pairwise distance")
        if name == "kld" and not merged["classifier"]:
            raise err(f"{key}.classifier", "missing: an audio classifier backend (hf:/folder of an "
                                           "audio-classification model, or a text-audio backend such as "
                                           "clap:/ckpt.pt,text=/roberta with `labels: [...]` for zero-shot tags)")
        if name == "kld" and merged["labels"] is not None and (
                not isinstance(merged["labels"], (list, tuple)) or len(merged["labels"]) < 2):
            raise err(f"{key}.labels", "a list of at least two tag texts (zero-shot classes)")
        if name in RECONSTRUCTION_ONLY and kind != "reconstruction":
            raise err(key, f"{name} compares a clip with its own reconstruction: use it in a reconstruction suite")
        if name in ("text_audio", "kld") and kind != "text_to_music":
            raise err(key, f"{name} scores generated music against its prompt: use it in a text_to_music suite")
        if name == "diversity" and kind not in GENERATING_KINDS:
            raise err(key, "diversity compares generated clips with each other: use it in a text_to_music or "
                           "unconditional suite")
        if name == "diversity" and (isinstance(merged["max_clips"], bool) or not isinstance(merged["max_clips"], int)
                                    or merged["max_clips"] < 2):
            raise err(f"{key}.max_clips", f"{merged['max_clips']!r}: an integer >= 2 (the first clips compared)")
        if (name == "retrieval") != (kind == "retrieval"):
            raise err(key, "a retrieval suite takes the retrieval metric only, and only it" if kind == "retrieval"
                      else "retrieval ranks clips against captions: use it in a retrieval suite")
        if name == "retrieval" and (not isinstance(merged["ks"], (list, tuple)) or not merged["ks"] or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in merged["ks"])):
            raise err(f"{key}.ks", f"{merged['ks']!r}: a list of integers >= 1 (recall at k)")
        specs.append(MetricSpec(name, merged))
    return specs
