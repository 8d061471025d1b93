"""Hydra entry point for training: ``python train.py [group=option ...] [key=value ...]``.

Instantiates DataModule -> model -> callbacks -> loggers -> trainer (in that order, so that
bad config fails before any data is read or any file is written), fits, tests the best
checkpoint and returns ``cfg.optimized_metric`` for sweepers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning import seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from capsnets.utils.instantiate import (
    check_ckpt_path,
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


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1}


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) as configured; returns every scalar metric logged."""
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"))

    datamodule = instantiate_datamodule(cfg.data)
    model = instantiate_model(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
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


def _fit_and_test(cfg: DictConfig, datamodule: Any, model: Any, callbacks: list, loggers: list, ckpt_path: str | None) -> dict[str, float]:
    trainer = instantiate_trainer(cfg.trainer, callbacks, loggers)
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))

    metrics: dict[str, float] = {}
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_scalar_metrics(trainer.callback_metrics))
        name = cfg.get("optimized_metric")
        if checkpoint is not None and name and checkpoint.monitor == name and checkpoint.best_model_score is not None:
            # the value of the checkpoint that is tested, not the noisier last epoch's
            # (ddp_spawn does not hand the score back; the last epoch's value is used then)
            metrics[f"{name}_best"] = float(checkpoint.best_model_score)

    if cfg.get("test", True):
        test_ckpt = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        if not cfg.get("train", True):
            test_ckpt = ckpt_path
        if test_ckpt is None and cfg.get("train", True) and not trainer.fast_dev_run:
            log.warning("No best checkpoint found; testing the weights at the end of training.")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=test_ckpt)
        metrics.update(_scalar_metrics(trainer.callback_metrics))

    if trainer.is_global_zero:
        write_metrics_json(cfg, metrics)
        _print_summary(cfg, trainer, metrics)
    return metrics


def paper_reference(cfg: DictConfig) -> dict[str, Any] | None:
    """The preset's ``paper`` block for this job: ``{metric, target, source}``. A sweep preset whose
    rows differ in target lists them as ``paper.targets: [{when: {dotted.key: value}, target: x}]``;
    the first entry whose keys all match this job's config gives ``target``."""
    paper = cfg.get("paper")
    if paper is None:
        return None
    ref = OmegaConf.to_container(paper, resolve=True)
    assert isinstance(ref, dict)
    rows = ref.pop("targets", None) or []
    if ref.get("target") is None:
        for row in rows:
            if all(OmegaConf.select(cfg, key) == value for key, value in row["when"].items()):
                ref["target"] = row["target"]
                break
    return ref


def write_metrics_json(cfg: DictConfig, metrics: dict[str, float]) -> Path:
    """``<run dir>/metrics.json``: the job's overrides, seed, final metrics and the paper target the
    preset names. ``scripts/summarize.py`` builds its tables from these files (no W&B needed)."""
    paper = paper_reference(cfg)
    name = cfg.get("optimized_metric")
    record = {
        "task_name": cfg.get("task_name"),
        "overrides": job_overrides(),
        "seed": cfg.get("seed"),
        "optimized_metric": name,
        "optimized_value": optimized_value(metrics, name) if name else None,
        "metrics": dict(sorted(metrics.items())),
        "paper": paper,
    }
    path = Path(cfg.paths.output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


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
        if getattr(cb, "best_model_path", ""):
            # (ddp_spawn hands back the path but not the score to the launching process)
            score = f"={float(cb.best_model_score):.4f}" if cb.best_model_score is not None else ""
            lines.append(f"Best checkpoint ({cb.monitor}{score}): {cb.best_model_path}")
        if getattr(cb, "last_model_path", ""):
            lines.append(f"Last checkpoint: {cb.last_model_path}")
    shown = {k: v for k, v in metrics.items() if k.endswith("/acc") or k.endswith("/loss")}
    lines.append("Metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
    print("\n".join(lines), flush=True)


def optimized_value(metrics: dict[str, float], name: str) -> float | None:
    """The best checkpoint's value of ``name`` when the checkpoint callback monitors it, else the last logged one."""
    return metrics.get(f"{name}_best", metrics.get(name))


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises (:func:`optimized_value`); None (with a warning naming what was
    logged) when absent, e.g. when validation never ran; the finished run and its checkpoints stay as they are."""
    if not name:
        return None
    value = optimized_value(metrics, name)
    if value is None:
        log.warning("optimized_metric=%r was not logged (logged: %s); returning None.", name, ", ".join(sorted(metrics)))
    return value


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
