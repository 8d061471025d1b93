"""Checks of a composed config, run once before anything is built, read or written.

Per setting, the schema is the type annotations (:mod:`capsnets.schema`): each DataModule, each LightningModule
(``model.loss``, ``model.optimizer``, ``model.scheduler`` as TypedDicts) and its network, and each routing procedure
declares its settings in its constructor, and the composed config is checked against them with
:func:`~capsnets.schema.check_settings` (``data``, ``model``, ``model.net`` here; ``model.routing`` by
:func:`~capsnets.nn.routing.check_routing_config`), so a new setting is checked the moment it is added. The keys no
constructor takes have their schema here (:class:`TopLevelSettings`, :class:`TrainerSettings`, :class:`EvalSettings`).
Booleans are booleans (``model.net.reconstruction=no`` is refused, not "truthy"), integers are integers, numbers are
numbers, choices are choices, ranges are ranges. The constructors check their arguments against the same annotations
with the same function (:func:`~capsnets.schema.checked`), so a class built from Python refuses a bad value with the
same message; they hold no per-setting checks of their own.

On top, in one place (this module):

* cross-field rules: the model's input shape and classes against the data's, the margin-loss margins, the margin
  schedule, random shifts and crops against the image, ``train=false`` without a checkpoint, devices against the
  machine;
* an option of an optional group that does not exist (``experiment=sabour2017_mnsit``, ``debug=fastest``), which
  Hydra drops without a word, with a "did you mean".

Every problem is a :class:`~capsnets.errors.ConfigError` naming the key, the value, what is allowed and the override
that fixes it; ``train.py`` / ``eval.py`` print it as one line and exit with code 2. ``check_config`` checks a
``train.py`` config, ``check_eval_config`` an ``eval.py`` one.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from omegaconf import DictConfig, ListConfig, OmegaConf

from capsnets.callbacks.nonfinite import Policy
from capsnets.data.base import EvalSplit
from capsnets.errors import ConfigError
from capsnets.schema import PositiveFloat, PositiveInt, Range, check_settings, constructor_hints
from capsnets.utils.compile import CompileSettings, check_compile

# optional config groups whose misspelled option Hydra would silently drop
OPTIONAL_GROUPS = ("experiment", "debug", "hparams_search")
Metric = Literal["val/acc", "val/loss", "train/acc", "train/loss", "test/acc", "test/loss"]
Epochs = Annotated[int, Range(-1)]  # -1: no limit


class TopLevelSettings(TypedDict, total=False):
    """The top-level keys of ``train.yaml`` / ``eval.yaml`` that capsnets reads (the others belong to Hydra)."""

    train: bool
    test: bool
    multirun_fail_fast: bool
    seed: Annotated[int, Range(0, 2**32 - 1)] | None
    nonfinite: Policy  # NonFiniteGuard's policy
    nonfinite_max_skips: PositiveInt
    optimized_metric: Metric | None
    test_checkpoint: Literal["best", "last"]
    compile: CompileSettings


class TrainerSettings(TypedDict, total=False):
    """The ``trainer`` keys checked before Lightning sees them (``devices``: :func:`check_trainer`)."""

    max_epochs: Epochs | None
    min_epochs: Epochs | None
    accumulate_grad_batches: PositiveInt | None
    val_check_interval: PositiveFloat | None  # a fraction of an epoch, or a number of batches
    log_every_n_steps: PositiveInt | None
    check_val_every_n_epoch: PositiveInt | None
    deterministic: bool | Literal["warn"]
    sync_batchnorm: bool
    enable_checkpointing: bool
    enable_progress_bar: bool


class EvalSettings(TypedDict, total=False):
    """The keys of ``eval.yaml`` that choose what is evaluated (the checkpoint's DataModule checks ``viewpoints``)."""

    split: EvalSplit
    test_crops: PositiveInt | None
    data_overrides: Mapping[str, Any] | None


def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema, include_extras=True)


# --------------------------------------------------------------------------- groups
def check_optional_groups(choices: Mapping[str, Any] | None, config_dir: Path) -> None:
    """An option of an optional group that has no file is an error (Hydra would drop it silently)."""
    for group in OPTIONAL_GROUPS:
        option = (choices or {}).get(group)
        if option is None:
            continue
        options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        if str(option) not in options:
            close = difflib.get_close_matches(str(option), options, n=1)
            hint = f" Did you mean {group}={close[0]}?" if close else ""
            raise ConfigError(
                f"{group}={option}: there is no such option (conf/{group}/{option}.yaml), so it would be ignored "
                f"and the defaults trained.{hint} Options: {', '.join(options)}."
            )


