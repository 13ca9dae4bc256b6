"""Read DAC (descript-audio-codec) checkpoints into ``ostinato.models.dac.DACCodec``, and write them as ostinato codec
export folders.

The file is the one ``dac.utils.load_model`` downloads and ``DAC.save(path, package=False)`` writes: a
``torch.save`` of ``{"state_dict": ..., "metadata": {"kwargs": DAC(...) arguments}}``; its tensor names are ours
but for weight norm (``weight_g`` / ``weight_v``). ``DAC.save(path)`` with its default ``package=True`` writes a
``torch.package`` instead, which runs the package's own code to load: refused, naming the re-save that fixes it.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ostinato.errors import UserError
from ostinato.models.dac import ARCHITECTURE, DACCodec

# DAC(...) argument -> DACCodec.build key (others, such as quantizer_dropout, only matter to its training)
DAC_KWARGS = {"encoder_dim": "encoder_dim", "encoder_rates": "encoder_rates", "latent_dim": "latent_dim",
              "decoder_dim": "decoder_dim", "decoder_rates": "decoder_rates", "n_codebooks": "n_q",
              "codebook_size": "card", "codebook_dim": "codebook_dim", "sample_rate": "sample_rate"}
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_MARKERS = (b"encoder_rates", b"codebook_size", b"metadata")  # words the pickle of a DAC weights file holds
EXPORT_TARGET = "ostinato.families.codec.CodecFamily"  # the family of a codec export (config.yaml)


def is_dac_file(path: str | Path) -> bool:
    """Whether ``path`` is a DAC checkpoint (weights file or torch.package), told from its zip's pickle alone."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(n.endswith("/dac/model/dac.py") for n in names):
            return True
        pickles = [n for n in names if n.endswith("/data.pkl")]
        head = archive.read(pickles[0])[:65536] if len(pickles) == 1 else b""
    return all(marker in head for marker in _MARKERS)


def _read(path: Path, trust: bool) -> Mapping[str, Any]:
    with zipfile.ZipFile(path) as archive:
        if any(n.endswith("/dac/model/dac.py") for n in archive.namelist()):
            raise UserError(f"{path} is a torch.package (DAC.save's default), which loads only by running dac's own "
                            "code; re-save it as weights with dac: DAC.load(path).save(out, package=False)")
    try:
        package = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise UserError(f"{path} pickles Python objects that weights-only loading refuses; if you trust this "
                            "file, pass --trust") from e
        package = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(package, Mapping) or "state_dict" not in package or "kwargs" not in package.get("metadata", {}):
        raise UserError(f"{path}: not a DAC weights file (a dict with state_dict and metadata.kwargs, as "
                        "DAC.save(path, package=False) writes)")
    return package


def dac_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A DAC checkpoint's ``metadata["kwargs"]`` -> ``DACCodec.build`` kwargs."""
    return {ours: kwargs[theirs] for theirs, ours in DAC_KWARGS.items() if kwargs.get(theirs) is not None}


def dac_state_to_codec(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DAC state dict -> ours: weight norm's ``weight_g`` / ``weight_v`` as parametrizations."""
    out = {}
    for key, value in state.items():
        head, _, last = key.rpartition(".")
        out[f"{head}.{_WEIGHT_NORM[last]}" if last in _WEIGHT_NORM else key] = value
    return out


def load_dac(path: str | Path, trust: bool = False) -> DACCodec:
    """A DAC weights ``.pth`` -> ``DACCodec`` in eval mode; tensors that do not fit its arguments are refused in one
    line naming the file."""
    path = Path(path)
    package = _read(path, trust)
    kwargs = dac_kwargs(package["metadata"]["kwargs"])
    if "sample_rate" not in kwargs:
        raise UserError(f"{path}: metadata.kwargs has no sample_rate; re-save it with DAC(sample_rate=...)")
    codec = DACCodec.build(architecture=ARCHITECTURE, **kwargs)
    state, own = dac_state_to_codec(package["state_dict"]), codec.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise UserError(f"{path}: its tensors do not fit DAC({kwargs}): {len(missing)} missing (e.g. "
                        f"{(missing or ['-'])[0]}), {len(unexpected)} unexpected (e.g. {(unexpected or ['-'])[0]}), "
                        f"{len(shapes)} of another shape (e.g. {(shapes or ['-'])[0]}); give an unmodified DAC file")
    codec.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return codec.eval()


def write_codec_export(codec: DACCodec, out: str | Path, source: str, overwrite: bool = False) -> Path:
    """``codec`` as an ostinato codec export folder (model.safetensors, config.yaml, export.json) that
    ``ostinato.load``, ``--codec`` and ``family.codec`` take. An existing ``out`` is replaced only with
    ``overwrite``."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ostinato.fileio import atomic_write_json, atomic_write_text
    from ostinato.store.records import CONFIG_NAME, INFO_NAME, WEIGHTS_NAME, staged_folder

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it, or choose another folder")
    arch = {k: v for k, v in codec.config.items() if k not in ("sample_rate", "channels")}
    cfg = {"family": {"_target_": EXPORT_TARGET, "sample_rate": codec.sample_rate, "channels": 1, "codec": arch}}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in codec.state_dict().items()}
    with staged_folder(out) as stage:
        save_file(tensors, str(stage / WEIGHTS_NAME))
        atomic_write_text(stage / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(cfg)))
        atomic_write_json(stage / INFO_NAME, {"source": source, "kind": "dac", "tensors": len(tensors),
                                              "family": "codec", "wrapper": EXPORT_TARGET,
                                              "model": "ostinato.models.codec:Codec", "imported_by": "ostinato import"})
    return out


def import_dac(src: str | Path, out: str | Path, trust: bool = False, overwrite: bool = False) -> Path:
    """``ostinato import DAC.pth OUT``: the checkpoint as a codec export folder (weights-only from then on)."""
    codec = load_dac(src, trust=trust)
    return write_codec_export(codec, out, str(Path(src).resolve()), overwrite=overwrite)
