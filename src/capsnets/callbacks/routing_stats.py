"""Routing statistics per iteration, from the traces of any routing procedure: how decisively children pick parents.

Routings keep every iteration's assignments (couplings) and parent activations only while
recording (:func:`capsnets.nn.routing.recording`, which ``pl_module.inspect`` uses), so training
never pays for it. :func:`routing_statistics` turns the traces into per-child summaries:

* entropy (nats) of each child's distribution over its parents, and the entropy of a uniform
  split over those parents (``log(#parents)``), where most procedures start;
* the largest share of each child's assignment that goes to one parent (1 = all to one parent).

A routing procedure that works should lower the entropy from iteration to iteration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from capsnets.nn.routing import RoutingTrace, child_assignment_stats


@dataclass
class LayerRoutingStats:
    """Per-child routing summaries of one layer, one entry per routing iteration (CPU, flat).

    Attributes:
        name: the layer's name in the network, e.g. ``digit`` or ``caps1``.
        entropy: t -> entropy (nats) of each child's distribution over its parents.
        uniform: entropy of a uniform split over each child's parents, ``log(#parents)``.
        largest: t -> the largest share of each child's assignment.
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


def routing_statistics(traces: Mapping[str, RoutingTrace]) -> list[LayerRoutingStats]:
    """Summaries of routing traces by layer name (e.g. ``CapsuleView.traces``); empty traces are left out."""
    stats: list[LayerRoutingStats] = []
    for name, trace in traces.items():
        if not trace.assignments:
            continue
        entropy, largest = [], []
        for R in trace.assignments:  # (B, P, K, T_in, T_out)
            e, u, m = child_assignment_stats(R, trace.layout)
            entropy.append(e.flatten().cpu())
            largest.append(m.flatten().cpu())
        stats.append(LayerRoutingStats(name, entropy, u.flatten().cpu(), largest))
    return stats