def check_top_level(cfg: DictConfig) -> None:
    check_settings("", cfg, _hints(TopLevelSettings), closed=False)  # the other keys are Hydra's
    if cfg.get("train") is False and cfg.get("test", True) and not cfg.get("ckpt_path"):
        raise ConfigError(
            "train=false tests a model without training it, but no ckpt_path is given: it would score random "
            "weights. Fix: pass ckpt_path=<.ckpt> (or use eval.py ckpt_path=<.ckpt>), or drop train=false."
        )


def check_data(cfg: DictConfig) -> type | None:
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or "_target_" not in data:
        return None
    from capsnets.registry import resolve

    cls = resolve("datamodule", data._target_, "data._target_")
    check_settings("data", data, constructor_hints(cls))
    image = data.get("image_size")
    shift = data.get("shift_pixels")
    if isinstance(image, int) and isinstance(shift, int) and shift >= image:
        raise ConfigError(
            f"data.shift_pixels={shift} moves the image by at least its whole size ({image} px). "
            f"Fix: data.shift_pixels=<0..{max(image // 4, 0)}> (Sabour et al. shift MNIST by up to 2 px)."
        )
    resize = data.get("resize")
    if isinstance(image, int) and isinstance(resize, int) and image > resize:
        raise ConfigError(
            f"data.image_size={image} crops are larger than the data.resize={resize} images they are cut from. "
            f"Fix: data.image_size<={resize} (the paper: 32 px crops of 48 px images)."
        )
    return cls


def check_model(cfg: DictConfig) -> None:
    model = cfg.get("model")
    if not isinstance(model, DictConfig) or "_target_" not in model:
        return
    from capsnets.registry import resolve

    cls = resolve("model", model._target_, "model._target_")
    check_settings("model", model, constructor_hints(cls), skip=("net", "routing"))  # loss, optimizer, scheduler
    network = getattr(cls, "network", None)
    net = model.get("net")
    if network is not None and isinstance(net, DictConfig):
        hints = {**constructor_hints(network), **getattr(cls, "net_settings", {})}
        check_settings("model.net", net, hints, skip=("routing",))
    data = cfg.get("data")
    if isinstance(net, DictConfig) and isinstance(data, DictConfig):
        for key in ("in_channels", "image_size", "num_classes"):
            if key in net and key in data and net[key] != data[key]:
                raise ConfigError(
                    f"model.net.{key}={net[key]} but the data has data.{key}={data[key]}: the network would fail "
                    f"at its first step. Fix: drop the model.net.{key} override (it follows the data by default), "
                    f"or set data.{key}={net[key]} for data that really has it."
                )
    if (
        isinstance(net, DictConfig)
        and isinstance(data, DictConfig)
        and net.get("reconstruction")
        and data.get("normalize")
    ):
        raise ConfigError(
            "data.normalize=true standardises the images to values outside [0, 1], but the model's decoder "
            "(model.net.reconstruction=true) reconstructs them through a sigmoid, so its loss could never reach zero. "
            "Fix: data.normalize=false (inputs in [0, 1]), or model.net.reconstruction=false."
        )
    loss = model.get("loss")
    if isinstance(loss, DictConfig):
        check_loss(loss)
    scheduler = model.get("scheduler")
    if isinstance(scheduler, DictConfig):
        from capsnets.models.base import check_schedule

        check_schedule(OmegaConf.to_container(scheduler, resolve=True))


def check_loss(loss: DictConfig) -> None:
    """Cross-field rules of ``model.loss`` (each value is already checked against its annotation)."""
    if "m_plus" in loss and "m_minus" in loss and loss.m_plus <= loss.m_minus:
        raise ConfigError(
            f"model.loss.m_plus={loss.m_plus} must be larger than model.loss.m_minus={loss.m_minus} "
            f"(the margin loss pushes the true class above m_plus and the others below m_minus). "
            f"Fix: the paper's model.loss.m_plus=0.9 model.loss.m_minus=0.1."
        )
    schedule = loss.get("margin_schedule")
    if isinstance(schedule, DictConfig) and "start" in schedule and "end" in schedule and schedule.start > schedule.end:
        raise ConfigError(
            f"model.loss.margin_schedule: start={schedule.start} > end={schedule.end}, a decreasing "
            f"margin (the spread loss's margin grows during training). Fix: the paper's start=0.2 end=0.9."
        )


