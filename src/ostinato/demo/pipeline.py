"""``ostinato demo`` (what ``make demo`` runs): the embedded default end to end on this machine.

demo corpus -> tiny codec (trained, exported) -> reconstructions -> token shards -> tiny MusicGen (on the audio
shards, tokenized per batch by the codec, so that its melody is the chroma of the real audio) conditioned on
text, melody and style -> a tiny MuLaN (held-out text <-> audio retrieval printed) -> generation: text, melody,
style, continuation, chained segments (10 s = five training windows each) and a 60 s piece -> the demo evaluation
suite (FAD, FAD-inf, per-song FAD, chroma) against the held-out split -> ``outputs/demo/report.html`` (players,
spectrograms, metrics, training curves). Finished steps are skipped (experiments resume), so a second run is quick.

On a machine with a GPU the same command trains on it with larger settings (``GPU_OVERRIDES``: bf16, bigger
batches and a wider MusicGen). ``quick=True`` (``ostinato demo --quick``) shrinks everything to a few steps and
seconds: the test of the demo itself.
"""
from __future__ import annotations

import errno
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import soundfile as sf
import torch

from ostinato.errors import UserError
from ostinato.fileio import write_wav

CODEC_EXPERIMENT = ["experiment=codec_tiny"]
MUSICGEN_EXPERIMENT = ["experiment=musicgen_tiny_melody_style"]
MULAN_EXPERIMENT = ["experiment=mulan_tiny"]
# What `ostinato demo` adds on a CUDA machine. Measured on an H100 (bench/RESULTS.md): with the CPU presets' one or
# two loader workers the codec trained at 10 steps/s, and the wider MusicGen at the tiny model's lr 2e-3 skipped
# a third of its bf16 updates as non-finite from step 173 on; the wider model takes AdamW's usual 5e-4.
GPU_OVERRIDES = {
    "codec": ["trainer.precision=bf16-mixed", "data.batch_size=32", "trainer.max_steps=2000", "data.num_workers=8"],
    "musicgen": ["trainer.precision=bf16-mixed", "data.batch_size=32", "trainer.max_steps=3000",
                 "family.lm.dim=512", "family.lm.num_heads=8", "family.lm.num_layers=8", "family.lm.ffn_dim=2048",
                 "optim.lr=5.0e-4", "optim.schedule.warmup_steps=200", "data.num_workers=8"],
    "mulan": ["data.batch_size=64", "trainer.max_steps=1000", "data.num_workers=8"],
}
QUICK_OVERRIDES = ["trainer.max_steps=6", "trainer.checkpoint_every_steps=6", "data.batches_per_epoch=3",
                   "trainer.limit_val_batches=1", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=4"]


@dataclass
class DemoPlan:
    """How big the demo is: corpus hours, extra training overrides per model, generated seconds."""

    hours: float = 1.0
    overrides: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 10.0
    long_seconds: float = 60.0
    eval_samples: int | None = None

    @classmethod
    def make(cls, quick: bool = False, gpu: bool | None = None) -> DemoPlan:
        gpu = torch.cuda.is_available() if gpu is None else gpu
        if quick:
            return cls(hours=0.05, overrides={k: list(QUICK_OVERRIDES) for k in ("codec", "musicgen", "mulan")},
                       seconds=3.0, long_seconds=5.0, eval_samples=4)
        return cls(overrides={k: list(v) for k, v in GPU_OVERRIDES.items()} if gpu else {})
PROMPTS = ["A baroque chorale by Johann Sebastian Bach for church organ, in G major, at 90 BPM (andante).",
           "A traditional irish reel for fiddle, in D major, at 112 BPM (allegro).",
           "A classical string quartet, in C minor, at 70 BPM (adagio)."]


RESTART = "then run `ostinato demo` again (finished steps are kept)"


Verb = Callable[[list[str]], None]  # ``ostinato ARGS`` in this process: the CLI's main, passed in by the CLI


def _run(args: list[str], verb: Verb | None = None) -> None:
    """``ostinato ARGS`` in a subprocess (training: dora and Lightning own their process), or in this one through
    ``verb`` (saves the start-up of torch for the generation calls). A failed step has printed its own error; this
    adds one line."""
    print(f"$ ostinato {' '.join(args)}", flush=True)
    if verb is not None:
        verb(list(args))
        return
    code = subprocess.run([sys.executable, "-m", "ostinato.cli", *args]).returncode
    if code == 2:
        raise UserError(f"the step `ostinato {' '.join(args[:2])}` stopped on the error above; fix it, {RESTART}")
    if code != 0:
        raise SystemExit(f"ostinato demo: the step `ostinato {' '.join(args[:2])}` failed with exit code {code} "
                         f"(its output is above); {RESTART}")


def _check_writable(folder: Path, flag: str) -> None:
    """``folder`` is (or can be made) a folder that takes files; else a one-line error naming ``flag``."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; give a folder ({flag} DIR)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable",
               errno.EPERM: "is not writable", errno.ENOSPC: "is on a full disk"}.get(e.errno or 0)
        if why is None:
            raise
        raise UserError(f"{flag} {folder} {why}; give a writable folder ({flag} DIR)") from e


def _corpus_leftovers(data: Path) -> list[Path]:
    """Clips of a render that stopped before ``corpus.json`` was written (empty when there is none)."""
    from ostinato.recipes.corpus import CORPUS_NAME, SPLITS

    if (data / CORPUS_NAME).is_file():
        return []
    return [p for split in SPLITS if (data / "audio" / split).is_dir() for p in (data / "audio" / split).iterdir()]


def check_demo(data: Path, outputs: Path, plan: DemoPlan) -> list[str]:
    """What the demo needs before it starts (seconds, not after an hour of training): writable ``data`` and
    ``outputs`` folders, and fluidsynth and a soundfont unless the corpus is rendered. Returns the extra arguments
    of ``ostinato prep corpus``: ``--overwrite`` to render again a corpus that an interrupted run left unfinished."""
    from ostinato.recipes.corpus import CORPUS_NAME, find_fluidsynth, find_soundfont
    from ostinato.fileio import read_json

    _check_writable(data, "--data")
    _check_writable(outputs, "--outputs")
    corpus = data / CORPUS_NAME
    if corpus.is_file():
        hours = (read_json(corpus).get("options") or {}).get("hours")
        if hours != plan.hours:
            raise UserError(f"--data {data} holds a demo corpus of {hours} h, this demo renders {plan.hours:g} h "
                            f"(--quick renders {DemoPlan.make(quick=True).hours:g} h); give another --data folder, "
                            f"or delete {data} to render it again")
        return []
    find_fluidsynth()
    find_soundfont()
    leftovers = _corpus_leftovers(data)
    if not leftovers:
        return []
    strangers = [p for p in leftovers if not p.is_file() or p.suffix not in (".flac", ".json", ".tmp")]
    if strangers:
        raise UserError(f"--data {data}: {strangers[0]} is not a clip of the demo corpus (no {corpus} either); "
                        "give an empty or new --data folder")
    print(f"{data}: an earlier run stopped while writing the corpus ({len(leftovers)} files, no {CORPUS_NAME}); "
          "rendering it again", flush=True)
    return ["--overwrite"]


def _history(folder: Path) -> list[dict]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def melody_kept(codec, shards: Path, count: int = 8) -> float:
    """``melody_through_codec`` of the first ``count`` clips of ``shards``: how much of their chroma the codec keeps."""
    from ostinato.data.shards import iter_shard_samples
    from ostinato.generation.melody_adherence import melody_through_codec
    from ostinato.generation.request import AudioInput

    samples = (s for shard in sorted(shards.glob("*.tar")) for s in iter_shard_samples(shard))
    return melody_through_codec(codec, [AudioInput(wav, sr) for _, wav, sr, _ in islice(samples, count)])


def _reconstructions(codec, shards: Path, out: Path, count: int = 3) -> list[Path]:
    from ostinato.data.shards import iter_shard_samples

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in sorted(shards.glob("*.tar")):
        for key, wav, sr, meta in iter_shard_samples(shard):
            if len(written) >= 2 * count:
                return written
            with torch.no_grad():
                recon = codec(wav[None]).recon[0]
            for name, audio in (("original", wav), ("reconstruction", recon)):
                path = out / f"{key}_{name}.wav"
                write_wav(path, audio, sr)
                written.append(path)
    return written


def unigram_entropy(tokens: Path) -> float:
    """Mean over codebooks of the entropy (nats) of the code frequencies in a token shard folder."""
    from ostinato.data.tokens import TokenManifest, iter_token_samples

    manifest = TokenManifest.load(tokens)
    counts = torch.zeros(manifest.codec.n_q, manifest.codec.card, dtype=torch.float64)
    for shard in manifest.shards:
        for _, codes, _ in iter_token_samples(str(tokens / shard.name)):
            counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def _generation_modes(data: Path, inputs: Path, plan: DemoPlan) -> dict[str, list[str]]:
    """The demo's generation calls: reference clips from the test split (a melody, a style, a 1.5 s intro)."""
    clips = sorted(p for p in (data / "audio" / "test").rglob("*") if p.suffix in (".flac", ".wav"))
    if not clips:
        raise FileNotFoundError(f"{data / 'audio' / 'test'}: the demo needs test clips as references")
    inputs.mkdir(parents=True, exist_ok=True)
    wav, sr = sf.read(clips[2 % len(clips)], dtype="float32")
    intro = wav[: 3 * sr // 2]  # 1.5 s: inside the 2 s training window
    write_wav(inputs / "intro.wav", torch.from_numpy(intro.reshape(len(intro), -1).T), sr)
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    seconds = ["--seconds", f"{plan.seconds:g}"]
    return {
        "text": prompts + seconds,
        "text_chained": prompts[:2] + seconds + ["--long-form-mode", "chain", "--long-form-overlap", "0.5"],
        "melody": prompts[:2] + seconds + ["--melody", str(clips[0])],
        "style": prompts[2:4] + seconds + ["--style", str(clips[1 % len(clips)]), "--cfg-beta", "2"],
        "continuation": prompts[:2] + seconds + ["--continue", str(inputs / "intro.wav")],
        "long": prompts[:2] + ["--seconds", f"{plan.long_seconds:g}"],
    }


MODE_TITLES = {"text": "Text to music", "text_chained": "Text, chained segments with a crossfade",
               "melody": "Text + melody (chromagram of a test clip)", "style": "Style of a test clip (double CFG)",
               "continuation": "Continuation of a 1.5 s intro", "long": "A long piece (sliding window)"}


def mulan_retrieval(mulan_ref: str, shards: Path) -> dict[str, float]:
    """Held-out retrieval of a trained MuLaN: every clip of ``shards`` (whole, windowed) against its caption."""
    from ostinato.models.mulan import as_mulan, mulan_embeddings
    from ostinato.nn.contrastive import retrieval_metrics

    mulan = as_mulan(mulan_ref)
    emb = mulan_embeddings(mulan, str(shards), segment_seconds=10.0, with_text=True)
    audio, text = emb.chunk(2)
    return {k: float(v) for k, v in retrieval_metrics(audio, text).items()}


def _curves(folder: Path, wanted: list[str]) -> dict[str, list[tuple[int, float]]]:
    from ostinato.demo.report import read_curves

    path = Path(folder) / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as f:
        have = f.readline().strip().split(",")
    return read_curves(folder, [w for w in wanted if w in have])


RETRIEVAL_SHOWN = ("t2a_r10", "a2t_r10", "chance_r10", "t2a_median_rank", "a2t_median_rank", "chance_median_rank",
                   "n")


CONDITIONS = ("text", "melody", "style")


def condition_ces(valid: dict[str, float]) -> dict[str, float]:
    """``valid/ce_no_{text,melody,style}`` of a validation record (``history.json``'s ``valid``): the CE with
    each condition nulled alone, for those the model has."""
    return {f"valid/ce_no_{name}": valid[f"ce_no_{name}"] for name in CONDITIONS if f"ce_no_{name}" in valid}


def condition_gaps(lm_ce: float, ce_without: dict[str, float]) -> str:
    """"text +0.123, melody +0.045 nats": what nulling each condition alone adds to the validation CE."""
    return ", ".join(f"{key.removeprefix('valid/ce_no_')} {value - lm_ce:+.3f}" for key, value in ce_without.items())


def demo_table(evaluation: dict[str, float], lm_ce: float | None, ce_text: float | None, entropy: float,
               retrieval: dict[str, float], before: float | None, after: float | None,
               ce_without: dict[str, float] | None = None) -> dict:
    """The report's metrics: the evaluation's scalars, then one table each for MusicGen, MuLaN and the codec, keyed
    by metric names that ``ostinato.evaluation.report.metric_info`` knows (None values are left out).
    ``ce_without``: ``condition_ces`` of the last validation."""
    table = {**evaluation,
             "MusicGen": {"valid/ce": lm_ce, **(ce_without or {}), "valid/ce_text_only": ce_text,
                          "unigram_entropy": entropy},
             "MuLaN retrieval, test split": {k: retrieval[k] for k in RETRIEVAL_SHOWN},
             "codec": {"mel_distance_untrained": before, "valid/mel_distance": after}}
    return {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
            for k, v in table.items()}


def _report(outputs: Path, generated: Path, modes: dict, plan: DemoPlan, recon: list[Path], metrics: dict,
            xps: dict[str, Path], summary: list[str], notes: dict[str, str]) -> Path:
    from ostinato.demo.report import DemoClip, DemoSection, clips_from_folder, write_demo_report

    sections = [DemoSection("Codec reconstructions (test split)",
                            [DemoClip(p, p.stem.rsplit("_", 1)[1], p.stem.rsplit("_", 1)[0]) for p in recon])]
    for mode in modes:
        seconds = plan.long_seconds if mode == "long" else plan.seconds
        sections.append(DemoSection(MODE_TITLES[mode], clips_from_folder(generated / mode, mode),
                                    note=f"{seconds:g} s each; parameters in the .json beside each clip"))
    curves = {"codec": _curves(xps["codec"], ["train/loss", "valid/mel_distance"]),
              "MusicGen": _curves(xps["musicgen"], ["train/ce", "valid/ce", "valid/ce_text_only",
                                                    *(f"valid/ce_no_{name}" for name in CONDITIONS)]),
              "MuLaN": _curves(xps["mulan"], ["train/loss", "valid/t2a_r10", "valid/a2t_r10", "valid/chance_r10"])}
    return write_demo_report(outputs / "demo" / "report.html", sections, metrics,
                             {k: v for k, v in curves.items() if v}, summary=summary, notes=notes)


def run_demo(data: Path, outputs: Path, quick: bool = False, *, verb: Verb) -> Path:
    """Run (or finish) the demo; returns the path of its HTML report. ``verb`` runs ``ostinato ARGS`` in this
    process (``ostinato.cli.main``: the demo sits below the CLI, which hands it in)."""
    plan = DemoPlan.make(quick)
    start = time.time()
    resume = check_demo(data, outputs, plan)
    from ostinato.interop.codecs import load_codec
    from ostinato.train import main as train_main

    _run(["prep", "corpus", "--out", str(data), "--hours", f"{plan.hours:g}", *resume])  # a finished corpus is kept
    codec_run = CODEC_EXPERIMENT + plan.overrides.get("codec", [])
    xp = train_main.get_xp(codec_run)
    t0 = time.time()
    _run(["train", *codec_run])
    codec_minutes = (time.time() - t0) / 60
    export = outputs / "exports" / "codec_tiny"
    _run(["export", str(xp.folder), str(export), "--overwrite"])  # a re-run replaces the export of the same XP
    codec = load_codec(export)
    recon = _reconstructions(codec, data / "shards" / "test", outputs / "demo" / "reconstructions")
    for split in ("train", "valid", "test"):
        if not (data / "tokens" / split / "manifest.json").is_file():
            _run(["tokenize", str(data / "shards" / split), str(data / "tokens" / split), "--codec", str(export)])

    # audio shards tokenized per batch by the export: the melody chroma of the segment's audio, not of the codec's
    # reconstruction (the tokens still give the unigram entropy)
    lm_run = MUSICGEN_EXPERIMENT + [f"family.codec={export}"] + plan.overrides.get("musicgen", [])
    lm_xp = train_main.get_xp(lm_run)
    _run(["train", *lm_run])
    mulan_run = MULAN_EXPERIMENT + plan.overrides.get("mulan", [])
    mulan_xp = train_main.get_xp(mulan_run)
    _run(["train", *mulan_run])
    retrieval = mulan_retrieval(str(mulan_xp.folder), data / "shards" / "test")

    generated = outputs / "demo" / "generated"
    modes = _generation_modes(data, outputs / "demo" / "inputs", plan)
    base = ["generate", "--model", str(lm_xp.folder), "--codec", str(export), "--seed", "0", "--overwrite"]
    for mode, extra in modes.items():
        _run(base + extra + ["--out", str(generated / mode), "--quiet"], verb=verb)

    from ostinato.demo.evaluation import run_demo_eval

    print("$ ostinato eval demo (evaluation/demo.yaml)", flush=True)
    eval_over = []
    if plan.eval_samples is not None:
        from ostinato.data.manifest import Manifest

        n_test = Manifest.load(data / "shards" / "test").total_samples
        eval_over = [f"num_samples={min(plan.eval_samples, n_test)}", "batch_size=4"]
    eval_report = run_demo_eval(data, outputs, str(lm_xp.folder), str(export), overrides=eval_over)
    eval_result = json.loads((eval_report.parent / "metrics.json").read_text())
    metrics = eval_result.get("metrics", {})

    history = _history(Path(xp.folder))
    before = next((h["valid"]["mel_distance"] for h in history if h.get("epoch") == -1), None)
    after = next((h["valid"]["mel_distance"] for h in reversed(history) if "valid" in h), None)
    lm_history = _history(Path(lm_xp.folder))
    lm_ce = next((h["valid"]["ce"] for h in reversed(lm_history) if "ce" in h.get("valid", {})), None)
    ce_text = next((h["valid"]["ce_text_only"] for h in reversed(lm_history)
                    if "ce_text_only" in h.get("valid", {})), None)
    ce_without = next((condition_ces(h["valid"]) for h in reversed(lm_history)
                       if condition_ces(h.get("valid", {}))), {})
    entropy = unigram_entropy(data / "tokens" / "train")
    mulan_valid = next((h["valid"] for h in reversed(_history(Path(mulan_xp.folder)))
                        if "t2a_r10" in h.get("valid", {})), {})
    lines = [f"codec: XP {xp.sig}, exported to {export}; training took {codec_minutes:.1f} min"]
    if before is not None and after is not None:
        lines.append(f"  validation mel distance: untrained {before:.3f} -> trained {after:.3f} "
                     f"({after / before:.2f} of the untrained value)")
    lines.append(f"  reconstructions: {recon[0].parent} ({len(recon) // 2} originals + reconstructions); chroma "
                 f"cosine to the originals {melody_kept(codec, data / 'shards' / 'test'):.3f} (what a MusicGen on "
                 "its tokens would see of the melody; this one reads the audio)")
    lines.append(f"tokens: {data / 'tokens'}/{{train,valid,test}} ({codec.n_q} x {codec.card} codes at "
                 f"{codec.frame_rate:g} Hz)")
    lines.append(f"musicgen: XP {lm_xp.sig}; validation cross-entropy {lm_ce:.3f} nats vs the tokens' unigram "
                 f"entropy {entropy:.3f} nats" if lm_ce is not None else f"musicgen: XP {lm_xp.sig}")
    if ce_without and lm_ce is not None:
        lines.append(f"  each condition nulled alone adds (validation CE minus {lm_ce:.3f}): "
                     f"{condition_gaps(lm_ce, ce_without)} nats")
    if ce_text is not None:
        lines.append(f"  without its melody and style prefix (text only): {ce_text:.3f} nats")
    lines.append(f"mulan: XP {mulan_xp.sig}; held-out test split ({retrieval['n']:.0f} clips vs their captions): "
                 f"R@10 text->audio {retrieval['t2a_r10']:.3f}, audio->text {retrieval['a2t_r10']:.3f} vs chance "
                 f"{retrieval['chance_r10']:.3f}; median rank {retrieval['t2a_median_rank']:.1f} / "
                 f"{retrieval['a2t_median_rank']:.1f} vs chance {retrieval['chance_median_rank']:.1f}")
    if mulan_valid:
        lines.append(f"  validation: R@10 text->audio {mulan_valid['t2a_r10']:.3f}, audio->text "
                     f"{mulan_valid['a2t_r10']:.3f} vs chance {mulan_valid['chance_r10']:.3f}")
    lines.append(f"generated ({plan.seconds:g} s per mode, {plan.long_seconds:g} s for the long piece; parameters in "
                 f"the .json files): {generated}/{{{','.join(modes)}}}")
    from ostinato.evaluation.report import metric_notes

    notes = metric_notes(eval_result)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    lines.append("evaluation (evaluation/demo.yaml vs the test split): "
                 + ", ".join(f"{k} {v:.4g}" + (f" ({notes[k]})" if k in notes else "") for k, v in shown.items()))
    lines.append(f"  evaluation report: {eval_report}")
    table = demo_table(shown, lm_ce, ce_text, entropy, retrieval, before, after, ce_without)
    report = _report(outputs, generated, modes, plan, recon, table,
                     {"codec": Path(xp.folder), "musicgen": Path(lm_xp.folder), "mulan": Path(mulan_xp.folder)},
                     lines, notes)
    print("\n== ostinato demo ==")
    print("\n".join(lines))
    print(f"total {(time.time() - start) / 60:.1f} min")
    print(f"report: {report}")
    return report
