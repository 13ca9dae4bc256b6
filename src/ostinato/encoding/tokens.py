"""``ostinato tokenize``: audio shards -> token shards with a codec or a fitted semantic tokenizer.

The "codec" is anything ``load_tokenizer`` resolves: a neural codec, or a ``SemanticTokenizer`` folder (k-means
tokens, ``n_q = 1``). Token shards are array shards of one ``codes`` stream whose manifest records the codec
(``data/tokens.py``). The loop (resume, workers, devices, skipped samples) is ``writer.write_shards``.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ostinato.data.array_shards import ModelInfo
from ostinato.data.sources import naming
from ostinato.data.tokens import CODES, CodecInfo, TokenManifest, TokenShard
from ostinato.encoding.arrays import array_entries
from ostinato.encoding.writer import open_output, write_shards
from ostinato.interop.codecs import load_codec, weights_hash
from ostinato.models.codec import Codec
from ostinato.models.semantic import SemanticTokenizer, is_semantic_tokenizer
from ostinato.store.records import codec_id

__all__ = ["CodecTokens", "load_tokenizer", "tokenize", "tokenizer_hash"]


def load_tokenizer(ref: str | Path, trust: bool = False) -> Codec | SemanticTokenizer:
    """A semantic tokenizer folder (``semantic_tokenizer.json``) or anything ``load_codec`` takes."""
    if is_semantic_tokenizer(ref):
        return SemanticTokenizer.load(ref)
    return load_codec(str(ref), trust=trust)


def tokenizer_hash(codec: Codec | SemanticTokenizer) -> str:
    return codec.hash if isinstance(codec, SemanticTokenizer) else weights_hash(codec)


class CodecTokens:
    """A codec (or semantic tokenizer) as a ``ShardEncoder``: one stream of int16 codes ``[n_q, F]`` per item,
    stored as ``<key>.codes.npy`` with ``frames`` (per stream) and ``frame_rate`` in its JSON."""

    def __init__(self, codec: nn.Module, n_q: int):
        self.codec, self.n_q = codec, n_q
        self.sample_rate, self.channels = int(codec.sample_rate), int(codec.channels)

    def encode(self, wav: Tensor) -> dict[str, Tensor]:
        """``wav [B, C, T]`` -> ``{"codes": [B, n_q, ceil(T / hop)]}``."""
        codes = self.codec.encode(wav, n_q=self.n_q)
        codes = codes.codes if hasattr(codes, "codes") else codes
        return {CODES: codes[..., :math.ceil(wav.shape[-1] / self.codec.hop_length)]}

    def sample(self, arrays: dict[str, Tensor]) -> tuple[dict[str, bytes], dict[str, Any], int]:
        entries, fields = array_entries({CODES: arrays[CODES]})
        return entries, {**fields, "frame_rate": self.codec.frame_rate}, int(arrays[CODES].shape[-1])


def _open(ref: str, n_q: int, trust: bool, device: str) -> CodecTokens:
    return CodecTokens(load_tokenizer(ref, trust=trust).to(device).eval(), n_q)


def tokenize(codec_ref: str, shards: Any, out: str | Path, *, n_q: int | None = None, batch_size: int = 16,
             workers: int = 1, devices: list[str] | None = None, overwrite: bool = False, trust: bool = False,
             progress: bool = True, part: tuple[int, int] = (0, 1)) -> TokenManifest | None:
    """Encode every sample of ``shards`` (any spec ``resolve_shards`` takes) into token shards in ``out``.

    ``codec_ref``: a semantic tokenizer folder (``ostinato prep semantic``) or anything ``load_codec`` takes.
    ``part``: ``(I, N)``, this process's share when N processes tokenize together (``write_shards``); the one that
    finishes last writes the manifest and returns it, the others return None.
    """
    if batch_size < 1 or workers < 0 or (n_q is not None and n_q < 1):
        raise ValueError(f"--batch-size {batch_size}, --workers {workers}, --n-q {n_q}: the batch size and n_q must "
                         "be at least 1, the workers at least 0")
    open_output(shards, out)
    codec = load_tokenizer(codec_ref, trust=trust)
    n_q = n_q or codec.n_q
    if not 1 <= n_q <= codec.n_q:
        raise ValueError(f"--n-q {n_q}: this codec has {codec.n_q} codebooks")
    info = CodecInfo(id=codec_id(codec_ref), hash=tokenizer_hash(codec), sample_rate=codec.sample_rate,
                     channels=codec.channels, frame_rate=codec.frame_rate, n_q=n_q,
                     card=codec.card)
    written = write_shards(partial(_open, str(codec_ref), n_q, trust), shards, out,
                           identity={"codec_hash": info.hash, "n_q": n_q}, what="token shards",
                           batch_size=batch_size, workers=workers, devices=devices, overwrite=overwrite,
                           progress=progress, part=part)
    if written is None:
        return None
    is_semantic = isinstance(codec, SemanticTokenizer)
    semantic = {"semantic": codec.id} if is_semantic else {}
    model = ModelInfo(info.id, info.hash, "semantic_tokenizer" if is_semantic else "codec", info.sample_rate,
                      info.channels)
    manifest = TokenManifest(shards=[TokenShard(m["name"], m["samples"], m["frames"]) for m in written.markers],
                             model=model, codec=info, source=written.source_record(**semantic))
    with naming(Path(out) / "manifest.json"):
        manifest.save(out)
    return manifest
