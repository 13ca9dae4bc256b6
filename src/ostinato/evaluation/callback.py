"""``EvaluationCallback``: FAD of a MusicGen while it trains (``evaluate.suite`` / ``evaluate.every_steps``).

Every ``every_steps`` steps, each rank generates its share of a fixed set of ``num_samples`` clips from the suite's
first prompts (same prompts and seeds every time, so the curve shows the model, not the sampling), with the live
training weights and the codec attached to the module. The suite's FAD (and text-audio score when the suite has a
``text_audio`` metric) is gathered over the ranks and logged as ``eval/fad`` (``eval/text_audio``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

from ostinato.evaluation.items import EvalItem, rank_batches, read_items
from ostinato.evaluation.scoring import SuiteMetrics
from ostinato.evaluation.suite import MetricSpec, Suite, SuiteError, load_suite

log = logging.getLogger(__name__)

__all__ = ["EvaluationCallback"]


class EvaluationCallback(L.Callback):
    """Log ``eval/fad`` (and ``eval/text_audio``) every ``every_steps`` training steps.

    Args:
        suite: a ``text_to_music`` suite (a ``Suite``, a YAML path or a name in ``evaluation/``) with a ``fad``
            metric or a top-level ``embedding``.
        every_steps: evaluation period in optimizer steps (``trainer.global_step``); 0 disables it.
        num_samples: clips per evaluation (the suite's first prompts); at least the number of ranks.
        overrides: ``key=value`` overrides of the suite.
    """

    def __init__(self, suite: Suite | str, every_steps: int, num_samples: int = 8,
                 overrides: Sequence[str] | Mapping[str, Any] | None = None) -> None:
        self.suite = suite if isinstance(suite, Suite) else load_suite(suite, overrides)
        where = self.suite.path or self.suite.name
        if self.suite.kind != "text_to_music":
            raise SuiteError(f"{where}: kind: the training evaluation generates music; use a text_to_music suite")
        if num_samples < 1:
            raise ValueError(f"evaluate.num_samples={num_samples}: use at least 1")
        fad = self.suite.metric("fad")
        if fad is None and not self.suite.embedding:
            raise SuiteError(f"{where}: metrics: the training evaluation logs FAD; add fad (with an embedding)")
        self.specs = [fad or MetricSpec("fad", {"embedding": self.suite.embedding, "per": "frame"})]
        if self.suite.metric("text_audio") is not None:
            self.specs.append(self.suite.metric("text_audio"))  # type: ignore[arg-type]
        self.every_steps, self.num_samples = int(every_steps), int(num_samples)
        self._items: list[EvalItem] | None = None
        self._scores: SuiteMetrics | None = None
        self._last = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_steps <= 0 or step == self._last or step % self.every_steps:
            return
        self._last = step
        values = self.evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        for key, value in values.items():  # for the progress bar and dora's history
            trainer.callback_metrics[key] = torch.tensor(value)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate this rank's share, score all ranks' clips together; every rank returns the same values."""
        from ostinato.evaluation.runner import generate_items
        from ostinato.nn.decoding import GenerationParams
        from ostinato.models.musicgen import LongForm

        model = pl_module.model  # the MusicGen the family trains
        codec = model.codec
        suite = self.suite
        # every rank needs a batch: smaller batches here (a run's world size is fixed, so its clips still repeat)
        size = min(suite.batch_size, -(-self.num_samples // trainer.world_size))
        batches = rank_batches(self.num_samples, size, trainer.global_rank, trainer.world_size)
        if self._items is None:
            self._items = read_items(suite, codec.sample_rate, codec.channels, self.num_samples,
                                     keep={i for b in batches for i in b})
            self._scores = SuiteMetrics(suite, self.specs, codec.sample_rate, pl_module.device, progress=False)
        assert self._scores is not None and suite.seconds is not None
        self._scores.reset()
        window = suite.long_form.get("window", getattr(trainer.datamodule, "segment_seconds", None))
        long_form = LongForm(**{"mode": "window", **suite.long_form, "window": window})
        params = GenerationParams(**{"seed": 0, **suite.generation})
        melody = model.melody is not None and suite.melody_from_reference in (True, "auto")
        was_training = pl_module.training
        try:
            for batch in batches:
                group = [self._items[i] for i in batch]
                wav = generate_items(model, codec, group, suite.seconds, params, long_form, melody=melody)
                self._scores.update(wav, None, [it.prompt for it in group], [str(it.index) for it in group])
        finally:
            pl_module.train(was_training)
        scalars, _ = self._scores.compute()
        names = {"fad": "eval/fad", "text_audio": "eval/text_audio"}
        return {names[k]: v for k, v in scalars.items() if k in names and v is not None}
