"""The typed schema (capsnets.schema): annotations are the one rule table, ``check_value`` the one check.

* a range marker is read right (inclusive and open bounds, integers against numbers, booleans refused);
* a range is enforced at compose time (the config check ``train.py`` runs, nothing built) and at construction
  from Python, with the same message;
* a guard: every number setting of every registered model, network, DataModule and routing (and the callbacks)
  carries a Range, and every constructor that takes settings checks them, so a new setting cannot skip the schema.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import pytest
from hydra import compose, initialize_config_dir
from lightning import Callback

import capsnets.callbacks
from capsnets.config_checks import check_config
from capsnets.data import SyntheticDataModule
from capsnets.errors import ConfigError
from capsnets.losses import MarginSchedule
from capsnets.models.base import OPTIMIZERS, OptimizerSettings
from capsnets.nets import CapsNet
from capsnets.nn.routing import ROUTINGS, EMRouting, VBRouting, check_routing_config
from capsnets.registry import registered
from capsnets.schema import (
    Fraction,
    PositiveInt,
    Range,
    SettingsOf,
    check_settings,
    check_value,
    checked,
    constructor_hints,
)
from capsnets.utils.instantiate import check_model_config
from capsnets.utils.resolvers import CONFIG_DIR

from helpers import SMALL_DR_CAPS

HalfOpen = Annotated[int, Range(0, 10, high_open=True)]  # 0 .. 9
Rate = Annotated[float, Range(0, 1, low_open=True)]  # (0, 1]


class Sample:
    """A class declaring its settings the way capsnets' constructors do."""

    @checked("sample")
    def __init__(
        self,
        *,
        count: PositiveInt = 1,
        slot: HalfOpen = 0,
        rate: Rate = 0.5,
        share: Fraction = 0.5,
        flag: bool = False,
        mode: Literal["fast", "slow"] = "fast",
        widths: Sequence[PositiveInt] = (1,),
        scale: Rate | None = None,
    ) -> None:
        self.count = count


# --------------------------------------------------------------------------- the markers, read from a class
def test_the_range_marker_is_read_from_the_annotation():
    hints = constructor_hints(Sample)
    assert typing.get_origin(hints["count"]) is Annotated
    assert typing.get_args(hints["count"]) == (int, Range(1))
    assert typing.get_args(hints["rate"]) == (float, Range(0, 1, low_open=True))
    assert Range(0, 1, low_open=True).describe() == "in (0, 1]" and Range(1).describe() == ">= 1"
    assert Range(0, 10, high_open=True).describe() == "in [0, 10)" and Range(high=3).describe() == "<= 3"


@pytest.mark.parametrize(
    "name, value",
    [
        ("count", 1),
        ("count", 10**9),
        ("slot", 0),
        ("slot", 9),
        ("rate", 1),
        ("rate", 1e-9),
        ("share", 0),
        ("share", 1.0),
        ("flag", True),
        ("mode", "slow"),
        ("widths", [1, 2]),
        ("scale", None),
        ("scale", 0.5),
    ],
)
def test_values_inside_the_bounds_are_taken(name, value):
    assert Sample(**{name: value}).count >= 1


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("count", 0, "sample.count must be an integer >= 1, got 0."),  # inclusive low bound, just below
        ("count", 2.0, "sample.count must be an integer >= 1, got 2.0."),  # a float is not an integer
        ("count", True, "sample.count must be an integer >= 1, got True."),  # a boolean is not an integer
        ("slot", 10, "sample.slot must be an integer in [0, 10), got 10."),  # open high bound
        ("slot", -1, "sample.slot must be an integer in [0, 10), got -1."),
        ("rate", 0, "sample.rate must be a number in (0, 1], got 0."),  # open low bound
        ("rate", 1.5, "sample.rate must be a number in (0, 1], got 1.5."),
        ("rate", float("nan"), "sample.rate must be a number in (0, 1], got nan."),
        ("share", True, "sample.share must be a number in [0, 1], got True."),  # a boolean is not a number
        ("share", "half", "sample.share must be a number in [0, 1], got 'half'."),
        ("flag", "no", "sample.flag must be true or false, got 'no'. Fix: sample.flag=true or sample.flag=false."),
        ("mode", "fats", "sample.mode must be one of fast, slow; got 'fats'. Did you mean sample.mode=fast?"),
        ("widths", [1, 0], "sample.widths[1] must be an integer >= 1, got 0."),
        ("widths", 3, "sample.widths must be a list, got 3."),
        ("scale", 0, "sample.scale must be a number in (0, 1], got 0."),
    ],
)
def test_values_outside_are_refused_the_same_way_built_or_configured(name, value, message):
    with pytest.raises(ConfigError) as built:
        Sample(**{name: value})
    assert str(built.value).startswith(message), str(built.value)
    with pytest.raises(ConfigError) as configured:
        check_settings("sample", {name: value}, constructor_hints(Sample))
    assert str(configured.value) == str(built.value)


