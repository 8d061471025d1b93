"""The routing seam: one protocol every routing procedure implements, and the registry.

**Layout.** A capsule layer hands its routing the votes (predictions) of its children, laid out
by patch, and the children's activations:

    votes  (B, P, K, T_in, T_out, D)   vote of the child in slot k (type i) of patch p for the
                                       parent at position p of type j (D = 16 pose elements, or
                                       the parent capsule's dimension for vector capsules)
    a_in   (B, P, K, T_in) or None     child activations (None: vector capsules, whose activation
                                       is their length, already in the votes)
    layout ChildLayout                 which child sits in each (p, k) slot (see ``layout.py``)

A matrix-capsule layer may hand over ``votes`` as :class:`VoteFactors` (the child poses and the
transformation matrices whose product the votes are): a procedure that forms its votes block by
block (``takes_vote_factors``: fused EM routing) then never holds them all in memory; every other
procedure receives the votes tensor, formed by the seam.

A fully connected layer is P = 1 patch whose K slots are all the children (DigitCaps: K = 1152
primary capsules, T_in = 1; class capsules: K = H*W positions, T_in types); a convolutional
layer has one patch per output position and K = kernel offsets.

**Result.** ``RoutingResult(poses (B, P, T_out, D), activations (B, P, T_out), assignments
(B, P, K, T_in, T_out))``: the parents and the final assignments of each child (which sum to 1
over the child's parents). For ``kind="vector"`` the poses are the parent capsules themselves
(squashed; activation = length), for ``kind="matrix"`` pose matrices with activations in (0, 1),
for ``kind="pose"`` poses alone, whose "activation" is the parent's share of its patch's routing
mass, ``sum_i r_ij / sum_ij' r_ij'`` (for routing statistics; the model does not read it).

**Trace.** With ``record_trace = True`` (off by default; see
:func:`capsnets.nn.routing.recording`) a call leaves a :class:`RoutingTrace` of every iteration's
assignments and parent activations in ``trace``; otherwise ``trace`` is None, so training never
pays for it.

**Registry.** ``@register_routing(name, kinds=..., impl=...)`` adds a procedure; configs name it
(``model/routing=<name>``, ``impl``) and :func:`build_routing` builds it for a layer. Routing
always runs in at least float32, with autocast off (mixed precision would lose the small
differences routing decides on).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.routing.layout import ChildLayout
from capsnets.schema import PositiveInt, check_settings, checked, constructor_hints

# capsule kinds: vectors whose length is the activation; pose matrices with an activation; poses alone (Tsai et al.
# 2020: layer-normalised poses, a model reads class scores from the class capsules' poses)
KINDS = ("vector", "matrix", "pose")
Role = Literal["hidden", "class"]  # an intermediate capsule layer, or the layer of class capsules


def routing_key(routing: Routing, settings: Mapping[str, Any]) -> str:
    """The config key of a routing being built (its ``key`` setting): the prefix of its settings in messages."""
    return settings.get("key", "model.routing")


@dataclass(frozen=True)
class VoteFactors:
    """Votes given by their factors, ``V[b, p, k, i, j] = pose[b, p, k, i] @ weight[k, i, j] + offset[k]``.

    pose (B, P, K, T_in, C), weight (K, T_in, T_out, C, D), offset (K, D) or None (class capsules' coordinate
    addition: one offset per slot, i.e. per child position). ``kron``: weight is ``kron(I_4, W)`` of 4x4 matrices W
    (matrix poses, C = D = 16: each vote element is then a sum of 4 products, not 16, which compiled kernels use;
    a promise of the layer that builds the factors). ``materialise()`` is the votes tensor (B, P, K, T_in, T_out, D),
    in the layout ``torch.einsum`` gives it (each vote's D elements contiguous).
    """

    pose: torch.Tensor
    weight: torch.Tensor
    offset: torch.Tensor | None = None
    kron: bool = False

    @property
    def shape(self) -> torch.Size:
        b, p, k, t_in, _ = self.pose.shape
        return torch.Size((b, p, k, t_in, self.weight.shape[2], self.weight.shape[4]))

    @property
    def dtype(self) -> torch.dtype:
        return self.pose.dtype

    @property
    def device(self) -> torch.device:
        return self.pose.device

    def to(self, dtype: torch.dtype) -> VoteFactors:
        offset = None if self.offset is None else self.offset.to(dtype)
        return VoteFactors(self.pose.to(dtype), self.weight.to(dtype), offset, self.kron)

    def materialise(self) -> torch.Tensor:
        V = torch.einsum("bnkic,kijcd->bnkijd", self.pose, self.weight)  # (B, P, K, T_in, T_out, D)
        return V if self.offset is None else V + self.offset[:, None, None, :]  # (K, 1, 1, D) over T_in, T_out


Votes = torch.Tensor | VoteFactors


class RoutingResult(NamedTuple):
    poses: torch.Tensor  # (B, P, T_out, D)
    activations: torch.Tensor  # (B, P, T_out)
    assignments: torch.Tensor  # (B, P, K, T_in, T_out), sum to 1 over each child's parents


@dataclass
class RoutingTrace:
    """Every iteration of one routing call (detached): what routing statistics and pictures read.

    ``assignments[t]`` is what iteration t used to form the parents (the uniform start for
    t = 0), ``activations[t]`` the parent activations that iteration produced.
    """

    layout: ChildLayout = field(default_factory=ChildLayout)
    assignments: list[torch.Tensor] = field(default_factory=list)  # t -> (B, P, K, T_in, T_out)
    activations: list[torch.Tensor] = field(default_factory=list)  # t -> (B, P, T_out)

    def record(self, assignments: torch.Tensor, activations: torch.Tensor) -> None:
        self.assignments.append(assignments.detach())
        self.activations.append(activations.detach())


class Routing(nn.Module):
    """Base class of the routing procedures (see the module docstring for the protocol).

    Subclasses implement :meth:`route` and take their own settings as keyword arguments.

    Args:
        kind: capsule kind of the layer, one of the class's ``kinds``.
        out_types: T_out, parent types (learned per-type parameters are sized by it).
        iterations: routing iterations (>= 1).
        role: ``hidden`` or ``class`` (some procedures treat the class layer differently).
        in_slots: ``(K, T_in)``, the child slots of every patch, when the layer knows them; procedures
            with per-slot learned parameters (a log prior over each child's parents) size them by it.
        key: config key prefix for error messages (``model.routing``).
    """

    name: ClassVar[str] = ""
    impl: ClassVar[str] = "reference"
    kinds: ClassVar[tuple[str, ...]] = ()
    takes_vote_factors: ClassVar[bool] = False  # route() accepts VoteFactors (else the seam materialises them)
    # route() traces as one torch.compile graph (False: it breaks the graph, refused under compile.fullgraph=true)
    compiles_whole: ClassVar[bool] = True

    @checked(routing_key)
    def __init__(
        self,
        *,
        kind: str,
        out_types: PositiveInt,
        iterations: PositiveInt = 3,
        role: Role = "hidden",
        in_slots: tuple[PositiveInt, PositiveInt] | None = None,
        key: str = "model.routing",
    ) -> None:
        super().__init__()
        self.key = key
        if kind not in self.kinds:  # which kinds depends on the class (register_routing), so it is no annotation
            raise ConfigError(f"{key}: routing {self.name!r} is for {', '.join(self.kinds)} capsules, not {kind!r}.")
        self.kind = kind
        self.out_types = out_types
        self.iterations = iterations
        self.role = role
        self.in_slots = None if in_slots is None else (in_slots[0], in_slots[1])
        self.record_trace = False  # keep every iteration in self.trace (routing statistics)
        self.trace: RoutingTrace | None = None

    def forward(
        self, votes: Votes, a_in: torch.Tensor | None = None, layout: ChildLayout | None = None
    ) -> RoutingResult:
        """Route ``votes`` (B, P, K, T_in, T_out, D), a tensor or :class:`VoteFactors`, with child activations
        ``a_in`` (B, P, K, T_in)."""
        layout = layout if layout is not None else ChildLayout()
        with torch.autocast(device_type=votes.device.type, enabled=False):
            dtype = torch.promote_types(votes.dtype, torch.float32)
            a_in = a_in.to(dtype) if a_in is not None else None
            trace = RoutingTrace(layout) if self.record_trace else None
            votes = votes.to(dtype)
            if isinstance(votes, VoteFactors) and not self.takes_vote_factors:
                votes = votes.materialise()
            result = self.route(votes, a_in, layout, trace)
        if trace is not None:  # in the results' dtype, whatever precision the procedure computed in
            trace.assignments = [x.to(result.assignments.dtype) for x in trace.assignments]
            trace.activations = [x.to(result.activations.dtype) for x in trace.activations]
        self.trace = trace
        return result

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        raise NotImplementedError

    def transform_init_std(self, *, in_types: int, kernel_size: int) -> float | None:
        """The std this procedure expects of the initial transformation matrices ``W`` of the layer whose votes it
        routes (``in_types`` child types, ``kernel_size`` x ``kernel_size`` patches, ``self.out_types`` parents), or
        None for the layer's own default. A procedure whose equations carry a scale of their own (a prior over the
        parents' variances) says here which vote scale its release was trained with; a layer given an explicit
        ``init_std`` uses that instead."""
        return None

    def extra_repr(self) -> str:
        return f"name={self.name}, impl={self.impl}, kind={self.kind}, role={self.role}, iterations={self.iterations}"


# --- registry ---------------------------------------------------------------------------

ROUTINGS: dict[str, dict[str, type[Routing]]] = {}  # name -> impl -> class
DEFAULT_IMPLS: dict[str, str] = {}  # name -> the impl a config without ``impl`` gets


def register_routing(
    name: str, *, kinds: tuple[str, ...], impl: str = "reference", default: bool = False
) -> Callable[[type[Routing]], type[Routing]]:
    """Class decorator: make ``cls`` the ``impl`` implementation of routing ``name`` for capsule ``kinds``.

    The first implementation registered under a name is its default, unless a later one says ``default=True``.
    """

    def add(cls: type[Routing]) -> type[Routing]:
        if any(kind not in KINDS for kind in kinds):
            raise ValueError(f"routing {name!r}: kinds must be among {KINDS}, got {kinds}")
        cls.name, cls.impl, cls.kinds = name, impl, tuple(kinds)
        ROUTINGS.setdefault(name, {})[impl] = cls
        if default or name not in DEFAULT_IMPLS:
            DEFAULT_IMPLS[name] = impl
        return cls

    return add


def routing_names(kind: str | None = None) -> list[str]:
    """Registered routing names, those supporting capsule ``kind`` if given."""
    return sorted(n for n, impls in ROUTINGS.items() if kind is None or any(kind in c.kinds for c in impls.values()))


def routing_class(cfg: Mapping[str, Any], *, kind: str | None = None, key: str = "model.routing") -> type[Routing]:
    """The class a routing config (``name``, optional ``impl``) selects; ConfigError naming the options."""
    name = cfg.get("name")
    if name not in ROUTINGS:
        raise ConfigError(
            f"{key}.name: unknown routing {name!r}. Options: {', '.join(routing_names(kind))} (model/routing=<option>)."
        )
    impls = ROUTINGS[name]
    impl = cfg.get("impl") or DEFAULT_IMPLS[name]
    if impl not in impls:
        raise ConfigError(
            f"{key}.impl: routing {name!r} has no implementation {impl!r}; options: {', '.join(sorted(impls))}."
        )
    cls = impls[impl]
    if kind is not None and kind not in cls.kinds:
        raise ConfigError(
            f"{key}: routing {name!r} does not support {kind} capsules ({', '.join(cls.kinds)} only). "
            f"Routings for {kind} capsules: {', '.join(routing_names(kind))} (model/routing=<option>)."
        )
    return cls


def routing_settings(cls: type[Routing]) -> set[str]:
    """Keyword settings a routing class accepts (its and its bases' constructors)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, Routing):
            params = inspect.signature(klass.__init__).parameters.values()
            names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return names - {"kind", "out_types", "role", "in_slots", "key"}


def check_routing_config(cfg: Mapping[str, Any], *, kind: str, key: str = "model.routing") -> type[Routing]:
    """Compose-time check of a routing config for a model of capsule ``kind``: name, impl, kind, keys, and every
    value against the annotations of the class's constructor (the same check the constructor makes)."""
    cls = routing_class(cfg, kind=kind, key=key)
    unknown = sorted(set(cfg) - {"name", "impl"} - routing_settings(cls))
    if unknown:
        raise ConfigError(
            f"{key}: {', '.join(unknown)} is not a setting of routing {cls.name!r}; "
            f"its settings: {', '.join(sorted(routing_settings(cls)))}."
        )
    check_settings(key, cfg, constructor_hints(cls), skip=("name", "impl"))
    return cls


def build_routing(
    cfg: Mapping[str, Any],
    *,
    kind: str,
    out_types: int,
    role: str = "hidden",
    in_slots: tuple[int, int] | None = None,
    key: str = "model.routing",
) -> Routing:
    """Build the routing ``cfg`` names for one capsule layer (``in_slots``: its (K, T_in) child slots per patch)."""
    cls = check_routing_config(cfg, kind=kind, key=key)
    settings = {k: v for k, v in cfg.items() if k not in ("name", "impl")}
    return cls(kind=kind, out_types=out_types, role=role, in_slots=in_slots, key=key, **settings)


def routing_layers(module: nn.Module) -> dict[str, Routing]:
    """Every routing inside ``module`` by the name of the capsule layer that owns it (``caps1``, ``digit``)."""
    layers = {}
    for qualified, child in module.named_modules():
        if isinstance(child, Routing):
            parts = [p for p in qualified.split(".") if p not in ("net", "routing")]
            layers[".".join(parts) or "routing"] = child
    return layers


@contextmanager
def recording(module: nn.Module) -> Iterator[dict[str, Routing]]:
    """Record every iteration of the routings inside ``module`` while in the block.

    Yields the routings switched on (by layer name). On exit recording is switched off and the
    traces are dropped, so no memory is kept between passes.
    """
    layers = routing_layers(module)
    for layer in layers.values():
        layer.record_trace = True
    try:
        yield layers
    finally:
        for layer in layers.values():
            layer.record_trace = False
            layer.trace = None
