"""The MuLaN family: audio-text contrastive training of ``ostinato.models.mulan.MuLaN`` on audio shards.

Training step: random crops ``[B, C, T]`` of ``data.segment_seconds`` (at most the tower's window) and their texts,
``description(meta)`` (caption + structured fields) with each field dropped with ``attribute_dropout`` -> audio and
text embeddings -> ``ContrastiveLoss`` (softmax or sigmoid, negatives gathered over the DDP ranks, fp32 logits).

Validation / test: clips from their start (``data.eval_segment_seconds``; longer than the window they are windowed
and averaged) and their full descriptions; at the epoch end the embeddings of every rank are gathered and ranked
both ways: ``{split}/t2a_r1``, ``t2a_r10``, ``t2a_median_rank``, the same for ``a2t``, the chance levels
``chance_r1 = 1 / N``, ``chance_r10 = 10 / N``, ``chance_median_rank = (N + 1) / 2``, ``n`` and ``loss`` (the
contrastive loss of the whole set). Clips sharing a description (clips of one piece) are distinct targets, so a
perfect score is out of reach when descriptions repeat.

After training: ``fit_mulan_quantizer`` fits MusicLM's per-stage residual VQs on the training set's embeddings.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ostinato.data.batch import AudioBatch
from ostinato.families.base import FamilyModule, plain
from ostinato.nn.conditioners import description
from ostinato.nn.contrastive import ContrastiveLoss, RetrievalMetrics, retrieval_metrics
from ostinato.models.mulan import MuLaN, MuLaNQuantizer, checked_kwargs

__all__ = ["MuLaNFamily", "as_mulan", "mulan_embeddings", "fit_mulan_quantizer"]
log = logging.getLogger(__name__)


class MuLaNFamily(FamilyModule):
    """Trains a ``MuLaN`` on ``AudioBatch``es.

    Args:
        sample_rate: the audio tower's rate (``data.sample_rate`` follows it in ``conf/data/demo.yaml``).
        channels: channels the data module delivers (the tower averages them to mono).
        dim: the joint embedding width.
        audio: ``AudioTower`` kwargs: n_mels, n_fft, hop_length, patch_freq, patch_time, dim, depth, heads, ffn_dim,
            dropout, window_seconds (>= data.segment_seconds), spec_augment.
        text: ``TextTower`` kwargs: model (null = packaged MiniLM, a folder, or ``scratch``), train, max_length,
            and for scratch: tokenizer, dim, depth, heads, ffn_dim, dropout.
        loss: ``ContrastiveLoss`` kwargs: kind (softmax | sigmoid), init_temperature, min_temperature,
            max_temperature, learn_temperature, init_bias.
        attribute_dropout: probability, per training item and structured field, of leaving the field out.
    """

    ema_modules = ("mulan",)  # both towers; never the temperature, and a frozen text encoder is not a parameter

    def __init__(self, sample_rate: int = 16000, channels: int = 1, dim: int = 128,
                 audio: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None,
                 loss: Mapping[str, Any] | None = None, attribute_dropout: float = 0.1,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        if channels not in (1, 2):
            raise ValueError(f"family.channels={channels}: use 1 or 2 (the audio tower mixes to mono)")
        self._sample_rate, self.channels = int(sample_rate), int(channels)
        self.mulan = MuLaN(sample_rate, dim, plain(audio), plain(text))
        self.criterion = ContrastiveLoss(**checked_kwargs(ContrastiveLoss, plain(loss), "family.loss"))
        self.attribute_dropout = float(attribute_dropout)
        self.val_retrieval = RetrievalMetrics()
        self.test_retrieval = RetrievalMetrics()
        self._data_rate = self._sample_rate

    # -- engine hooks ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        self._data_rate = int(getattr(dm, "sample_rate", self._sample_rate))
        segment = getattr(dm, "segment_seconds", None)
        if segment is not None and float(segment) > self.mulan.window_seconds + 1e-9:
            raise ValueError(f"data.segment_seconds={segment} is longer than the audio tower's window "
                             f"(family.audio.window_seconds={self.mulan.window_seconds}): shorten the crops or "
                             "widen the window")

    def block_classes(self) -> set[type[nn.Module]]:
        return {nn.TransformerEncoderLayer}

    # -- data -----------------------------------------------------------------------------------------------
    def descriptions(self, batch: AudioBatch, train: bool) -> list[str]:
        if not train or self.attribute_dropout <= 0:
            return [description(m) for m in batch.meta]
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
        return [description(m, rng, self.attribute_dropout) for m in batch.meta]

    def embed(self, batch: AudioBatch, train: bool) -> tuple[Tensor, Tensor]:
        """(audio [B, D], text [B, D]) normalised embeddings of a batch."""
        audio = self.mulan.embed_audio(batch.audio, self._data_rate, batch.lengths)
        return audio, self.mulan.embed_text(self.descriptions(batch, train))

    # -- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: AudioBatch, batch_idx: int) -> Tensor:
        audio, text = self.embed(batch, train=True)
        loss = self.criterion(audio, text)
        n = len(batch)
        with torch.no_grad():
            cos = audio.float() @ text.float().t()
            pos = cos.diagonal().mean()
            neg = (cos.sum() - cos.diagonal().sum()) / max(1, n * n - n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/temperature", self.criterion.temperature, batch_size=n)
        if self.criterion.bias is not None:
            self.log("train/bias", self.criterion.bias.detach(), batch_size=n)
        self.log("train/pos_cos", pos, batch_size=n)
        self.log("train/neg_cos", neg, batch_size=n)
        return loss

    # -- evaluation -----------------------------------------------------------------------------------------
    def _eval_step(self, batch: AudioBatch, metric: RetrievalMetrics) -> None:
        valid = batch.lengths > 0  # corrupt samples come as length 0
        keep = valid.nonzero().flatten().tolist()
        sub = AudioBatch(batch.audio[valid], batch.lengths[valid], [batch.captions[i] for i in keep],
                         [batch.meta[i] for i in keep])
        audio, text = self.embed(sub, train=False)
        metric.update(audio, text)  # also when empty: every rank must hold a state to gather

    def _eval_epoch_end(self, metric: RetrievalMetrics, split: str) -> None:
        audio, text = metric.embeddings()
        metric.reset()
        if len(audio) == 0:
            return
        values = retrieval_metrics(audio, text)
        values["loss"] = self.criterion(audio, text, gather=False).detach()
        for name, value in values.items():
            # equal on every rank already; sync_dist only keeps Lightning from warning under DDP
            self.log(f"{split}/{name}", value.float(), prog_bar=name == "t2a_r10", sync_dist=True)

    def validation_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_retrieval)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_retrieval, "valid")

    def test_step(self, batch: AudioBatch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_retrieval)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_retrieval, "test")


# ---------------------------------------------------------------------------------------------- after training


def as_mulan(model: MuLaN | MuLaNFamily | str | Path, map_location: str | torch.device = "cpu") -> MuLaN:
    """A ``MuLaN`` from itself, a ``MuLaNFamily``, or any ``ostinato.load`` ref (export, XP folder or signature,
    ``//sig/SIG``, ``.ckpt``), in eval mode."""
    if isinstance(model, MuLaNFamily):
        return model.mulan.eval()
    if isinstance(model, MuLaN):
        return model.eval()
    from ostinato.models import load
    from ostinato.store.records import resolve_ref, xps_dir

    module = load(resolve_ref(str(model)), map_location=map_location, xps_dir=xps_dir())
    if not isinstance(module, MuLaNFamily):
        raise ValueError(f"{model} holds a {type(module).__name__}, not a MuLaN (train one with "
                         "`ostinato train experiment=mulan_tiny`)")
    return module.mulan.eval()


@torch.no_grad()
def mulan_embeddings(mulan: MuLaN, data: Any, segment_seconds: float = 10.0, batch_size: int = 16,
                     max_items: int | None = None, with_text: bool = False) -> Tensor:
    """Audio embeddings ``[N, D]`` of a shard set (clips from their start, ``segment_seconds`` long, windowed by
    the tower), in shard order; with ``with_text`` also the embeddings of their descriptions, ``[2N, D]``.

    ``data``: an ``AudioDataModule`` (its ``train`` shards) or any shard spec ``resolve_shards`` takes.
    """
    from ostinato.data.datamodule import AudioDataModule
    from ostinato.data.sources import resolve_shards
    from ostinato.data.streams import EvalSet, count_samples

    spec = data.specs["train"] if isinstance(data, AudioDataModule) else data
    if spec is None:
        raise ValueError("the datamodule has no train shards (data.train): the quantizer is fitted on them")
    src = resolve_shards(spec)
    n = src.num_samples if src.num_samples is not None else count_samples(src.urls)
    if max_items is not None:
        n = min(n, int(max_items))
    clips = EvalSet(src.urls, num_samples=n, sample_rate=mulan.sample_rate, channels=1,
                    segment_seconds=segment_seconds, batch_size=batch_size)
    audio, text = [], []
    was_training = mulan.training
    mulan.eval()
    for batch in clips:
        valid = batch.lengths > 0
        audio.append(mulan.embed_audio(batch.audio[valid], mulan.sample_rate, batch.lengths[valid]).cpu())
        if with_text:
            text.append(mulan.embed_text([description(m) for m, v in zip(batch.meta, valid.tolist()) if v]).cpu())
    mulan.train(was_training)
    if not audio:
        raise ValueError(f"no clips in {spec}")
    return torch.cat(audio + text)


def fit_mulan_quantizer(mulan: MuLaN | MuLaNFamily | str | Path, data: Any, n_q: int = 12, bins: int = 1024,
                        namespaces: Sequence[str] | Mapping[str, Mapping[str, int]] = ("semantic", "coarse"), *,
                        segment_seconds: float = 10.0, with_text: bool = False, max_items: int | None = None,
                        iters: int = 10, seed: int = 0, batch_size: int = 16, out: str | Path | None = None,
                        **quantizer_kw: Any) -> MuLaNQuantizer:
    """Fit one residual VQ per namespace on a trained MuLaN's training-set audio embeddings; frozen, in eval mode.

    ``data``: an ``AudioDataModule`` or a shard spec (see ``mulan_embeddings``); ``with_text`` adds the text
    embeddings of the same clips (the quantizer then sees both modalities, as MusicLM's inference does).
    ``out``: also save it there (safetensors; ``MuLaNQuantizer.load`` reads it back).
    """
    source = str(mulan) if isinstance(mulan, (str, Path)) else None
    model = as_mulan(mulan)
    emb = mulan_embeddings(model, data, segment_seconds, batch_size, max_items, with_text)
    log.info("fitting the MuLaN quantizer (%s, %d x %d) on %d embeddings", list(namespaces), n_q, bins, len(emb))
    quantizer = MuLaNQuantizer(model.dim, n_q, bins, namespaces, **quantizer_kw).fit_(emb, iters=iters, seed=seed)
    if out is not None:
        quantizer.save(out, source=source)
    return quantizer
