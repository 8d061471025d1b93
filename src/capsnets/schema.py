"""The schema of every setting: type annotations that carry their rules, and the one function that checks them.

A constructor declares each setting it takes with an annotation, and the annotation is the whole per-setting rule:

* ``bool``: true or false (a string such as ``no`` is refused, not taken as "truthy"); ``int``: an integer, never
  a boolean; ``float``: a finite number (an integer is a number); ``str``: a string;
* ``Literal["a", "b"]``: a choice (a close misspelling gets a "did you mean");
* ``Annotated[int, Range(1)]``: a range (:class:`Range`; readable aliases below: :data:`PositiveInt`,
  :data:`Fraction`, ...). Every ``int`` and ``float`` setting carries a Range, ``Range()`` for a number that may
  take any finite value on purpose (a test walks the registered classes and holds them to it);
* ``Sequence[PositiveInt]``, ``tuple[X, Y]``: lists, checked entry by entry (``key[i]``); ``X | None``: null too;
* a ``TypedDict``: a mapping of named settings (``model.optimizer``), closed unless annotated
  :class:`OtherKeys`; ``Annotated[Mapping[str, Any], SettingsOf(cls)]``: a mapping of ``cls``'s constructor settings.

:func:`check_value` is the one check, and the same annotations feed it twice: at compose time
(:mod:`capsnets.config_checks` reads every constructor with :func:`constructor_hints` and checks the composed config
before anything is built) and at construction (:func:`checked` on a constructor checks the arguments it is given,
e.g. a network built from Python), so a value is refused with the same message wherever it is set: the key, the
value, what is allowed and the override that fixes it. Rules that relate several settings (parallel lists of one
length, ``nu0 > D - 1``, ``m_plus > m_minus``) are code that raises :class:`~capsnets.errors.ConfigError`:
:mod:`capsnets.config_checks` for the config, beside the constructor for rules that need what it builds.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from capsnets.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- markers
@dataclass(frozen=True)
class Range:
    """The numbers a setting allows: ``low <= x <= high`` (``<`` where ``low_open`` / ``high_open``); None: no bound
    on that side, ``Range()``: any finite number."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.low is None or x > self.low or (x == self.low and not self.low_open)
        below = self.high is None or x < self.high or (x == self.high and not self.high_open)
        return above and below

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1]``, or "" for no bound."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return ""


@dataclass(frozen=True)
class OtherKeys:
    """On a TypedDict: the mapping may hold keys beyond those declared (``where``: what takes them)."""

    where: str


@dataclass(frozen=True)
class SettingsOf:
    """On a mapping: its keys are the constructor settings of ``cls`` (``model.loss.margin_schedule``)."""

    cls: type


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
NumClasses = Annotated[int, Range(2)]  # a classification has two classes at least
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
BoundedFloat = Annotated[float, Range(-1e6, 1e6)]  # initial biases, prior means: any sign, a sane size


