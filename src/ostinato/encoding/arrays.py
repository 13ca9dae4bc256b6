"""``ostinato encode``: audio shards -> array shards with a model that writes arrays (a Musika autoencoder's
latents, float16 ``[D, F]``; a Jukebox VQ-VAE's codes per level, int16 ``[1, F_level]``).

    ostinato encode data/demo/shards/train data/demo/latents/train --model outputs/exports/musika_ae_tiny
    ostinato encode data/demo/shards/train data/demo/jukebox/train --model outputs/exports/jukebox_vqvae_tiny

The model is anything ``ostinato.load`` takes whose object writes arrays: ``array_streams()`` (stream ->
``StreamInfo``), ``encode_arrays(wav [B, C, T])`` (stream -> ``[B, K, F]``), ``array_kind``, ``sample_rate``,
``channels``. The loop (resume, workers, devices, skipped samples) is ``writer.write_shards``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ostinato.data.arrays import ArrayManifest, ArrayShard, ModelInfo, encode_array
from ostinato.data.sources import naming
from ostinato.encoding.writer import open_output, write_shards

__all__ = ["ModelArrays", "array_entries", "encode_shards", "load_encoder"]


def array_entries(arrays: dict[str, Tensor]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """One item's streams (name -> ``[K, F]``) -> its tar entries (``<stream>.npy``) and JSON fields (``frames``
    per stream): the array-shard sample every writer makes."""
    return ({f"{n}.npy": encode_array(x) for n, x in arrays.items()},
            {"frames": {n: int(x.shape[-1]) for n, x in arrays.items()}})


def load_encoder(ref: str, trust: bool = False, device: str = "cpu") -> nn.Module:
    """The model behind ``ref`` (XP signature, //sig/SIG, XP folder, .ckpt, export folder), checked to write
    arrays, in eval mode on ``device``."""
    from ostinato.models import load
    from ostinato.store.records import resolve_ref, xps_dir

    module = load(resolve_ref(str(ref)), xps_dir=xps_dir(), trust=trust)
    if not hasattr(module, "encode_arrays") or not hasattr(module, "array_streams"):
        raise ValueError(f"{ref} holds a {type(module).__name__}, which writes no arrays: give a Musika autoencoder "
                         "(family=musika_autoencoder_tiny) or a Jukebox VQ-VAE (family=jukebox_vqvae_tiny)")
    return module.to(device).eval()


class ModelArrays:
    """A model that writes arrays as a ``ShardEncoder``: ``<key>.<stream>.npy`` per stream, ``frames`` per stream
    in the JSON; a shard's frames count the first stream's."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sample_rate, self.channels = int(model.sample_rate), int(model.channels)
        self.first = next(iter(model.array_streams()))

    def encode(self, wav: Tensor) -> dict[str, Tensor]:
        """``wav [B, C, T]`` -> stream -> ``[B, K, F]``."""
        return self.model.encode_arrays(wav)

    def sample(self, arrays: dict[str, Tensor]) -> tuple[dict[str, bytes], dict[str, Any], int]:
        return *array_entries(arrays), int(arrays[self.first].shape[-1])


def _open(ref: str | nn.Module, trust: bool, device: str) -> ModelArrays:
    model = load_encoder(ref, trust, device) if isinstance(ref, (str, Path)) else ref.to(device).eval()
    return ModelArrays(model)


def encode_shards(model_ref: str | Path | nn.Module, shards: Any, out: str | Path, *, batch_size: int = 16,
                  workers: int = 0, devices: list[str] | None = None, device: str = "cpu", overwrite: bool = False,
                  trust: bool = False, progress: bool = True) -> ArrayManifest:
    """Encode every sample of ``shards`` (any spec ``resolve_shards`` takes) into array shards in ``out``.

    ``model_ref``: a reference ``load_encoder`` takes, or an already loaded model that writes arrays;
    ``devices`` (default ``[device]``): each takes every n-th pending shard.
    """
    from ostinato.interop.codecs import weights_hash

    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    open_output(shards, out)
    devices = devices or [device]
    ref = str(model_ref) if isinstance(model_ref, Path) else model_ref
    encoder = _open(ref, trust, devices[0])
    model = encoder.model
    info = ModelInfo(id=str(ref) if isinstance(ref, str) else type(model).__name__, hash=weights_hash(model),
                     kind=model.array_kind, sample_rate=encoder.sample_rate, channels=encoder.channels)
    written = write_shards(partial(_open, ref, trust), shards, out, identity={"model_hash": info.hash},
                           what="array shards", batch_size=batch_size, workers=workers, devices=devices,
                           overwrite=overwrite, progress=progress, loaded=encoder)
    manifest = ArrayManifest(shards=[ArrayShard(m["name"], m["samples"], m["frames"]) for m in written.markers],
                             streams=dict(model.array_streams()), model=info, source=written.source_record())
    with naming(Path(out) / "manifest.json"):
        manifest.save(out)
    return manifest
