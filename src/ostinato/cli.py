"""The ``ostinato`` command: the same verbs for every model family (docs/cli.md: the shared flags).

    ostinato prep corpus --out data/demo         render the demo corpus (music21 + fluidsynth) and shard it
    ostinato prep shards SRC OUT [options]       any audio folder -> WebDataset shards + manifest.json
    ostinato prep semantic SHARDS OUT [options]  fit a semantic tokenizer (k-means over MFCC / SSL features)
    ostinato prep mulan --mulan REF              fit the MuLaN quantizer, write MuLaN tokens of every split
    ostinato train [-d] [overrides ...]          train an experiment (== dora -P ostinato run ...)
    ostinato config [overrides ...]              the resolved config of those overrides and their XP folder
    ostinato grid NAME [dora grid options]       launch/monitor a grid from grids/ (== dora -P ostinato grid)
    ostinato launch / info [...]                 dora's launch (one XP on SLURM) and info verbs
    ostinato export SIG|PATH OUT [--format F]    EMA weights + config; a MusicGen also as audiocraft / transformers
    ostinato tokenize SHARDS OUT --codec REF     audio shards -> token shards (int16 codes + metadata)
    ostinato tokenize SHARDS OUT --semantic DIR  audio shards -> semantic token shards (one k-means stream)
    ostinato encode SHARDS OUT --model REF       audio shards -> Musika latents / Jukebox codes (array shards)
    ostinato generate --model REF --prompt TEXT  text / melody / style / continuation -> wav
    ostinato import SRC OUT                      a transformers / audiocraft MusicGen, a DAC -> an export folder
    ostinato bundle jukebox|musiclm|stereo-codec the models that generate together -> one --model folder
    ostinato eval SUITE --model REF              a benchmark suite (evaluation/*.yaml) -> metrics.json + report
    ostinato eval SUITE --model REF -d N         ... shared by N ranks here (--slurm nodes=K,gpus=G: a SLURM job)
    ostinato eval-sweep SUITE --model REF        the suite over a grid of settings -> one summary table
    ostinato fad REF GEN --embedding SPEC        FAD (and KAD, FAD-inf, per-song FAD) between two folders
    ostinato demo                                the embedded default end to end (what `make demo` runs)
    ostinato app --model REF                     a web app (Gradio) generating with a MusicGen
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every verb's ``--help``: descriptions as written, each option's default after its help (left out where it
    is unset or a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: MESSAGE; see PROG --help``), exit 2, not the
    usage block; its sub-parsers are of the same class and help formatter. The only parser: argparse lives in this
    module alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        from ostinato.errors import EXIT_USER_ERROR

        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


class DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: it still works, hidden from ``--help``, and says its new name in one line."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _alias(parser: Any, old: str, new: argparse.Action) -> None:
    """``old`` as a deprecated spelling of the flag ``new`` (same value, same checks)."""
    parser.add_argument(old, dest=new.dest, type=new.type, choices=new.choices, metavar=new.metavar,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS, action=DeprecatedFlag,
                        new=new.option_strings[0] if new.option_strings else (new.metavar or new.dest.upper()))


# The shared flags: one spelling and one meaning on every verb (docs/cli.md). Verbs that write take
# --overwrite and --quiet; verbs that load a model take --trust; verbs that run one take --device (default auto).
TRUST_HELP = ("allow checkpoints that need full unpickling (torch.load weights_only=False: code in the file runs); "
              "only for files you trust")
QUIET_HELP = "no progress bars and no info log lines (results and errors are still printed)"
WINDOW_HELP = "seconds decoded per window (default: the training segment length)"
DEVICE_HELP = "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N"
DEVICES_HELP = ("auto (every visible GPU, else cpu), cpu, cuda:N or a comma-separated list (cuda:0,cuda:1); each "
                "device takes every n-th pending shard")


def _trust(p: Any) -> None:
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)


def _quiet(p: Any) -> None:
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _overwrite(p: Any, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (without it, refused)")


def _seconds(p: Any, flag: str, default: float | None, help: str, zero: bool = False) -> argparse.Action:
    """A length of time in seconds (> 0, or >= 0 with ``zero``)."""
    return p.add_argument(flag, type=_number(float, 0, above=not zero), default=default, metavar="SECONDS", help=help)


def _device_flag(p: Any, many: bool = False, help: str | None = None) -> argparse.Action:
    return p.add_argument("--device", default="auto", type=_devices if many else _device,
                          help=help or (DEVICES_HELP if many else DEVICE_HELP))


@contextlib.contextmanager
def _quieted(quiet: bool):
    """``--quiet``: tqdm's bars off (TQDM_DISABLE, which rank and worker processes inherit) and info logs off, for
    the verb's run only."""
    if not quiet:
        yield
        return
    before, root = os.environ.get("TQDM_DISABLE"), logging.getLogger()
    level = root.level
    os.environ["TQDM_DISABLE"] = "1"
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def _prep_corpus(args: argparse.Namespace) -> None:
    from ostinato.recipes.corpus import render_corpus
    from ostinato.data.manifest import Manifest
    from ostinato.data.shards import build_shards

    out = Path(args.out)
    summary = render_corpus(out, sample_rate=args.sample_rate, channels=args.channels, hours=args.hours,
                            clip_seconds=args.seconds, seed=args.seed, workers=args.workers,
                            soundfont=args.soundfont, overwrite=args.overwrite, progress=not args.quiet)
    if not args.no_shards:
        for split in ("train", "valid", "test"):
            folder = out / "shards" / split
            if (folder / "manifest.json").is_file() and not args.overwrite:  # same corpus: its shards stand
                manifest = Manifest.load(folder)
            else:
                manifest = build_shards(out / "audio" / split, folder, sample_rate=args.sample_rate,
                                        channels=args.channels, workers=args.workers or os.cpu_count() or 1,
                                        files_per_shard=args.files_per_shard, overwrite=args.overwrite,
                                        progress=not args.quiet)
            print(f"shards/{split}: {len(manifest.shards)} shards, {manifest.total_samples} clips "
                  f"-> {out / 'shards' / split / 'manifest.json'}")
    print(summary.format())


def _prep_shards(args: argparse.Namespace) -> None:
    import json

    from ostinato.data.shards import build_shards

    m = build_shards(args.src, args.out, sample_rate=args.sample_rate, channels=args.channels,
                     loudness=args.loudness, segment_seconds=args.seconds, overlap_seconds=args.overlap,
                     min_segment_seconds=args.min_seconds, metadata=args.metadata,
                     files_per_shard=args.files_per_shard, bits=args.bits, workers=args.workers,
                     overwrite=args.overwrite, progress=not args.quiet)
    print(f"{len(m.shards)} shards, {m.total_samples} samples, {m.total_seconds / 3600:.2f} h at "
          f"{m.sample_rate} Hz x {m.channels} ch; {m.skipped} files skipped")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    if m.skipped:
        print(f"skipped files and reasons: {Path(args.out) / 'report.json'}")
    cut = json.loads((Path(args.out) / "report.json").read_text()).get("truncated", [])
    if cut:
        print(f"{len(cut)} files cut short (kept what decodes), e.g. {cut[0]['source']}: see `truncated` in "
              f"{Path(args.out) / 'report.json'}")


def _prep_semantic(args: argparse.Namespace) -> None:
    from ostinato.devices import resolve_device
    from ostinato.encoding.semantic import fit_semantic_tokenizer

    tok = fit_semantic_tokenizer(args.shards, args.out, features=args.features, layer=args.layer,
                                 frame_rate=args.frame_rate, k=args.k, batch_frames=args.batch_frames,
                                 iterations=args.iterations, max_hours=args.max_hours, seed=args.seed,
                                 workers=args.workers, init=args.init, device=resolve_device(args.device),
                                 overwrite=args.overwrite, progress=not args.quiet)
    fit, last = tok.fit_stats, tok.fit_stats["passes"][-1]
    print(f"{tok.id}: {tok.card} centroids of {tok.dim}-dim {tok.features.kind} features at "
          f"{tok.frame_rate:g} Hz, fitted on {fit['hours']:.2f} h ({fit['clips']} clips, {fit['skipped']} skipped) "
          f"in {fit['seconds']:.0f} s")
    print(f"last pass: inertia/frame {last['inertia_per_frame']:.4f}, {last['used']}/{last['k']} centroids used, "
          f"entropy {last['entropy_bits']:.2f} bits")
    print(f"tokenizer: {Path(args.out)}; next: ostinato tokenize SHARDS TOKENS --semantic {args.out}")


