"""``run_suite``: generate (or reconstruct) a suite's clips, score them, write ``metrics.json``, the wavs and a report.

Under DDP (an initialised process group, e.g. ``torchrun`` + ``ostinato eval``) every rank produces its share of the
items (``rank_batches``) and writes their wavs; the metrics gather their states through torchmetrics; rank 0 writes
``metrics.json`` and the report. Batches and seeds do not depend on the number of ranks, so one rank and several
give the same clips and the same numbers (up to float64 summation order).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ostinato.evaluation.items import EvalItem, count_clips, rank_batches, read_items, stack_references
from ostinato.evaluation.report import versions
from ostinato.evaluation.scoring import SuiteMetrics, barrier, dist_info
from ostinato.evaluation.suite import Suite, SuiteError, load_suite
from ostinato.evaluation.timing import StageClock
from ostinato.fileio import atomic_write_json, write_wav
from ostinato.registry import Family

log = logging.getLogger(__name__)

__all__ = ["default_out_dir", "generate_items", "load_producer", "model_family", "run_suite", "setup_distributed"]


def setup_distributed(device: str = "cpu") -> str:
    """Initialise the process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1; ``ostinato eval -d N``
    sets it, and a submitit task's is set from its job): gloo on CPU, nccl on GPU. Returns this rank's device
    (``cuda:LOCAL_RANK`` on GPU)."""
    import torch.distributed as dist

    from ostinato.engine.launch import rendezvous_from_job

    rendezvous_from_job()  # a task of `ostinato eval --slurm`: its rank and rendezvous from the job
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU is visible (CUDA_VISIBLE_DEVICES?); use --device cpu")
        if world > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def generate_items(module: torch.nn.Module, codec: Any, items: list[EvalItem], seconds: float, params: Any,
                   long_form: Any, *, melody: bool = False,
                   progress: Callable[[float], None] | None = None) -> Tensor:
    """One clip per item -> wav ``[B, C, round(seconds * sample_rate)]``.

    The seed of a call is ``params.seed + index of its first item``, so a clip does not depend on which rank made
    it. With ``melody`` each item is conditioned on its reference clip's chromagram.
    """
    from ostinato.nn.decoding import GenerationParams
    from ostinato.generation.musicgen import generate_audio
    from ostinato.generation.request import AudioInput

    def run(group: list[EvalItem], first: int) -> Tensor:
        seed = None if params.seed is None else params.seed + group[0].index
        audio = [AudioInput(it.reference, codec.sample_rate) for it in group] if melody else None
        report = None if progress is None else (
            lambda s, t: progress((first + len(group) * s / max(t, 1)) / len(items)))
        return generate_audio(module, codec, [it.prompt for it in group], seconds,
                              GenerationParams(**{**params.__dict__, "seed": seed}), melody=audio,
                              long_form=long_form, progress=report)

    if melody and any(it.reference is None for it in items):
        raise ValueError("melody from the reference: some items have no reference clip (more num_samples than "
                         "reference clips); lower num_samples or set melody_from_reference: false")
    return run(items, 0)


def model_family(model_ref: str, trust: bool = False) -> Family:
    """The family of ``--model``: a bundle's (by its bundle file), a foreign codec file's (codec), or the one its
    record's config names."""
    from ostinato.interop.codecs import CODEC_KINDS, is_foreign_codec
    from ostinato.registry import FAMILIES, bundle_family, family_of
    from ostinato.store.records import read_config, require_ref

    family = bundle_family(model_ref)
    if family is not None:
        return family
    if is_foreign_codec(model_ref):
        return FAMILIES["codec"]
    ref = require_ref(model_ref, "--model", f"an export, XP folder or signature, checkpoint, bundle, or {CODEC_KINDS}")
    return family_of(read_config(ref, trust=trust), f"--model {model_ref}")


def load_producer(suite: Suite, model_ref: str, *, codec: str | None = None, device: str | torch.device = "cpu",
                  trust: bool = False) -> Any:
    """The model of a suite, loaded as its family's producer (``Family.evaluate``): a MusicGen or MusicLM that
    generates (text_to_music), a codec that reconstructs (reconstruction), a Musika GAN or Jukebox bundle that
    generates without text (unconditional), a MuLaN that embeds (retrieval). A suite kind the family cannot
    produce is refused before the model loads."""
    from ostinato.registry import resolve

    family = model_family(str(model_ref), trust)
    if family.evaluate is None:
        raise SuiteError(f"{suite.path or suite.name}: --model {model_ref} is a {family.name} model, which no suite "
                         "evaluates")
    cls = resolve(family.evaluate)
    _check_kind(suite, cls, str(model_ref), trust)
    return cls(suite, str(model_ref), codec, torch.device(device), trust)


