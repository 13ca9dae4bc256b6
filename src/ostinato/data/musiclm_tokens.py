"""Aligned token streams of the same clips for the MusicLM stages: semantic tokens, codec tokens, MuLaN tokens.

A split is a mapping of streams to folders::

  train: {semantic: .../semantic/train, codec: .../tokens/train, mulan: .../mulan/train}

``semantic`` and ``codec`` are token shard folders (``ostinato tokenize`` / ``--semantic``) of the same audio
shards: same shard names, same sample keys; both are array shards of one ``codes`` stream, resolved and decoded by
the array reader (``data/arrays.py``). ``mulan`` is a folder written once by ``ostinato prep mulan``
(``ostinato.encoding.mulan``): the MuLaN audio embedding of every clip quantized per namespace, as array shards
(one ``[n_q, 1]`` stream per namespace, ``MuLaNTokens``), so nothing is re-embedded per step.

Streams are joined by sample key (a shard's samples missing from another stream are skipped). Crops are
time-aligned: the start time is drawn on the grid of the slowest stream and every stream is cut from
``round(start * rate)`` for ``round(segment_seconds * rate)`` frames. The crop length is the stage's (MusicLM: 30 s
semantic, 10 s coarse, 3 s fine), set per experiment with ``data.segment_seconds``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import json

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from ostinato.data.array_shards import (CODES, ArrayManifest, ArrayShard, ModelInfo, aligned_crop, decode_array,
                                        encode_array, stream_data)
from ostinato.data.datamodule import ShardDataModule
from ostinato.data.manifest import StreamInfo, card_named
from ostinato.data.sources import iter_raw_samples
from ostinato.data.streams import CorruptSample, EvalSet, TrainStream
from ostinato.data.tokens import CodecInfo, resolve_token_shards
from ostinato.fileio import atomic_path, read_json

log = logging.getLogger(__name__)

__all__ = ["MusicLMBatch", "MusicLMTokenDataModule", "MuLaNTokens", "aligned_crop", "mulan_manifest"]

TOKEN_STREAMS = ("semantic", "codec")
MULAN_FORMAT = "ostinato.mulan-tokens/1"  # MuLaN tokens written before they were array shards (read only)
MULAN_KIND = "mulan"


# -- MuLaN tokens ---------------------------------------------------------------------------------------------
@dataclass
class MuLaNTokens:
    """Per-clip MuLaN tokens: ``tokens[namespace]`` is ``[N, n_q]`` int64, row i belongs to ``keys[i]``.

    On disk they are array shards (``data/array_shards.py``, model kind ``mulan``): one stream per namespace,
    ``<key>.<namespace>.npy`` int16 ``[n_q, 1]`` (one frame per clip), the MuLaN ref as the model's id and the
    quantizer file in the manifest's ``source``. Folders of the earlier ``mulan_tokens.npz`` format still load.
    """

    keys: list[str]
    tokens: dict[str, Tensor]
    card: dict[str, int]  # codebook size per namespace
    source: str = ""     # the MuLaN they come from
    quantizer: str = ""  # the quantizer file (what generation uses to tokenize MuLaN text embeddings)

    def lookup(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def save(self, folder: str | Path) -> Path:
        """Write the tokens as one array shard and its manifest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = "shard-000000.tar"
        with atomic_path(folder / name) as tmp, wds.TarWriter(str(tmp)) as writer:
            for i, key in enumerate(self.keys):
                writer.write({"__key__": key, "json": b"{}",
                              **{f"{ns}.npy": encode_array(t[i][:, None]) for ns, t in self.tokens.items()}})
        model = ModelInfo(self.source, "", MULAN_KIND, 0, 1)
        mulan_manifest(self.card, {ns: int(t.shape[1]) for ns, t in self.tokens.items()}, model,
                       [ArrayShard(name, len(self.keys), len(self.keys))], {"quantizer": self.quantizer}).save(folder)
        return folder

    @classmethod
    def read(cls, folder: str | Path, manifest: ArrayManifest) -> MuLaNTokens:
        """The tokens of the array shards ``manifest`` lists in ``folder``."""
        if manifest.model.kind != MULAN_KIND:
            raise ValueError(f"{folder} holds {manifest.model.kind} arrays, not MuLaN tokens; write them with "
                             "`ostinato prep mulan`")
        keys: list[str] = []
        rows: dict[str, list[Tensor]] = {ns: [] for ns in manifest.streams}
        for shard in manifest.shards:
            for raw in iter_raw_samples(str(Path(folder) / shard.name)):
                keys.append(raw["__key__"])
                for ns in rows:
                    rows[ns].append(decode_array(stream_data(raw, ns))[:, 0])
        tokens = {ns: torch.stack(r) if r else torch.zeros(0, manifest.streams[ns].channels, dtype=torch.long)
                  for ns, r in rows.items()}
        return cls(keys, tokens, {ns: s.card for ns, s in manifest.streams.items()}, manifest.model.id,
                   str(manifest.source.get("quantizer", "")))

    @classmethod
    def load(cls, folder: str | Path) -> MuLaNTokens:
        folder = Path(folder)
        if not (folder / "manifest.json").is_file():
            raise FileNotFoundError(f"no MuLaN tokens in {folder}; write them with `ostinato prep mulan` "
                                    "(data.<split>.mulan must be its output folder)")
        meta = read_json(folder / "manifest.json")
        if meta.get("format") != MULAN_FORMAT:
            return cls.read(folder, ArrayManifest.from_dict(meta, origin=str(folder / "manifest.json")))
        with np.load(folder / "mulan_tokens.npz", allow_pickle=False) as z:  # the format before array shards
            keys = [str(k) for k in z["keys"]]
            tokens = {ns: torch.from_numpy(z[f"tokens_{ns}"].astype(np.int64)) for ns in meta["namespaces"]}
        card = {ns: int(card_named(o)["card"]) for ns, o in meta["namespaces"].items()}
        return cls(keys, tokens, card, meta.get("source", ""), meta.get("quantizer", ""))


