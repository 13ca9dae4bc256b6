"""The training entry point: ``ostinato train [overrides]`` == ``dora -P ostinato run [overrides]``.

config -> checks -> datamodule + family module + Trainer -> fit, resuming the XP's ``last.ckpt`` when present.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import lightning as L
from dora import XP, get_xp
from dora.distrib import get_distrib_spec
from dora.hydra import HydraMain
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ostinato.data.dims import read_manifests, register_resolvers
from ostinato.engine import console
from ostinato.engine.callbacks import grouped
from ostinato.engine.config import ConfigError, check_global_batch, check_overrides, composition_error, validate
from ostinato.families.base import plain
from ostinato.families.guard import NonFiniteError
from ostinato.engine.loggers import build_loggers
from ostinato.engine.lost_node import LostNodeError, lost_node_message
from ostinato.engine.trainer import (apply_compile_and_checkpointing, build_trainer, check_resume_fits,
                                     last_checkpoint, sweep_checkpoint_temp_files)
from ostinato.engine.weights import load_weights
from ostinato.evaluation.hooks import check_evaluate, evaluation_callbacks
from ostinato.store.records import CONFIG_KEY
from ostinato.errors import EXIT_USER_ERROR, debug_enabled, user_errors, user_message
from ostinato.fileio import atomic_write_text
from ostinato.store.records import conf_dir

log = logging.getLogger("ostinato.train")
register_resolvers()  # ${manifest:...}: a family's dimensions read from its data's manifest


def _setup_logging(folder: Path, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    folder.mkdir(parents=True, exist_ok=True)
    handlers.append(logging.FileHandler(folder / ("train.log" if rank == 0 else f"train.rank{rank}.log")))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def _preflight(cfg: DictConfig, world_size: int):
    """Everything that can fail before training: config checks, data paths, batch division."""
    validate(cfg, checks=[check_evaluate])
    check_global_batch(cfg, world_size)
    datamodule = instantiate(cfg.data, _convert_="all")
    for split in ("train", "valid", "test"):
        if cfg.data.get(split) is not None:
            try:
                datamodule.source(split)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"data.{split}: {e}") from None
    return datamodule


def run(cfg: DictConfig) -> L.Trainer:
    console.install()  # before the Trainer: Lightning warns while it is built
    xp = get_xp()
    read_manifests()  # the signature is fixed: the family's ${manifest:...} dimensions now come from the data
    folder = Path(xp.folder)
    spec = get_distrib_spec()
    _setup_logging(folder, spec.rank)
    world = spec.world_size if spec.world_size > 1 else (
        int(cfg.trainer.devices if str(cfg.trainer.devices).isdigit() else 1) * int(cfg.trainer.num_nodes))
    datamodule = _preflight(cfg, world)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    family = instantiate(cfg.family, optim=plain(cfg.optim), _convert_="all")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    family.__dict__[CONFIG_KEY] = resolved  # stored in every checkpoint (see FamilyModule.on_save_checkpoint)
    if spec.rank == 0:
        atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        sweep_checkpoint_temp_files(folder)  # no rank writes before the process group exists: none is in progress
    resume = last_checkpoint(folder, set_aside_damaged=spec.rank == 0)
    if resume is not None:
        check_resume_fits(resume, family)
    lora = getattr(family, "lora", None) is not None  # continue_from is set: engine.config.check_lora
    if cfg.continue_from and (resume is None or lora):  # a LoRA run's checkpoints hold the adapters alone
        load_base(family, cfg.continue_from, Path(xp.dora.dir) / xp.dora.xps, cfg.trainer.trust_checkpoints,
                  resuming=resume is not None)
    apply_compile_and_checkpointing(cfg.trainer, family)
    resumed_step = checkpoint_step(resume) if resume is not None else None
    loggers = build_loggers(cfg.logger, folder, xp.sig, resumed_step) if cfg.logger.kind != "none" else []
    trainer = build_trainer(cfg, folder, family, xp=xp, loggers=loggers,
                            extra_callbacks=evaluation_callbacks(cfg))
    log.info("XP %s in %s%s", xp.sig, folder, f", resuming {resume}" if resume else "")
    if cfg.eval_only:
        metrics = {k: v for r in trainer.validate(family, datamodule) for k, v in r.items()}
        if cfg.data.get("test") is not None:
            metrics.update({k: v for r in trainer.test(family, datamodule) for k, v in r.items()})
        if trainer.is_global_zero:
            xp.link.push_metrics({**grouped({k: float(v) for k, v in metrics.items()}), "step": 0})
        return trainer
    baseline = cfg.trainer.validate_first and resume is None and cfg.data.get("valid") is not None
    if baseline:  # the untrained model, as history's epoch -1
        metrics = {k: v for r in trainer.validate(family, datamodule, verbose=False) for k, v in r.items()}
        if trainer.is_global_zero:
            xp.link.push_metrics({**grouped({k: float(v) for k, v in metrics.items()}), "step": 0, "epoch": -1})
            main = {k: v for k, v in trainer.progress_bar_metrics.items() if k.startswith("valid/")} or metrics
            log.info("untrained baseline: %s", " ".join(f"{k} {float(v):.4g}" for k, v in sorted(main.items())))
    try:
        trainer.fit(family, datamodule, ckpt_path=str(resume) if resume else None)
    except NonFiniteError as e:
        kept = last_checkpoint(folder)
        raise NonFiniteError(f"{e} ({kept or 'no checkpoint was written yet'})") from None
    except Exception as e:  # noqa: BLE001 - a collective that failed on a lost node is said in one line; else re-raised
        lost = lost_node_message(e, spec.rank, cfg.trainer.collective_timeout) if spec.world_size > 1 else None
        if lost is None:
            raise
        kept = last_checkpoint(folder)
        message = f"{lost} ({kept or 'no checkpoint was written yet'})"
        log.error("%s", message)  # the rank's log file (train.log / train.rankN.log), not only its stderr
        raise LostNodeError(message) from None
    if trainer.is_global_zero:  # the last line: what `ostinato export`, `generate --model` and continue_from take
        log.info("XP %s in %s (step %d): ostinato export %s OUT", xp.sig, folder, trainer.global_step, xp.sig)
    return trainer


def load_base(family: L.LightningModule, ref: str, xps: Path, trust: bool, resuming: bool) -> None:
    """``continue_from``'s weights into ``family``; at a LoRA run's resume a base that is gone is refused in one
    line (its checkpoints hold the adapters alone)."""
    try:
        load_weights(family, ref, xps_dir=xps, trust=trust)
    except FileNotFoundError as e:
        if not resuming:
            raise
        raise ConfigError(f"continue_from={ref}: the base this LoRA run adapts is gone ({e}); its checkpoints hold "
                          "the adapters alone: put the base back at that path to resume") from None


def checkpoint_step(path: Path) -> int:
    """The global step of a checkpoint file (memory-mapped, no tensor is read) or of a sharded checkpoint folder;
    when it cannot be read, a step past every logged one (a resumed run then keeps all its CSV rows)."""
    import torch

    meta = Path(path) / "meta.pt" if Path(path).is_dir() else Path(path)
    try:
        return int(torch.load(meta, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable checkpoint: keep the rows
        return 2**62


class CheckedMain(HydraMain):
    """dora's hydra main, whose ``get_xp`` (the first thing of every dora verb: run, launch, grid, info) checks the
    overrides and the composed config, raising one-line ConfigErrors instead of hydra's tracebacks."""

    @functools.cached_property
    def group_options(self) -> dict[str, list[str]]:
        """Config group -> its option names (hydra's own groups left out)."""
        with initialize_config_dir(str(self.full_config_path), job_name=self._job_name, **self.hydra_kwargs):
            loader = GlobalHydra.instance().hydra.config_loader
            return {g: loader.get_group_options(g) for g in self._config_groups if not g.startswith("hydra")}

    def get_xp(self, argv: Sequence[str]) -> XP:
        argv = list(argv)
        check_overrides(argv, self.group_options)
        try:
            xp = super().get_xp(argv)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise composition_error(e, argv, self._get_base_config(argv)[0], self.group_options) from None
        try:
            validate(xp.cfg, data_paths=False, checks=[check_evaluate])
        except OmegaConfBaseException as e:  # e.g. an interpolation that does not resolve
            raise composition_error(e, argv, self._get_base_config(argv)[0], self.group_options) from None
        return xp


def _dora_excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """`dora -P ostinato VERB` (dora catches nothing): a user error that reaches the top is one line, exit 2."""
    message = user_message(error, value_errors=False)
    if message is None:
        return sys.__excepthook__(kind, error, tb)
    if debug_enabled():
        traceback.print_exception(kind, error, tb)
    verb = next((a for a in sys.argv[1:] if a in ("run", "launch", "grid", "info")), "")
    print(f"dora {verb}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


@functools.partial(CheckedMain, config_path=conf_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("ostinato train", value_errors=False):
        run(cfg)


if Path(sys.argv[0]).name == "dora" or sys.argv[0].endswith(f"dora{os.sep}__main__.py"):  # dora's own CLI
    sys.excepthook = _dora_excepthook

if __name__ == "__main__":
    with user_errors("ostinato train"):
        main()
