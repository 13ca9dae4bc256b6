"""``ostinato prep mulan``'s tokens: every clip of audio shards embedded once by a frozen MuLaN and quantized in
every namespace of a ``MuLaNQuantizer`` -> MuLaN token shards (``data/musiclm_tokens.py`` ``MuLaNTokens``: one
``[n_q, 1]`` stream per namespace), so the MusicLM stages never re-embed a clip per step. The loop (resume,
workers, skipped samples) is ``writer.write_shards``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ostinato.data.array_shards import ArrayShard, ModelInfo
from ostinato.data.musiclm_tokens import MULAN_KIND, MuLaNTokens, mulan_manifest
from ostinato.data.sources import naming
from ostinato.encoding.arrays import array_entries
from ostinato.encoding.writer import open_output, write_shards

log = logging.getLogger(__name__)

__all__ = ["MuLaNArrays", "write_mulan_tokens"]


class MuLaNArrays:
    """A MuLaN and its quantizer as a ``ShardEncoder``: per clip, its first ``segment_seconds`` (zero-padded, the
    valid length given to the tower) embedded once and quantized in every namespace (``<ns>.npy`` ``[n_q, 1]``)."""

    def __init__(self, mulan: Any, quantizer: Any, segment_seconds: float):
        self.mulan, self.quantizer = mulan, quantizer
        self.sample_rate, self.channels = int(mulan.sample_rate), 1
        self.frames = round(segment_seconds * self.sample_rate)
        self.n_q: dict[str, int] = {}  # rows per namespace, as encoded

    def encode(self, wav: Tensor) -> dict[str, Tensor]:
        """``wav [B, 1, T]`` -> namespace -> ``[B, n_q, 1]``."""
        clip = wav[..., :self.frames]
        lengths = torch.full((wav.shape[0],), clip.shape[-1], dtype=torch.long)
        emb = self.mulan.embed_audio(F.pad(clip, (0, self.frames - clip.shape[-1])), self.sample_rate, lengths)
        tokens = {ns: self.quantizer.tokens(emb, ns)[..., None] for ns in self.quantizer.namespaces}
        self.n_q = {ns: int(t.shape[1]) for ns, t in tokens.items()}
        return tokens

    def sample(self, arrays: dict[str, Tensor]) -> tuple[dict[str, bytes], dict[str, Any], int]:
        return *array_entries(arrays), 1


def _device(mulan: Any) -> str:
    params = list(mulan.parameters()) if isinstance(mulan, nn.Module) else []
    return str(params[0].device) if params else "cpu"


@torch.no_grad()
def write_mulan_tokens(shards: Any, out: str | Path, mulan_ref: Any, quantizer: Any, *,
                       segment_seconds: float = 10.0, batch_size: int = 16, source: str | None = None,
                       workers: int = 0, overwrite: bool = False, progress: bool = False) -> MuLaNTokens:
    """Embed every clip of audio ``shards`` once with MuLaN (the first ``segment_seconds``, windowed by the
    tower) and quantize it in every namespace of ``quantizer`` -> ``out/`` (MuLaN token shards).

    ``mulan_ref``: a ``MuLaN`` or an ``ostinato.load`` ref (``source``: the ref to record when it
    is an object); ``quantizer``: a ``MuLaNQuantizer`` or its safetensors path.
    """
    from ostinato.interop.codecs import weights_hash

    open_output(shards, out)
    mulan = mulan_ref
    if not hasattr(mulan, "embed_audio"):
        from ostinato.models.mulan import as_mulan

        mulan = as_mulan(mulan_ref)
    if isinstance(quantizer, (str, Path)):
        from ostinato.models.mulan import MuLaNQuantizer

        quantizer = MuLaNQuantizer.load(quantizer)
    source = source or (str(mulan_ref) if isinstance(mulan_ref, (str, Path)) else "")
    quantizer_file = str(getattr(quantizer, "path", "") or "")
    mulan_hash = weights_hash(mulan) if isinstance(mulan, nn.Module) else type(mulan).__name__
    encoder = MuLaNArrays(mulan, quantizer, segment_seconds)
    was_training = getattr(mulan, "training", False)
    if hasattr(mulan, "eval"):
        mulan.eval()
    try:
        written = write_shards(lambda device: encoder, shards, out, what="MuLaN token shards",
                               identity={"mulan_hash": mulan_hash, "quantizer": quantizer_file,
                                         "segment_seconds": segment_seconds},
                               batch_size=batch_size, workers=workers, devices=[_device(mulan)], overwrite=overwrite,
                               progress=progress, loaded=encoder)
    finally:
        if hasattr(mulan, "train"):
            mulan.train(was_training)
    namespaces = list(quantizer.namespaces)
    n_q = {ns: int(quantizer.n_q(ns)) for ns in namespaces} if hasattr(quantizer, "n_q") else encoder.n_q
    manifest = mulan_manifest({ns: int(quantizer.card(ns)) for ns in namespaces}, n_q,
                              ModelInfo(source, mulan_hash, MULAN_KIND, encoder.sample_rate, 1),
                              [ArrayShard(m["name"], m["samples"], m["frames"]) for m in written.markers],
                              written.source_record(quantizer=quantizer_file, segment_seconds=segment_seconds))
    tokens = MuLaNTokens.read(out, manifest)
    if len(set(tokens.keys)) != len(tokens.keys):
        raise ValueError(f"{shards}: sample keys repeat across shards; MuLaN tokens are joined by key")
    with naming(Path(out) / "manifest.json"):
        manifest.save(out)
    log.info("wrote MuLaN tokens of %d clips (%s) to %s", len(tokens.keys), namespaces, out)
    return tokens
