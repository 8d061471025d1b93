"""Weights & Biases for Hydra jobs: one W&B run per job, online when it can be, offline otherwise.

:func:`wandb_logger` is the ``_target_`` of ``conf/logger/wandb.yaml``. It decides the mode once per
job and passes it to ``wandb.init`` (``mode=``), never through ``os.environ``, so one job's mode never
leaks into the next job of a multirun:

1. ``logger.wandb.mode`` when set (``online`` / ``offline`` / ``disabled``);
2. else ``$WANDB_MODE`` from the environment (``dryrun`` counts as offline, ``run`` as online);
3. else online when an API key is found (``$WANDB_API_KEY`` or ``wandb login``'s netrc entry) and the
   W&B server (``$WANDB_BASE_URL``, ``wandb login --host``'s, or wandb.ai) answers within
   ``network_timeout`` seconds; offline otherwise.

Online without a key or a network never prompts and never crashes: it falls back to offline with one
line saying why; so does an online start that fails later (e.g. an invalid key). Every file W&B
writes for the run stays under ``<run dir>/wandb/`` (see :class:`RunDirWandbLogger`). Offline runs land in
``<run dir>/wandb/offline-run-*`` and :func:`finish_loggers` prints the ``wandb sync`` command that uploads them later.
"""

from __future__ import annotations

import configparser
import contextlib
import logging
import netrc
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from capsnets.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
_ENV_ALIASES = {"dryrun": "offline", "run": "online", "online": "online", "offline": "offline", "disabled": "disabled"}
DEFAULT_BASE_URL = "https://api.wandb.ai"


def _settings_base_url() -> str | None:
    """The server ``wandb login --host`` stored in W&B's settings file (``$WANDB_CONFIG_DIR/settings``)."""
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
    except (configparser.Error, OSError):
        return None
    return parser.get("default", "base_url", fallback=None) or None


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or _settings_base_url() or DEFAULT_BASE_URL


def find_api_key() -> str | None:
    """The W&B API key from ``$WANDB_API_KEY`` or from the netrc entry ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = urlparse(_base_url()).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError, OSError):
        return None
    return entry[2] if entry and entry[2] else None


def server_reachable(timeout: float) -> bool:
    """Whether the W&B server answers an HTTP request within ``timeout`` seconds (any HTTP status
    counts; proxies from ``HTTPS_PROXY``/``HTTP_PROXY`` are used like W&B itself does)."""
    request = urllib.request.Request(_base_url(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered (e.g. 401/404)
    except (OSError, ValueError):
        return False


def resolve_mode(mode: str | None, network_timeout: float = 3.0) -> tuple[str, str]:
    """``(mode, reason)`` for this job; see the module docstring for the order of precedence."""
    if mode is not None and mode != "auto":
        if mode not in MODES:
            raise ConfigError(f"logger.wandb.mode must be one of {', '.join(MODES)} or null (auto), got {mode!r}.")
        requested, source = mode, "logger.wandb.mode"
    elif os.environ.get("WANDB_MODE"):
        env = os.environ["WANDB_MODE"].strip().lower()
        if env not in _ENV_ALIASES:
            raise ConfigError(
                f"WANDB_MODE={os.environ['WANDB_MODE']!r} is not a W&B mode. Fix: set it to online, offline or "
                "disabled, or unset it to let capsnets choose."
            )
        requested, source = _ENV_ALIASES[env], "WANDB_MODE"
    else:
        requested, source = "online", "auto"
    if requested != "online":
        return requested, f"{source}={requested}"
    if getattr(rank_zero_only, "rank", 0) > 0:
        return "online", "not rank 0 (no run of its own)"  # only rank 0 starts a run: no probe
    if find_api_key() is None:
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login` to log online)"
    if not server_reachable(network_timeout):
        return "offline", f"W&B server {_base_url()} not reachable"
    return "online", source


def _hydra_job() -> tuple[str | None, list[str], str | None, str | None]:
    """(mode, overrides, sweep folder name, job name) of the running Hydra job, Nones outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, [], None, None
    hc = HydraConfig.get()
    mode = "multirun" if hc.mode == RunMode.MULTIRUN else "run"
    return mode, list(hc.overrides.task), Path(hc.sweep.dir).name, hc.job.name