def _prep_mulan(args: argparse.Namespace) -> None:
    from ostinato.data.sources import output_folder
    from ostinato.devices import resolve_device
    from ostinato.encoding.mulan import write_mulan_tokens
    from ostinato.errors import UserError
    from ostinato.models.mulan import as_mulan, fit_mulan_quantizer

    shards, out = Path(args.shards), Path(args.out)
    if not (shards / "train").is_dir():
        raise FileNotFoundError(f"--shards {shards}: no train/ split there (expected SHARDS/train/manifest.json)")
    output_folder(out, "--out")  # before any model loads
    if (out / "quantizer.safetensors").exists() and not args.overwrite:
        raise UserError(f"--out {out} already holds a quantizer and MuLaN tokens; pass --overwrite to fit them anew, "
                        "or choose another --out")
    mulan = as_mulan(args.mulan, map_location=resolve_device(args.device), trust=args.trust)
    quantizer = fit_mulan_quantizer(mulan, str(shards / "train"), n_q=args.n_q, card=args.card,
                                    segment_seconds=args.seconds, with_text=args.with_text, seed=args.seed,
                                    out=out / "quantizer.safetensors")
    for split in ("train", "valid", "test"):
        if (shards / split).is_dir():
            tokens = write_mulan_tokens(str(shards / split), out / split, mulan, quantizer,
                                        segment_seconds=args.seconds, source=args.mulan,
                                        overwrite=True)  # the quantizer is fitted anew
            print(f"mulan/{split}: {len(tokens.keys)} clips x {list(tokens.tokens)} -> {out / split}")
    print(f"quantizer: {out / 'quantizer.safetensors'} ({args.n_q} x {args.card} per namespace)")


DORA_VERBS = {"train": "run", "grid": "grid", "launch": "launch", "info": "info"}


def _dora(verb: str, rest: list[str]) -> None:
    """Hand the verb to dora with this package, so `ostinato train` and `dora -P ostinato run` are one. A bad
    override or config value (ostinato.train.main.get_xp raises ConfigError), an unknown grid or signature: one
    line, exit 2."""
    from dora.__main__ import get_parser
    from dora.__main__ import main as dora_main
    from dora.explore import ProcessException

    from ostinato.engine.config import ConfigError
    from ostinato.errors import user_errors

    if "-h" in rest or "--help" in rest:
        print(dora_help(verb))
        return
    rest = ["--help" if a == "--dora-help" else a for a in rest]
    argv = ["-P", "ostinato", DORA_VERBS[verb], *rest]
    with user_errors(f"ostinato {verb}", value_errors=False):
        args = get_parser().parse_args(argv)
        _check_dora_args(args)
        sys.argv = ["dora", *argv]
        try:
            dora_main()
        except ProcessException as e:  # a grid's XPs are composed in worker processes: dora keeps repr(error)
            error = re.fullmatch(r"(?:Config|User)Error\((.*)\)", str(e), re.S)
            if error is None:
                raise
            raise ConfigError(f"grid {args.grid}: {ast.literal_eval(error[1])}") from e
        except ConfigError as e:
            if getattr(args, "grid", None):
                raise ConfigError(f"grid {args.grid}: {e}") from e
            raise


DORA_USAGE = {
    "train": ("ostinato train [-d] [dora run options] [OVERRIDE ...]",
              "Train one experiment: conf/config.yaml composed with the overrides, in its XP folder (== dora -P "
              "ostinato run). A stopped run resumes from the folder's last checkpoint when started again.",
              "-d (one process per local GPU), -f SIG (the overrides of an existing XP, more may follow), --clear "
              "(start the XP afresh)"),
    "grid": ("ostinato grid NAME [dora grid options]",
             "Launch (or monitor) a grid of XPs on SLURM: NAME is a file of grids/ (== dora -P ostinato grid).",
             "--dry_run (list the XPs, launch nothing), --init (create the XPs), --cancel, --clear, -r/--replace, "
             "-t N (tail an XP's log)"),
    "launch": ("ostinato launch [-g GPUS] [dora launch options] [OVERRIDE ...]",
               "Submit one XP to SLURM (== dora -P ostinato launch).",
               "-g GPUS, -p PARTITION, -a (attach: tail the log), -f SIG"),
    "info": ("ostinato info [-f SIG | OVERRIDE ...]",
             "An XP's signature, folder and state, without training (== dora -P ostinato info).",
             "-f SIG, -l (the log), -t (tail the log)"),
}