def _check_kind(suite: Suite, producer: Any, model_ref: str, trust: bool = False) -> None:
    """Refuse, in one line naming the suite and what ``--model`` is, a suite kind its producer does not run."""
    if suite.kind in producer.kinds:
        return
    from omegaconf import OmegaConf

    from ostinato.evaluation.suite import suites_dir

    shipped = [p.stem for p in sorted(suites_dir().glob("*.yaml")) if OmegaConf.load(p).get("kind") in producer.kinds]
    examples = f" ({', '.join(shipped)})" if shipped else ""
    hint = ""
    if suite.kind == "reconstruction":
        hint = "; a reconstruction suite evaluates a codec: --model CODEC"
        recorded = _recorded_codec(model_ref, trust)
        hint += f", e.g. its codec {recorded}" if recorded else ""
    raise SuiteError(f"{suite.path or suite.name}: kind: a {suite.kind} suite cannot run here: --model {model_ref} is "
                     f"a {producer.label}, which runs {' or '.join(producer.kinds)} suites{examples}{hint}")


def _recorded_codec(model_ref: str, trust: bool) -> str | None:
    """The codec the record of ``model_ref`` names (a MusicGen's); None for a bundle (no record of its own)."""
    from ostinato.generation.musicgen import recorded_codec
    from ostinato.registry import bundle_family
    from ostinato.store.records import read_config, resolve_ref

    if bundle_family(model_ref) is not None:
        return None
    return recorded_codec(read_config(resolve_ref(model_ref), trust=trust))


def _clean(out: Path) -> None:
    """Remove the wavs of a previous run of this folder (it may have had more items)."""
    for sub in ("generated", "reference"):
        for path in (out / sub).glob("*.wav"):
            path.unlink()


