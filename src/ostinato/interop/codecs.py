"""One loader for every codec ostinato can tokenize with: its own (XP, checkpoint, export), a transformers
``EncodecModel`` folder, or audiocraft's ``compression_state_dict.bin``."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ostinato.models.codec import Codec
from ostinato.models.musicgen import MusicGen, recorded_codec
from ostinato.models.musika import recorded_autoencoder
from ostinato.registry import kind_of
from ostinato.store.records import resolve_ref, xps_dir


def load_codec(ref: str | Path, trust: bool = False) -> Codec:
    """``ref``: an ostinato codec (XP signature, //sig/SIG, XP folder, .ckpt, export folder), a transformers
    EncodecModel folder (config.json with model_type "encodec"), or an audiocraft compression_state_dict.bin."""
    path = Path(str(ref))
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
    """Whether ``ref`` is another toolkit's codec: a transformers EncodecModel folder or an audiocraft
    compression_state_dict.bin."""
    path = Path(str(ref))
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text()).get("model_type") == "encodec"
    return path.is_file() and path.suffix in (".bin", ".th", ".pt") and "compression" in path.name


CODEC_KINDS = ("a codec: an XP folder, a checkpoint, an export folder, a transformers EncodecModel folder or a "
               "compression_state_dict.bin")
CODEC_DIR = "codec"  # an export's own copy of its codec
AUTOENCODER_DIR = "autoencoder"  # a Musika GAN export's own copy of its autoencoder
FOREIGN_WEIGHTS = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.gguf")  # other frameworks' copies


Exporter = Callable[..., Path]  # engine.weights.export: (ref, out, xps_dir=, trust=) -> out


def copy_codec(ref: str, dst: Path, trust: bool = False, exporter: Exporter | None = None) -> Path | None:
    """A copy of the local codec ``ref`` at ``dst`` (a folder): a transformers EncodecModel or export folder is
    copied, an audiocraft file becomes ``dst/compression_state_dict.bin``, an ostinato XP or checkpoint is
    exported with ``exporter`` (EMA weights + config; only when one is given). Returns the codec reference inside
    ``dst``, or None when ``ref`` is nothing local (then it stays as it is)."""
    from ostinato.store.checkpoint import SIG_PREFIX

    path = Path(ref).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or (path / "model.safetensors").is_file()):
        shutil.copytree(path, dst, ignore=shutil.ignore_patterns(*FOREIGN_WEIGHTS))
        return dst
    if path.is_file() and path.suffix in (".bin", ".th", ".pt"):
        dst.mkdir(parents=True)
        shutil.copy2(path, dst / "compression_state_dict.bin")
        return dst / "compression_state_dict.bin"
    if exporter is not None and (ref.startswith(SIG_PREFIX) or path.exists() or (xps_dir() / ref).is_dir()):
        return exporter(resolve_ref(ref), dst, xps_dir=xps_dir(), trust=trust)
    return None


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
