"""Exceptions with messages that name the problem and the fix.

Raised before any training starts, so nothing a run already wrote is touched.
"""


class CapsnetsError(Exception):
    """Base class for every error capsnets raises on purpose."""


class ConfigError(CapsnetsError, ValueError):
    """A config value is outside its allowed range; the message names the key."""


class DataError(CapsnetsError, OSError):
    """A dataset file is missing, truncated or in the wrong format; the message names the file."""


def exit_on_error(main):
    """Decorator for a Hydra task function: a :class:`CapsnetsError` ends a single run with its message on
    stderr and exit code 2, without a traceback (the message already names the key and the fix). In a
    multirun the error is raised on, so the launcher records the failed job and runs the next. An error
    with an ``exit_code`` (an interruption by a signal) ends the process with that code in either mode."""
    import functools
    import sys

    @functools.wraps(main)
    def task(cfg):
        try:
            return main(cfg)
        except CapsnetsError as exc:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            code = getattr(exc, "exit_code", None)  # Interrupted: 128 + signal, and a sweep stops there too
            if code is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            print(f"{'Interrupted' if code else 'Error'}: {exc}", file=sys.stderr, flush=True)
            sys.exit(code or 2)

    return task
