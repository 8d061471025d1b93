"""Hydra entry point for evaluation.

``python eval.py ckpt_path=<file.ckpt> [split=...] [viewpoints=...] [test_crops=N]``.

The checkpoint is read with ``torch.load``'s default ``weights_only=True``. It carries the
model class and hyper-parameters and the DataModule class and settings it was trained with
(see :meth:`CapsuleClassifier.on_save_checkpoint`), so a checkpoint alone is enough.

What is evaluated (all checked before any data is read; see ``conf/eval.yaml``):

- ``split``: the ``test`` (default), ``val`` or ``train`` split of the checkpoint's dataset.
- ``viewpoints``: for smallNORB novel-viewpoint checkpoints (``data.split=azimuth|elevation``),
  the ``novel`` (the protocol's test set, default), ``familiar`` or ``all`` viewpoints of the
  testing file (Hinton et al. 2018 compare models on both).
- ``test_crops``: smallNORB multi-crop testing (class scores averaged over N crops).
- ``data_overrides``: any other data setting applied on top of the checkpoint's (or of
  ``data=<option>``, which evaluates on another dataset config).

Metrics are logged under ``test/`` whatever the split (``test/acc`` is what sweepers read).
The results go to ``<ckpt dir>/<ckpt stem>.eval-<split>[-<viewpoints>][-crops<N>][-limit<L>][<data tag>].json``
(see :func:`data_tag`): the name encodes the setting, so evaluations with different settings never
overwrite each other, and re-running one setting replaces its file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from omegaconf import DictConfig, OmegaConf

import capsnets
from capsnets.checkpoints import check_finite, check_weights, read_checkpoint
from capsnets.config_checks import check_eval_config, runtime_choices
from capsnets.errors import ConfigError, exit_on_error
from capsnets.registry import resolve
from capsnets.results.record import scalar_metrics
from capsnets.schema import constructor_hints
from capsnets.utils.instantiate import (
    check_ckpt_path,
    instantiate_loggers,
    instantiate_trainer,
    job_overrides,
    resolved_config,
)
from capsnets.utils.resolvers import CONFIG_DIR
from capsnets.utils.wandb_logger import finish_loggers

log = logging.getLogger(__name__)

# data settings that change how examples are loaded but not which examples or how they are scored
RUNTIME_SETTINGS = ("batch_size", "num_workers", "pin_memory", "download")
# ... plus where the files are: overriding these on the checkpoint's own data (the same dataset,
# moved) keeps the results file name
LOADER_SETTINGS = (*RUNTIME_SETTINGS, "data_dir", "search_dirs")


def load_checkpoint(ckpt_path: str) -> tuple[LightningModule, dict[str, Any]]:
    """Rebuild the LightningModule stored in ``ckpt_path``; also returns the capsnets metadata
    (model and DataModule class and settings, samples seen) plus the checkpoint's epoch and global step.

    Only a model class that capsnets registers is built (:mod:`capsnets.registry`): a checkpoint carries
    data, never code. Unreadable, foreign, mismatched or non-finite checkpoints end in one ConfigError.
    """
    checkpoint = read_checkpoint(ckpt_path)
    meta = checkpoint["capsnets"]
    model_cls = resolve("model", meta["model_class"], f"checkpoint {ckpt_path}")
    try:
        model = model_cls(**checkpoint.get("hyper_parameters", {}))
    except TypeError as exc:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r}: its hyper-parameters do not build {model_cls.__name__} ({exc}). "
            f"Fix: evaluate it with the capsnets version that wrote it, or retrain."
        ) from None
    check_weights(model, checkpoint["state_dict"], ckpt_path)
    check_finite(checkpoint["state_dict"], ckpt_path)
    model.load_state_dict(checkpoint["state_dict"])
    model.samples_seen = int(meta.get("samples_seen", 0))
    return model, {**meta, "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}


# --------------------------------------------------------------------------- settings
def data_source(cfg: DictConfig, meta: dict[str, Any], ckpt_path: str) -> tuple[type, dict[str, Any]]:
    """(DataModule class, settings): from ``data=<option>`` when given, else from the checkpoint."""
    if cfg.get("data") is not None:
        settings = OmegaConf.to_container(cfg.data, resolve=True)
        assert isinstance(settings, dict)
        return resolve("datamodule", settings.pop("_target_"), "data._target_"), settings
    if "datamodule_class" in meta:
        return resolve("datamodule", meta["datamodule_class"], f"checkpoint {ckpt_path}"), dict(
            meta.get("datamodule_hparams", {})
        )
    raise ConfigError(f"{ckpt_path} does not record its dataset; pass data=<option> (e.g. data=mnist).")


def check_overrides(cls: type, overrides: dict[str, Any]) -> None:
    """ConfigError naming the problem and the fix for settings ``cls`` does not have (before any data is read)."""
    valid = set(constructor_hints(cls))  # keyword arguments cls accepts, following **kwargs up its bases
    if "test_crops" in overrides and "test_crops" not in valid:
        raise ConfigError(
            f"test_crops={overrides['test_crops']}: {cls.__name__} has no multi-crop testing (only smallNORB does, "
            f"data.test_crops). Fix: drop test_crops= to evaluate the whole images, or evaluate a smallNORB checkpoint."
        )
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(
            f"data_overrides: {cls.__name__} has no setting {', '.join(unknown)}. "
            f"Valid settings: {', '.join(sorted(valid))}."
        )


def build_datamodule(cls: type, settings: dict[str, Any], split: str, viewpoints: str | None) -> LightningDataModule:
    """Instantiate the DataModule (its constructor checks every setting) and point it at the evaluated rows."""
    datamodule = cls(**settings)
    if viewpoints is not None:
        datamodule.set_test_viewpoints(viewpoints)  # ConfigError naming the fix where the data has no such protocol
    if split != "test":
        if not callable(getattr(datamodule, "set_eval_split", None)):
            raise ConfigError(
                f"split={split}: {cls.__name__} serves only its test split to trainer.test. Fix: pass split=test."
            )
        datamodule.set_eval_split(split)
    return datamodule


SHAPE_KEYS = ("in_channels", "image_size", "num_classes")


def check_data_fits_model(model: LightningModule, datamodule: LightningDataModule, cls: type) -> None:
    """ConfigError, before any data is read, when the evaluated data's shapes differ from the ones
    the checkpoint's network was built for (e.g. an MNIST checkpoint with data=smallnorb)."""
    net = dict(getattr(model, "hparams", {}).get("net") or {})
    expected = {key: net[key] for key in SHAPE_KEYS if key in net}
    actual = {key: getattr(datamodule, key) for key in expected if hasattr(datamodule, key)}
    if any(actual[key] != expected[key] for key in actual):

        def shapes(d: dict[str, Any]) -> str:
            size = d.get("image_size")
            return f"{d.get('in_channels')}x{size}x{size} images, {d.get('num_classes')} classes"

        raise ConfigError(
            f"{cls.__name__} gives {shapes(actual)}; the checkpoint's network expects {shapes(expected)}. "
            "Fix: evaluate on data with the same shapes (e.g. data=fashion_mnist for an MNIST checkpoint), "
            "or drop data= to use the checkpoint's own dataset."
        )


