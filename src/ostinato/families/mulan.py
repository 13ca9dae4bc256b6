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

After training: ``ostinato.models.mulan.fit_mulan_quantizer`` fits MusicLM's per-stage residual VQs on the training
set's embeddings.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ostinato.data.batch import AudioBatch
from ostinato.families.base import FamilyModule, plain
from ostinato.nn.conditioners import description
from ostinato.nn.contrastive import ContrastiveLoss, RetrievalMetrics, retrieval_metrics
from ostinato.models.mulan import MuLaN, checked_kwargs

__all__ = ["MuLaNFamily"]


class MuLaNFamily(FamilyModule):
    """Trains ``self.model``, a ``MuLaN``, on ``AudioBatch``es.

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

    ema_modules = ("model",)  # both towers; never the temperature, and a frozen text encoder is not a parameter

    def __init__(self, sample_rate: int = 16000, channels: int = 1, dim: int = 128,
                 audio: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None,
                 loss: Mapping[str, Any] | None = None, attribute_dropout: float = 0.1,
                 optim: Mapping[str, Any] | None = None):
        super().__init__(optim)
        if channels not in (1, 2):
            raise ValueError(f"family.channels={channels}: use 1 or 2 (the audio tower mixes to mono)")
        self._sample_rate, self.channels = int(sample_rate), int(channels)
        self.model = MuLaN(sample_rate, dim, plain(audio), plain(text))
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
        if segment is not None and float(segment) > self.model.window_seconds + 1e-9:
            raise ValueError(f"data.segment_seconds={segment} is longer than the audio tower's window "
                             f"(family.audio.window_seconds={self.model.window_seconds}): shorten the crops or "
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
        audio = self.model.embed_audio(batch.audio, self._data_rate, batch.lengths)
        return audio, self.model.embed_text(self.descriptions(batch, train))

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
