"""Exceptions with messages that name the problem and the fix.

Raised before any training starts, so nothing a run already wrote is touched.
"""


class CapsnetsError(Exception):
    """Base class for every error capsnets raises on purpose."""


class ConfigError(CapsnetsError, ValueError):
    """A config value is outside its allowed range; the message names the key."""


class DataError(CapsnetsError, OSError):
    """A dataset file is missing, truncated or in the wrong format; the message names the file."""


FAILED_JOB_FILE = "failed.json"  # written into a multirun job's folder when the job fails (capsnets.sweep_report)


def exit_on_error(main):
    """Decorator for a Hydra task function.

    Single run: a :class:`CapsnetsError` ends the run with its message on stderr and exit code 2, without a
    traceback (the message already names the key and the fix); any other exception keeps Hydra's report.
    Multirun: a failed job (any exception) is reported on stderr (one line for a capsnets error, the
    traceback for anything else), recorded as ``failed.json`` in its folder, and the sweep goes on with the
    next job (the task returns NaN, which Optuna records as a failed trial); after the sweep,
    :class:`capsnets.sweep_report.SweepReport` names every failed job and exits 2. ``multirun_fail_fast=true``
    stops the sweep at the first failure instead (exit 2). An error with an ``exit_code`` (an interruption by a
    signal) ends the process with that code in either mode.
    """
    import functools
    import sys

    @functools.wraps(main)
    def task(cfg):
        try:
            return main(cfg)
        except Exception as exc:  # noqa: BLE001 - reported below, or raised on as Hydra would
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            code = getattr(exc, "exit_code", None)  # Interrupted: 128 + signal, and a sweep stops there too
            multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            if code is None and not multirun:
                if not isinstance(exc, CapsnetsError):
                    raise
                print(f"Error: {exc}", file=sys.stderr, flush=True)
                sys.exit(2)
            if code is not None:
                print(f"Interrupted: {exc}", file=sys.stderr, flush=True)
                sys.exit(code)
            record_failed_job(exc)
            if cfg.get("multirun_fail_fast", False) is True:
                print("Stopping the sweep: multirun_fail_fast=true.", file=sys.stderr, flush=True)
                sys.exit(2)
            return float("nan")

    return task


def record_failed_job(exc: BaseException) -> None:
    """Report a failed multirun job on stderr and in ``failed.json`` in its output folder."""
    import json
    import sys
    import traceback
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    job = f"job {hydra.job.num} ({' '.join(hydra.overrides.task)})"
    if isinstance(exc, CapsnetsError):
        message = str(exc)
        print(f"Error in {job}: {message}", file=sys.stderr, flush=True)
    else:
        message = f"{type(exc).__name__}: {exc}"
        print(f"Error in {job}:", file=sys.stderr, flush=True)
        traceback.print_exc()
    out = Path(hydra.runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"job": hydra.job.num, "overrides": list(hydra.overrides.task), "error": message}
    (out / FAILED_JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")
