"""What each family gives a suite: the producers that the registry names (``Family.evaluate``).

A producer is built from ``(suite, model_ref, codec, device, trust)``; ``kinds`` are the suite kinds it runs;
``configure(suite)`` takes a suite's settings (a sweep reuses one producer); ``__call__(items, progress) -> (wav
[B, C, T], lengths [B])`` makes the clips of a batch of items (retrieval producers embed instead: ``embed``);
``describe()`` is what ``metrics.json`` records as ``settings``. ``sample_rate``, ``channels`` and ``codec_ref``
say what the clips are; ``family`` and ``label`` what the model is (for messages and records). A producer that
learns something per item while producing (MusicLM's reranking scores) has ``item_records() -> {index: record}``
and ``summarize(records) -> (scalars, details)``, which the runner calls on every rank's records together.
``from_model(suite, model)`` wraps a model already in memory (tests, notebooks) where the family has one. A
producer whose clips come out of a codec may set ``decode_seconds`` after each call: the part of the call spent
decoding codes to audio, which the runner charges to a ``decode`` stage instead of ``generate``.

Generating producers seed a batch with ``seed + index of its first item``, so clips do not depend on the number
of ranks.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ostinato.evaluation.items import EvalItem, stack_references
from ostinato.evaluation.suite import Suite, SuiteError

__all__ = ["MusicGenProducer", "CodecProducer", "MusikaProducer", "JukeboxProducer", "MusicLMProducer",
           "MuLaNProducer"]

Progress = Callable[[float], None]


def _from_model(cls: type, suite: Suite, model: Any) -> Any:
    producer = cls.__new__(cls)
    producer._attach(model)
    producer.configure(suite)
    return producer


def _seed(settings: dict[str, Any], items: list[EvalItem]) -> int | None:
    seed = settings.get("seed")
    return None if seed is None else seed + items[0].index


def _sync(module: torch.nn.Module) -> None:
    """Wait for the queued GPU work of ``module``'s device (a stage's time is its kernels', not the host's)."""
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _where(suite: Suite) -> str:
    return str(suite.path or suite.name)


class MusicGenProducer:
    """A MusicGen writing the suite's clips (text, and the reference's melody when asked)."""

    kinds = ("text_to_music",)
    family = "musicgen"
    label = "MusicGen"

    def __init__(self, suite: Suite, model_ref: str, codec: str | None, device: torch.device, trust: bool) -> None:
        from ostinato.generation.musicgen import load_generator

        self.module, self.codec, self.cfg, self.codec_ref = load_generator(model_ref, codec, trust=trust)
        self.module.to(device)
        self.codec.to(device)
        self.model_ref = model_ref
        self.sample_rate, self.channels = self.codec.sample_rate, self.codec.channels
        self.configure(suite)

    def configure(self, suite: Suite) -> None:
        from ostinato.generation.musicgen import LongForm
        from ostinato.nn.decoding import GenerationParams

        if suite.rerank > 1:
            raise SuiteError(f"{_where(suite)}: rerank: {suite.rerank}: {self.model_ref} is a MusicGen, which has no "
                             "MuLaN to rank candidates with; rerank is for MusicLM bundles (set it to 1)")
        self.suite = suite
        has_melody = getattr(self.module, "melody", None) is not None
        if suite.melody_from_reference is True and not has_melody:
            raise SuiteError(f"{_where(suite)}: melody_from_reference: true, but {self.model_ref} has no melody "
                             "conditioner (family.melody); set it to auto or false")
        self.melody = has_melody and suite.melody_from_reference in (True, "auto")
        on_gpu = next(self.module.parameters()).device.type == "cuda"
        self.params = GenerationParams(**{"seed": 0, "dtype": "bf16" if on_gpu else None, **suite.generation})
        window = suite.long_form.get("window", (self.cfg.get("data") or {}).get("segment_seconds"))
        self.long_form = LongForm(**{"mode": "window", **suite.long_form, "window": window})

    def __call__(self, items: list[EvalItem], progress: Progress) -> tuple[Tensor, Tensor]:
        from ostinato.evaluation.runner import generate_items

        assert self.suite.seconds is not None
        codes_done: list[float] = []

        def tick(fraction: float) -> None:  # the last decoding step: the codes are done, audio decoding starts
            if fraction >= 1.0 and not codes_done:
                _sync(self.codec)
                codes_done.append(time.perf_counter())
            progress(fraction)

        wav = generate_items(self.module, self.codec, items, self.suite.seconds, self.params, self.long_form,
                             melody=self.melody, progress=tick)
        _sync(self.codec)
        self.decode_seconds = time.perf_counter() - codes_done[0] if codes_done else 0.0
        return wav, torch.full((len(items),), wav.shape[-1], dtype=torch.long)

    def describe(self) -> dict[str, Any]:
        return {"generation": dict(self.params.__dict__), "long_form": dict(self.long_form.__dict__),
                "melody_from_reference": self.melody}


class CodecProducer:
    """A codec re-encoding the reference clips (all its codebooks)."""

    kinds = ("reconstruction",)
    family = "codec"
    label = "codec"

    def __init__(self, suite: Suite, model_ref: str, codec: str | None, device: torch.device, trust: bool) -> None:
        from ostinato.interop.codecs import CODEC_KINDS, load_codec
        from ostinato.store.records import require_ref

        if codec is not None:
            raise ValueError(f"{_where(suite)}: a reconstruction suite evaluates the codec given as --model "
                             f"({model_ref}); drop --codec {codec}")
        ref = require_ref(model_ref, "--model", CODEC_KINDS)
        self.codec = load_codec(ref, trust=trust).to(device).eval()
        self.codec_ref = str(model_ref)
        self.sample_rate, self.channels = self.codec.sample_rate, self.codec.channels
        self.device = device

    def configure(self, suite: Suite) -> None:
        pass

    @torch.no_grad()
    def __call__(self, items: list[EvalItem], progress: Progress) -> tuple[Tensor, Tensor]:
        wav, lengths = stack_references(items)
        return self.codec(wav.to(self.device)).recon, lengths

    def describe(self) -> dict[str, Any]:
        return {"n_q": self.codec.n_q, "bandwidth_kbps": self.codec.bandwidth_kbps()}


class MusikaProducer:
    """A Musika GAN (with its autoencoder) writing ``seconds``-long clips without text."""

    kinds = ("unconditional",)
    family = "musika"
    label = "Musika GAN"

    def __init__(self, suite: Suite, model_ref: str, codec: str | None, device: torch.device, trust: bool) -> None:
        from ostinato.generation import musika

        self.gan, self.autoencoder, self.codec_ref = musika.load_musika(model_ref, codec, trust=trust)
        self.gan.to(device)  # its autoencoder too
        self.sample_rate, self.channels = self.autoencoder.sample_rate, self.autoencoder.channels
        self.configure(suite)

    def configure(self, suite: Suite) -> None:
        self.suite = suite
        self.settings = {"seed": 0, **suite.generation}
        bad = sorted(set(self.settings) - {"seed", "truncation"})
        if bad:
            raise SuiteError(f"{_where(suite)}: generation.{bad[0]}: Musika takes seed and truncation")

    @torch.no_grad()
    def __call__(self, items: list[EvalItem], progress: Progress) -> tuple[Tensor, Tensor]:
        assert self.suite.seconds is not None
        wav = self.gan.generate(self.suite.seconds, batch=len(items), seed=_seed(self.settings, items),
                                progress=lambda done, total: progress(done / max(total, 1)),
                                truncation=self.settings.get("truncation", 2.0))
        return wav, torch.full((len(items),), wav.shape[-1], dtype=torch.long)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "generation": dict(self.settings)}


class JukeboxProducer:
    """A Jukebox bundle writing ``seconds``-long clips, conditioned on each reference clip's metadata."""

    kinds = ("unconditional",)
    family = "jukebox"
    label = "Jukebox bundle"

    def __init__(self, suite: Suite, model_ref: str, codec: str | None, device: torch.device, trust: bool) -> None:
        from ostinato.generation import jukebox

        self._attach(jukebox.load_bundle(model_ref, codec, trust=trust).to(device))
        self.configure(suite)

    @classmethod
    def from_model(cls, suite: Suite, model: Any) -> JukeboxProducer:
        """A producer of a ``Jukebox`` already in memory (on its device)."""
        return _from_model(cls, suite, model)

    def _attach(self, model: Any) -> None:
        self.jukebox = model
        self.sample_rate, self.channels = model.sample_rate, model.channels
        self.codec_ref = (getattr(model, "refs", None) or {}).get("vqvae")

    def configure(self, suite: Suite) -> None:
        self.suite = suite
        self.settings = {"seed": 0, **suite.generation}
        if "truncation" in self.settings:
            raise SuiteError(f"{_where(suite)}: generation.truncation: Jukebox samples codes; use temperature, top_k, "
                             "top_p, cfg_scale")

    @torch.no_grad()
    def __call__(self, items: list[EvalItem], progress: Progress) -> tuple[Tensor, Tensor]:
        from ostinato.nn.decoding import GenerationParams

        assert self.suite.seconds is not None
        params = GenerationParams(**{"cfg_scale": 3.0, **self.settings, "seed": _seed(self.settings, items)})
        wav = self.jukebox.generate([it.meta for it in items], self.suite.seconds, params,
                                    lambda done, total: progress(done / max(total, 1)))
        return wav, torch.full((len(items),), wav.shape[-1], dtype=torch.long)

    def item_fields(self, item: EvalItem) -> dict[str, str]:
        """What the report lists for a clip: the metadata fields of its reference clip that the priors read (none
        for an unconditioned Jukebox, or a reference clip without them)."""
        used = [f"{name}: {item.meta[name]}" for name in self.jukebox.fields if item.meta.get(name) not in (None, "")]
        return {"conditioning": ", ".join(used)} if used else {}

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "generation": dict(self.settings)}


