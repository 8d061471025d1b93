"""Exceptions with messages that name the problem and the fix.

Raised before any training starts, so nothing a run already wrote is touched.
"""


class CapsnetsError(Exception):
    """Base class for every error capsnets raises on purpose."""


class ConfigError(CapsnetsError, ValueError):
    """A config value is outside its allowed range; the message names the key."""


class DataError(CapsnetsError, OSError):
    """A dataset file is missing, truncated or in the wrong format; the message names the file."""