def mulan_manifest(card: Mapping[str, int], n_q: Mapping[str, int], model: ModelInfo, shards: list[ArrayShard],
                   source: dict[str, Any]) -> ArrayManifest:
    """The manifest of MuLaN token shards: one stream of ``n_q[ns]`` rows, one frame per clip, per namespace."""
    streams = {ns: StreamInfo(0.0, int(n_q[ns]), "int16", int(card[ns])) for ns in card}
    return ArrayManifest(shards=shards, streams=streams, model=model, source=source)


# -- batches --------------------------------------------------------------------------------------------------
@dataclass
class MusicLMBatch:
    """Time-aligned crops of the same clips (streams not loaded are None).

    semantic:         [B, 1, Fs] int64, 0 past ``semantic_lengths [B]``
    codes:            [B, K, Fc] int64, 0 past ``code_lengths [B]``
    mulan:            namespace -> [B, n_q] int64
    meta:             B dicts (the sample JSON, ``__key__``, ``offset_seconds``)
    """

    semantic: Tensor | None
    semantic_lengths: Tensor | None
    codes: Tensor | None
    code_lengths: Tensor | None
    mulan: dict[str, Tensor] = field(default_factory=dict)
    meta: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.meta)


def collate_musiclm(items: list[tuple[dict[str, Tensor], int, dict[str, Any]]], skipped: int = 0) -> MusicLMBatch:
    def stack(name: str) -> tuple[Tensor | None, Tensor | None]:
        if name not in items[0][0]:
            return None, None
        return (torch.stack([x[name] for x, _, _ in items]),
                torch.tensor([m.get("lengths", {}).get(name, 0) for _, _, m in items], dtype=torch.long))

    semantic, sl = stack("semantic")
    codes, cl = stack("codec")
    names = [k[len("mulan_"):] for k in items[0][0] if k.startswith("mulan_")]
    mulan = {ns: torch.stack([x[f"mulan_{ns}"] for x, _, _ in items]) for ns in names}
    return MusicLMBatch(semantic, sl, codes, cl, mulan, [m for _, _, m in items], skipped)