class MusicLMProducer:
    """A MusicLM bundle (``ostinato bundle musiclm``) writing the suite's clips from their prompts."""

    kinds = ("text_to_music",)
    family = "musiclm"
    label = "MusicLM bundle"

    def __init__(self, suite: Suite, model_ref: str, codec: str | None, device: torch.device, trust: bool) -> None:
        from ostinato.generation.musiclm import load_bundle

        self._attach(load_bundle(model_ref, codec, trust=trust).to(device))
        self.configure(suite)

    @classmethod
    def from_model(cls, suite: Suite, model: Any) -> MusicLMProducer:
        """A producer of a ``MusicLM`` already in memory (on its device)."""
        return _from_model(cls, suite, model)

    def _attach(self, model: Any) -> None:
        self.model = model
        self.codec_ref = model.sources.get("codec")
        self.sample_rate, self.channels = model.sample_rate, model.codec.channels

    def configure(self, suite: Suite) -> None:
        from ostinato.nn.decoding import GenerationParams

        where = _where(suite)
        if suite.melody_from_reference is True:
            raise SuiteError(f"{where}: melody_from_reference: true, but MusicLM takes no melody; set it to auto")
        if suite.long_form:
            raise SuiteError(f"{where}: long_form: MusicLM's stages slide their own windows; leave long_form out")
        if "truncation" in suite.generation:
            raise SuiteError(f"{where}: generation.truncation: MusicLM samples codes; use temperature, top_k, "
                             "top_p, cfg_scale")
        self.suite = suite
        self.settings = {"seed": 0, **suite.generation}
        GenerationParams(**self.settings)  # the ranges, before anything runs
        self.reranked: dict[int, dict[str, Any]] = {}

    @torch.no_grad()
    def __call__(self, items: list[EvalItem], progress: Progress) -> tuple[Tensor, Tensor]:
        from ostinato.nn.decoding import GenerationParams

        assert self.suite.seconds is not None
        params = GenerationParams(**{**self.settings, "seed": _seed(self.settings, items)})
        out = self.model.sample([it.prompt for it in items], duration=self.suite.seconds, params=params,
                                num_candidates=self.suite.rerank,
                                progress=lambda done, total: progress(done / max(total, 1)))
        if self.suite.rerank > 1:
            for it, scores, kept in zip(items, out.scores.tolist(), out.best.tolist()):
                self.reranked[it.index] = {"scores": [float(s) for s in scores], "kept": int(kept),
                                           "prompt": bool(it.prompt.strip())}
        return out.wav, torch.full((len(items),), out.wav.shape[-1], dtype=torch.long)

    def item_records(self) -> dict[int, dict[str, Any]]:
        """``{item index: {"scores": [k MuLaN cosines], "kept": index of the kept candidate, "prompt": bool}}``."""
        return dict(self.reranked)

    def summarize(self, records: dict[int, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, Any]]:
        """All ranks' reranking records -> ``rerank_score_kept`` / ``rerank_score_all`` (mean MuLaN cosine of the
        kept candidates / of every candidate, over the items with a prompt) and ``rerank`` (per item)."""
        if self.suite.rerank <= 1:
            return {}, {}
        scored = [r for r in records.values() if r["prompt"]]  # "" prompts are not reranked (score 0)
        kept = [r["scores"][r["kept"]] for r in scored]
        every = [s for r in scored for s in r["scores"]]
        scalars = {"rerank_score_kept": sum(kept) / len(kept) if kept else None,
                   "rerank_score_all": sum(every) / len(every) if every else None}
        return scalars, {"rerank": {"candidates": self.suite.rerank, "by": "MuLaN audio-text cosine",
                                    "items": [{"index": i, **records[i]} for i in sorted(records)]}}

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "generation": dict(self.settings), "parts": dict(self.model.sources),
                "rerank": self.suite.rerank}