def uses_gpu(trainer: Any) -> bool:
    """Whether ``trainer`` (its config) trains on CUDA GPUs: asked for, or ``auto`` on a machine that has one."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto")) if isinstance(trainer, DictConfig) else "auto"
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.device_count() > 0)


def check_trainer(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return
    import torch

    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", 1)
    gpus = torch.cuda.device_count()
    on_gpu = uses_gpu(trainer)
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU. Fix: trainer=cpu (one process), "
            f"or trainer=ddp_sim (real DDP on 2 CPU processes) to try multi-process training."
        )
    if isinstance(devices, int) and not isinstance(devices, bool):
        available = gpus if on_gpu else os.cpu_count() or 1
        what = "GPUs" if on_gpu else "CPU cores"
        if devices < -1 or devices == 0 or devices > available:
            raise ConfigError(
                f"trainer.devices={devices}, but this machine has {available} {what}. "
                f"Fix: trainer.devices=<1..{available}> (or -1 for all)."
            )
    elif not (isinstance(devices, (str, list, ListConfig)) and not isinstance(devices, bool)):
        raise ConfigError(f"trainer.devices must be an integer, a list or 'auto', got {devices!r}.")
    check_settings("trainer", trainer, _hints(TrainerSettings), closed=False)  # Lightning's Trainer takes the rest


def check_config(cfg: DictConfig, *, choices: Mapping[str, Any] | None = None, config_dir: Path | None = None) -> None:
    """Every typed and cross-field check of a composed ``train.py`` config (see the module docstring)."""
    if config_dir is not None:
        check_optional_groups(choices, config_dir)
    check_top_level(cfg)
    check_data(cfg)
    check_model(cfg)
    check_trainer(cfg)
    check_compile_config(cfg)


def check_compile_config(cfg: DictConfig) -> None:
    """``compile`` against the machine (a C++ compiler for inductor on a CPU) and the model (a graph break in a
    ``fullgraph`` compile)."""
    settings = cfg.get("compile")
    if not isinstance(settings, DictConfig) or not settings.get("enabled", False):
        return
    check_compile(settings, on_gpu=uses_gpu(cfg.get("trainer")))
    routing = OmegaConf.select(cfg, "model.routing.name", default=None)
    if settings.get("fullgraph", False) and routing is not None:
        from capsnets.nn.routing import ROUTINGS  # the package: every routing registered

        if any(not cls.compiles_whole for cls in ROUTINGS.get(routing, {}).values()):
            raise ConfigError(
                f"compile.fullgraph=true, but model/routing={routing} breaks the compiled graph (random routing "
                "draws its fixed logits with a torch.Generator, which cannot be made inside one). Fix: "
                "compile.fullgraph=false (that part then runs eagerly), or another routing."
            )


def check_eval_config(
    cfg: DictConfig, *, choices: Mapping[str, Any] | None = None, config_dir: Path | None = None
) -> dict[str, Any]:
    """Every check of a composed ``eval.py`` config that needs no file (the checkpoint is checked when it is
    read); returns its settings as :func:`check_eval_settings` does."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(
            "ckpt_path is required. Fix: python eval.py ckpt_path=outputs/train/runs/<date>/checkpoints/last.ckpt"
        )
    if config_dir is not None:
        check_optional_groups(choices, config_dir)
    check_top_level(cfg)
    check_data(cfg)
    check_trainer(cfg)
    return check_eval_settings(cfg)


def check_eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """Check ``split``, ``viewpoints``, ``test_crops`` and ``data_overrides`` (config only, nothing read);
    returns them with the data overrides as one plain dict (``test_crops`` folded in)."""
    check_settings("", cfg, _hints(EvalSettings), closed=False)
    split = cfg.get("split", "test")
    viewpoints = cfg.get("viewpoints")
    # which viewpoints exist is the DataModule's to check (set_test_viewpoints)
    if viewpoints is not None and split != "test":
        raise ConfigError(
            f"viewpoints={viewpoints} selects rows of the test split, but split={split}. "
            f"Fix: drop viewpoints= (the {split} split has the training viewpoints), or pass split=test."
        )
    overrides_cfg = cfg.get("data_overrides")
    overrides: dict[str, Any] = {} if overrides_cfg is None else OmegaConf.to_container(overrides_cfg, resolve=True)
    crops = cfg.get("test_crops")
    if crops is not None:
        if overrides.get("test_crops", crops) != crops:
            raise ConfigError(
                f"test_crops={crops} and data_overrides.test_crops={overrides['test_crops']} disagree. "
                "Fix: pass only one."
            )
        overrides["test_crops"] = crops
    return {"split": split, "viewpoints": viewpoints, "data_overrides": overrides}


def runtime_choices(cfg: DictConfig) -> Mapping[str, Any] | None:
    """The group -> option choices of the running Hydra job (or of a config composed with its hydra node)."""
    if "hydra" in cfg and OmegaConf.select(cfg, "hydra.runtime.choices") is not None:
        return OmegaConf.to_container(cfg.hydra.runtime.choices)  # type: ignore[return-value]
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return OmegaConf.to_container(HydraConfig.get().runtime.choices)  # type: ignore[return-value]
    return None