# --------------------------------------------------------------------------- reading annotations
def _split(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """(the type, its Annotated metadata), through ``Required`` / ``NotRequired`` / nested ``Annotated``."""
    marks: tuple[Any, ...] = ()
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            marks += hint.__metadata__
            hint = hint.__origin__
        elif origin in (typing.Required, typing.NotRequired):
            hint = typing.get_args(hint)[0]
        else:
            return hint, marks


def _mark(marks: tuple[Any, ...], kind: type) -> Any:
    return next((m for m in marks if isinstance(m, kind)), None)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_sequence(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple, Sequence) or hint in (list, tuple, Sequence)


def _is_mapping(hint: Any) -> bool:
    return typing.is_typeddict(hint) or typing.get_origin(hint) in (dict, Mapping) or hint in (dict, Mapping)


def _is_list(value: Any) -> bool:  # a list, a tuple or an OmegaConf ListConfig
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_dict(value: Any) -> bool:  # a dict or an OmegaConf DictConfig
    return isinstance(value, Mapping)


def _arms(hint: Any) -> list[Any]:
    """The members of a union (``X | None`` -> [X, None]), or [hint]."""
    base = _split(hint)[0]
    return list(typing.get_args(base)) if _is_union(base) else [hint]


def _is_none(hint: Any) -> bool:
    return _split(hint)[0] is type(None)


def _items(hint: Any) -> list[Any]:
    """The entry hints of a sequence hint: one per position for ``tuple[X, Y]``, else one for all."""
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    return args or [Any]


def _fixed_length(hint: Any) -> int | None:
    args = typing.get_args(hint)
    return len(args) if typing.get_origin(hint) is tuple and args and Ellipsis not in args else None


def type_name(hint: Any) -> str:
    """What a hint allows, in words: ``an integer >= 1``, ``one of a, b``, ``a finite number > 0 or null``."""
    hint, marks = _split(hint)
    span = _mark(marks, Range)
    rule = span.describe() if span is not None else ""
    if hint is type(None):
        return "null"
    if _is_union(hint):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if hint is int:
        return f"an integer {rule}".strip()
    if hint is float:
        bounded = span is not None and span.low is not None and span.high is not None
        return f"a number {rule}" if bounded else f"a finite number {rule}".strip()
    if _is_sequence(hint):
        n = _fixed_length(hint)
        return f"a list of {n}" if n else "a list"
    if _is_mapping(hint):
        return "a mapping"
    names = {bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def fits(value: Any, hint: Any) -> bool:
    """Whether a value fits an annotation: its type, range and entries (unknown or ``Any`` annotations take all)."""
    hint, marks = _split(hint)
    span = _mark(marks, Range) or Range()
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None):
        return value is None
    if _is_union(hint):
        return any(fits(value, a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and value in span
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value) and value in span
    if hint is str:
        return isinstance(value, str)
    if _is_sequence(hint):
        if not _is_list(value):
            return False
        entries, n = _items(hint), _fixed_length(hint)
        if n is not None:
            return len(value) == n and all(fits(v, h) for v, h in zip(value, entries))
        return all(fits(v, entries[0]) for v in value)
    if _is_mapping(hint):
        return _is_dict(value)
    if isinstance(hint, type):  # an object handed over in code (a built Routing, a Path)
        return isinstance(value, hint)
    return True  # a Callable, a TypeVar: not a config value, taken as is


# --------------------------------------------------------------------------- the check
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _problem(key: str, value: Any, hint: Any) -> str:
    """The message for a value that does not fit: the key, the value, what is allowed and the fix (a value
    given is told what values fit, not that null would too)."""
    arms = [a for a in _arms(hint) if not _is_none(a)] if value is not None else _arms(hint)
    kinds = [_split(a)[0] for a in arms]
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is typing.Literal:
        options = typing.get_args(kinds[0])
        kind = "a string, " if all(isinstance(c, str) for c in options) and not isinstance(value, str) else ""
        close = difflib.get_close_matches(str(value), [str(c) for c in options], n=1)
        hint_text = f" Did you mean {key}={close[0]}?" if close else ""
        return f"{key} must be {kind}one of {', '.join(map(str, options))}; got {value!r}.{hint_text}"
    if kinds == [bool]:
        return f"{key} must be true or false, got {value!r}. Fix: {key}=true or {key}=false."
    allowed = " or ".join(type_name(a) for a in arms)
    return f"{key} must be {allowed}, got {value!r}. Fix: {key}=<{allowed}>."


def check_value(key: str, value: Any, hint: Any) -> None:
    """The one check of a setting: ConfigError naming ``key``, the value, what ``hint`` allows and the fix, unless
    ``value`` fits. Lists are checked entry by entry (``key[i]``), mappings setting by setting (``key.name``)."""
    marks = _split(hint)[1]
    if value is None and any(_is_none(a) for a in _arms(hint)):
        return
    arms = [a for a in _arms(hint) if not _is_none(a)]
    if len(arms) == 1:
        arm, arm_marks = _split(arms[0])
        if _is_sequence(arm) and _is_list(value):
            entries, n = _items(arm), _fixed_length(arm)
            if n is not None and len(value) != n:
                raise ConfigError(f"{key} must be {type_name(arm)}, got {value!r}. Fix: {key}=<{type_name(arm)}>.")
            for i, entry in enumerate(value):
                check_value(f"{key}[{i}]", entry, entries[i] if n is not None else entries[0])
            return
        if _is_mapping(arm) and _is_dict(value):
            _check_mapping(key, value, arm, marks + arm_marks)
            return
    if not fits(value, hint):
        raise ConfigError(_problem(key, value, hint))


def _check_mapping(key: str, value: Any, hint: Any, marks: tuple[Any, ...]) -> None:
    """A mapping against its schema: a TypedDict's keys, or the constructor settings of ``SettingsOf(cls)``."""
    settings_of = _mark(marks, SettingsOf)
    if settings_of is not None:
        check_settings(key, value, constructor_hints(settings_of.cls))
    elif typing.is_typeddict(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        closed = _mark(marks, OtherKeys) is None
        check_settings(key, value, hints, closed=closed, required=required_keys(hint))
    elif (typing.get_args(hint) or (Any, Any))[-1] is not Any:  # dict[str, X]: every value an X
        for name, item in value.items():
            check_value(_join(key, str(name)), item, typing.get_args(hint)[-1])


def required_keys(typed_dict: type) -> list[str]:
    """The keys a TypedDict requires. Read from the resolved hints: under ``from __future__ import annotations``
    Python 3.11 does not see ``Required`` / ``NotRequired`` in ``__required_keys__``."""
    hints = typing.get_type_hints(typed_dict, include_extras=True)
    marked = {name: typing.get_origin(hint) for name, hint in hints.items()}
    listed = set(typed_dict.__required_keys__)
    return sorted(n for n, m in marked.items() if m is typing.Required or (n in listed and m is not typing.NotRequired))


def check_settings(
    prefix: str,
    values: Mapping[str, Any],
    hints: Mapping[str, Any],
    *,
    skip: Sequence[str] = (),
    closed: bool = True,
    required: Sequence[str] = (),
) -> None:
    """Check a mapping of settings (a config group, a constructor's arguments) against their annotations: a missing
    ``required`` key, an unknown key (when ``closed``; with a "did you mean"), then :func:`check_value` on each."""
    for name in required:
        if name not in values:
            key = _join(prefix, name)
            raise ConfigError(f"{key} is required: {type_name(hints[name])}. Fix: {key}=<{type_name(hints[name])}>.")
    for name in values:  # by key: a value is read (an interpolation resolved) only when it is checked
        if name.startswith("_") or name in skip:
            continue
        if name not in hints:
            if not closed:
                continue
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f" Did you mean {_join(prefix, close[0])}?" if close else ""
            raise ConfigError(
                f"{_join(prefix, name)} is not a setting here.{hint} Settings: {', '.join(sorted(hints))}."
            )
        check_value(_join(prefix, name), values[name], hints[name])


# --------------------------------------------------------------------------- constructors
def function_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Parameter -> annotation of ``fn``, with their ``Annotated`` rules ({} when one does not resolve, e.g. a name
    imported for type checkers only: then any value is taken; capsnets' own resolve, a test holds them to it)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001
        return {}


def constructor_hints(cls: type) -> dict[str, Any]:
    """Keyword -> annotation of ``cls.__init__``, following ``**kwargs`` up the class hierarchy."""
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        annotations = function_hints(klass.__init__)
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                hints.setdefault(p.name, annotations.get(p.name, Any))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return hints


Prefix = Callable[[Any, Mapping[str, Any]], str]  # (the object being built, its arguments) -> config key prefix


def checked(prefix: str | Prefix = "", *, keys: Mapping[str, str] | None = None) -> Callable[[F], F]:
    """Decorator of a constructor (or another method): before it runs, :func:`check_value` on every argument it is
    given, against its own annotations. The key of parameter ``name`` is ``prefix.name`` (``model.net.A``), or
    ``keys[name]`` where the config names it otherwise; ``prefix`` may be a function of the object and its
    arguments (``**kwargs`` included), e.g. a routing's ``key``."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        hints: dict[str, Any] | None = None  # resolved at the first call, when every name they use exists

        @functools.wraps(fn)
        def checked_fn(*args: Any, **kwargs: Any) -> Any:
            nonlocal hints
            try:
                arguments = dict(signature.bind(*args, **kwargs).arguments)
            except TypeError:
                return fn(*args, **kwargs)  # Python's own error for a call that does not fit the signature
            owner = arguments.pop(params[0].name)
            extra = arguments.pop(var_kw, {}) if var_kw else {}
            base = prefix(owner, {**arguments, **extra}) if callable(prefix) else prefix
            hints = function_hints(fn) if hints is None else hints
            for name, value in arguments.items():
                check_value((keys or {}).get(name) or _join(base, name), value, hints.get(name, Any))
            return fn(*args, **kwargs)

        checked_fn.checks_arguments = True  # type: ignore[attr-defined]  # what the schema's guard test looks for
        return checked_fn  # type: ignore[return-value]

    return decorate


def check_parallel_lists(prefix: str, lists: Mapping[str, Sequence[Any]], *, min_length: int = 0) -> None:
    """A cross-field rule: per-layer lists (``conv_channels``, ``conv_kernels``, ...) of one length >= ``min_length``
    (their entries are the annotations' to check)."""
    lengths = {len(v) for v in lists.values()}
    if len(lengths) != 1 or min(lengths) < min_length:
        keys = ", ".join(_join(prefix, n) for n in lists)
        got = ", ".join(str(list(v)) for v in lists.values())
        raise ConfigError(f"{keys} must be lists of the same length >= {min_length}, got {got}.")