class MuLaNProducer:
    """A MuLaN embedding the reference clips and their captions (retrieval suites)."""

    kinds = ("retrieval",)
    family = "mulan"
    label = "MuLaN"

    def __init__(self, suite: Suite, model_ref: str, codec: str | None, device: torch.device, trust: bool) -> None:
        from ostinato.models.mulan import as_mulan

        if codec is not None:
            raise ValueError(f"{_where(suite)}: a retrieval suite embeds the reference clips with the MuLaN given as "
                             f"--model ({model_ref}); drop --codec {codec}")
        self._attach(as_mulan(model_ref).to(device))

    @classmethod
    def from_model(cls, suite: Suite, model: Any) -> MuLaNProducer:
        """A producer of a ``MuLaN`` already in memory (on its device)."""
        return _from_model(cls, suite, model)

    def _attach(self, model: Any) -> None:
        self.mulan = model
        self.codec_ref = None
        self.sample_rate, self.channels = model.sample_rate, 1

    def configure(self, suite: Suite) -> None:
        pass

    @torch.no_grad()
    def embed(self, items: list[EvalItem]) -> tuple[Tensor, Tensor]:
        """Items -> (audio ``[B, D]``, text ``[B, D]``) normalised embeddings of their clips and captions."""
        wav, lengths = stack_references(items)
        audio = self.mulan.embed_audio(wav, self.sample_rate, lengths)
        return audio, self.mulan.embed_text([it.prompt for it in items]).to(audio.device)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "window_seconds": self.mulan.window_seconds, "dim": self.mulan.dim}