def test_unknown_keys_get_a_did_you_mean_and_typed_mappings_their_required_keys():
    with pytest.raises(ConfigError, match=r"sample.cout is not a setting here. Did you mean sample.count\?"):
        check_settings("sample", {"cout": 2}, constructor_hints(Sample))
    with pytest.raises(ConfigError, match="model.optimizer.lr is required"):
        check_value("model.optimizer", {"name": "adam"}, OptimizerSettings)
    check_value("model.optimizer", {"name": "sgd", "lr": 0.1, "momentum": 0.9}, OptimizerSettings)
    assert typing.get_args(typing.get_type_hints(OptimizerSettings)["name"]) == tuple(OPTIMIZERS)


# --------------------------------------------------------------------------- compose time and construction agree
DR = ["model=dr_caps", *SMALL_DR_CAPS]
EM = ["model=em_caps_small"]


def config_error(overrides: list[str]) -> str:
    """The message of the checks train.py runs on the composed config before it builds anything."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "logger=csv"], return_hydra_config=True)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
        check_model_config(cfg.model)
    return str(info.value)


def build_error(build: typing.Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build()
    return str(info.value)


MNIST_NET = {"in_channels": 1, "image_size": 28, "num_classes": 10}
SAME_MESSAGE = [
    (["data=synthetic", "data.batch_size=0"], lambda: SyntheticDataModule(batch_size=0), "data.batch_size"),
    (["data=synthetic", "data.noise=1.5"], lambda: SyntheticDataModule(noise=1.5), "data.noise"),
    ([*DR, "model.net.class_dim=0"], lambda: CapsNet(**MNIST_NET, class_dim=0), "model.net.class_dim"),
    ([*DR, "model.net.weight_init_std=-1"], lambda: CapsNet(**MNIST_NET, weight_init_std=-1), "weight_init_std"),
    (
        [*EM, "model.routing.lambda_value=0"],
        lambda: EMRouting(kind="matrix", out_types=2, lambda_value=0),
        "model.routing.lambda_value",
    ),
    (
        [*EM, "model.routing.mean_smoothing=1.0"],
        lambda: EMRouting(kind="matrix", out_types=2, mean_smoothing=1.0),
        "model.routing.mean_smoothing must be a number in [0, 0.99]",
    ),
    (
        [*EM, "model.loss.margin_schedule.sigmoid_amplitude=2"],
        lambda: MarginSchedule(sigmoid_amplitude=2),
        "model.loss.margin_schedule.sigmoid_amplitude",
    ),
]


@pytest.mark.parametrize("overrides, build, key", SAME_MESSAGE, ids=[c[2] for c in SAME_MESSAGE])
def test_a_range_is_enforced_at_compose_time_and_at_construction_with_one_message(overrides, build, key):
    composed, built = config_error(overrides), build_error(build)
    assert key in composed and composed == built


def test_a_routing_config_is_checked_against_its_class_before_it_is_built():
    message = build_error(lambda: check_routing_config({"name": "vb", "psi0": -2.0}, kind="matrix"))
    assert message == build_error(lambda: VBRouting(kind="matrix", out_types=3, psi0=-2.0))
    assert message.startswith("model.routing.psi0 must be a finite number > 0, got -2.0.")
    assert "layers.0.psi0" in build_error(lambda: VBRouting(kind="matrix", out_types=3, psi0=0, key="layers.0"))


# --------------------------------------------------------------------------- the guard
def schema_classes() -> set[type]:
    """Every class whose constructor takes config settings: registered models, their networks, DataModules,
    routings, the callbacks, and the classes a mapping names (``SettingsOf``)."""
    classes: set[type] = {*registered("model").values(), *registered("datamodule").values()}
    classes |= {model.network for model in registered("model").values() if getattr(model, "network", None)}
    classes |= {cls for impls in ROUTINGS.values() for cls in impls.values()}
    callbacks = (getattr(capsnets.callbacks, name) for name in capsnets.callbacks.__all__)
    classes |= {c for c in callbacks if isinstance(c, type) and issubclass(c, Callback)}
    return classes


def unranged(hint: Any, where: str, found: set[type]) -> list[str]:
    """The numbers (int, float) in ``hint`` without a Range; classes named by ``SettingsOf`` go into ``found``."""
    marks: tuple[Any, ...] = ()
    while typing.get_origin(hint) in (Annotated, typing.Required, typing.NotRequired):
        if typing.get_origin(hint) is Annotated:
            marks += hint.__metadata__
        hint = typing.get_args(hint)[0]
    found |= {m.cls for m in marks if isinstance(m, SettingsOf)}
    if hint in (int, float):
        return [] if any(isinstance(m, Range) for m in marks) else [where]
    if typing.is_typeddict(hint):
        fields = typing.get_type_hints(hint, include_extras=True)
        return [w for name, h in fields.items() for w in unranged(h, f"{where}.{name}", found)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType, list, tuple, Sequence, dict, Mapping):
        return [w for arg in typing.get_args(hint) for w in unranged(arg, where, found)]
    return []


def schema_problems(classes: set[type]) -> list[str]:
    """What keeps ``classes`` out of the schema: a constructor that takes settings but does not check them, a
    setting without an annotation that resolves, a number without a Range, one setting typed two ways."""
    problems: list[str] = []
    todo, seen = set(classes), set()
    while todo:
        cls = todo.pop()
        seen.add(cls)
        declared: dict[str, Any] = {}
        for klass in cls.__mro__:
            if "__init__" not in vars(klass) or not klass.__module__.startswith(("capsnets.", __name__)):
                continue  # torch's, Lightning's, object's
            init = vars(klass)["__init__"]
            named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            params = [p for p in inspect.signature(init).parameters.values() if p.kind in named][1:]  # not self
            if not params:
                continue
            name = f"{klass.__qualname__}.__init__"
            if not getattr(init, "checks_arguments", False):
                problems.append(f"{name} is not @checked")
            hints = typing.get_type_hints(init, include_extras=True)
            found: set[type] = set()
            for p in params:
                if p.name not in hints:
                    problems.append(f"{name}: {p.name} has no annotation")
                    continue
                problems += [f"{w} has no Range" for w in unranged(hints[p.name], f"{name}: {p.name}", found)]
                if declared.setdefault(p.name, hints[p.name]) != hints[p.name]:
                    problems.append(f"{cls.__qualname__}: {p.name} is typed two ways along its bases")
            todo |= found - seen
    return problems


def test_every_number_setting_has_a_range_and_every_constructor_checks_its_settings():
    classes = schema_classes()
    assert {"EMCapsModule", "CapsNet", "SmallNORBDataModule", "VBRouting", "RandomRouting", "Throughput"} <= {
        c.__name__ for c in classes
    }
    assert schema_problems(classes) == []


class Bare:  # what the guard must catch
    @checked("bare")
    def __init__(self, *, size: int = 1, scale: float | None = None, ok: PositiveInt = 1) -> None: ...


class Unchecked:
    def __init__(self, *, size: PositiveInt = 1) -> None: ...


class Named:
    @checked("named")
    def __init__(self, *, schedule: Annotated[Mapping[str, Any], SettingsOf(Bare)] | None = None) -> None: ...


class Retyped(Sample):
    @checked("sample")
    def __init__(self, *, count: int = 1, **settings: Any) -> None: ...


def test_the_guard_sees_a_bare_number_an_unchecked_constructor_and_a_retyped_setting():
    assert schema_problems({Bare}) == ["Bare.__init__: size has no Range", "Bare.__init__: scale has no Range"]
    assert schema_problems({Unchecked}) == ["Unchecked.__init__ is not @checked"]
    assert schema_problems({Named}) == schema_problems({Bare})  # Bare's settings, found through SettingsOf
    assert "Retyped: count is typed two ways along its bases" in schema_problems({Retyped})
