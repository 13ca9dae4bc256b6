"""What training takes from evaluation: the ``evaluate`` node's config check and callback.

The engine does not import evaluation (it sits below it); ``ostinato.train`` passes these in:
``validate(cfg, checks=[check_evaluate])`` and ``build_trainer(..., extra_callbacks=evaluation_callbacks(cfg))``.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ostinato.engine.config import ConfigError

__all__ = ["check_evaluate", "evaluation_callbacks"]


def check_evaluate(cfg: DictConfig) -> None:
    """``evaluate.suite``: a ``text_to_music`` suite that loads, with a period in steps; raises ConfigError."""
    ev = cfg.evaluate
    if ev.suite is None:
        return
    if ev.every_steps <= 0:
        raise ConfigError(f"evaluate.every_steps={ev.every_steps}: set a period in steps (> 0) with evaluate.suite")
    from ostinato.evaluation.suite import load_suite

    try:
        suite = load_suite(ev.suite)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"evaluate.suite: {e}") from None
    if suite.kind != "text_to_music":
        raise ConfigError(f"evaluate.suite={ev.suite}: a {suite.kind} suite; the training evaluation generates "
                          "music, use a text_to_music suite")


def evaluation_callbacks(cfg: DictConfig) -> list[Any]:
    """The ``evaluate`` node's callback (FAD while a MusicGen trains), or none."""
    if not (cfg.evaluate.suite and cfg.evaluate.every_steps > 0):
        return []
    from ostinato.evaluation.callback import EvaluationCallback

    return [EvaluationCallback(cfg.evaluate.suite, cfg.evaluate.every_steps, cfg.evaluate.num_samples)]