def dora_help(verb: str) -> str:
    """``ostinato train|grid|launch|info --help``: ostinato's config groups and presets, the override syntax, the
    XP folder; dora's own options behind ``--dora-help``."""
    from ostinato.store.records import conf_dir

    usage, what, options = DORA_USAGE[verb]
    conf = Path(conf_dir())
    groups = sorted(d for d in conf.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    lines = [f"usage: {usage}", "", what, "", f"config groups and their presets ({conf}; default: conf/config.yaml):"]
    for group in groups:
        presets = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        lines.append(f"  {group.name + '=':<12}{presets}")
    lines += ["", "overrides:",
              "  GROUP=PRESET    pick a preset of a group            experiment=musicgen_tiny",
              "  KEY=VALUE       set any key of the composed config   optim.lr=3e-4 trainer.max_steps=1000",
              "  +KEY=VALUE      add a key the config lacks           +trainer.note=first",
              "", "XP folder: $OSTINATO_OUTPUTS (default outputs)/xps/<signature>; the signature is a hash of the "
              "overrides.", "  `ostinato config OVERRIDE ...` prints the resolved config and the XP folder without "
              "training; `ostinato config OVERRIDE ... --folder` prints the folder alone.",
              "", f"dora's options pass through, e.g. {options}.",
              f"  `ostinato {verb} --dora-help` prints dora's own help."]
    if verb == "grid":
        from ostinato.train import main

        package = main.dora.grid_package or "ostinato.grids"
        try:
            root = Path(importlib.import_module(package).__file__).parent
            names = sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")
                           if not p.name.startswith("_"))
            lines += ["", f"grids ({root}): {', '.join(names)}"]
        except ImportError:
            pass
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> None:
    """``ostinato config OVERRIDES``: the config a run of these overrides trains with, and its XP folder."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ostinato.data.dims import read_manifests
    from ostinato.engine.config import ConfigError
    from ostinato.errors import user_errors
    from ostinato.train import main as train_main

    with user_errors("ostinato config", value_errors=False):
        xp = train_main.get_xp(list(args.overrides))
        if args.folder:
            print(xp.folder)
            return
        read_manifests()  # as a run does once it has its XP: ${manifest:...} from the data when it is there
        try:
            text = OmegaConf.to_yaml(xp.cfg, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"the config does not resolve: {str(e).splitlines()[0]}") from None
        finally:
            read_manifests(False)
        print(text, end="")
        print(f"# XP {xp.sig}: {xp.folder}")


def _check_dora_args(args: argparse.Namespace) -> None:
    """What dora would answer with a FATAL line and exit 1 (or a list and exit 0): an unknown signature or grid."""
    from ostinato.errors import UserError, did_you_mean
    from ostinato.train import main

    sig = getattr(args, "from_sig", None)
    if sig is not None:
        try:
            main.get_argv_from_sig(sig)
        except RuntimeError:
            xps = main.dora.dir / main.dora.xps
            known = sorted(p.name for p in xps.iterdir()) if xps.is_dir() else []
            raise UserError(f"-f {sig}: no XP with this signature in {xps}{did_you_mean(sig, known)}; run "
                            "`ostinato train` first or check the signature") from None
    name = getattr(args, "grid", None)
    if name is not None:
        package = main.dora.grid_package or "ostinato.grids"
        try:
            root = Path(importlib.import_module(package).__file__).parent
        except ImportError:
            raise UserError(f"dora.grid_package={package}: cannot be imported; set OSTINATO_GRIDS to a package "
                            "of grid files on the PYTHONPATH") from None
        grids = sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")
                       if not p.name.startswith("_"))
        if name not in grids:
            raise UserError(f"{name}: no such grid{did_you_mean(name, grids)}; the grids are {', '.join(grids)}")


def _export(args: argparse.Namespace) -> None:
    from ostinato.engine.weights import export
    from ostinato.store.records import resolve_ref, xps_dir

    ref = resolve_ref(args.ref)
    out = export(ref, args.out, xps_dir=xps_dir(), trust=args.trust, overwrite=args.overwrite, lora=args.lora,
                 format=args.format, t5_name=args.t5_name)
    weights = "adapter/" if (out / "adapter").is_dir() else "model.safetensors"
    files = {"ostinato": f"{weights}, config.yaml, export.json",
             "audiocraft": "state_dict.bin, compression_state_dict.bin: audiocraft's MusicGen.get_pretrained(OUT)",
             "transformers": "a transformers MusicGen folder: from_pretrained(OUT)"}[args.format]
    print(f"exported {ref} -> {out} ({files})")


def _encode(args: argparse.Namespace) -> None:
    from ostinato.devices import resolve_devices
    from ostinato.encoding.arrays import encode_shards

    m = encode_shards(args.model, args.shards, args.out, batch_size=args.batch_size, workers=args.workers,
                      devices=resolve_devices(args.device), overwrite=args.overwrite, trust=args.trust,
                      progress=not args.quiet)
    streams = ", ".join(f"{n} [{s.channels}, {s.rate:g} Hz]" for n, s in m.streams.items())
    print(f"{len(m.shards)} array shards, {m.total_samples} samples ({streams}), {m.source['skipped']} skipped "
          f"-> {Path(args.out) / 'manifest.json'}")


def _tokenize(args: argparse.Namespace) -> None:
    from ostinato.devices import resolve_devices
    from ostinato.encoding.tokens import tokenize
    from ostinato.encoding.writer import parse_part
    from ostinato.models.semantic import is_semantic_tokenizer

    if args.semantic is not None and not is_semantic_tokenizer(args.semantic):
        raise FileNotFoundError(f"--semantic {args.semantic}: no semantic_tokenizer.json there; fit one with "
                                f"`ostinato prep semantic SHARDS {args.semantic}`")
    devices = resolve_devices(args.device)
    part = parse_part(args.part) if args.part else (0, 1)
    m = tokenize(args.semantic or args.codec, args.shards, args.out, n_q=args.n_q, batch_size=args.batch_size,
                 workers=args.workers, devices=devices, overwrite=args.overwrite, trust=args.trust, part=part,
                 progress=not args.quiet)
    if m is None:
        print(f"part {part[0]}/{part[1]}: its shards are written in {args.out}; the last part to finish writes the "
              "manifest")
        return
    c = m.codec
    print(f"{len(m.shards)} token shards, {m.total_samples} samples, {m.total_frames} frames "
          f"({m.total_frames / c.frame_rate / 3600:.2f} h) of {c.n_q} x {c.card} codes at {c.frame_rate:g} Hz "
          f"-> {Path(args.out) / 'manifest.json'}")
    if m.source.get("skipped"):
        print(f"{m.source['skipped']} samples skipped (corrupt or lost to a damaged tar); per shard: "
              f"source.skipped_by_shard in {Path(args.out) / 'manifest.json'}")


def _number(kind: type, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse ``type=``: ``kind`` (int or float) in ``[low, high]`` (``(low, high]`` when ``above``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if low is not None and high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}, got {text}")
        return value

    return parse


def _device(text: str) -> str:
    """An argparse ``type=`` for ``--device``: ``auto`` or what ``torch.device`` takes (cuda only where a GPU is
    visible); ``ostinato.devices.resolve_device`` turns ``auto`` into one."""
    from ostinato.devices import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _devices(text: str) -> str:
    """``--device`` of the verbs that spread shards over devices: ``auto`` or a comma-separated list."""
    for name in text.split(","):
        _device(name.strip())
    return text


def _check_out(out: str, option: str = "--out") -> None:
    """Refuse an output folder that is a file or cannot be written, before any model loads."""
    from ostinato.errors import UserError

    path = Path(out).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{option} {out}: {existing} is a file, not a folder; give a folder (created when missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: {existing} cannot be written (read-only or no permission); choose a "
                        "writable folder")


@contextlib.contextmanager
def _progress_bar(quiet: bool):
    from tqdm import tqdm

    bars: list[tqdm] = []  # opened at the first step: an error while loading stays one line

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="generating", unit="step", disable=quiet))
        bars[0].total = total
        bars[0].update(done - bars[0].n)  # tqdm rate-limits the redraws

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


CLIP_PATTERN = "[0-9][0-9][0-9].*"  # NNN.wav + NNN.json


def _clips_in(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(CLIP_PATTERN) if p.suffix in (".wav", ".json")) if out.is_dir() else []


def _check_clips(out: str, overwrite: bool) -> None:
    """Refuse, before any model loads, to write over the clips of an earlier run (nothing is lost silently)."""
    from ostinato.errors import UserError

    clips = _clips_in(Path(out))
    if clips and not overwrite:
        raise UserError(f"--out {out} already holds {len(clips)} clip files ({clips[0].name}, ...); pass --overwrite "
                        "to replace them, or choose another --out")


def _write_clips(out: Path, wavs, sample_rate: int, records: list[dict]) -> None:
    """NNN.wav + NNN.json (prompt and every parameter) per clip, each written atomically; the clips of an earlier
    run past these (``--overwrite``) are removed once the new ones are written."""
    from ostinato.fileio import write_wav
    from ostinato.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    for i, (wav, record) in enumerate(zip(wavs, records)):
        write_wav(out / f"{i:03d}.wav", wav, sample_rate)
        atomic_write_json(out / f"{i:03d}.json", record)
    for stale in _clips_in(out):
        if int(stale.stem) >= len(records):
            stale.unlink()
    print(f"wrote {len(records)} clip(s) of {wavs.shape[-1] / sample_rate:g} s to {out}")


def _prompts(args: argparse.Namespace) -> list[str]:
    from ostinato.errors import UserError

    prompts = list(args.prompt or [])
    if any(not p.strip() for p in prompts):  # most often an unset shell variable: said, not guessed
        raise UserError("--prompt '': an empty prompt; to generate unconditionally, give no --prompt, or "
                        "--unconditional N for N unconditional clips beside the prompts")
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "no such file"
            raise UserError(f"--prompts {path}: {what}; give a text file with one prompt per line")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UserError(f"--prompts {path}: not UTF-8 text; give a text file with one prompt per line") from None
        if not lines:
            raise UserError(f"--prompts {path}: no prompt in it; write one prompt per line")
        prompts += lines
    return prompts + [""] * (getattr(args, "unconditional", None) or 0)


def _generation_family(args: argparse.Namespace) -> str:
    """The family that generates: the one the --model's record names (``--family``, if given, must agree), or
    MusicLM for three stages."""
    from ostinato.errors import UserError
    from ostinato.registry import FAMILIES, bundle_family, family_of
    from ostinato.store.records import read_config, require_ref

    if args.model is None:
        if args.family == "musiclm" or any(getattr(args, k) for k in ("semantic", "coarse", "fine")):
            return "musiclm"
        raise UserError("--model is required (an export, import folder, XP signature or checkpoint); MusicLM takes "
                        "--semantic, --coarse and --fine instead")
    family = bundle_family(args.model)
    if family is None:
        ref = require_ref(args.model, "--model", "an export, import folder, XP folder or checkpoint")
        family = family_of(read_config(ref, trust=args.trust), f"--model {args.model}")
    if args.family is not None and args.family != family.name:
        raise UserError(f"--family {args.family}: --model {args.model} is a {family.name} model; leave --family out")
    if family.generate is None:
        generating = ", ".join(f.name for f in FAMILIES.values() if f.generate)
        raise UserError(f"--model {args.model} is a {family.name} model, which does not generate; give one of "
                        f"{generating}")
    return family.name


def _generate(args: argparse.Namespace) -> None:
    from ostinato.devices import resolve_device
    from ostinato.errors import UserError
    from ostinato.nn.decoding import GenerationParams
    from ostinato.generation.request import GenerationRequest, read_audio_input
    from ostinato.registry import FAMILIES, resolve

    _check_out(args.out)
    prompts = _prompts(args)  # the inputs are checked before any model loads
    paths = {"melody": args.melody, "style": args.style, "continue": args.continue_}
    audio = {k: read_audio_input(path, f"--{k}") for k, path in paths.items()}
    _check_clips(args.out, args.overwrite)
    family = _generation_family(args)
    if args.truncation is not None and family != "musika":
        raise ValueError(f"--truncation is a Musika setting; a {family} model does not take it")
    if family != "musicgen" and args.device.startswith("cuda"):
        raise UserError(f"--device {args.device}: {family} generation runs on the CPU here; use --device auto or cpu")
    params = GenerationParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              cfg_scale=args.cfg_scale, cfg_beta=args.cfg_beta, seed=args.seed)
    request = GenerationRequest(
        prompts=prompts, duration=args.seconds, params=params, model=args.model, codec=args.codec, trust=args.trust,
        device=resolve_device(args.device) if family == "musicgen" else "cpu",
        melody=audio["melody"], style=audio["style"], continuation=audio["continue"], inputs=paths,
        window=args.long_form_window, long_form=args.long_form_mode, extend_stride=args.long_form_stride,
        overlap=args.long_form_overlap, style_eval_q=args.style_eval_q, style_excerpt=args.style_excerpt,
        semantic=args.semantic, coarse=args.coarse, fine=args.fine, mulan=args.mulan, quantizer=args.quantizer,
        semantic_tokenizer=args.semantic_tokenizer, num_candidates=args.rerank, truncation=args.truncation)
    generate_clips = resolve(f"{FAMILIES[family].generate}:generate_clips")
    with _progress_bar(args.quiet) as progress:
        wavs, sample_rate, records = generate_clips(request, progress)
    _write_clips(Path(args.out), wavs, sample_rate, records)


def _check_bundle(path: Path, overwrite: bool) -> None:
    from ostinato.errors import UserError

    if path.exists() and not overwrite:
        raise UserError(f"{path} exists (a bundle written before); pass --overwrite to replace it, or choose another "
                        "OUT")


def _bundle_musiclm(args: argparse.Namespace) -> None:
    from ostinato.generation.musiclm import write_bundle

    _check_bundle(Path(args.out) / "musiclm.json", args.overwrite)
    path = write_bundle(args.out, args.semantic, args.coarse, args.fine, mulan=args.mulan, quantizer=args.quantizer,
                        codec=args.codec, semantic_tokenizer=args.semantic_tokenizer)
    print(f"bundle: {path}; next: ostinato generate --model {args.out} --prompt TEXT")


def _import(args: argparse.Namespace) -> None:
    from ostinato.interop.dac import is_dac_file
    from ostinato.interop.musicgen_import import import_musicgen

    if is_dac_file(args.src):
        _import_dac(args)
        return
    result = import_musicgen(args.src, args.out, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                             codec=args.codec, trust=args.trust, overwrite=args.overwrite,
                             style_encoder=args.style_encoder)
    print(result.summary())
    print(result.finetune_hint())


def _import_dac(args: argparse.Namespace) -> None:
    from ostinato.errors import UserError
    from ostinato.interop.dac import import_dac

    given = [flag for flag in ("text_encoder", "tokenizer", "codec") if getattr(args, flag) is not None]
    if given:
        raise UserError(f"{args.src} is a DAC codec: --{given[0].replace('_', '-')} is for MusicGen imports; drop it")
    out = import_dac(args.src, args.out, trust=args.trust, overwrite=args.overwrite)
    print(f"imported DAC codec {args.src} -> {out} (model.safetensors, config.yaml, export.json)\n"
          f"tokenize with it: ostinato tokenize SHARDS TOKENS --codec {out}")


def _bundle_jukebox(args: argparse.Namespace) -> None:
    from ostinato.generation.jukebox import write_bundle
    from ostinato.store.records import require_ref

    for part in ("top", "middle", "bottom", "vqvae"):  # a part that is nothing here fails now, not at generation
        if getattr(args, part) is not None:
            require_ref(getattr(args, part), f"--{part}", "an export folder, an XP folder or a checkpoint")
    _check_bundle(Path(args.out) / "jukebox.json", args.overwrite)
    path = write_bundle(args.out, args.top, args.middle, args.bottom, args.vqvae)
    print(f"wrote {path}; generate with: ostinato generate --model {args.out} --duration 4 --out gen/jukebox")


def _bundle_stereo_codec(args: argparse.Namespace) -> None:
    from ostinato.errors import UserError
    from ostinato.interop.codecs import CODEC_KINDS, write_stereo_codec
    from ostinato.store.records import require_ref

    require_ref(args.codec, "codec", CODEC_KINDS)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists; give a new folder for the stereo codec, or pass --overwrite to replace it")
    if out.exists():  # written beside it first: a failure leaves the old one whole
        import shutil

        new = write_stereo_codec(args.codec, out.with_name(f".{out.name}.new"), trust=args.trust)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
        out = new.rename(out)
    else:
        out = write_stereo_codec(args.codec, args.out, trust=args.trust)
    print(f"wrote {out} (interleaved stereo over {args.codec}); tokenize stereo audio with it: "
          f"ostinato tokenize SHARDS TOKENS --codec {out}")


def _eval(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from ostinato.devices import resolve_device
    from ostinato.evaluation.report import format_table, metric_notes
    from ostinato.evaluation.runner import default_out_dir, run_suite, setup_distributed
    from ostinato.evaluation.suite import load_suite

    overrides = list(args.set or []) + ([f"num_samples={args.num_samples}"] if args.num_samples else [])
    suite = load_suite(args.suite, overrides)
    out = Path(args.out) if args.out else default_out_dir(suite, args.model, overrides)
    _check_out(str(out))
    if "WORLD_SIZE" not in os.environ:  # once, before any rank starts: rank 0 writes metrics.json
        _check_results(out / "metrics.json", args.overwrite, "an evaluation")
    if args.slurm is not None:
        return _eval_submit(args, suite, out)
    if args.distributed > 1 and "WORLD_SIZE" not in os.environ:
        return _eval_ranks(args, suite)
    if args.distributed > 1 and int(os.environ["WORLD_SIZE"]) != args.distributed:
        raise ValueError(f"-d {args.distributed}, but WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun or a job "
                         "started the ranks already): drop -d")
    device = setup_distributed(resolve_device(args.device))
    try:
        result = run_suite(suite, args.model, out, codec=args.codec, device=device, trust=args.trust,
                           progress=not args.quiet)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(result["metrics"], metric_notes(result)))
        print(f"report: {result['report']} (and report.html); metrics: {out / 'metrics.json'}")


def _check_results(path: Path, overwrite: bool, what: str) -> None:
    """Refuse, before anything runs, to replace the results of an earlier run without ``--overwrite``."""
    from ostinato.errors import UserError

    if path.exists() and not overwrite:
        raise UserError(f"--out {path.parent}: already holds {what} ({path.name}); pass --overwrite to replace it, "
                        "or choose another --out")


def _fad(args: argparse.Namespace) -> None:
    from ostinato.devices import resolve_device
    from ostinato.errors import UserError
    from ostinato.evaluation.folder_fad import compare_folders, format_fad_table
    from ostinato.fileio import atomic_write_json

    out = Path(args.out) if args.out else (Path(os.environ.get("OSTINATO_OUTPUTS", "outputs")) / "fad" /
                                          f"{Path(args.ref).stem}__{Path(args.gen).stem}.json")
    _check_out(str(out.parent), "--out")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out}: exists (an earlier comparison); pass --overwrite to replace it, or choose "
                        "another --out")
    result = compare_folders(args.ref, args.gen, args.embedding, per=args.per, per_song=args.per_song, inf=args.inf,
                             inf_protocol=args.inf_protocol, kad=args.kad, bootstrap=args.bootstrap, seed=args.seed,
                             device=resolve_device(args.device), cache=args.cache, progress=not args.quiet)
    atomic_write_json(out, result)
    print(format_fad_table(result))
    print(f"protocol: {out}")


def _check_ranks(suite: Any, world: int, device: str) -> None:
    """Refuse, before any rank starts, more ranks than GPUs or than the suite's batches (when num_samples says)."""
    import torch

    from ostinato.errors import UserError
    from ostinato.evaluation.items import rank_batches

    if device.startswith("cuda") and world > torch.cuda.device_count():
        raise UserError(f"-d {world} --device cuda: {torch.cuda.device_count()} GPUs are visible; one rank per GPU: "
                        f"-d {torch.cuda.device_count()} or less")
    if suite.num_samples is not None:
        try:
            rank_batches(suite.num_samples, suite.batch_size, 0, world)
        except ValueError as e:
            raise UserError(f"{suite.path or suite.name}: {e}") from None


