"""The classes capsnets builds from what a file names: checkpoints carry data, never code.

A checkpoint records the LightningModule and DataModule it came from as dotted paths
(``capsnets.models.em_caps.EMCapsModule``). ``eval.py`` and resume build only a class that is
registered here, looked up by that path; anything else (``subprocess.run``, ``os.system``, a class
of another package) is refused with a :class:`~capsnets.errors.ConfigError` before anything is
imported or called. The built-in models and DataModules register themselves with the decorators
below; a researcher's own class registers the same way, in code they run::

    from capsnets.registry import register_model

    @register_model
    class MyCapsModule(CapsuleClassifier): ...
"""

from __future__ import annotations

from typing import TypeVar

from capsnets.errors import ConfigError

T = TypeVar("T", bound=type)

_REGISTRIES: dict[str, dict[str, type]] = {"model": {}, "datamodule": {}}
_BUILTIN_PACKAGES = {"model": "capsnets.models", "datamodule": "capsnets.data"}


def _register(kind: str, cls: T) -> T:
    registry = _REGISTRIES[kind]
    registry[f"{cls.__module__}.{cls.__qualname__}"] = cls
    package = _BUILTIN_PACKAGES[kind]
    if cls.__module__.startswith(package + "."):  # the public path too: capsnets.models.EMCapsModule
        registry[f"{package}.{cls.__qualname__}"] = cls
    return cls


def register_model(cls: T) -> T:
    """Class decorator: ``cls`` (a LightningModule) may be rebuilt from a checkpoint that names it."""
    return _register("model", cls)


def register_datamodule(cls: T) -> T:
    """Class decorator: ``cls`` (a LightningDataModule) may be rebuilt from a checkpoint or config that names it."""
    return _register("datamodule", cls)


def registered(kind: str) -> dict[str, type]:
    """Dotted path -> class of every registered ``kind`` (``model`` or ``datamodule``), built-ins included."""
    import importlib

    importlib.import_module(_BUILTIN_PACKAGES[kind])  # the built-ins register on import
    return dict(_REGISTRIES[kind])


def resolve(kind: str, path: object, source: str) -> type:
    """The registered ``kind`` class at dotted ``path``; ConfigError naming ``source`` for anything else.

    Nothing named by ``path`` is imported or called unless it is registered.
    """
    classes = registered(kind)
    if isinstance(path, str) and path in classes:
        return classes[path]
    names = sorted({f"{cls.__module__}.{cls.__qualname__}" for cls in classes.values()})
    raise ConfigError(
        f"{source} names {kind} class {path!r}, which capsnets does not build: checkpoints and data files carry "
        f"data, never code, so only registered classes are rebuilt ({', '.join(names)}). Fix: evaluate a "
        f"checkpoint written by a capsnets run; for a class of your own, decorate it with "
        f"capsnets.registry.register_{kind} in code you import."
    )
