"""Routing statistics per iteration: how decisively children pick their parents.

The routing layers keep every iteration's couplings (dynamic routing, Sabour et al. 2017) or
assignments (EM routing, Hinton et al. 2018) only while ``record_routing`` is switched on;
:func:`record_routing` does that for one forward pass and switches it off again, so training
never pays for it. :func:`routing_statistics` then turns the traces into per-child summaries:

* entropy (nats) of each child's distribution over its parents, and the entropy of a
  uniform split over those parents (``log(#parents)``), the starting point of both procedures;
* the largest single coupling/assignment of each child (1 = everything to one parent).

A routing procedure that works should lower the entropy from iteration to iteration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from capsnets.nn.dynamic_routing import RoutingCapsules, child_coupling_entropy
from capsnets.nn.em_routing import EMRouting, child_assignment_stats


@contextmanager
def record_routing(module: nn.Module) -> Iterator[list[nn.Module]]:
    """Record every routing iteration of the routing layers inside ``module`` while in the block.

    Yields the layers switched on (empty for a network without routing). On exit recording is
    switched off again and the traces are dropped, so no memory is kept between passes.
    """
    layers = [m for m in module.modules() if isinstance(m, (RoutingCapsules, EMRouting))]
    for layer in layers:
        layer.record_routing = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer.record_routing = False
            layer.routing_trace = None


@dataclass
class LayerRoutingStats:
    """Per-child routing summaries of one layer, one entry per routing iteration (CPU, flat).

    Attributes:
        name: the layer's name in the network, e.g. ``digit`` or ``caps1``.
        entropy: t -> entropy (nats) of each child's distribution over its parents.
        uniform: entropy of a uniform split over each child's parents, ``log(#parents)``.
        largest: t -> the largest coupling/assignment of each child.
    """

    name: str
    entropy: list[torch.Tensor]
    uniform: torch.Tensor
    largest: list[torch.Tensor]

    @property
    def iterations(self) -> int:
        return len(self.entropy)

    def mean_entropy(self) -> list[float]:
        """Mean child entropy of every iteration (nats)."""
        return [float(e.mean()) for e in self.entropy]

    def mean_uniform(self) -> float:
        """Mean entropy of a uniform split (the value of iteration 1 when routing starts uniform)."""
        return float(self.uniform.mean())


def layer_name(qualified: str) -> str:
    """``net.caps1.routing`` -> ``caps1``: the capsule layer that owns the routing."""
    parts = [p for p in qualified.split(".") if p not in ("net", "routing")]
    return ".".join(parts) or "routing"


def routing_statistics(module: nn.Module) -> list[LayerRoutingStats]:
    """Summaries of the traces left by the last forward pass under :func:`record_routing`.

    Layers without a trace (recording off, or not run) are left out.
    """
    stats: list[LayerRoutingStats] = []
    for qualified, layer in module.named_modules():
        if isinstance(layer, RoutingCapsules) and layer.routing_trace:
            couplings = layer.routing_trace  # t -> (B, N_in, N_out)
            entropy = [child_coupling_entropy(c.float()).flatten().cpu() for c in couplings]
            largest = [c.amax(-1).float().flatten().cpu() for c in couplings]
            uniform = torch.full_like(entropy[0], math.log(couplings[0].shape[-1]))  # log(N_out)
            stats.append(LayerRoutingStats(layer_name(qualified), entropy, uniform, largest))
        elif isinstance(layer, EMRouting) and layer.routing_trace is not None and layer.routing_trace.assignments:
            trace = layer.routing_trace
            entropy, largest = [], []
            for R in trace.assignments:  # (B, P, K, T_in, T_out)
                e, u, m = child_assignment_stats(R, trace.child_index, trace.num_children)
                entropy.append(e.flatten().cpu())
                largest.append(m.flatten().cpu())
                uniform = u.flatten().cpu()
            stats.append(LayerRoutingStats(layer_name(qualified), entropy, uniform, largest))
    return stats
