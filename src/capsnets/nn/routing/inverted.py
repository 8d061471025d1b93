"""Inverted dot-product attention routing (Tsai, Srivastava, Goh & Salakhutdinov, ICLR 2020, "Capsules with
inverted dot-product attention routing", Algorithm 1), for pose capsules (``kind: pose``).

Parents compete for the attention of their children: a child's routing probabilities are a
softmax over its parents of the agreement between the parent's current pose and the child's
vote, and a parent's pose is the layer-normalised, probability-weighted sum of its votes::

    v_ij = M_i W_ij                                     votes: child pose M_i (4x4) times W_ij (the layer computes
                                                        them), (B, P, K, T_in, T_out, D)
    iteration 1 (initialisation, "one pass"):  r_ij = 1 / |parents of i|   (the parents' poses start at 0)
    iteration t > 1:
        a_ij = p_j^T v_ij / sqrt(D)                     agreement with the previous iteration's parent pose
        r_ij = exp(a_ij) / sum_j' exp(a_ij')            softmax over child i's parents (never over children)
    p_j = LayerNorm(sum_i r_ij v_ij)                    (B, P, T_out, D), LayerNorm over the D pose elements

``iterations`` counts every iteration, the initialising pass included (the release's ``num_routing``:
1 is the uniform single pass, 2 the paper's CIFAR setting). A network may run all its capsule layers'
iterations *concurrently* (the paper's concurrent routing: iteration t of every layer uses the
poses of iteration t - 1 of the layers below and above); it then calls :meth:`InvertedDotProductRouting.step`
itself, one iteration at a time (``capsnets.nets.ida_capsnet``). Called through the seam, a routing
iterates one layer to the end before the next (sequential routing).

The release (apple/ml-capsules-inverted-attention-routing) normalises each slot's probabilities over
the parent types of its patch (``normalisation: patch``), scales the agreement by ``1/sqrt(D)`` and
uses LayerNorm with learned elementwise affine parameters; these are the defaults.

Two implementations: ``impl: reference`` (the einsums above) and ``impl: fused`` (the default: the same results with
the votes copied once into the parents' layout, the agreements and weighted sums as the batched products of
:mod:`~capsnets.nn.routing.vote_passes` and the votes' gradient written once, as the fused dynamic routing does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from capsnets.nn.routing.base import (
    Routing,
    RoutingResult,
    RoutingTrace,
    VoteFactors,
    Votes,
    register_routing,
    routing_key,
)
from capsnets.nn.routing.layout import ChildLayout, Normalisation
from capsnets.nn.routing.vote_passes import FactorVotes, ParentVotes, VoteDot, VoteSum
from capsnets.schema import PositiveInt, checked


def parent_share(r: torch.Tensor) -> torch.Tensor:
    """Each parent's share of its patch's routing mass, (B, P, K, T_in, T_out) -> (B, P, T_out), in [0, 1]."""
    mass = r.sum(dim=(2, 3))  # (B, P, T_out)
    return mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-12)


@register_routing("inverted_dot_product", kinds=("pose",), impl="reference")
class InvertedDotProductRouting(Routing):
    """Inverted dot-product attention routing (see the module docstring), the readable implementation.

    Args:
        iterations: every iteration, the initialising uniform pass included (release: 2; 1 = no routing).
        normalisation: over which parents a conv child's probabilities are normalised (release: ``patch``).
        pose_dim: D, the pose elements LayerNorm normalises (and its affine parameters' size).
        layer_norm_affine: learned elementwise gain and bias of the LayerNorm (release: yes).
    """

    @checked(routing_key)
    def __init__(
        self,
        *,
        iterations: PositiveInt = 2,
        normalisation: Normalisation = "patch",
        pose_dim: PositiveInt = 16,
        layer_norm_affine: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(iterations=iterations, **base)
        self.normalisation = normalisation
        self.pose_dim = pose_dim
        self.layer_norm_affine = layer_norm_affine
        self.norm = nn.LayerNorm(self.pose_dim, elementwise_affine=self.layer_norm_affine)

    def step(
        self,
        votes: torch.Tensor,
        previous: torch.Tensor | None,
        layout: ChildLayout,
        trace: RoutingTrace | None = None,
    ) -> RoutingResult:
        """One iteration: parent poses (B, P, T_out, D) from ``votes`` and the parents' ``previous`` poses
        (None: the initialising uniform pass)."""
        self.check_pose_dim(votes)
        votes = votes.contiguous()  # one copy of a strided view, not one per contraction below
        if previous is None:  # the parents' poses start at 0: every agreement 0, r uniform over each child's parents
            r = layout.softmax(votes.new_zeros((1, *votes.shape[1:5])), over=self.normalisation).expand(votes.shape[:5])
        else:
            agreement = torch.einsum("bpkiod,bpod->bpkio", votes, previous) / math.sqrt(votes.shape[-1])
            r = layout.softmax(agreement, over=self.normalisation)  # (B, P, K, T_in, T_out)
        poses = self.norm(torch.einsum("bpkio,bpkiod->bpod", r, votes))  # (B, P, T_out, D)
        share = parent_share(r)
        if trace is not None:
            trace.record(r, share)
        return RoutingResult(poses, share, r)

    def check_pose_dim(self, votes: torch.Tensor) -> None:
        if votes.shape[-1] != self.pose_dim:
            raise ValueError(
                f"{self.key}: built for {self.pose_dim}-element poses (pose_dim), got votes of {votes.shape[-1]}."
            )

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        result = self.step(votes, None, layout, trace)
        for _ in range(self.iterations - 1):
            result = self.step(votes, result.poses, layout, trace)
        return result

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, normalisation={self.normalisation}, pose_dim={self.pose_dim}, "
            f"layer_norm_affine={self.layer_norm_affine}"
        )


@register_routing("inverted_dot_product", kinds=("pose",), impl="fused", default=True)
class FusedInvertedDotProductRouting(InvertedDotProductRouting):
    """Inverted dot-product attention routing, the fast implementation (``impl: fused``): the same settings and
    results as ``impl: reference``, the votes in the parents' layout U (G, N, D), G = B * P * T_out parents of
    N = K * T_in children: the agreement is ``(G, 1, D) @ (G, D, N)``, the weighted sum ``(G, 1, N) @ (G, N, D)``, and
    the backward pass writes the votes' gradient once (:class:`~capsnets.nn.routing.vote_passes.ParentVotes`). Given
    the votes' factors (a layer's :class:`~capsnets.nn.routing.VoteFactors`), it forms U from them block by block
    (:class:`~capsnets.nn.routing.vote_passes.FactorVotes`) and the votes never exist whole."""

    takes_vote_factors = True

    def iterate(
        self, votes: Votes, previous: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None, *,
        steps: int,
    ) -> RoutingResult:  # fmt: skip
        """``steps`` iterations on one copy of the votes, the first from the parents' ``previous`` poses (None: the
        initialising uniform pass)."""
        self.check_pose_dim(votes)
        b, p, k, t_in, t_out, d = votes.shape
        g, n = b * p * t_out, k * t_in
        agreements = steps - (previous is None)  # uses of U: a weighted sum per iteration, an agreement per previous
        uses = (steps + agreements, 0, votes.dtype, False)  # plain uses, no scaled ones, U's dtype, not centred
        if isinstance(votes, VoteFactors):
            U, _, *tokens = FactorVotes.apply(votes.pose, votes.weight, votes.offset, *uses)  # U: (G, N, D)
        else:
            U, _, *tokens = ParentVotes.apply(votes, *uses)
        for _ in range(steps):
            if previous is None:  # every agreement 0: r uniform over each child's parents
                r = layout.softmax(U.new_zeros((1, p, k, t_in, t_out)), over=self.normalisation)
                r_par = r.expand(b, p, k, t_in, t_out).permute(0, 1, 4, 2, 3).reshape(g, n)  # (G, N)
                r = r.expand(b, p, k, t_in, t_out)
            else:  # a_ij = p_j . v_ij / sqrt(D), softmax over child i's parents (the layout's own view: no copy)
                agreement = VoteDot.apply(U, *tokens[:2], previous.reshape(g, d)) / math.sqrt(d)  # (G, N)
                tokens = tokens[2:]
                r = layout.softmax(agreement.view(b, p, t_out, k, t_in).permute(0, 1, 3, 4, 2), over=self.normalisation)
                r_par = r.permute(0, 1, 4, 2, 3).reshape(g, n)  # (G, N)
            s = VoteSum.apply(U, *tokens[:2], r_par).view(b, p, t_out, d)  # sum_i r_ij v_ij
            tokens = tokens[2:]
            previous = self.norm(s)  # (B, P, T_out, D)
            share = parent_share(r)
            if trace is not None:
                trace.record(r, share)
        return RoutingResult(previous, share, r)

    def step(
        self,
        votes: Votes,
        previous: torch.Tensor | None,
        layout: ChildLayout,
        trace: RoutingTrace | None = None,
    ) -> RoutingResult:
        return self.iterate(votes, previous, layout, trace, steps=1)

    def route(
        self, votes: Votes, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        return self.iterate(votes, None, layout, trace, steps=self.iterations)  # one copy of the votes for all