def _eval_ranks(args: argparse.Namespace, suite: Any) -> None:
    """``eval -d N``: the same command as N ranks on this machine (each sees torchrun's variables)."""
    from ostinato.engine.launch import python_command, run_local_ranks

    from ostinato.devices import resolve_device

    _check_ranks(suite, args.distributed, resolve_device(args.device))
    code = run_local_ranks(python_command("ostinato.cli", args.argv), args.distributed)
    if code:
        raise SystemExit(code)


def _eval_submit(args: argparse.Namespace, suite: Any, out: Path) -> None:
    """``eval --slurm KEY=VALUE,...``: one submitit job whose tasks are the ranks (logs in OUT/slurm)."""
    import json

    from ostinato.engine.launch import SlurmOptions, submit_ranks, without_option
    from ostinato.evaluation.report import format_table, metric_notes

    if args.distributed > 1:
        raise ValueError("--slurm and -d: the job's tasks are the ranks; drop -d and give --slurm gpus=N (or tasks=N)")
    options = SlurmOptions.parse(args.slurm)
    _check_ranks(suite, options.world_size, "cpu")  # GPUs are the job's, not this machine's
    argv = without_option(args.argv, "--slurm") + ["--out", str(out.absolute())]
    if options.gpus and not any(t == "--device" or t.startswith("--device=") for t in argv):
        argv += ["--device", "cuda"]
    from ostinato.cli import main as entry  # by module name: under `python -m ostinato.cli` this is __main__

    job = submit_ranks(entry, argv, options, out.absolute() / "slurm", name=f"eval-{suite.name}")
    where = f"{options.world_size} ranks ({options.nodes} x {options.tasks_per_node})"
    if options.cluster == "local":
        result = json.loads((out / "metrics.json").read_text())
        print(format_table(result["metrics"], metric_notes(result)))
        print(f"job {job.job_id} ({where}) done; report: {out / 'report.md'}; logs: {out / 'slurm'}")
    else:
        print(f"submitted job {job.job_id} ({where}); logs: {out / 'slurm'}; results: {out / 'metrics.json'}")