def run_suite(suite: Suite | str | os.PathLike, model_ref: str, out_dir: str | os.PathLike, *,
              codec: str | None = None, overrides: Sequence[str] | Mapping[str, Any] | None = None,
              device: str | torch.device = "cpu", trust: bool = False, progress: bool = True,
              report: bool = True, cache: str | os.PathLike | None = None,
              producer: Any | None = None) -> dict[str, Any]:
    """Run ``suite`` (a ``Suite``, a YAML path or a suite name) on ``model_ref`` and write into ``out_dir``:
    ``generated/NNN.wav`` (+ ``reference/NNN.wav``), ``metrics.json``, ``report.md`` / ``report.html``.

    ``model_ref``: a MusicGen (XP signature, XP folder, checkpoint, export or import folder) for text_to_music,
    a codec (anything ``load_codec`` takes) for reconstruction. ``codec``: the MusicGen's codec when it records
    none. ``cache``: reference statistics cache (default ``$OSTINATO_OUTPUTS/eval_cache``). ``producer``: one from
    ``load_producer`` to reuse (a sweep loads the model once). Returns what ``metrics.json`` holds, plus ``out_dir``
    and ``report``; every rank returns it.
    """
    if not isinstance(suite, Suite):
        suite = load_suite(suite, overrides)
    elif overrides:
        suite = suite.with_overrides(overrides)
    rank, world = dist_info()
    device = torch.device(device)
    out = Path(out_dir)
    t0 = time.time()
    clock = StageClock(device)
    if producer is None:
        with clock("load"):
            producer = load_producer(suite, model_ref, codec=codec, device=device, trust=trust)
    else:
        _check_kind(suite, producer, str(model_ref), trust)
        producer.configure(suite)
    if suite.kind == "retrieval":
        from ostinato.evaluation.retrieval import run_retrieval

        return run_retrieval(suite, producer, str(model_ref), out, device, progress=progress, report=report)
    n = suite.num_samples if suite.num_samples is not None else count_clips(suite)
    mine = rank_batches(n, suite.batch_size, rank, world)
    with clock("read"):
        items = read_items(suite, producer.sample_rate, producer.channels, n, keep={i for b in mine for i in b})
    with clock("references"):  # the embedding models and the reference statistics (cached)
        scores = SuiteMetrics(suite, suite.metrics, producer.sample_rate, device, progress=progress and rank == 0,
                              cache=cache)
    width = max(3, len(str(len(items) - 1)))
    if rank == 0:
        _clean(out)
    barrier()
    total = sum(len(b) for b in mine)
    verb = "reconstructing" if suite.kind == "reconstruction" else "generating"
    with tqdm(total=total, unit="clip", desc=f"{suite.name}: {verb}", disable=not progress or rank != 0,
              dynamic_ncols=True) as bar:
        for batch in mine:
            group = [items[i] for i in batch]
            done = bar.n

            def on_progress(fraction: float, done: float = done, size: int = len(group)) -> None:
                bar.update(round(done + size * fraction, 2) - bar.n)  # update() rate-limits the redraws

            stage = "reconstruct" if suite.kind == "reconstruction" else "generate"
            with clock(stage):
                wav, lengths = producer(group, on_progress)
            clock.move(stage, "decode", getattr(producer, "decode_seconds", 0.0))
            reference = ref_lengths = None
            if all(it.reference is not None for it in group):
                reference, ref_lengths = stack_references(group)
            with clock("write"):
                for it, w, valid in zip(group, wav, lengths.tolist()):
                    write_wav(out / "generated" / f"{it.index:0{width}d}.wav", w[:, :valid], producer.sample_rate)
                    if it.reference is not None:
                        write_wav(out / "reference" / f"{it.index:0{width}d}.wav", it.reference,
                                  producer.sample_rate)
            with clock("embed"):  # embeddings and metric updates
                scores.update(wav, lengths, [it.prompt for it in group], [str(it.index) for it in group],
                              reference, ref_lengths)
            bar.update(done + len(group) - bar.n)
    with clock("compute"):  # the metrics' gathers and final computations
        scalars, details = scores.compute(num_items=len(items))
    timings = _gather_records({rank: {"rank": rank, "items": total, "seconds": clock.rounded()}})
    if hasattr(producer, "item_records"):  # what the producer learnt per item (MusicLM's reranking scores)
        more, extra = producer.summarize(_gather_records(producer.item_records()))
        scalars.update(more)
        details.update(extra)
    if "fad_inf" in scalars:  # the flag that reports show beside the number
        from ostinato.metrics.fad import fad_inf_reliability

        details["fad_inf_fit"] = fad_inf_reliability(scalars.get("fad_inf_r2"), len(items))
    result: dict[str, Any] = {
        "suite": suite.name, "suite_file": None if suite.path is None else str(suite.path), "kind": suite.kind,
        "model": str(model_ref), "codec": producer.codec_ref, "sample_rate": producer.sample_rate,
        "num_items": len(items), "seconds": suite.seconds, "metrics": scalars, **details,
        "settings": producer.describe(), "items": [
            {"index": it.index, **({"prompt": it.prompt} if suite.kind == "text_to_music" else {}), "key": it.key,
             **(producer.item_fields(it) if hasattr(producer, "item_fields") else {}),
             "generated": f"generated/{it.index:0{width}d}.wav",
             "reference": f"reference/{it.index:0{width}d}.wav" if it.has_reference else None}
            for it in items],
        "suite_config": suite.config, "device": str(device), "world_size": world,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
        "elapsed_seconds": round(time.time() - t0, 2),
        "ranks": [timings[r] for r in range(world)],  # seconds per stage on each rank (timing.stage_shares)
    }
    barrier()  # every rank's wavs are on disk
    if rank == 0:
        atomic_write_json(out / "metrics.json", result)
        if report:
            from ostinato.evaluation.report import write_report

            write_report(out)
    barrier()
    return {**result, "out_dir": str(out), "report": str(out / "report.md")}


def _gather_records(mine: dict[int, Any]) -> dict[int, Any]:
    """Every rank's ``{item index: record}`` merged (all ranks call this together)."""
    rank, world = dist_info()
    if world == 1:
        return dict(mine)
    import torch.distributed as dist

    everyone: list[dict[int, Any] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    return {i: r for part in everyone for i, r in (part or {}).items()}


def default_out_dir(suite: Suite, model_ref: str, overrides: Sequence[str] = ()) -> Path:
    """``$OSTINATO_OUTPUTS/eval/<suite>/<model>[_<overrides>]``."""
    import re

    model = Path(str(model_ref).rstrip("/")).name or "model"
    tag = "_".join(re.sub(r"[^A-Za-z0-9=.,-]+", "-", o) for o in overrides)
    base = Path(os.environ.get("OSTINATO_OUTPUTS", "outputs")) / "eval" / suite.name
    return base / (f"{model}_{tag}" if tag else model)
