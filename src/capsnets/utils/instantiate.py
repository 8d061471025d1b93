"""Build the parts of a run from config: DataModule -> model -> callbacks -> loggers -> trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from capsnets.errors import CapsnetsError, ConfigError

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None, kind: str) -> list[Any]:
    """Each entry of a group like ``callbacks`` or ``logger`` with a ``_target_`` becomes one object."""
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{kind} config must be a mapping of name -> {{_target_: ...}}, got {type(cfg).__name__}.")
    objects = []
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("Instantiating %s <%s> (%s)", kind, conf._target_, name)
            objects.append(build(conf, _convert_="all"))
    return objects


def build(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but an error capsnets raised on purpose (a ConfigError naming the key and
    the fix) comes out as itself, not wrapped in Hydra's InstantiationException with a traceback."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, CapsnetsError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_group(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_group(cfg, "logger")


def instantiate_datamodule(cfg: DictConfig) -> LightningDataModule:
    log.info("Instantiating datamodule <%s>", cfg._target_)
    return build(cfg, _convert_="all")


def check_model_config(cfg: DictConfig) -> None:
    """Compose-time checks of ``model`` before anything is built: its routing exists, suits the model's
    capsule kind and has only known settings (a ConfigError lists the options)."""
    from capsnets import models
    from capsnets.nn.routing import check_routing_config

    classes = {f"capsnets.models.{name}": getattr(models, name) for name in models.__all__}
    model_cls = classes.get(str(cfg.get("_target_")))
    kind = getattr(model_cls, "capsule_kind", None)
    routing = cfg.get("routing")
    if kind is None or routing is None:
        return
    if not isinstance(routing, DictConfig):
        raise ConfigError(f"model.routing must be a routing config (model/routing=<option>), got {routing!r}.")
    check_routing_config(OmegaConf.to_container(routing, resolve=True), kind=kind)


def instantiate_model(cfg: DictConfig) -> LightningModule:
    log.info("Instantiating model <%s>", cfg._target_)
    # _convert_="all": plain dicts/lists in hparams, so checkpoints load with weights_only=True
    return build(cfg, _convert_="all")


def instantiate_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> Trainer:
    log.info("Instantiating trainer <%s>", cfg._target_)
    extra: dict[str, Any] = {}
    if cfg.get("plugins") is None:  # checkpoints written whole or not at all, no temporary files in $TMPDIR
        from capsnets.utils.checkpoint_io import PartialFileCheckpointIO

        extra["plugins"] = [PartialFileCheckpointIO()]
    return build(cfg, callbacks=callbacks, logger=loggers or False, **extra)


def check_ckpt_path(ckpt_path: str | None, key: str = "ckpt_path") -> str | None:
    """Fail early, naming the key, when a checkpoint to resume from or evaluate is missing."""
    if ckpt_path is None:
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{key}={ckpt_path!r} is not a file. Fix: pass the path of a .ckpt written by a run, "
            f"e.g. {key}=outputs/train/runs/<date>/checkpoints/last.ckpt"
        )
    return str(path.resolve())


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The whole config with interpolations resolved, as plain dicts (for loggers)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def job_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (``[]`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
