"""One loader for every codec ostinato can tokenize with: its own (XP, checkpoint, export), a transformers
``EncodecModel`` folder, or audiocraft's ``compression_state_dict.bin``."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ostinato.nn.codec import Codec


def xps_dir() -> Path:
    """The dora experiments folder of this project's config (``$OSTINATO_OUTPUTS/xps``)."""
    from ostinato.train import main

    return Path(main.dora.dir) / main.dora.xps


def resolve_ref(ref: str) -> str:
    """A bare XP signature becomes ``//sig/SIG``; anything else is returned as is."""
    if not ref.startswith("//") and not Path(ref).exists() and (xps_dir() / ref).is_dir():
        return f"//sig/{ref}"
    return ref


def load_codec(ref: str | Path, trust: bool = False) -> Codec:
    """``ref``: an ostinato codec (XP signature, //sig/SIG, XP folder, .ckpt, export folder), a transformers
    EncodecModel folder (config.json with model_type "encodec"), or an audiocraft compression_state_dict.bin."""
    path = Path(str(ref))
    if path.is_dir() and (path / "config.json").is_file():
        if json.loads((path / "config.json").read_text()).get("model_type") == "encodec":
            from ostinato.interop.encodec import load_transformers_encodec

            return load_transformers_encodec(path).eval()
    if path.is_file() and path.suffix in (".bin", ".th", ".pt") and "compression" in path.name:
        from ostinato.interop.encodec import load_audiocraft_encodec

        return load_audiocraft_encodec(path, trust=trust).eval()
    from ostinato.engine.weights import load

    module = load(resolve_ref(str(ref)), xps_dir=xps_dir(), trust=trust)
    codec = getattr(module, "codec", None)
    if not isinstance(codec, Codec):
        raise ValueError(f"{ref} holds a {type(module).__name__}, not a codec")
    return codec.eval()


def weights_hash(module: torch.nn.Module) -> str:
    """A short sha256 of the module's state dict (names, shapes, values): the codec's identity in token shards."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
