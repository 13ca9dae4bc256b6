"""A suite's metrics as torchmetrics objects: built once, updated batch by batch, computed over all DDP ranks.

Every embedding backend is loaded once and its frames computed once per batch, whatever the number of metrics
that use it. Reference statistics come from the embedding cache (``reference_stats``; KAD's reference embeddings from
``reference_embeddings``): the statistics computed by all ranks together (each embeds its share of the clips),
KAD's embeddings by rank 0 first so the other ranks read the cache.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.evaluation.suite import MetricSpec, Suite

__all__ = ["SuiteMetrics", "barrier", "cache_dir", "dist_info"]


def cache_dir() -> Path:
    """Where reference statistics are cached: ``$OSTINATO_OUTPUTS/eval_cache`` (default ``outputs/eval_cache``)."""
    return Path(os.environ.get("OSTINATO_OUTPUTS", "outputs")) / "eval_cache"


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class SuiteMetrics:
    """The metrics ``specs`` of ``suite`` for outputs at ``sample_rate``.

    ``update(wav [B, C, T], lengths [B], prompts, ids, reference [B, C, T] | None)``; ``compute()`` ->
    ``(scalars, details)``: flat ``{name: float | None}`` (None for non-finite) and per-item / curve data.
    """

    def __init__(self, suite: Suite, specs: Sequence[MetricSpec], sample_rate: int,
                 device: str | torch.device = "cpu", progress: bool = True,
                 cache: str | os.PathLike | None = None) -> None:
        self.suite, self.specs, self.sample_rate = suite, list(specs), int(sample_rate)
        self.device = torch.device(device)
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.backends: dict[str, Any] = {}
        self.classifiers: dict[str, Any] = {}
        self._stats: dict[tuple[str, str], tuple[Tensor, Tensor, int]] = {}
        self._embeddings: dict[tuple[str, str], Tensor] = {}  # KAD's reference points [M, D] per (backend, per)
        for spec in self.specs:
            if spec.name == "kld":
                from ostinato.evaluation.classifier import load_classifier

                self.classifiers.setdefault(spec.options["classifier"],
                                            load_classifier(spec.options["classifier"],
                                                            spec.options.get("labels")).to(self.device))
            elif spec.options.get("embedding"):
                self._backend(spec)
        self._reference_stats(progress)
        self.metrics = {spec.name: self._build(spec).to(self.device) for spec in self.specs}

    # -- construction ---------------------------------------------------------------------------------------

    def _backend(self, spec: MetricSpec) -> Any:
        name = spec.options["embedding"]
        if name not in self.backends:
            from ostinato.metrics.embeddings import load_backend

            where = self.suite.path or self.suite.name
            try:
                backend = load_backend(name)
            except (ValueError, FileNotFoundError, ImportError) as e:
                raise ValueError(f"{where}: metrics.{spec.name}.embedding={name!r}: {e}") from e
            if spec.name == "text_audio" and not backend.has_text:
                raise ValueError(f"{where}: metrics.text_audio.embedding={name!r}: this backend has no text tower; "
                                 "use a joint audio-text backend (clap:/ckpt.pt,text=/roberta_folder)")
            self.backends[name] = backend.to(self.device)
        return self.backends[name]

    def _reference_stats(self, progress: bool) -> None:
        """``(mu, sigma, n)`` per (backend, per) that a FAD metric needs, and the reference embeddings (frames or
        clip means) a KAD needs. The statistics are computed by all ranks together (each embeds every world-th
        clip); the KAD embeddings by rank 0 first, filling the cache that the others read."""
        from ostinato.metrics.embeddings import clip_embeddings
        from ostinato.metrics.embeddings.cache import reference_embeddings, reference_stats

        needed: list[tuple[str, str]] = []
        points: list[tuple[str, str]] = []
        for spec in self.specs:
            key = (spec.options.get("embedding"), spec.options.get("per", "frame"))
            wanted = needed if spec.name in ("fad", "fad_inf", "per_song_fad") else (
                points if spec.name == "kad" else None)
            if wanted is not None and key not in wanted:
                wanted.append(key)
        if not needed and not points:
            return
        rank, world = dist_info()
        for name, per in needed:  # every rank embeds its share of the reference clips; the moments are summed
            self._stats[(name, per)] = reference_stats(self.backends[name], self.suite.reference, self.cache,
                                                       per=per, max_items=self.suite.reference_max_items,
                                                       progress=progress, sharded=True)
        if not points:
            return
        if rank != 0:
            barrier()
        for name, per in points:
            clips = reference_embeddings(self.backends[name], self.suite.reference, self.cache,
                                         max_items=self.suite.reference_max_items, progress=progress)
            emb = (torch.cat(clips) if per == "frame" else clip_embeddings(clips)) if clips else None
            if emb is None or len(emb) < 2:
                raise ValueError(f"{self.suite.path or self.suite.name}: metrics.kad: the reference "
                                 f"{self.suite.reference} gives {0 if emb is None else len(emb)} {per} embeddings; "
                                 "KAD needs >= 2: give more or longer reference audio")
            self._embeddings[(name, per)] = emb
        if rank == 0:
            barrier()

    def _build(self, spec: MetricSpec) -> Any:
        o = spec.options
        if spec.name in ("fad", "fad_inf", "per_song_fad"):
            from ostinato.metrics.fad import FADInf, FrechetAudioDistance, PerSongFAD

            backend = self.backends[o["embedding"]]
            ref = self._stats[(o["embedding"], o.get("per", "frame"))]
            if spec.name == "fad":
                return FrechetAudioDistance(backend.dim, reference=ref)
            if spec.name == "fad_inf":
                return FADInf(backend.dim, reference=ref, num_points=o["num_points"], min_n=o["min_n"],
                              seed=o["seed"], protocol=o.get("protocol", "ostinato"))
            return PerSongFAD(backend.dim, reference=ref)
        if spec.name == "kad":
            from ostinato.metrics.kad import KernelAudioDistance

            return KernelAudioDistance(self.backends[o["embedding"]].dim, reference=self._embeddings[
                (o["embedding"], o["per"])], bandwidth=o["bandwidth"], bandwidth_from=o["bandwidth_from"])
        if spec.name == "diversity":
            from ostinato.metrics.diversity import ClipDiversity

            assert self.suite.seconds is not None  # generating suites have seconds
            return ClipDiversity(self.sample_rate, round(self.suite.seconds * self.sample_rate), o["max_clips"])
        if spec.name == "text_audio":
            from ostinato.metrics.text_audio import TextAudioScore

            return TextAudioScore()
        if spec.name == "kld":
            from ostinato.metrics.kld import LabelKLD

            return LabelKLD(multilabel=bool(o["multilabel"]))
        if spec.name == "chroma":
            from ostinato.metrics.chroma import ChromaCosineSimilarity

            return ChromaCosineSimilarity(self.sample_rate, hop_seconds=o["hop_seconds"], argmax=bool(o["argmax"]))
        from ostinato.metrics.codec import SISNR, MelDistance, MultiScaleSTFTDistance

        if spec.name == "mel":
            return MelDistance(self.sample_rate, n_mels=o["n_mels"], n_fft=o["n_fft"], hop_length=o["hop_length"])
        if spec.name == "stft":
            return MultiScaleSTFTDistance(n_ffts=tuple(o["n_ffts"]), hop_ratio=o["hop_ratio"])
        return SISNR()

    # -- update / compute -----------------------------------------------------------------------------------

    def _frames(self, backend: Any, wav: Tensor, lengths: Tensor) -> list[Tensor]:
        """Per item ``[F_i, D]`` of its valid part; items of equal length are embedded together."""
        out: list[Tensor | None] = [None] * len(wav)
        for length in torch.unique(lengths).tolist():
            idx = (lengths == length).nonzero().squeeze(1).tolist()
            frames = backend.embed_audio(wav[idx, :, :length], self.sample_rate)
            for i, f in zip(idx, frames):
                out[i] = f.to(self.device)
        return out  # type: ignore[return-value]

    def update(self, wav: Tensor, lengths: Tensor | None, prompts: Sequence[str], ids: Sequence[str],
               reference: Tensor | None = None, reference_lengths: Tensor | None = None) -> None:
        """``wav [B, C, T]`` outputs (valid for ``lengths [B]`` samples), their prompts and ids, and the paired
        references ``[B, C, T']`` at the same rate (valid for ``reference_lengths [B]``) for the paired metrics."""
        from ostinato.metrics.embeddings import clip_embeddings

        wav = wav.detach().float().to(self.device)
        lengths = (torch.full((len(wav),), wav.shape[-1], dtype=torch.long) if lengths is None
                   else lengths.cpu().long())
        frames = {name: self._frames(b, wav, lengths) for name, b in self.backends.items()}
        for spec in self.specs:
            metric, o = self.metrics[spec.name], spec.options
            if spec.name in ("fad", "fad_inf", "kad"):
                f = frames[o["embedding"]]
                metric.update(torch.cat(f) if o["per"] == "frame" else clip_embeddings(f))
            elif spec.name == "per_song_fad":
                metric.update(frames[o["embedding"]], ids=list(ids))
            elif spec.name == "diversity":  # ids are the item indices
                metric.update(wav, torch.tensor([int(i) for i in ids], device=self.device))
            elif spec.name == "text_audio":
                backend = self.backends[o["embedding"]]
                text = backend.embed_text(list(prompts)).to(self.device)
                metric.update(clip_embeddings(frames[o["embedding"]]).to(self.device), text)
            else:
                if reference is None:
                    raise ValueError(f"{spec.name} compares each output with its reference clip; none was given")
                reference = reference.detach().float().to(self.device)
                if spec.name == "kld":
                    classifier = self.classifiers[o["classifier"]]
                    gen = torch.cat([classifier.logits(wav[i:i + 1, :, :n], self.sample_rate)
                                     for i, n in enumerate(lengths.tolist())])
                    ref_n = (reference_lengths if reference_lengths is not None
                             else torch.full((len(reference),), reference.shape[-1])).tolist()
                    ref = torch.cat([classifier.logits(reference[i:i + 1, :, :n], self.sample_rate)
                                     for i, n in enumerate(ref_n)])
                    metric.update(gen, ref, logits=True)
                elif spec.name == "chroma":  # a shorter reference is looped under the output
                    ref_lengths = None if reference_lengths is None else reference_lengths.to(self.device)
                    metric.update(wav, reference, lengths=lengths.to(self.device), reference_lengths=ref_lengths)
                else:
                    metric.update(wav, reference, lengths=lengths.to(self.device))

    def compute(self, num_items: int | None = None) -> tuple[dict[str, float | None], dict[str, Any]]:
        """All ranks call this together (torchmetrics gathers the states). ``num_items``: the clips scored over all
        ranks; given, FAD-inf from fewer than ``FAD_INF_MIN_ITEMS`` is refused. A refused FAD-inf or per-song FAD
        is None, its reason in ``details["fad_inf_refused"]`` / ``details["per_song_fad_refused"]``."""
        from ostinato.metrics.fad import fad_inf_refusal, per_song_refusal

        scalars: dict[str, float | None] = {}
        details: dict[str, Any] = {}
        for spec in self.specs:
            metric = self.metrics[spec.name]
            if spec.name == "fad_inf":
                try:
                    value = metric.compute()
                except ValueError as e:  # no more embeddings than the smallest subset
                    value, refused = None, f"FAD-inf refused: {e}"
                r2 = None if value is None else _finite(value["r2"])
                if value is not None:
                    details["fad_inf_curve"] = {"n": [int(n) for n in value["n"].tolist()],
                                                "fad": [_finite(f) for f in value["fad"].tolist()]}
                    refused = fad_inf_refusal(r2, num_items) if num_items is not None else None
                scalars["fad_inf"] = None if refused else _finite(value["fad_inf"])
                scalars["fad_inf_slope"] = None if refused else _finite(value["slope"])
                scalars["fad_inf_r2"] = r2
                if refused:
                    details["fad_inf_refused"] = refused
                continue
            value = metric.compute()
            if spec.name == "diversity":
                if not value["pairs"] >= 1:  # NaN: fewer than two clips, no pair to compare
                    details["diversity_refused"] = ("diversity refused: it compares pairs of clips and "
                                                    f"{num_items if num_items is not None else 'fewer than 2'} "
                                                    "clip(s) were scored; generate at least 2")
                for key, v in value.items():
                    scalars[f"diversity_{key}"] = None if "diversity_refused" in details else _finite(v)
            elif spec.name == "per_song_fad":
                fad = value["fad"].double().cpu().reshape(-1)  # one clip: a 0-d tensor
                frames = [int(n) for n in value["frames"].reshape(-1).tolist()]
                refused = per_song_refusal(frames, metric.dim)
                finite = fad[torch.isfinite(fad)] if not refused else fad[:0]
                scalars["per_song_fad_mean"] = _finite(finite.mean()) if len(finite) else None
                scalars["per_song_fad_median"] = _finite(finite.median()) if len(finite) else None
                details["per_song_fad"] = {"ids": list(value["ids"]),
                                           "fad": [None if refused else _finite(f) for f in fad.tolist()],
                                           "frames": frames, "bins": spec.options["bins"]}
                if refused:
                    details["per_song_fad_refused"] = refused
            else:
                name = {"mel": "mel_distance", "stft": "stft_distance"}.get(spec.name, spec.name)
                scalars[name] = _finite(value)
        return scalars, details

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