@contextlib.contextmanager
def _files_under(save_dir: str | None):
    """While W&B starts or attaches to a run, or stages artifacts, point every folder it would
    otherwise pick by itself (the current directory, ``~/.local/share/wandb`` for artifact staging,
    ``~/.cache/wandb``) into ``<save_dir>``; the previous environment is restored afterwards, so
    nothing carries over to the next job of a multirun."""
    root = Path(save_dir or ".").resolve()
    wanted = {
        "WANDB_DIR": root,
        "WANDB_DATA_DIR": root / "wandb" / "data",
        "WANDB_CACHE_DIR": root / "wandb" / "cache",
        "WANDB_ARTIFACT_DIR": root / "wandb" / "artifacts",
    }
    previous = {key: os.environ.get(key) for key in wanted}
    os.environ.update({key: str(value) for key, value in wanted.items()})
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RunDirWandbLogger(WandbLogger):
    """Lightning's :class:`WandbLogger`, keeping every file of the run under ``save_dir`` and never
    failing a job because W&B is unreachable.

    - Files: under ``ddp_spawn`` the workers attach to the run the launching process created, and
      W&B would place what they log relative to the worker's current directory; checkpoint
      artifacts are staged in the user's data folder. Both go under ``<run dir>/wandb/`` here.
    - Online start-up failures (an invalid key, a server that does not answer): the run starts
      offline instead, with one line saying why.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        with _files_under(self.save_dir):
            if self._wandb_init.get("mode") != "online" or getattr(self, "_attach_id", None) is not None:
                return WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
            try:
                return WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
            except Exception as err:  # noqa: BLE001 - any start-up failure: keep the job, log offline
                import wandb

                if wandb.run is not None:
                    wandb.run.finish(exit_code=1)
                self._experiment = None
                self._wandb_init["mode"] = "offline"
                log.warning("W&B offline: could not start an online run (%s: %s).", type(err).__name__, err)
                return WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]

    def _scan_and_log_checkpoints(self, checkpoint_callback: Any) -> None:
        with _files_under(self.save_dir):
            super()._scan_and_log_checkpoints(checkpoint_callback)


def wandb_logger(
    project: str = "capsnets",
    entity: str | None = None,
    mode: str | None = None,
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    save_dir: str = ".",
    log_model: bool | str = False,
    task_name: str = "train",
    network_timeout: float = 3.0,
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning :class:`WandbLogger` for this Hydra job (arguments documented in ``conf/logger/wandb.yaml``).

    Defaults filled in from the job: ``name`` = the job's overrides (or the run folder's name),
    ``group`` = ``task_name`` for one run and ``<task_name>/<sweep folder>`` for a multirun,
    ``job_type`` = the script (``train`` / ``eval``).
    """
    if log_model not in (False, True, "all"):
        raise ConfigError(
            "logger.wandb.log_model must be false, true (checkpoints at the end) or 'all' (every checkpoint), "
            f"got {log_model!r}."
        )
    if not project:
        raise ConfigError("logger.wandb.project must name a W&B project, e.g. logger.wandb.project=capsnets.")
    resolved, reason = resolve_mode(mode, network_timeout)
    hydra_mode, overrides, sweep_name, job_name = _hydra_job()
    save_path = Path(save_dir)
    if name is None:
        name = " ".join(overrides) if overrides else save_path.resolve().name
    if group is None:
        group = f"{task_name}/{sweep_name}" if hydra_mode == "multirun" and sweep_name else task_name
    if job_type is None:
        job_type = job_name or "train"
    if getattr(rank_zero_only, "rank", 0) > 0:
        pass  # other DDP ranks never start a run of their own: nothing to say
    elif resolved == "offline":
        log.warning("W&B offline: %s. The run is kept under %s.", reason, save_path / "wandb")
    else:
        log.info("W&B %s (%s): project=%s group=%s name=%s", resolved, reason, project, group, name)
    save_path.mkdir(parents=True, exist_ok=True)
    if "settings" not in kwargs:
        import wandb

        # W&B's own end-of-run banner is long; finish_loggers prints the one line that matters
        kwargs["settings"] = wandb.Settings(quiet=True)
    return RunDirWandbLogger(
        project=project,
        entity=entity,
        name=name,
        group=group,
        job_type=job_type,
        tags=list(tags or []),
        save_dir=str(save_path),
        log_model=log_model,
        mode=resolved,
        **kwargs,
    )


def finish_loggers(loggers: list[Logger], failed: bool = False) -> None:
    """Finish every W&B run this job started (call in a ``finally``), so the next job of a multirun
    starts its own run; for offline runs, say how to upload them."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or getattr(logger, "_experiment", None) is None:
            continue
        run = logger._experiment
        try:
            offline = getattr(run.settings, "mode", None) == "offline"
            run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
            run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # finishing must never hide the job's own result or error
            log.warning("Could not finish the W&B run cleanly: %s", err)
            continue
        finally:
            logger._experiment = None
        if offline and run_dir is not None and run_dir.exists():
            print(f"W&B run saved offline; upload it with: wandb sync {run_dir}", flush=True)