def decode_aligned(sample: dict, *, seconds: float, rates: Mapping[str, float], mulan: Mapping[str, Tensor] | None,
                   primary: str, rng: np.random.Generator | None = None
                   ) -> tuple[dict[str, Tensor], int, dict[str, Any]]:
    """A joined sample (``<stream>.npy`` per token stream: ``semantic``, ``codec`` + ``json``) -> ``(crops, valid
    frames of primary, meta)``.

    ``mulan`` (namespace -> ``[N, n_q]``) is indexed by the sample's ``__mulan_row__``.
    """
    key = sample.get("__key__", "?")
    try:
        streams = {name: decode_array(stream_data(sample, name)) for name in rates}
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except Exception as e:
        raise CorruptSample(f"token sample {key}: {type(e).__name__}: {e}") from e
    if any(x.ndim != 2 or x.shape[-1] == 0 for x in streams.values()):
        raise CorruptSample(f"token sample {key}: empty or malformed token stream")
    crops, valid, start = aligned_crop(streams, rates, seconds, rng)
    if mulan:
        row = sample["__mulan_row__"]
        crops.update({f"mulan_{ns}": t[row] for ns, t in mulan.items()})
    return crops, valid[primary], {**meta, "__key__": key, "offset_seconds": start, "lengths": valid}


def _read_whole(url: str) -> dict[str, dict]:
    """The samples of a shard by key; damage raises CorruptSample naming the shard (the group is named by another)."""
    try:
        return {s["__key__"]: s for s in iter_raw_samples(url)}
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or unreadable tar
        raise CorruptSample(f"{url}: {type(e).__name__}: {e}") from e


def joined_size(group: Mapping[str, str], mulan_rows: Mapping[str, int] | None, listed: int = 0) -> int:
    """How many joined samples ``group`` gives whole: those read, or for a damaged group what its first stream's
    manifest ``listed`` less the keys the join left out (the evaluation counts the rest as lost)."""
    left_out: list[str] = []
    read = 0
    try:
        for _ in iter_joined(group, mulan_rows, left_out):
            read += 1
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - counted as lost when read, never a crash here
        log.warning("shard group %s is damaged (%s: %s); its lost samples are counted when evaluated",
                    next(iter(group.values())), type(e).__name__, e)
        return max(read, listed - len(left_out))
    return read


def iter_joined(paths: Mapping[str, str], mulan_rows: Mapping[str, int] | None,
                left_out: list[str] | None = None) -> Iterator[dict]:
    """The samples of the token shards ``paths`` (stream -> the same-named shard of each stream) joined by key.

    The first stream is read in order; the others are read whole first (token shards are small). The keys of the
    first stream that another stream lacks are appended to ``left_out``."""
    names = list(paths)
    others = {n: _read_whole(paths[n]) for n in names[1:]}
    for raw in iter_raw_samples(paths[names[0]]):
        key = raw["__key__"]
        try:  # every token sample has both entries: one missing is a tar cut inside the sample
            first, _ = stream_data(raw, CODES), raw["json"]
        except KeyError as e:
            raise CorruptSample(f"{paths[names[0]]}: sample {key} lacks its {e} entry (a cut tar)") from None
        if any(key not in o for o in others.values()) or (mulan_rows is not None and key not in mulan_rows):
            if left_out is not None:
                left_out.append(key)
            continue
        out = {"__key__": key, f"{names[0]}.npy": first, "json": raw["json"]}
        out.update({f"{n}.npy": stream_data(others[n][key], CODES) for n in names[1:]})
        if mulan_rows is not None:
            out["__mulan_row__"] = mulan_rows[key]
        yield out