def effective_viewpoints(datamodule: LightningDataModule, split: str) -> str | None:
    """The test viewpoints evaluated (novel/familiar/all) for a novel-viewpoint protocol's test split, else None."""
    if split != "test" or getattr(datamodule, "viewpoint_protocol", None) is None:
        return None
    return getattr(datamodule, "test_viewpoints", None)


def data_changes(cls: type, settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Data class and settings that differ from the checkpoint's: ``{key: {"checkpoint": a, "now": b}}``."""
    before = {"class": meta.get("datamodule_class"), **meta.get("datamodule_hparams", {})}
    now = {"class": f"{cls.__module__}.{cls.__qualname__}", **settings}
    return {
        k: {"checkpoint": before.get(k), "now": now.get(k)}
        for k in sorted(set(before) | set(now))
        if before.get(k) != now.get(k)
    }


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _hydra_choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def data_tag(cfg: DictConfig, cls: type, settings: dict[str, Any], changes: dict[str, Any]) -> str:
    """The results file name's mark of the data evaluated, when it is not the checkpoint's own:
    ``-data_<option>-<hash>`` with ``data=<option>`` (hash of the class and every setting but
    :data:`RUNTIME_SETTINGS` and test_crops); ``-data-<hash>`` when data settings that change which
    examples are scored or how (any but :data:`LOADER_SETTINGS` and test_crops) differ from the
    checkpoint's; else empty."""
    if cfg.get("data") is not None:
        option = re.sub(r"[^A-Za-z0-9_.-]", "_", _hydra_choice("data") or "config")
        kept = {k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS and k != "test_crops"}
        return f"-data_{option}-{_digest({'class': f'{cls.__module__}.{cls.__qualname__}', **kept})}"
    scoring = {k: v["now"] for k, v in changes.items() if k not in LOADER_SETTINGS and k != "test_crops"}
    return f"-data-{_digest(scoring)}" if scoring else ""


def results_path(cfg: DictConfig, ckpt_path: str, *, split: str, viewpoints: str | None, crops: int, data: str) -> Path:
    """``<dir>/<ckpt stem>.eval-<split>[-<viewpoints>][-crops<N>][-limit<L>]<data>.json``, ``data`` from
    :func:`data_tag`; ``<dir>`` is ``results_dir`` or the checkpoint's folder."""
    ckpt = Path(ckpt_path)
    name = f"{ckpt.stem}.eval-{split}"
    if viewpoints is not None:
        name += f"-{viewpoints}"
    if crops > 1:
        name += f"-crops{crops}"
    limit = cfg.trainer.get("limit_test_batches")  # Lightning: float = fraction of batches, int = batch count
    if limit is not None and not (isinstance(limit, float) and limit == 1.0):
        name += f"-limit{limit}"
    name += data
    folder = Path(cfg.results_dir).expanduser() if cfg.get("results_dir") else ckpt.parent
    return folder / f"{name}.json"


def check_writable(path: Path) -> None:
    """ConfigError before any data is read when the results file cannot be written."""
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(
            f"cannot write the results {path.name} into {folder} (not a writable folder). "
            f"Fix: results_dir=<a writable folder>."
        )


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (a half-written file never has the real name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(partial, path)


class ExampleCounter(Callback):
    """Counts the examples scored by ``trainer.test`` (summed over processes)."""

    def __init__(self) -> None:
        self.count = 0

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.count += int(batch[1].shape[0])  # labels (B,)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = trainer.strategy.reduce(torch.tensor(float(self.count), device=pl_module.device), reduce_op="sum")
        self.count = int(total.item())


def check_single_launch(trainer: Trainer) -> None:
    """eval.py reads the results (examples scored, split size) in the process that runs the test;
    spawned/forked workers (``ddp_spawn``, ``ddp_fork``) keep them to themselves."""
    start_method = getattr(trainer.strategy, "_start_method", None)
    if start_method in ("spawn", "fork", "forkserver"):
        raise ConfigError(
            f"eval.py cannot run under a ddp_{start_method} strategy (its worker processes do not hand the "
            "evaluation back). Fix: trainer=cpu or trainer=gpu (one device is plenty for testing), or trainer=ddp."
        )


def _split_size(trainer: Trainer) -> int:
    loaders = trainer.test_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return sum(len(loader.dataset) for loader in loaders if loader is not None)


# --------------------------------------------------------------------------- main
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the checkpoint ``cfg.ckpt_path`` as configured; returns the metrics (logged as ``test/*``)."""
    settings = check_eval_config(cfg, choices=runtime_choices(cfg), config_dir=CONFIG_DIR)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"))
    split, viewpoints = settings["split"], settings["viewpoints"]
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    model, meta = load_checkpoint(ckpt_path)
    cls, data_settings = data_source(cfg, meta, ckpt_path)
    check_overrides(cls, settings["data_overrides"])
    data_settings.update(settings["data_overrides"])
    datamodule = build_datamodule(cls, data_settings, split, viewpoints)
    check_data_fits_model(model, datamodule, cls)
    data_settings = dict(getattr(datamodule, "hparams", None) or data_settings)  # validated, plain values
    viewpoints = effective_viewpoints(datamodule, split)
    crops = int(getattr(datamodule, "test_crops", 1))
    changes = data_changes(cls, data_settings, meta)
    tag = data_tag(cfg, cls, data_settings, changes)
    out_path = results_path(cfg, ckpt_path, split=split, viewpoints=viewpoints, crops=crops, data=tag)
    check_writable(out_path)

    loggers = instantiate_loggers(cfg.get("logger"))
    counter = ExampleCounter()
    failed = True
    try:
        trainer = instantiate_trainer(cfg.trainer, callbacks=[counter], loggers=loggers)
        check_single_launch(trainer)
        for logger in loggers:
            logger.log_hyperparams(resolved_config(cfg))
        trainer.test(model=model, datamodule=datamodule)
        failed = False
    finally:
        finish_loggers(loggers, failed=failed)
    split_size = _split_size(trainer)
    if split_size == 0:
        raise ConfigError(
            f"split={split} of {cls.__name__} has no examples (e.g. data.val_size=0). Fix: pick another split=."
        )
    metrics = scalar_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        record = {
            "checkpoint": ckpt_path,
            "split": split,
            "viewpoints": viewpoints,
            "crops": crops,
            "num_examples": counter.count,
            "split_size": split_size,
            "metrics": dict(sorted(metrics.items())),
            "metrics_note": f"logged under test/* whatever the split; these are {split}-split values",
            "dataset": {
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "settings": data_settings,
                "changed_from_checkpoint": changes,
            },
            "model": {
                "class": meta["model_class"],
                "epoch": meta.get("epoch"),
                "global_step": meta.get("global_step"),
                "samples_seen": meta.get("samples_seen"),
            },
            "seed": cfg.get("seed"),
            "overrides": job_overrides(),
            "run_dir": cfg.paths.get("output_dir"),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "capsnets_version": capsnets.__version__,
        }
        write_json(out_path, record)
        setting = ", ".join([f"split={split}", *([f"viewpoints={viewpoints}"] if viewpoints else []), f"crops={crops}"])
        lines = [f"Checkpoint: {ckpt_path}", f"Evaluated: {setting}, {counter.count} examples"]
        lines += [f"{k}: {v:.4f}" for k, v in sorted(metrics.items())]
        lines.append(f"Results written to {out_path}")
        print("\n".join(lines), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@exit_on_error
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg).get("test/acc")


if __name__ == "__main__":
    main()