def _eval_sweep(args: argparse.Namespace) -> None:
    """``eval-sweep``: the suite once per combination of --grid (``evaluation.sweep``), then one summary table;
    ``-d N`` and ``--slurm`` start the ranks as ``eval`` does, every combination run by all of them."""
    from ostinato.devices import resolve_device
    from ostinato.engine.launch import SlurmOptions, python_command, run_local_ranks, submit_ranks, without_option
    from ostinato.evaluation.runner import setup_distributed
    from ostinato.evaluation.sweep import DEFAULT_GRID, parse_grid, sweep

    args.suite = args.old_suite or args.suite
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    out = Path(args.out) if args.out else (Path(os.environ.get("OSTINATO_OUTPUTS", "outputs")) / "eval" / "sweeps" /
                                          Path(args.suite).stem / Path(args.model.rstrip("/")).name)
    _check_out(str(out))
    if "WORLD_SIZE" not in os.environ:
        _check_results(out / "summary.json", args.overwrite, "a sweep")
    if args.slurm is not None:
        if args.distributed > 1:
            raise ValueError("--slurm and -d: the job's tasks are the ranks; drop -d and give --slurm gpus=N")
        options = SlurmOptions.parse(args.slurm)
        argv = without_option(args.argv, "--slurm") + ["--out", str(out.absolute()), "--overwrite"]
        if options.gpus and not any(t == "--device" or t.startswith("--device=") for t in argv):
            argv += ["--device", "cuda"]
        from ostinato.cli import main as entry  # by module name: under `python -m ostinato.cli` this is __main__

        job = submit_ranks(entry, argv, options, out.absolute() / "slurm", name="eval-sweep")
        print(f"job {job.job_id} ({options.world_size} ranks): summary {out / 'summary.md'}; logs {out / 'slurm'}")
        return
    if args.distributed > 1 and "WORLD_SIZE" not in os.environ:
        code = run_local_ranks(python_command("ostinato.cli", [*args.argv, "--overwrite"]), args.distributed)
        if code:
            raise SystemExit(code)
        return
    device = setup_distributed(resolve_device(args.device))
    summary = sweep(args.suite, args.model, grid, out, codec=args.codec, overrides=args.set or [], device=device,
                    trust=args.trust, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.read_text())
        print(f"summary: {summary}")


def _app(args: argparse.Namespace) -> None:
    from ostinato.app import launch_app

    if args.out is not None:
        _check_out(args.out)
    launch_app(args.model, args.codec, host=args.host, port=args.port, out=args.out, window=args.long_form_window,
               device=args.device, trust=args.trust)


