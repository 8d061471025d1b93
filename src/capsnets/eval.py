"""Hydra entry point for evaluation: ``python eval.py ckpt_path=<file.ckpt> [data=...]``.

The checkpoint is read with ``torch.load``'s default ``weights_only=True``. It carries the
model class and hyper-parameters and the DataModule class and settings it was trained with
(see :meth:`CapsuleClassifier.on_save_checkpoint`), so a checkpoint alone is enough; pass
``data=<option>`` to evaluate on another dataset config.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import hydra
import torch
from lightning import LightningDataModule, LightningModule, seed_everything
from omegaconf import DictConfig

from capsnets.errors import ConfigError
from capsnets.train import _scalar_metrics
from capsnets.utils.instantiate import (
    check_ckpt_path,
    instantiate_datamodule,
    instantiate_loggers,
    instantiate_trainer,
    resolved_config,
)
from capsnets.utils.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_checkpoint(ckpt_path: str) -> tuple[LightningModule, dict[str, Any]]:
    """Rebuild the LightningModule stored in ``ckpt_path``; also returns the capsnets metadata."""
    checkpoint = torch.load(ckpt_path, map_location="cpu")  # weights_only=True (PyTorch default)
    meta = checkpoint.get("capsnets")
    if not meta or "model_class" not in meta:
        raise ConfigError(f"{ckpt_path} was not written by a capsnets run (no 'capsnets' metadata); cannot rebuild the model.")
    model = _import(meta["model_class"])(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    model.samples_seen = int(meta.get("samples_seen", 0))
    return model, meta


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint ``cfg.ckpt_path``; returns the test metrics."""
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"))
    model, meta = load_checkpoint(ckpt_path)
    if cfg.get("data") is not None:
        datamodule: LightningDataModule = instantiate_datamodule(cfg.data)
    elif "datamodule_class" in meta:
        datamodule = _import(meta["datamodule_class"])(**meta["datamodule_hparams"])
    else:
        raise ConfigError(f"{ckpt_path} does not record its dataset; pass data=<option> (e.g. data=mnist).")
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate_trainer(cfg.trainer, callbacks=[], loggers=loggers)
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))
    trainer.test(model=model, datamodule=datamodule)
    metrics = _scalar_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        print(f"Checkpoint: {ckpt_path}\n" + "\n".join(f"{k}: {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg).get("test/acc")


if __name__ == "__main__":
    main()
