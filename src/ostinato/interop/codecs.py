"""One loader for every codec ostinato can tokenize with: its own (XP, checkpoint, export), a transformers
``EncodecModel`` folder, audiocraft's ``compression_state_dict.bin``, or a DAC (descript-audio-codec) ``.pth``; and
the interleaved stereo codec of stereo MusicGens: a folder holding ``interleaved_stereo.json`` (``{"mono": PATH}``,
PATH relative to the folder) that names the mono codec run on each channel."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ostinato.interop.dac import is_dac_file, load_dac, write_codec_export
from ostinato.models.codec import Codec
from ostinato.models.stereo_codec import InterleavedStereoCodec
from ostinato.models.musicgen import MusicGen, recorded_codec
from ostinato.models.musika import recorded_autoencoder
from ostinato.registry import kind_of
from ostinato.store.records import resolve_ref, xps_dir


STEREO_FILE = "interleaved_stereo.json"  # marks a folder as an interleaved stereo codec (see the module docstring)


def load_codec(ref: str | Path, trust: bool = False) -> Codec | InterleavedStereoCodec:
    """``ref``: an ostinato codec (XP signature, //sig/SIG, XP folder, .ckpt, export folder), a transformers
    EncodecModel folder (config.json with model_type "encodec"), an audiocraft compression_state_dict.bin, a DAC
    weights .pth (``interop.dac``) or an interleaved stereo codec folder (``interleaved_stereo.json``)."""
    path = Path(str(ref))
    if (path / STEREO_FILE).is_file():
        return InterleavedStereoCodec(load_codec(stereo_mono_ref(path), trust=trust)).eval()
    if is_dac_file(path):
        return load_dac(path, trust=trust).eval()
    if is_foreign_codec(path) and path.is_dir():
        from ostinato.interop.encodec import load_transformers_encodec

        return load_transformers_encodec(path).eval()
    if is_foreign_codec(path):
        from ostinato.interop.encodec import load_audiocraft_encodec

        return load_audiocraft_encodec(path, trust=trust).eval()
    from ostinato.models import load

    module = load(resolve_ref(str(ref)), xps_dir=xps_dir(), trust=trust)
    if isinstance(module, MusicGen):
        from ostinato.errors import UserError
        from ostinato.store.records import read_weights

        recorded = recorded_codec(read_weights(resolve_ref(str(ref)), xps_dir(), trust)[1])
        raise UserError(f"{ref} is a MusicGen, not a codec; give a codec here (a reconstruction suite evaluates a "
                        f"codec: --model CODEC){f', e.g. its codec {recorded}' if recorded else ''}")
    codec = module if isinstance(module, Codec) else getattr(module, "codec", None)
    if not isinstance(codec, Codec):
        raise ValueError(f"{ref} holds a {type(module).__name__}, not a codec")
    return codec.eval()


def is_foreign_codec(ref: str | Path) -> bool:
    """Whether ``ref`` is another toolkit's codec: a transformers EncodecModel folder, an audiocraft
    compression_state_dict.bin, a DAC .pth, or an interleaved stereo codec folder."""
    path = Path(str(ref))
    if (path / STEREO_FILE).is_file() or is_dac_file(path):
        return True
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text()).get("model_type") == "encodec"
    return path.is_file() and path.suffix in (".bin", ".th", ".pt") and "compression" in path.name


CODEC_KINDS = ("a codec: an XP folder, a checkpoint, an export folder, a transformers EncodecModel folder, a "
               "compression_state_dict.bin or a DAC .pth")
CODEC_DIR = "codec"  # an export's own copy of its codec
AUTOENCODER_DIR = "autoencoder"  # a Musika GAN export's own copy of its autoencoder
FOREIGN_WEIGHTS = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.gguf")  # other frameworks' copies


Exporter = Callable[..., Path]  # engine.weights.export: (ref, out, xps_dir=, trust=) -> out


def copy_codec(ref: str, dst: Path, trust: bool = False, exporter: Exporter | None = None) -> Path | None:
    """A copy of the local codec ``ref`` at ``dst`` (a folder): a transformers EncodecModel or export folder is
    copied, an audiocraft file becomes ``dst/compression_state_dict.bin``, a DAC .pth becomes a codec export folder
    (read weights-only from then on), an ostinato XP or checkpoint is exported with ``exporter`` (EMA weights +
    config; only when one is given). Returns the codec reference inside ``dst``, or None when ``ref`` is nothing
    local (then it stays as it is)."""
    from ostinato.store.checkpoint import SIG_PREFIX

    path = Path(ref).expanduser()
    if is_dac_file(path):
        return write_codec_export(load_dac(path, trust=trust), dst, str(path.resolve()))
    if path.is_dir() and any((path / name).is_file() for name in ("config.json", "model.safetensors", STEREO_FILE)):
        shutil.copytree(path, dst, ignore=shutil.ignore_patterns(*FOREIGN_WEIGHTS))
        return dst
    if path.is_file() and path.suffix in (".bin", ".th", ".pt"):
        dst.mkdir(parents=True)
        shutil.copy2(path, dst / "compression_state_dict.bin")
        return dst / "compression_state_dict.bin"
    if exporter is not None and (ref.startswith(SIG_PREFIX) or path.exists() or (xps_dir() / ref).is_dir()):
        return exporter(resolve_ref(ref), dst, xps_dir=xps_dir(), trust=trust)
    return None


def stereo_mono_ref(folder: str | Path) -> Path:
    """The mono codec an interleaved stereo codec folder names (``interleaved_stereo.json``: ``{"mono": PATH}``)."""
    folder = Path(folder)
    marker = folder / STEREO_FILE
    try:
        mono = json.loads(marker.read_text())["mono"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{marker}: expected {{\"mono\": PATH}} naming the mono codec (relative to the folder); "
                         "rewrite it with ostinato.interop.codecs.write_stereo_codec") from None
    path = folder / mono
    if not path.exists():
        raise FileNotFoundError(f"{marker}: its mono codec {path} is not there; copy the stereo codec folder whole")
    return path


def write_stereo_codec(mono_ref: str, dst: str | Path, trust: bool = False) -> Path:
    """An interleaved stereo codec folder ``dst`` around a copy of the local mono codec ``mono_ref`` (a transformers
    EncodecModel folder, a compression_state_dict.bin or an export folder), placed in ``dst/mono``. Returns ``dst``."""
    dst = Path(dst)
    codec = load_codec(mono_ref, trust=trust)
    if codec.channels != 1:
        raise ValueError(f"{mono_ref}: a {codec.channels}-channel codec; an interleaved stereo codec wraps a mono one")
    placed = copy_codec(str(mono_ref), dst / "mono", trust=trust)
    if placed is None:
        raise ValueError(f"{mono_ref}: not a local codec file or folder; give the mono codec's path")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / STEREO_FILE).write_text(json.dumps({"mono": placed.relative_to(dst).as_posix()}) + "\n")
    return dst


def embed_codec(cfg: dict, stage: Path, out: Path, trust: bool = False, exporter: Exporter | None = None) -> dict:
    """``cfg`` of a MusicGen being exported to ``out`` (written in ``stage``, renamed onto ``out`` at the end), with
    its codec (``family.codec``, else the one its token shards record) copied into ``codec/`` and recorded relative
    to the export: it generates from any working directory, and moved or copied whole it still finds its codec.
    A Musika GAN's autoencoder travels the same way, in ``autoencoder/``.
    Other families are returned as they are; ``exporter`` exports a codec that is an XP or checkpoint."""
    family = dict(cfg.get("family") or {})
    kind = kind_of(cfg)
    if kind.family == "musicgen":
        key, folder, ref = "codec", CODEC_DIR, recorded_codec(cfg)  # None without token shards: needs --codec
    elif kind.model == "ostinato.models.musika:Musika":  # a Musika GAN: its autoencoder decodes
        key, folder, ref = "autoencoder", AUTOENCODER_DIR, recorded_autoencoder(cfg)
    else:
        return cfg
    placed = None if ref is None else copy_codec(str(ref), stage / folder, trust=trust, exporter=exporter)
    if placed is None:
        return cfg
    return {**cfg, "family": {**family, key: placed.relative_to(stage).as_posix()}}


def weights_hash(module: torch.nn.Module) -> str:
    """A short sha256 of the module's state dict (names, shapes, values): the codec's identity in token shards."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