def _by_first(groups: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Groups of same-named shards keyed by their first stream's shard (the url that names a group)."""
    return {next(iter(g.values())): g for g in groups}


class _JoinedTrainStream(TrainStream):
    """``TrainStream`` over groups of same-named shards of every stream, each named by its first stream's shard.

    ``expected`` (samples per shard of the first stream, from its manifest) counts what a damaged group lost: a
    truncated first-stream shard loses the samples after the damage, a damaged shard of another stream the whole
    group. Keys the join leaves out by design (another stream lacks them) are taken off, so they are not lost.
    """

    def __init__(self, groups: list[dict[str, str]], mulan_rows: dict[str, int] | None,
                 expected: Mapping[str, int] | None = None, **kw: Any):
        self.groups = _by_first(groups)
        super().__init__(list(self.groups), expected=expected, **kw)
        self.mulan_rows, self._listed = mulan_rows, dict(self.expected)

    def _read(self, url: str) -> Iterator[dict]:
        left_out: list[str] = []
        try:
            yield from iter_joined(self.groups[url], self.mulan_rows, left_out)
        finally:  # before TrainStream compares what was read with what the group should give
            if url in self._listed:
                self.expected[url] = self._listed[url] - len(left_out)


class _JoinedEvalSet(EvalSet):
    """``EvalSet`` over joined samples (the first ``num_samples`` in shard order, dealt over the ranks)."""

    def __init__(self, groups: list[dict[str, str]], mulan_rows: dict[str, int] | None, **kw: Any):
        self.groups = _by_first(groups)
        super().__init__(list(self.groups), **kw)
        self.mulan_rows = mulan_rows

    def _read(self, url: str) -> Iterator[dict]:
        return iter_joined(self.groups[url], self.mulan_rows)


@dataclass
class _Split:
    groups: list[dict[str, str]]
    rates: dict[str, float]
    codecs: dict[str, CodecInfo]
    mulan: MuLaNTokens | None
    rows: dict[str, int] | None
    num_samples: int
    counts: dict[str, int] = field(default_factory=dict)  # samples per shard of the first stream (manifest)


class MusicLMTokenDataModule(ShardDataModule):
    """Joined semantic / codec / MuLaN token streams -> ``MusicLMBatch`` of time-aligned crops.

    Args:
        train, valid, test: ``{semantic: DIR, codec: DIR, mulan: DIR}`` (any subset; a stage reads what it needs).
        streams: which of ``semantic``, ``codec``, ``mulan`` to load (default: all the splits give).
        segment_seconds: the crop length in seconds (the stage's: 30 / 10 / 3 s in MusicLM).
        The rest (``**loading``) is ``ShardDataModule``'s.
    """

    def __init__(self, train: Mapping[str, Any] | None = None, valid: Mapping[str, Any] | None = None,
                 test: Mapping[str, Any] | None = None, *, streams: Sequence[str] | None = None, **loading: Any):
        super().__init__(train, valid, test, **loading)
        for split, spec in (("train", train), ("valid", valid), ("test", test)):
            if spec is not None and (not isinstance(spec, Mapping) or not set(spec) <= {*TOKEN_STREAMS, "mulan"}):
                raise ValueError(f"data.{split} must map semantic / codec / mulan to folders, got {spec!r}")
        self.streams = None if streams is None else [str(s) for s in streams]
        if self.streams is not None and not set(self.streams) <= {*TOKEN_STREAMS, "mulan"}:
            raise ValueError(f"data.streams must be a subset of [semantic, codec, mulan], got {self.streams}")

    def _wanted(self, spec: Mapping[str, Any]) -> list[str]:
        names = [n for n in (*TOKEN_STREAMS, "mulan") if spec.get(n) is not None]
        if self.streams is not None:
            missing = [n for n in self.streams if n not in names]
            if missing:
                raise ValueError(f"data.streams asks for {missing} but the split gives only {names}")
            names = [n for n in names if n in self.streams]
        return names

    def source(self, split: str) -> _Split:
        if split in self._sources:
            return self._sources[split]
        spec = self.specs[split]
        if spec is None:
            raise ValueError(f"no token streams configured for the {split} split (data.{split})")
        names = self._wanted(spec)
        token_names = [n for n in TOKEN_STREAMS if n in names]
        if not token_names:
            raise ValueError(f"data.{split} needs a semantic or codec token folder")
        srcs = {n: resolve_token_shards(spec[n]) for n in token_names}
        by_name = {n: {Path(u).name: u for u in s.urls} for n, s in srcs.items()}
        first = token_names[0]
        groups = [{n: by_name[n][Path(u).name] for n in token_names} for u in srcs[first].urls
                  if all(Path(u).name in by_name[n] for n in token_names)]
        if not groups:
            raise ValueError(f"data.{split}: the {token_names} token shards share no shard names; they must be "
                             "tokenized from the same audio shards")
        mulan = MuLaNTokens.load(spec["mulan"]) if "mulan" in names else None
        rows = mulan.lookup() if mulan is not None else None
        counts = srcs[first].counts
        n = srcs[first].num_samples if split == "train" else sum(
            joined_size(g, rows, counts.get(g[first], 0)) for g in groups)
        for other in self._sources.values():
            for name in token_names:
                if name in other.codecs and (other.codecs[name].frame_rate, other.codecs[name].n_q) != (
                        srcs[name].codec.frame_rate, srcs[name].codec.n_q):
                    raise ValueError(f"data.{split}.{name} tokens differ from the other splits' ({srcs[name].codec})")
        self._sources[split] = _Split(groups, {k: float(s.codec.frame_rate) for k, s in srcs.items()},
                                      {k: s.codec for k, s in srcs.items()}, mulan, rows, n, counts)
        return self._sources[split]

    @property
    def codec(self) -> CodecInfo | None:
        """The codec token stream's ``CodecInfo`` (None without codec tokens)."""
        return self._first().codecs.get("codec")

    @property
    def semantic(self) -> CodecInfo | None:
        """The semantic token stream's info (frame_rate, card; None without semantic tokens)."""
        return self._first().codecs.get("semantic")

    @property
    def mulan_tokens(self) -> MuLaNTokens | None:
        return self._first().mulan

    def _decode(self, src: _Split, seconds: float) -> partial:
        return partial(decode_aligned, seconds=seconds, rates=src.rates,
                       mulan=None if src.mulan is None else src.mulan.tokens, primary=next(iter(src.rates)))

    def train_dataset(self) -> TrainStream:
        src = self.source("train")
        return _JoinedTrainStream(src.groups, src.rows, sample_rate=next(iter(src.rates.values())), channels=1,
                                  decode=self._decode(src, self.segment_seconds), collate=collate_musiclm,
                                  expected=src.counts, **self.train_stream_kw())

    def eval_dataset(self, split: str) -> EvalSet:
        src = self.source(split)
        return _JoinedEvalSet(src.groups, src.rows, num_samples=src.num_samples,
                              sample_rate=next(iter(src.rates.values())), channels=1,
                              decode=self._decode(src, self.eval_segment_seconds), collate=collate_musiclm,
                              blank=partial(_blank, src, self.eval_segment_seconds), **self.eval_set_kw())


def _blank(src: _Split, seconds: float) -> dict[str, Tensor]:
    """What replaces a corrupt evaluation sample (at length 0): zeros of every stream."""
    out = {n: torch.zeros(src.codecs[n].n_q, round(seconds * r), dtype=torch.long) for n, r in src.rates.items()}
    if src.mulan is not None:
        out.update({f"mulan_{ns}": torch.zeros_like(t[0]) for ns, t in src.mulan.tokens.items()})
    return out