def _demo(args: argparse.Namespace) -> None:
    from ostinato.demo import run_demo

    os.environ["OSTINATO_OUTPUTS"] = args.outputs  # the demo's XPs, exports and evaluation caches go there too
    run_demo(Path(args.data), Path(args.outputs), quick=args.quick, verb=main)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ostinato", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback behind an error (also: OSTINATO_DEBUG=1); give it before the verb")
    verbs = parser.add_subparsers(dest="verb", required=True)

    prep = verbs.add_parser("prep", help="prepare data: demo corpus, audio folder -> shards")
    prep_verbs = prep.add_subparsers(dest="what", required=True)

    c = prep_verbs.add_parser("corpus", help="render the demo corpus from music21's bundled scores")
    c.add_argument("--out", default="data/demo", help="output folder")
    c.add_argument("--sample-rate", type=int, default=24000, choices=[16000, 22050, 24000, 32000, 44100, 48000],
                   help="Hz")
    c.add_argument("--channels", choices=["mono", "stereo"], default="mono", help="channels rendered")
    c.add_argument("--hours", type=_number(float, 0, above=True), default=1.0, help="total audio to render")
    _alias(c, "--clip-seconds", _seconds(c, "--seconds", 10.0, help="length of each clip"))
    c.add_argument("--seed", type=int, default=0, help="same seed, same corpus")
    c.add_argument("--workers", type=_number(int, 1), default=None, help="processes (default: all cores)")
    c.add_argument("--soundfont", default=None, help="a GM .sf2 (default: $OSTINATO_SOUNDFONT or Debian's)")
    c.add_argument("--files-per-shard", type=_number(int, 1), default=64, help="clips per shard tar")
    c.add_argument("--no-shards", action="store_true", help="render clips only, do not write shards")
    _overwrite(c, "an existing corpus")
    _quiet(c)
    c.set_defaults(func=_prep_corpus)

    s = prep_verbs.add_parser("shards", help="audio folder -> WebDataset shards (FLAC + JSON) + manifest.json")
    s.add_argument("src", help="folder of wav/flac/mp3/ogg files, searched recursively")
    s.add_argument("out", help="output folder for shard-*.tar, manifest.json and report.json")
    s.add_argument("--sample-rate", type=_number(int, 1), default=None, help="target rate (default: the most common)")
    s.add_argument("--channels", choices=["mono", "stereo", "keep"], default="keep", help="channels written")
    s.add_argument("--loudness", type=float, default=None, metavar="LUFS", help="normalise to this loudness")
    _alias(s, "--segment", _seconds(s, "--seconds", None,
                                    help="cut into segments of this length (default: whole files)"))
    s.add_argument("--overlap", type=_number(float, 0), default=0.0, metavar="SECONDS",
                   help="seconds shared by consecutive segments")
    _alias(s, "--min-segment", _seconds(s, "--min-seconds", None,
                                        help="shortest tail segment kept (default: half a segment)"))
    s.add_argument("--metadata", default=None, help="CSV or JSONL table with a `path` column (captions, fields)")
    s.add_argument("--files-per-shard", type=_number(int, 1), default=64, help="clips per shard tar")
    s.add_argument("--bits", type=int, choices=[16, 24], default=16, help="FLAC sample width")
    s.add_argument("--workers", type=_number(int, 1), default=1, help="decoding processes")
    _overwrite(s, "a finished output folder")
    _quiet(s)
    s.set_defaults(func=_prep_shards)

    m = prep_verbs.add_parser("semantic", help="fit a semantic tokenizer (MusicLM family): k-means over frame "
                                               "features of audio shards")
    m.add_argument("shards", help="audio shards: a manifest folder or a brace pattern")
    m.add_argument("out", help="output folder (semantic_tokenizer.safetensors + .json)")
    m.add_argument("--features", default="mfcc", metavar="mfcc|logmel|hf:/folder",
                   help="MFCC + deltas (default), log-mel, or a local transformers SSL model (HuBERT, MERT...)")
    m.add_argument("--layer", type=int, default=None, help="hf features: hidden layer (default: the last)")
    m.add_argument("--k", type=_number(int, 2), default=None,
                   help="centroids (default 500 for mfcc/logmel, 1024 for hf)")
    m.add_argument("--frame-rate", type=_number(float, 0, above=True), default=25.0, help="tokens per second")
    m.add_argument("--max-hours", type=_number(float, 0, above=True), default=None,
                   help="audio to fit on (default: all)")
    m.add_argument("--iterations", type=_number(int, 1), default=10, help="k-means passes over the audio")
    m.add_argument("--batch-frames", type=_number(int, 1), default=10000, help="frames per k-means mini-batch")
    m.add_argument("--init", choices=["k-means++", "random"], default="k-means++", help="centroid initialisation")
    m.add_argument("--seed", type=int, default=0, help="same seed, same tokenizer")
    m.add_argument("--workers", type=_number(int, 0), default=1, help="audio decoding processes")
    _device_flag(m, help=f"where hf features run: {DEVICE_HELP}")
    _overwrite(m, "a tokenizer fitted in OUT")
    _quiet(m)
    m.set_defaults(func=_prep_semantic)

    u = prep_verbs.add_parser("mulan", help="MuLaN tokens for the MusicLM stages: fit the quantizer on the "
                                            "training clips' embeddings, then tokenize every split")
    u.add_argument("--mulan", required=True, help="a trained MuLaN (XP signature, //sig/SIG, folder, export)")
    u.add_argument("--shards", default="data/demo/shards", help="audio shard root with train/ valid/ test/")
    u.add_argument("--out", default="data/demo/mulan", help="output root: quantizer.safetensors + one folder per split")
    u.add_argument("--n-q", type=_number(int, 1), default=12, help="residual codebooks per namespace (MusicLM: 12)")
    u.add_argument("--card", type=_number(int, 2), default=1024, help="codes per codebook (MusicLM: 1024)")
    _alias(u, "--segment", _seconds(u, "--seconds", 10.0, help="length of each clip embedded"))
    u.add_argument("--with-text", action="store_true",
                   help="fit on the captions' text embeddings too (generation quantizes text embeddings)")
    u.add_argument("--seed", type=int, default=0, help="same seed, same quantizer")
    _device_flag(u)
    _trust(u)
    _overwrite(u, "a quantizer and the MuLaN tokens in --out")
    _quiet(u)
    u.set_defaults(func=_prep_mulan)

    for verb, dora_verb in DORA_VERBS.items():
        verbs.add_parser(verb, help=f"dora {dora_verb} for ostinato (see `ostinato {verb} --help`)", add_help=False)
    cf = verbs.add_parser("config", help="the resolved config of a training run and its XP folder, without training",
                          description="Print the config `ostinato train OVERRIDE ...` would train with (YAML, "
                                      "resolved) and its XP folder (the dora signature of the overrides). Nothing "
                                      "is trained or written.")
    cf.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                    help="GROUP=PRESET or KEY=VALUE, as `ostinato train` takes them")
    cf.add_argument("--folder", action="store_true", help="print the XP folder alone (for scripts)")
    cf.set_defaults(func=_config)

    n = verbs.add_parser("encode", help="audio shards -> latent / code array shards with a Musika autoencoder or "
                                        "Jukebox VQ-VAE (resumable; corrupt samples skipped and counted)")
    n.add_argument("shards", help="audio shards: a manifest folder or a brace pattern")
    n.add_argument("out", help="output folder for the array shards")
    n.add_argument("--model", required=True, help="a Musika autoencoder or Jukebox VQ-VAE (XP signature, XP folder, "
                                                  ".ckpt or export folder)")
    n.add_argument("--batch-size", type=_number(int, 1), default=16, help="clips per forward pass")
    n.add_argument("--workers", type=_number(int, 0), default=0, help="audio decoding processes per device")
    _alias(n, "--devices", _device_flag(n, many=True))
    _overwrite(n, "finished array shards in OUT")
    _trust(n)
    _quiet(n)
    n.set_defaults(func=_encode)

    e = verbs.add_parser("export", help="write an XP's EMA weights as safetensors + config for ostinato.load")
    e.add_argument("ref", help="an XP signature, //sig/SIG, an XP folder or a .ckpt file (with --format also an "
                               "export or import folder)")
    e.add_argument("out", help="output folder")
    _trust(e)
    _overwrite(e, "an OUT that already holds files")
    _quiet(e)
    e.add_argument("--lora", choices=("merge", "keep"), default="merge",
                   help="a LoRA run: merge the adapters into the weights (default), or keep them apart in peft's "
                        "format (adapter/) beside the base's reference")
    e.add_argument("--format", choices=("ostinato", "audiocraft", "transformers"), default="ostinato",
                   help="a MusicGen as audiocraft's state_dict.bin + compression_state_dict.bin, or a transformers "
                        "MusicgenForConditionalGeneration folder (default: ostinato's own export)")
    e.add_argument("--t5-name", default=None, help="--format audiocraft: the T5 audiocraft loads (t5-base...), "
                                                   "when the import recorded none")
    e.set_defaults(func=_export)

    t = verbs.add_parser("tokenize", help="audio shards -> token shards with a codec or a semantic tokenizer")
    t.add_argument("shards", help="audio shards: a manifest folder or a brace pattern")
    t.add_argument("out", help="output folder for the token shards")
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--semantic", default=None, metavar="DIR",
                       help="a semantic tokenizer folder fitted by `ostinato prep semantic`")
    which.add_argument("--codec", default=None,
                       help="an ostinato codec (XP signature, export folder, .ckpt), a transformers EncodecModel "
                            "folder, audiocraft's compression_state_dict.bin, or a DAC .pth (descript-audio-codec)")
    t.add_argument("--n-q", type=_number(int, 1), default=None, help="codebooks to keep (default: all)")
    t.add_argument("--batch-size", type=_number(int, 1), default=16, help="clips per forward pass")
    t.add_argument("--workers", type=_number(int, 0), default=2, help="audio decoding processes per device "
                                                                      "(0: in the main process)")
    _alias(t, "--devices", _device_flag(t, many=True))
    t.add_argument("--part", default=None, metavar="I/N|slurm",
                   help="this process's share when several machines tokenize into OUT together: I/N (every N-th "
                        "shard from the I-th, I from 0), or slurm (the task's SLURM_PROCID of SLURM_NTASKS: srun "
                        "--nodes 4 ostinato tokenize ... --part slurm); the last part to finish writes the manifest")
    _overwrite(t, "finished token shards in OUT")
    _trust(t)
    _quiet(t)
    t.set_defaults(func=_tokenize)

    g = verbs.add_parser("generate", help="text / melody / style / audio prompt -> audio with a trained model")
    g.add_argument("--family", choices=["musicgen", "musiclm", "musika", "jukebox"], default=None,
                   help="optional: the family is read from --model's record (given, it must agree)")
    g.add_argument("--model", default=None,
                   help="XP signature, export folder or checkpoint (musicgen, musika), or a bundle (jukebox, musiclm)")
    g.add_argument("--codec", default=None,
                   help="codec to decode with (default: family.codec, else the one of its token shards)")
    g.add_argument("--prompt", action="append", help="a text prompt (repeatable; none = unconditional)")
    g.add_argument("--unconditional", type=_number(int, 1), default=None, metavar="N",
                   help="N unconditional clips in the same batch as the prompts (the CFG-free baseline)")
    g.add_argument("--prompts", default=None, help="a file with one prompt per line")
    g.add_argument("--melody", default=None, help="audio whose chromagram the output follows (melody models)")
    g.add_argument("--style", default=None, help="audio whose style the output takes (style models)")
    g.add_argument("--style-eval-q", type=_number(int, 1), default=None,
                   help="style bottleneck codebooks at inference (fewer = looser style; default: the model's)")
    g.add_argument("--style-excerpt", type=_number(float, 0, above=True), default=None,
                   help="seconds of the style reference used (default: the model's eval_excerpt_seconds)")
    g.add_argument("--continue", dest="continue_", default=None,
                   help="audio to continue: the output starts with it and lasts --seconds in all")
    _alias(g, "--duration", _seconds(g, "--seconds", 10.0, help="length of each output clip"))
    # the long-form and sampling flags are the suite keys long_form.* and generation.* (evaluation/README.md)
    _alias(g, "--long-form", g.add_argument("--long-form-mode", choices=["window", "chain"], default="window",
                                            help="past one window: sliding window (audiocraft) or chained "
                                                 "segments with a crossfade"))
    _alias(g, "--window", _seconds(g, "--long-form-window", None, help=WINDOW_HELP))
    _alias(g, "--extend-stride", _seconds(g, "--long-form-stride", None,
                                          help="window mode: seconds added per extra window (default: half a window)"))
    _alias(g, "--overlap", _seconds(g, "--long-form-overlap", 2.0, zero=True,
                                    help="chain mode: seconds shared by segments"))
    _alias(g, "--cfg", g.add_argument("--cfg-scale", type=_number(float, 0), default=3.0,
                                      help="classifier-free guidance scale (alpha of double CFG)"))
    g.add_argument("--cfg-beta", type=_number(float, 0), default=None,
                   help="double CFG (text + style, MusicGen-Style): weight of the text given the style")
    g.add_argument("--top-k", type=_number(int, 0), default=250, help="0 = no top-k filtering")
    g.add_argument("--top-p", type=_number(float, 0, 1), default=0.0, help="0 = no nucleus filtering")
    g.add_argument("--temperature", type=_number(float, 0), default=1.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=None, help="same seed, same clips (default: random)")
    lm = g.add_argument_group("musiclm", "MusicLM: the three stages (or --model BUNDLE), MuLaN and reranking")
    lm.add_argument("--semantic", default=None, help="the semantic stage (XP signature, folder, export)")
    lm.add_argument("--coarse", default=None, help="the coarse stage")
    lm.add_argument("--fine", default=None, help="the fine stage")
    lm.add_argument("--mulan", default=None, help="the MuLaN (default: the one of the stages' MuLaN tokens)")
    lm.add_argument("--quantizer", default=None, help="the MuLaN quantizer file (default: the stages' one)")
    lm.add_argument("--semantic-tokenizer", default=None, metavar="DIR",
                    help="for --continue (default: the one of the semantic stage's token shards)")
    _alias(lm, "--num-candidates", lm.add_argument(
        "--rerank", type=_number(int, 1), default=1, metavar="K",
        help="K samples per prompt, generated in one batch; the best MuLaN text-audio score is kept"))
    mk = g.add_argument_group("musika", "Musika")
    mk.add_argument("--truncation", type=_number(float, 0), default=None,
                    help="latent anchors and style drawn from a normal cut at +-T (default 2; lower = more typical, "
                         "less varied; 0 = untruncated)")
    g.add_argument("--out", required=True, help="output folder: NNN.wav + NNN.json (prompt and parameters)")
    _device_flag(g, help=f"{DEVICE_HELP}; MusicGen runs there (the other families generate on the CPU: auto is "
                         "cpu for them)")
    _overwrite(g, "the clips an earlier run wrote in --out")
    _quiet(g)
    _trust(g)
    g.set_defaults(func=_generate)

    i = verbs.add_parser("import", help="a transformers or audiocraft MusicGen, or a DAC codec -> an export folder "
                                        "(ostinato.load, continue_from, generate; --codec)")
    i.add_argument("src", help="a transformers MusicgenForConditionalGeneration / MusicgenForCausalLM folder, "
                               "an audiocraft state_dict.bin (or a folder holding one), or a DAC .pth "
                               "(descript-audio-codec weights)")
    i.add_argument("out", help="the export folder to write")
    i.add_argument("--text-encoder", default=None, metavar="FOLDER",
                   help="audiocraft only: a local text-encoder folder (e.g. t5-base) with its tokenizer")
    i.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="tokenizer files, when SRC (or --text-encoder) has none")
    i.add_argument("--codec", default=None, metavar="REF",
                   help="the codec: a transformers EncodecModel folder, a compression_state_dict.bin, a DAC .pth "
                        "or an ostinato codec (default: the source's audio encoder / a compression_state_dict.bin "
                        "beside an audiocraft file); local ones are copied into OUT/codec")
    i.add_argument("--style-encoder", default=None, metavar="FOLDER",
                   help="audiocraft MusicGen-Style only: the local MERT folder (m-a-p/MERT-v1-95M) its style "
                        "conditioner reads; copied into OUT/style_encoder")
    _trust(i)
    _overwrite(i, "an existing OUT")
    _quiet(i)
    i.set_defaults(func=_import)

    b = verbs.add_parser("bundle", help="a folder naming the models that generate together (what --model takes)")
    bundles = b.add_subparsers(dest="what", required=True)
    j = bundles.add_parser("jukebox", help="OUT/jukebox.json from the three Jukebox priors (and the VQ-VAE)")
    j.add_argument("out")
    for part in ("top", "middle", "bottom"):
        j.add_argument(f"--{part}", required=True, help=f"the {part} prior (export folder, XP folder, //sig/SIG)")
    j.add_argument("--vqvae", default=None, help="the VQ-VAE (default: the one the priors' array shards record)")
    _overwrite(j, "an OUT/jukebox.json")
    _quiet(j)
    j.set_defaults(func=_bundle_jukebox)
    ml = bundles.add_parser("musiclm", help="OUT/musiclm.json: the three MusicLM stages (and MuLaN, its quantizer,"
                                            " the codec, the semantic tokenizer: default, from the stages' data)")
    ml.add_argument("out", help="output folder")
    for part in ("semantic", "coarse", "fine"):
        ml.add_argument(f"--{part}", required=True, help=f"the {part} stage: XP signature, XP folder, export, .ckpt")
    for part in ("mulan", "quantizer", "codec", "semantic-tokenizer"):
        ml.add_argument(f"--{part}", default=None, help=f"the {part.replace('-', ' ')} (default: the stages' own)")
    _overwrite(ml, "an OUT/musiclm.json")
    _quiet(ml)
    ml.set_defaults(func=_bundle_musiclm)
    st = bundles.add_parser("stereo-codec", help="OUT: a mono codec on each channel, L/R codebooks interleaved (the "
                                                 "codec of a stereo MusicGen: tokenize stereo audio with it)")
    st.add_argument("codec", help="the mono codec: a transformers EncodecModel folder, a compression_state_dict.bin, "
                                  "an export folder")
    st.add_argument("out", help="output folder")
    _trust(st)
    _overwrite(st, "an existing OUT")
    _quiet(st)
    st.set_defaults(func=_bundle_stereo_codec)

    v = verbs.add_parser("eval", help="run a benchmark suite on a model: generate, score, report",
                         description="Run an evaluation suite (a YAML file, or a name in evaluation/) on a model. "
                                     "With -d N, --slurm or under torchrun the ranks share the suite's batches.")
    v.add_argument("suite", help="a suite YAML file or the name of one in evaluation/ (demo, codec_demo, ...)")
    v.add_argument("--model", required=True,
                   help="text_to_music: a MusicGen (XP signature, XP folder, checkpoint, export or import folder); "
                        "reconstruction: a codec (anything --codec of tokenize takes)")
    v.add_argument("--codec", default=None, help="the MusicGen's codec when it records none")
    v.add_argument("--out", default=None,
                   help="output folder (default: $OSTINATO_OUTPUTS/eval/<suite>/<model>[_<overrides>])")
    v.add_argument("--num-samples", type=_number(int, 1), default=None,
                   help="clips to evaluate (overrides num_samples)")
    v.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a suite key, e.g. --set generation.cfg_scale=1 --set embedding=codec:/m/codec "
                        "(repeatable)")
    _device_flag(v, help=f"{DEVICE_HELP}; each rank of -d N takes cuda:LOCAL_RANK")
    v.add_argument("-d", "--distributed", type=_number(int, 1), default=1, metavar="N",
                   help="N ranks on this machine (one per GPU on cuda, else gloo CPU processes); the suite's "
                        "batches are dealt to them, metrics gathered exactly")
    v.add_argument("--slurm", default=None, metavar="KEY=VALUE,...",
                   help="submit the evaluation as one SLURM job whose tasks are the ranks, e.g. --slurm "
                        "nodes=2,gpus=8,partition=learn,time=120 (keys: nodes, gpus, tasks, partition, time, cpus, "
                        "mem, account, qos; cluster=local runs the tasks here through submitit and waits)")
    _overwrite(v, "an earlier evaluation in --out (its metrics.json)")
    _quiet(v)
    _trust(v)
    v.set_defaults(func=_eval)

    w = verbs.add_parser("eval-sweep", help="a suite over a grid of settings (default: cfg_scale x top_k) -> one "
                                            "summary table",
                         description="Run SUITE on --model once per combination of the --grid values (suite keys, "
                                     "as --set takes them), each into OUT/<key=value,...>/, then OUT/summary.md and "
                                     "summary.json. With -d N or --slurm the ranks share every combination's "
                                     "batches, as in `ostinato eval`.")
    w.add_argument("suite", nargs="?", default="demo", help="a suite YAML file or the name of one in evaluation/")
    w.add_argument("--suite", dest="old_suite", default=None, help=argparse.SUPPRESS, action=DeprecatedFlag,
                   new="SUITE")  # a positional with a default would hide the flag's value: a dest of its own
    w.add_argument("--model", required=True, help="the trained MusicGen (XP signature, XP folder, export)")
    w.add_argument("--codec", default=None, help="the MusicGen's codec when it records none")
    w.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a suite key and its values (repeatable; default: generation.cfg_scale=1,3,5 and "
                        "generation.top_k=50,250)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed suite overrides (repeatable)")
    w.add_argument("--out", default=None, help="output folder (default: $OSTINATO_OUTPUTS/eval/sweeps/<suite>/"
                                                "<model>)")
    _device_flag(w, help=f"{DEVICE_HELP}; each rank of -d N takes cuda:LOCAL_RANK")
    w.add_argument("-d", "--distributed", type=_number(int, 1), default=1, metavar="N",
                   help="N ranks on this machine, as in `ostinato eval -d N`")
    w.add_argument("--slurm", default=None, metavar="KEY=VALUE,...",
                   help="one SLURM job whose tasks are the ranks (the keys of `ostinato eval --slurm`)")
    _overwrite(w, "an earlier sweep in --out (its summary.json)")
    _quiet(w)
    _trust(w)
    w.set_defaults(func=_eval_sweep)

    f = verbs.add_parser("fad", help="FAD between two folders of audio (or shard sets, or cached statistics)",
                         description="FAD of GEN against REF, one row per --embedding; writes the exact protocol "
                                     "(embedding and weights hashes, rate, windowing, statistics, N) as JSON. "
                                     "FAD-inf and per-song FAD are refused, with the reason, when N is too small.")
    f.add_argument("ref", help="reference: an audio folder (recursive), a shard folder (manifest.json) or a "
                               "statistics file of the eval cache (.safetensors)")
    f.add_argument("gen", help="generated: the same kinds (a statistics file only when nothing but FAD is asked)")
    f.add_argument("--embedding", action="append", required=True, metavar="SPEC",
                   help="codec:REF, hf:FOLDER[,layer=N], vggish:/path/vggish.pth[,pca=...], clap:/ckpt.pt,text=/dir "
                        "(repeatable: a row each)")
    f.add_argument("--per", choices=("frame", "clip"), default="frame",
                   help="Gaussian over frame embeddings (fadtk) or over clip means")
    f.add_argument("--per-song", action="store_true", help="per-song FAD of every GEN clip")
    f.add_argument("--inf", action="store_true", help="FAD-inf: FAD over growing subsets extrapolated to 1/N = 0")
    f.add_argument("--inf-protocol", choices=("ostinato", "fadtk"), default="ostinato",
                   help="subsets without replacement (ostinato) or with replacement, int(linspace(500, N, 25)) "
                        "(fadtk)")
    f.add_argument("--kad", action="store_true", help="Kernel Audio Distance beside FAD")
    f.add_argument("--bootstrap", type=_number(int, 0), default=0, metavar="N",
                   help="confidence interval of FAD from N resamples of the GEN clips (0: none)")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and FAD-inf subsets")
    f.add_argument("--out", default=None, help="the JSON (default: $OSTINATO_OUTPUTS/fad/REF__GEN.json)")
    f.add_argument("--cache", default=None, help="embedding cache folder (default: $OSTINATO_OUTPUTS/eval_cache)")
    _device_flag(f)
    _overwrite(f, "the JSON of an earlier comparison at --out")
    _quiet(f)
    f.set_defaults(func=_fad)

    a = verbs.add_parser("app", help="a Gradio web app to generate with a MusicGen (prompt, duration or unlimited, "
                                     "CFG, sampling, seed, melody / style / continuation uploads)")
    a.add_argument("--model", required=True, help="XP signature, XP folder, checkpoint, export or import folder")
    a.add_argument("--codec", default=None, help="codec to decode with (default: the model's)")
    a.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    a.add_argument("--port", type=_number(int, 1, 65535), default=7860, help="port to serve on")
    a.add_argument("--out", default=None, help="folder for the clips (default: $OSTINATO_OUTPUTS/app)")
    _alias(a, "--window", _seconds(a, "--long-form-window", None, help=WINDOW_HELP))
    _device_flag(a)
    _trust(a)
    a.set_defaults(func=_app)

    d = verbs.add_parser("demo", help="the embedded default end to end: corpus -> codec, MusicGen, MuLaN -> "
                                      "generation -> evaluation -> outputs/demo/report.html")
    d.add_argument("--data", default="data/demo", help="the demo corpus (rendered when missing)")
    d.add_argument("--outputs", default=os.environ.get("OSTINATO_OUTPUTS", "outputs"),
                   help="everything the demo writes: XPs, exports, clips, report (default: $OSTINATO_OUTPUTS or "
                        "outputs)")
    d.add_argument("--quick", action="store_true",
                   help="a few steps and seconds of everything (a smoke test of the demo, not a model)")
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    from ostinato.errors import DEBUG_ENV, user_errors

    argv = sys.argv[1:] if argv is None else argv
    if "--debug" in argv[:1]:  # `ostinato --debug VERB ...`: tracebacks for every verb, dora's included
        os.environ[DEBUG_ENV] = "1"
        argv = argv[1:]
    if argv and argv[0] in DORA_VERBS:
        return _dora(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # what `eval -d` / `eval --slurm` hand their ranks
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors("ostinato"), _quieted(getattr(args, "quiet", False)):
        args.func(args)


if __name__ == "__main__":
    main()
