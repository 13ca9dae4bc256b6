"""``FamilyModule``: what every model family's LightningModule shares with the engine."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf


def plain(cfg: Any) -> Any:
    """OmegaConf node -> plain Python containers (checkpoints and hparams stay weights-only loadable)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class FamilyModule(L.LightningModule):
    """Base of every family's LightningModule.

    Subclasses build their networks in ``__init__``, implement ``training_step``/``validation_step``, and may set:
      ``ema_modules``: submodule names the EMA averages (never discriminators or frozen encoders)
      ``block_classes()``: the repeated blocks, for FSDP wrapping and activation checkpointing
      ``sample_audio(batch)``: waveforms to log as samples, e.g. {"original": x, "reconstruction": y}
    The optimizer and schedule come from the ``optim`` config group.
    """

    ema_modules: tuple[str, ...] = ("model",)
    manual_gradient_clip: float = 0.0  # set from trainer.gradient_clip_val for manual-optimization families

    def __init__(self, optim: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.optim_cfg: dict[str, Any] = plain(optim) or {"name": "adamw", "lr": 3e-4}

    def configure_optimizers(self) -> Any:
        from ostinato.families.optim import build_optimizer, build_scheduler

        optimizer = build_optimizer(self, self.optim_cfg)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 10**9
        scheduler = build_scheduler(optimizer, self.optim_cfg.get("schedule") or {}, total)
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from ostinato.store.records import CONFIG_KEY

        if CONFIG_KEY in self.__dict__:
            checkpoint[CONFIG_KEY] = self.__dict__[CONFIG_KEY]

    def block_classes(self) -> set[type[torch.nn.Module]]:
        return set()

    def sample_audio(self, batch: Any) -> dict[str, torch.Tensor]:
        return {}

    @property
    def sample_rate(self) -> int | None:
        """The audio rate: the family's own, else its model's."""
        return getattr(self, "_sample_rate", None) or getattr(getattr(self, "model", None), "sample_rate", None)
