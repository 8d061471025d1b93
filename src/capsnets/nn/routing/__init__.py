"""Routing procedures: one protocol (:class:`Routing`), a registry, one file per procedure.

* ``dynamic``: routing-by-agreement, Sabour et al. 2017 (vector capsules), ``impl: reference`` (einsums) or
  ``impl: fused`` (the same, the predictions in the parents' layout; ``dynamic.py``);
* ``em``: EM routing, Hinton et al. 2018 (matrix capsules), ``impl: reference`` (Procedure 1 as
  written, ``em.py``) or ``impl: fused`` (the same, with fewer passes over the votes, ``em_fused.py``);
* ``self_attention``: Efficient-CapsNet's one-pass self-attention routing, Mazzia et al. 2021 (vector
  capsules, ``self_attention.py``);
* ``inverted_dot_product``: inverted dot-product attention routing, Tsai et al. 2020 (pose capsules,
  ``inverted.py``), ``impl: reference`` (einsums) or ``impl: fused`` (the votes in the parents' layout);
* ``vb``: variational Bayes routing, Ribeiro et al. 2020 (matrix capsules), ``impl: reference`` (``vb.py``) or
  ``impl: fused`` (the same, with the fused EM routing's passes over the votes, ``vb_fused.py``);
* ``uniform`` / ``random``: the no-routing baselines of Paik et al. 2019, fixed uniform or random
  assignments (both kinds, ``baselines.py``).

The fused implementations share their vote-sized passes (``vote_passes.py``).

Adding a procedure: one file here with a :class:`Routing` subclass decorated by
``@register_routing(name, kinds=...)``, its import below, and ``conf/model/routing/<name>.yaml``. Its settings are
keyword arguments of its constructor, annotated with their rules (``PositiveFloat``, ``Literal[...]``; see
:mod:`capsnets.schema`) and checked by ``@checked(routing_key)``: at compose time and when built, one rule each.
"""

from capsnets.nn.routing import (  # noqa: F401
    baselines,
    dynamic,
    em,
    em_fused,
    inverted,
    kernels,
    self_attention,
    vb,
    vb_fused,
    vote_passes,
)
from capsnets.nn.routing.base import (
    KINDS,
    ROUTINGS,
    Routing,
    RoutingResult,
    RoutingTrace,
    VoteFactors,
    build_routing,
    check_routing_config,
    recording,
    register_routing,
    routing_class,
    routing_layers,
    routing_names,
)
from capsnets.nn.routing.baselines import AssignmentBaseline, RandomRouting, UniformRouting
from capsnets.nn.routing.dynamic import DynamicRouting, FusedDynamicRouting, dynamic_routing, fused_dynamic_routing
from capsnets.nn.routing.em import EMRouting, EMRoutingBase, em_routing, inverse_temperatures
from capsnets.nn.routing.em_fused import FusedEMRouting, fused_em_routing
from capsnets.nn.routing.inverted import FusedInvertedDotProductRouting, InvertedDotProductRouting
from capsnets.nn.routing.layout import NORMALISATIONS, ChildLayout, child_assignment_stats
from capsnets.nn.routing.self_attention import SelfAttentionRouting, self_attention_routing
from capsnets.nn.routing.vb import VBRouting
from capsnets.nn.routing.vb_fused import FusedVBRouting, fused_vb_iterations

__all__ = [
    "KINDS",
    "NORMALISATIONS",
    "ROUTINGS",
    "AssignmentBaseline",
    "ChildLayout",
    "DynamicRouting",
    "EMRouting",
    "EMRoutingBase",
    "FusedDynamicRouting",
    "FusedEMRouting",
    "FusedInvertedDotProductRouting",
    "FusedVBRouting",
    "InvertedDotProductRouting",
    "RandomRouting",
    "Routing",
    "RoutingResult",
    "RoutingTrace",
    "SelfAttentionRouting",
    "UniformRouting",
    "VBRouting",
    "VoteFactors",
    "build_routing",
    "check_routing_config",
    "child_assignment_stats",
    "dynamic_routing",
    "em_routing",
    "fused_dynamic_routing",
    "fused_em_routing",
    "fused_vb_iterations",
    "inverse_temperatures",
    "recording",
    "register_routing",
    "routing_class",
    "routing_layers",
    "routing_names",
    "self_attention_routing",
]
