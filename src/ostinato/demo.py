"""``ostinato demo`` (what ``make demo`` runs): the embedded default end to end on this machine.

demo corpus -> tiny codec (trained, exported) -> reconstructions -> token shards -> tiny MusicGen conditioned on
text, melody and style -> a tiny MuLaN (held-out text <-> audio retrieval printed) -> generation in every mode (text, melody, style, continuation; sliding window and
chaining), each 10 s = five training windows -> the demo evaluation suite (FAD, FAD-inf, per-song FAD, chroma)
against the held-out split. Finished steps are skipped (experiments resume), so a second run is
quick.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf
import torch

CODEC_EXPERIMENT = ["experiment=codec_tiny"]
MUSICGEN_EXPERIMENT = ["experiment=musicgen_tiny_melody_style"]
MULAN_EXPERIMENT = ["experiment=mulan_tiny"]
PROMPTS = ["A baroque chorale by Johann Sebastian Bach for church organ, in G major, at 90 BPM (andante).",
           "A traditional irish reel for fiddle, in D major, at 112 BPM (allegro).",
           "A classical string quartet, in C minor, at 70 BPM (adagio)."]


def _run(args: list[str]) -> None:
    print(f"$ ostinato {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "ostinato.cli", *args], check=True)


def _history(folder: Path) -> list[dict]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


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
                sf.write(path, audio.clamp(-1, 1).T.numpy(), sr)
                written.append(path)
    return written


def unigram_entropy(tokens: Path) -> float:
    """Mean over codebooks of the entropy (nats) of the code frequencies in a token shard folder."""
    from ostinato.data.tokens import TokenManifest, iter_token_samples

    manifest = TokenManifest.load(tokens)
    counts = torch.zeros(manifest.codec.n_q, manifest.codec.cardinality, dtype=torch.float64)
    for shard in manifest.shards:
        for _, codes, _ in iter_token_samples(str(tokens / shard.name)):
            counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def _generation_modes(data: Path, inputs: Path) -> dict[str, list[str]]:
    """The demo's generation calls: reference clips from the test split (a melody, a style, a 3 s intro)."""
    clips = sorted(p for p in (data / "audio" / "test").rglob("*") if p.suffix in (".flac", ".wav"))
    if len(clips) < 3:
        raise FileNotFoundError(f"{data / 'audio' / 'test'}: the demo needs three test clips as references")
    inputs.mkdir(parents=True, exist_ok=True)
    wav, sr = sf.read(clips[2], dtype="float32")
    sf.write(inputs / "intro.wav", wav[: 3 * sr // 2], sr)  # 1.5 s: inside the 2 s training window
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return {
        "text": prompts,
        "text_chained": prompts[:2] + ["--long-form", "chain", "--overlap", "0.5"],
        "melody": prompts[:2] + ["--melody", str(clips[0])],
        "style": prompts[2:4] + ["--style", str(clips[1]), "--cfg-beta", "2"],
        "continuation": prompts[:2] + ["--continue", str(inputs / "intro.wav")],
    }


def mulan_retrieval(mulan_ref: str, shards: Path) -> dict[str, float]:
    """Held-out retrieval of a trained MuLaN: every clip of ``shards`` (whole, windowed) against its caption."""
    from ostinato.families.mulan import as_mulan, mulan_embeddings
    from ostinato.nn.contrastive import retrieval_metrics

    mulan = as_mulan(mulan_ref)
    emb = mulan_embeddings(mulan, str(shards), segment_seconds=10.0, with_text=True)
    audio, text = emb.chunk(2)
    return {k: float(v) for k, v in retrieval_metrics(audio, text).items()}


def run_demo(data: Path, outputs: Path) -> None:
    from ostinato.interop.codecs import load_codec
    from ostinato.train import main as train_main

    start = time.time()
    _run(["prep", "corpus", "--out", str(data)])  # returns the existing corpus (and its summary) when done
    xp = train_main.get_xp(CODEC_EXPERIMENT)
    t0 = time.time()
    _run(["train", *CODEC_EXPERIMENT])
    codec_minutes = (time.time() - t0) / 60
    export = outputs / "exports" / "codec_tiny"
    _run(["export", str(xp.folder), str(export)])
    codec = load_codec(export)
    recon = _reconstructions(codec, data / "shards" / "test", outputs / "demo" / "reconstructions")
    for split in ("train", "valid", "test"):
        if not (data / "tokens" / split / "manifest.json").is_file():
            _run(["tokenize", str(data / "shards" / split), str(data / "tokens" / split), "--codec", str(export)])

    lm_xp = train_main.get_xp(MUSICGEN_EXPERIMENT)
    _run(["train", *MUSICGEN_EXPERIMENT])
    generated = outputs / "demo" / "generated"
    modes = _generation_modes(data, outputs / "demo" / "inputs")
    base = ["generate", "--model", str(lm_xp.folder), "--codec", str(export), "--duration", "10", "--seed", "0"]
    for mode, extra in modes.items():
        _run(base + extra + ["--out", str(generated / mode), "--quiet"])

    mulan_xp = train_main.get_xp(MULAN_EXPERIMENT)
    _run(["train", *MULAN_EXPERIMENT])
    retrieval = mulan_retrieval(str(mulan_xp.folder), data / "shards" / "test")

    from ostinato.evaluation.demo import run_demo_eval

    print("$ ostinato eval demo (evaluation/demo.yaml)", flush=True)
    report = run_demo_eval(data, outputs, str(lm_xp.folder), str(export))
    metrics = json.loads((report.parent / "metrics.json").read_text()).get("metrics", {})

    history = _history(Path(xp.folder))
    before = next((h["valid"]["mel_distance"] for h in history if h.get("epoch") == -1), None)
    after = next((h["valid"]["mel_distance"] for h in reversed(history) if "valid" in h), None)
    lm_history = _history(Path(lm_xp.folder))
    lm_ce = next((h["valid"]["ce"] for h in reversed(lm_history) if "ce" in h.get("valid", {})), None)
    print("\n== ostinato demo ==")
    print(f"codec: XP {xp.sig} ({xp.folder}), exported to {export}; training took {codec_minutes:.1f} min")
    if before is not None and after is not None:
        print(f"  validation mel distance: untrained {before:.3f} -> trained {after:.3f} "
              f"({after / before:.2f} of the untrained value)")
    print(f"  reconstructions: {recon[0].parent} ({len(recon) // 2} originals + reconstructions)")
    print(f"tokens: {data / 'tokens'}/{{train,valid,test}} ({codec.n_q} x {codec.cardinality} codes at "
          f"{codec.frame_rate:g} Hz)")
    entropy = unigram_entropy(data / "tokens" / "train")
    print(f"musicgen: XP {lm_xp.sig}; validation cross-entropy {lm_ce:.3f} nats vs the tokens' unigram entropy "
          f"{entropy:.3f} nats" if lm_ce is not None else f"musicgen: XP {lm_xp.sig}")
    ce_text = next((h["valid"]["ce_text_only"] for h in reversed(lm_history)
                    if "ce_text_only" in h.get("valid", {})), None)
    if ce_text is not None:
        print(f"  without its melody and style prefix (text only): {ce_text:.3f} nats")
    print(f"  generated (10 s each, 5 training windows; parameters in the .json files): {generated}/"
          f"{{{','.join(modes)}}}")
    mulan_valid = next((h["valid"] for h in reversed(_history(Path(mulan_xp.folder))) if "t2a_r10" in h.get("valid", {})),
                       {})
    print(f"mulan: XP {mulan_xp.sig}; held-out test split ({retrieval['n']:.0f} clips vs their captions): R@10 "
          f"text->audio {retrieval['t2a_r10']:.3f}, audio->text {retrieval['a2t_r10']:.3f} vs chance "
          f"{retrieval['chance_r10']:.3f}; median rank {retrieval['t2a_median_rank']:.0f} / "
          f"{retrieval['a2t_median_rank']:.0f}")
    if mulan_valid:
        print(f"  validation: R@10 text->audio {mulan_valid['t2a_r10']:.3f}, audio->text "
              f"{mulan_valid['a2t_r10']:.3f} vs chance {mulan_valid['chance_r10']:.3f}")
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(f"evaluation (evaluation/demo.yaml vs the test split): "
          + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    print(f"  report: {report}")
    print(f"total {(time.time() - start) / 60:.1f} min")
