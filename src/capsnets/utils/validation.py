"""Small checks used by constructors so that bad config values fail before training.

Each message names the config key (e.g. ``model.net.routing_iterations``), the value
received and the allowed range, so the fix is obvious from the command line.
"""

from __future__ import annotations

import difflib
import math
from numbers import Integral, Real
from typing import Any

from capsnets.errors import ConfigError


def require_int(key: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` as int if it is an integer in [``minimum``, ``maximum``], else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}. Fix: pass {key}=<int >= {minimum}>.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be an integer in [{minimum}, {maximum}], got {value!r}.")
    return int(value)


def require_bool(key: str, value: Any) -> bool:
    """Return ``value`` if it is a real boolean (a string such as ``no`` is not), else raise ConfigError."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}. Fix: {key}=true or {key}=false.")
    return value


def require_positive(key: str, value: Any) -> float:
    """Return ``value`` as float if it is a finite number > 0, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}. Fix: pass {key}=<number > 0>.")
    return float(value)


def require_range(key: str, value: Any, low: float, high: float) -> float:
    """Return ``value`` as float if ``low <= value <= high``, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (low <= value <= high):
        raise ConfigError(
            f"{key} must be a number in [{low}, {high}], got {value!r}. Fix: pass {key}=<value in [{low}, {high}]>."
        )
    return float(value)


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ConfigError listing them."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {key}={close[0]}?" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}.{hint}")
    return value


def require_int_lists(prefix: str, lists: dict[str, Any], *, min_length: int = 0) -> None:
    """Parallel lists of positive integers (one entry per layer): the same length (>= ``min_length``), every entry an
    int >= 1; ConfigError naming the keys (``prefix`` + name) otherwise."""
    names, values = list(lists), [list(v) for v in lists.values()]
    if len({len(v) for v in values}) != 1 or len(values[0]) < min_length:
        keys = ", ".join(f"{prefix}{n}" for n in names)
        raise ConfigError(
            f"{keys} must be lists of the same length >= {min_length}, got {', '.join(str(v) for v in values)}."
        )
    for name, items in zip(names, values):
        for i, value in enumerate(items):
            require_int(f"{prefix}{name}[{i}]", value)
