"""Hydra entry point for training: ``python train.py [group=option ...] [key=value ...]``.

Instantiates DataModule -> model -> callbacks -> loggers -> trainer (in that order, so that
bad config fails before any data is read or any file is written), fits, tests the best
checkpoint (``test_checkpoint=last``: the weights at the end of training) and returns ``cfg.optimized_metric``
for sweepers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from lightning import seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from capsnets.callbacks.interruption import Interruption, interruption_of
from capsnets.callbacks.learning_curve import LearningCurve
from capsnets.callbacks.nonfinite import NonFiniteGuard
from capsnets.checkpoints import check_finite, check_weights, read_checkpoint
from capsnets.config_checks import check_config, runtime_choices
from capsnets.errors import ConfigError, exit_on_error
from capsnets.registry import resolve
from capsnets.results.record import metric_value, scalar_metrics, write_record
from capsnets.utils.allocator import loaded_allocator
from capsnets.utils.checkpoint_io import remove_stale_partials
from capsnets.utils.compile import compile_model
from capsnets.utils.instantiate import (
    check_ckpt_path,
    check_model_config,
    instantiate_callbacks,
    instantiate_datamodule,
    instantiate_loggers,
    instantiate_model,
    instantiate_trainer,
    job_overrides,
    resolved_config,
)
from capsnets.utils.resolvers import CONFIG_DIR
from capsnets.utils.wandb_logger import finish_loggers

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) as configured; returns every scalar metric logged."""
    check_config(cfg, choices=runtime_choices(cfg), config_dir=CONFIG_DIR)
    check_model_config(cfg.model)
    log.info("CPU memory allocator: %s (capsnets/utils/allocator.py)", loaded_allocator())
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"))
    output_dir = cfg.get("paths", {}).get("output_dir")
    remove_stale_partials(
        Path(output_dir) / "checkpoints" if output_dir else None, ckpt_path and Path(ckpt_path).parent
    )

    datamodule = instantiate_datamodule(cfg.data)
    model = instantiate_model(cfg.model)
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, model)
    compile_model(model, cfg.get("compile"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks.append(Interruption(run_dir=cfg.paths.get("output_dir")))
    callbacks.append(
        NonFiniteGuard(
            cfg.get("nonfinite", "stop"),
            max_skips=cfg.get("nonfinite_max_skips", 10),
            run_dir=cfg.paths.get("output_dir"),
        )
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    if not loggers and any(isinstance(cb, LearningRateMonitor) for cb in callbacks):
        log.info("logger=none: the learning-rate monitor has nowhere to log and is left out.")
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    failed = True
    try:
        metrics = _fit_and_test(cfg, datamodule, model, callbacks, loggers, ckpt_path)
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)
    return metrics


@contextlib.contextmanager
def reported_interruption(trainer: Any) -> Iterator[None]:
    """Lightning ends a fit stopped by SIGTERM / Ctrl-C with SystemExit (code 0 / 1): turn it into
    :class:`Interrupted` naming the saved checkpoint and the resume command (exit 128 + signal)."""
    try:
        yield
    except SystemExit:
        interruption = interruption_of(trainer.callbacks)
        if interruption is None or interruption.signum is None:
            raise
        raise interruption.error(job_overrides()) from None


def check_resume_checkpoint(ckpt_path: str, model: Any) -> None:
    """Before anything is written: ``ckpt_path`` is a readable capsnets checkpoint of this model, with finite
    weights of the configured shapes (else one ConfigError naming the file and the fix)."""
    checkpoint = read_checkpoint(ckpt_path)
    stored = resolve("model", checkpoint["capsnets"]["model_class"], f"checkpoint {ckpt_path}")
    if stored is not type(model):
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} holds a {stored.__name__}, but the config builds a {type(model).__name__}. "
            f"Fix: pass the model= the checkpoint was trained with, or another checkpoint."
        )
    check_weights(model, checkpoint["state_dict"], ckpt_path)
    check_finite(checkpoint["state_dict"], ckpt_path)


def _fit_and_test(
    cfg: DictConfig, datamodule: Any, model: Any, callbacks: list, loggers: list, ckpt_path: str | None
) -> dict[str, float]:
    trainer = instantiate_trainer(cfg.trainer, callbacks, loggers)
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))

    metrics: dict[str, float] = {}
    # the checkpoint that is tested: the monitored one (conf/callbacks/model_checkpoint.yaml also keeps last.ckpt),
    # or with test_checkpoint=last the weights at the end of training
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    checkpoint = next((c for c in checkpoints if c.monitor), checkpoints[0] if checkpoints else None)
    if cfg.get("train", True):
        with reported_interruption(trainer):
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(scalar_metrics(trainer.callback_metrics))
        name = cfg.get("optimized_metric")
        if checkpoint is not None and name and checkpoint.monitor == name and checkpoint.best_model_score is not None:
            # the best checkpoint's value, not the noisier last epoch's (the tested one unless test_checkpoint=last)
            # (ddp_spawn does not hand the score back; the last epoch's value is used then)
            metrics[f"{name}_best"] = float(checkpoint.best_model_score)

    if cfg.get("test", True):
        test_ckpt = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        if not cfg.get("train", True):
            test_ckpt = ckpt_path
        elif cfg.get("test_checkpoint", "best") == "last":
            test_ckpt = None  # the weights in memory: those at the end of training
            log.info("Testing the weights at the end of training (test_checkpoint=last).")
        elif test_ckpt is None and not trainer.fast_dev_run:
            log.warning("No best checkpoint found; testing the weights at the end of training.")
        with reported_interruption(trainer):
            trainer.test(model=model, datamodule=datamodule, ckpt_path=test_ckpt)
        metrics.update(scalar_metrics(trainer.callback_metrics))

    if trainer.is_global_zero:
        curve = next((cb.curve for cb in trainer.callbacks if isinstance(cb, LearningCurve)), None)
        write_record(cfg, metrics, job_overrides(), curve=curve)
        _print_summary(cfg, trainer, metrics)
    return metrics


def _print_summary(cfg: DictConfig, trainer: Any, metrics: dict[str, float]) -> None:
    """Where everything went and the final metrics (rank 0 only: other ranks have dummy loggers)."""
    lines = [f"Run directory: {cfg.paths.output_dir}"]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            where = getattr(run, "url", None) or (Path(run.dir).parent if getattr(run, "dir", None) else None)
            lines.append(f"W&B ({run.settings.mode}): {where}")
        else:
            lines.append(f"{type(logger).__name__}: {logger.log_dir}")
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "best_model_path", "") and getattr(cb, "monitor", None):
            # (ddp_spawn hands back the path but not the score to the launching process)
            score = f"={float(cb.best_model_score):.4f}" if cb.best_model_score is not None else ""
            lines.append(f"Best checkpoint ({cb.monitor}{score}): {cb.best_model_path}")
        elif not getattr(cb, "monitor", None) and cb.dirpath and (Path(cb.dirpath) / f"{cb.filename}.ckpt").is_file():
            lines.append(f"Last checkpoint: {Path(cb.dirpath) / f'{cb.filename}.ckpt'}")
    shown = {k: v for k, v in metrics.items() if k.endswith("/acc") or k.endswith("/loss")}
    lines.append("Metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
