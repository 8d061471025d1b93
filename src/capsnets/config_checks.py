"""Typed checks of a composed config, run once before anything is built, read or written.

The types come from where the values go: each LightningModule's network, each DataModule and each
routing procedure declares its settings with type annotations in its constructor, and these checks
read them (``typing.get_type_hints``), so a new setting is typed the moment it is added. On top:

* booleans are booleans (``model.net.reconstruction=no`` is refused, not "truthy"), integers are
  integers, numbers are numbers, choices are choices, ranges are ranges;
* cross-field rules in one place: the model's input shape and classes against the data's, spread and
  margin-loss margins, the margin schedule, random shifts and crops against the image, ``train=false``
  without a checkpoint, devices against the machine, Lightning's loop intervals;
* an option of an optional group that does not exist (``experiment=sabour2017_mnsit``,
  ``debug=fastest``), which Hydra drops without a word, with a "did you mean".

Every problem is a :class:`~capsnets.errors.ConfigError` naming the key, the value, what is allowed
and the override that fixes it; ``train.py`` / ``eval.py`` print it as one line and exit with code 2.
``check_config`` checks a ``train.py`` config, ``check_eval_config`` an ``eval.py`` one. The constructors
keep their own range checks for direct (non-Hydra) use; both layers call the same ``utils.validation``
helpers, so a value is refused with the same message wherever it is set.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from capsnets.data.base import EVAL_SPLITS
from capsnets.errors import ConfigError
from capsnets.utils.validation import require_bool, require_choice, require_int, require_range

# optional config groups whose misspelled option Hydra would silently drop
OPTIONAL_GROUPS = ("experiment", "debug", "hparams_search")


# --------------------------------------------------------------------------- types from annotations
def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (list, tuple, Sequence, typing.Sequence):
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a constructor's type annotation (unknown / Any annotations accept all)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)) or isinstance(value, str):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(matches(v, args[0]) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, (dict, DictConfig))
    return True


def constructor_hints(cls: type) -> dict[str, Any]:
    """Keyword -> annotation of ``cls.__init__``, following ``**kwargs`` up the class hierarchy."""
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            annotations = typing.get_type_hints(klass.__init__)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: accept any value for it
            annotations = {}
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                hints.setdefault(p.name, annotations.get(p.name, Any))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return hints


def check_types(prefix: str, values: Mapping[str, Any], hints: Mapping[str, Any], skip: Sequence[str] = ()) -> None:
    """ConfigError for the first value whose type does not fit; unknown keys name the valid ones."""
    for key, value in values.items():
        if key.startswith("_") or key in skip:
            continue
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" Did you mean {prefix}.{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}.{key} is not a setting here.{hint} Settings: {', '.join(sorted(hints))}.")
        if not matches(value, hints[key]):
            raise ConfigError(
                f"{prefix}.{key} must be {_type_name(hints[key])}, got {value!r}. "
                f"Fix: {prefix}.{key}=<{_type_name(hints[key])}>."
            )


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
    for key in ("train", "test", "multirun_fail_fast"):
        if key in cfg:
            require_bool(key, cfg[key])
    seed = cfg.get("seed")
    if seed is not None:
        require_int("seed", seed, minimum=0, maximum=2**32 - 1)
    if "nonfinite" in cfg:
        require_choice("nonfinite", cfg.nonfinite, ("stop", "skip"))
    if "nonfinite_max_skips" in cfg:
        require_int("nonfinite_max_skips", cfg.nonfinite_max_skips)
    if cfg.get("train") is False and cfg.get("test", True) and not cfg.get("ckpt_path"):
        raise ConfigError(
            "train=false tests a model without training it, but no ckpt_path is given: it would score random "
            "weights. Fix: pass ckpt_path=<.ckpt> (or use eval.py ckpt_path=<.ckpt>), or drop train=false."
        )
    metric = cfg.get("optimized_metric")
    if metric is not None:
        known = ("val/acc", "val/loss", "train/acc", "train/loss", "test/acc", "test/loss")
        require_choice("optimized_metric", metric, known)


def check_data(cfg: DictConfig) -> type | None:
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or "_target_" not in data:
        return None
    from capsnets.registry import resolve

    cls = resolve("datamodule", data._target_, "data._target_")
    check_types("data", data, constructor_hints(cls))
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
    network = getattr(cls, "network", None)
    net = model.get("net")
    if network is not None and isinstance(net, DictConfig):
        hints = constructor_hints(network)
        extra = getattr(cls, "net_settings", {})
        check_types("model.net", net, {**hints, **extra}, skip=("routing",))
    data = cfg.get("data")
    if isinstance(net, DictConfig) and isinstance(data, DictConfig):
        for key in ("in_channels", "image_size", "num_classes"):
            if key in net and key in data and net[key] != data[key]:
                raise ConfigError(
                    f"model.net.{key}={net[key]} but the data has data.{key}={data[key]}: the network would fail "
                    f"at its first step. Fix: drop the model.net.{key} override (it follows the data by default), "
                    f"or set data.{key}={net[key]} for data that really has it."
                )
    loss = model.get("loss")
    if isinstance(loss, DictConfig):
        if "m_plus" in loss and "m_minus" in loss:
            require_range("model.loss.m_plus", loss.m_plus, 0.0, 1.0)
            require_range("model.loss.m_minus", loss.m_minus, 0.0, 1.0)
            if loss.m_plus <= loss.m_minus:
                raise ConfigError(
                    f"model.loss.m_plus={loss.m_plus} must be larger than model.loss.m_minus={loss.m_minus} "
                    f"(the margin loss pushes the true class above m_plus and the others below m_minus). "
                    f"Fix: the paper's model.loss.m_plus=0.9 model.loss.m_minus=0.1."
                )
        if "down_weight" in loss:
            require_range("model.loss.down_weight", loss.down_weight, 0.0, math.inf)
        schedule = loss.get("margin_schedule")
        if isinstance(schedule, DictConfig):
            if "schedule" in schedule:
                require_choice(
                    "model.loss.margin_schedule.schedule", schedule.schedule, ("linear", "sigmoid", "constant")
                )
            for key in ("start", "end"):
                if key in schedule:
                    require_range(f"model.loss.margin_schedule.{key}", schedule[key], 0.0, 1.0)
            if "start" in schedule and "end" in schedule and schedule.start > schedule.end:
                raise ConfigError(
                    f"model.loss.margin_schedule: start={schedule.start} > end={schedule.end}, a decreasing "
                    f"margin (the spread loss's margin grows during training). Fix: the paper's start=0.2 end=0.9."
                )


def check_trainer(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return
    import torch

    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", 1)
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU. Fix: trainer=cpu (one process), "
            f"or trainer=ddp_sim (real DDP on 2 CPU processes) to try multi-process training."
        )
    if isinstance(devices, int) and not isinstance(devices, bool):
        available = gpus if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus) else os.cpu_count() or 1
        what = "GPUs" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus) else "CPU cores"
        if devices < -1 or devices == 0 or devices > available:
            raise ConfigError(
                f"trainer.devices={devices}, but this machine has {available} {what}. "
                f"Fix: trainer.devices=<1..{available}> (or -1 for all)."
            )
    elif not (isinstance(devices, (str, list, ListConfig)) and not isinstance(devices, bool)):
        raise ConfigError(f"trainer.devices must be an integer, a list or 'auto', got {devices!r}.")
    for key in ("max_epochs", "min_epochs"):
        value = trainer.get(key)
        if value is not None:
            require_int(f"trainer.{key}", value, minimum=-1)
    if trainer.get("accumulate_grad_batches") is not None:
        require_int("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches)
    interval = trainer.get("val_check_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0):
        raise ConfigError(
            f"trainer.val_check_interval must be > 0 (a fraction of an epoch, or a number of batches), "
            f"got {interval!r}. Fix: trainer.val_check_interval=1.0 (once per epoch)."
        )
    if trainer.get("log_every_n_steps") is not None:
        require_int("trainer.log_every_n_steps", trainer.log_every_n_steps)
    check_every = trainer.get("check_val_every_n_epoch")
    if check_every is not None:
        require_int("trainer.check_val_every_n_epoch", check_every)
    for key in ("deterministic", "sync_batchnorm", "enable_checkpointing", "enable_progress_bar"):
        if (
            key in trainer
            and not isinstance(trainer[key], bool)
            and not (key == "deterministic" and trainer[key] == "warn")
        ):
            require_bool(f"trainer.{key}", trainer[key])


def check_config(cfg: DictConfig, *, choices: Mapping[str, Any] | None = None, config_dir: Path | None = None) -> None:
    """Every typed and cross-field check of a composed ``train.py`` config (see the module docstring)."""
    if config_dir is not None:
        check_optional_groups(choices, config_dir)
    check_top_level(cfg)
    check_data(cfg)
    check_model(cfg)
    check_trainer(cfg)


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
    split = require_choice("split", cfg.get("split", "test"), EVAL_SPLITS)
    viewpoints = cfg.get("viewpoints")
    # which viewpoints exist is the DataModule's to check (set_test_viewpoints)
    if viewpoints is not None and split != "test":
        raise ConfigError(
            f"viewpoints={viewpoints} selects rows of the test split, but split={split}. "
            f"Fix: drop viewpoints= (the {split} split has the training viewpoints), or pass split=test."
        )
    overrides_cfg = cfg.get("data_overrides")
    if overrides_cfg is None:
        overrides: dict[str, Any] = {}
    elif isinstance(overrides_cfg, DictConfig):
        overrides = OmegaConf.to_container(overrides_cfg, resolve=True)  # type: ignore[assignment]
    else:
        raise ConfigError(
            f"data_overrides must be a mapping of data settings, got {overrides_cfg!r}. "
            f"Fix: 'data_overrides={{batch_size: 256}}' or +data_overrides.batch_size=256."
        )
    crops = cfg.get("test_crops")
    if crops is not None:
        crops = require_int("test_crops", crops, minimum=1)
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
