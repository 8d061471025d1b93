"""Routing-by-agreement (Sabour, Frosst & Hinton 2017, "Dynamic routing between capsules", Procedure 1).

Children i predict every parent j, ``u_hat_{j|i} = W_ij u_i``; the couplings ``c_ij`` of each
child are a softmax of logits ``b_ij`` over the parents, and a parent is the squashed,
coupling-weighted sum of its predictions. Agreement ``u_hat_{j|i} . v_j`` raises ``b_ij``.

Two implementations: ``impl: reference`` (:func:`dynamic_routing`, Procedure 1 in einsums and plain autograd)
and ``impl: fused`` (:func:`fused_dynamic_routing`, the default): the same equations with the predictions copied
once into the parents' layout and every contraction in the batched-product form that reads them fastest, the
gradient of the predictions written once for all iterations (:mod:`~capsnets.nn.routing.vote_passes`). Tests
assert equal values and gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from capsnets.nn.routing.base import Routing, RoutingResult, RoutingTrace, register_routing, routing_key
from capsnets.nn.routing.layout import ChildLayout
from capsnets.nn.routing.vote_passes import ParentVotes, VoteDot, VoteSum
from capsnets.nn.squash import squash
from capsnets.schema import PositiveInt, checked


def dynamic_routing(
    u_hat: torch.Tensor,
    *,
    iterations: int,
    detach_inner: bool = False,
    layout: ChildLayout | None = None,
    trace: RoutingTrace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route predictions ``u_hat`` (B, P, K, T_in, T_out, D) from children to parents (Procedure 1).

    Args:
        u_hat: predictions ``u_hat_{j|i}`` in the routing layout (DigitCaps: (B, 1, N_in, 1, N_out, D)).
        iterations: r, the number of routing iterations (>= 1).
        detach_inner: if True, the iterations before the last use ``u_hat.detach()``, so
            gradients reach ``W`` only through the final iteration (some ports). The official code
            lets gradients flow through every iteration (False).
        layout: which child sits in each slot; a child's couplings are normalised over all its
            parents (default: every slot its own child, softmax over the T_out parents).
        trace: if given, each iteration's couplings and parent lengths are recorded.

    Returns:
        ``v`` (B, P, T_out, D), the squashed parents, and the final couplings ``c``
        (B, P, K, T_in, T_out); each child's couplings sum to 1 over its parents.
    """
    layout = layout if layout is not None else ChildLayout()
    # Line 2: b_ij <- 0, reset for every example.
    b_ij = u_hat.new_zeros(u_hat.shape[:-1])  # (B, P, K, T_in, T_out)
    u_hat_inner = u_hat.detach() if detach_inner else u_hat
    for r in range(iterations):
        last = r == iterations - 1
        u = u_hat if last else u_hat_inner
        # Line 4: c_i <- softmax(b_i) over the parents j of child i, never over the children.
        c_ij = layout.softmax(b_ij)  # (B, P, K, T_in, T_out)
        # Line 5: s_j <- sum_i c_ij u_hat_{j|i}.
        s_j = torch.einsum("bpkio,bpkiod->bpod", c_ij, u)  # (B, P, T_out, D)
        # Line 6: v_j <- squash(s_j).
        v_j = squash(s_j, dim=-1)
        if trace is not None:
            trace.record(c_ij, v_j.norm(dim=-1))
        if not last:
            # Line 7: b_ij <- b_ij + u_hat_{j|i} . v_j (skipped after the last iteration).
            b_ij = b_ij + torch.einsum("bpkiod,bpod->bpkio", u, v_j)
    return v_j, c_ij


def fused_dynamic_routing(
    u_hat: torch.Tensor,
    *,
    iterations: int,
    detach_inner: bool = False,
    layout: ChildLayout | None = None,
    trace: RoutingTrace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedure 1 as :func:`dynamic_routing` (same arguments and results), with the predictions in the parents'
    layout U (G, N, D), G = B * P * T_out parents of N = K * T_in children: line 5 is ``(G, 1, N) @ (G, N, D)``,
    line 7 ``(G, 1, D) @ (G, D, N)``, and the backward pass writes dL/du_hat once (:class:`ParentVotes`)."""
    layout = layout if layout is not None else ChildLayout()
    b, p, k, t_in, t_out, d = u_hat.shape
    g, n = b * p * t_out, k * t_in
    # token pairs: one per use of U, line 5 in every iteration and line 7 in all but the last
    U, _, *tokens = ParentVotes.apply(u_hat, 2 * iterations - 1, 0, u_hat.dtype, False)  # U: (G, N, D)
    # Line 2: b_ij <- 0, kept in the parents' layout (B, P, T_out, K, T_in)
    b_par = u_hat.new_zeros(b, p, t_out, k, t_in)
    for r in range(iterations):
        last = r == iterations - 1
        uses = tokens[4 * r : 4 * r + 4]
        if detach_inner and not last:  # u_hat.detach() in this iteration: no gradient reaches U through its uses
            uses = [token.detach() for token in uses]
        # Line 4: c_i <- softmax(b_i) over the parents j of child i (the layout's own view of the logits)
        c_ij = layout.softmax(b_par.permute(0, 1, 3, 4, 2))  # (B, P, K, T_in, T_out)
        c_par = c_ij.permute(0, 1, 4, 2, 3).reshape(g, n)  # (G, N)
        # Line 5: s_j <- sum_i c_ij u_hat_{j|i};  Line 6: v_j <- squash(s_j)
        s_j = VoteSum.apply(U, *uses[:2], c_par)  # (G, D)
        v_j = squash(s_j.view(b, p, t_out, d), dim=-1)  # (B, P, T_out, D)
        if trace is not None:
            trace.record(c_ij, v_j.norm(dim=-1))
        if not last:
            # Line 7: b_ij <- b_ij + u_hat_{j|i} . v_j
            b_par = b_par + VoteDot.apply(U, *uses[2:], v_j.reshape(g, d)).view(b, p, t_out, k, t_in)
    return v_j, c_ij


@register_routing("dynamic", kinds=("vector",))
class DynamicRouting(Routing):
    """Dynamic routing for vector capsules: ``poses`` are the squashed parents ``v_j``, activations their lengths.

    Args:
        iterations: r (paper: 3; ablation: 1).
        detach_inner: gradients through the last iteration only (see :func:`dynamic_routing`).
    """

    @checked(routing_key)
    def __init__(self, *, iterations: PositiveInt = 3, detach_inner: bool = False, **base: Any) -> None:
        super().__init__(iterations=iterations, **base)
        self.detach_inner = detach_inner

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        v, c = dynamic_routing(
            votes, iterations=self.iterations, detach_inner=self.detach_inner, layout=layout, trace=trace
        )
        return RoutingResult(v, v.norm(dim=-1), c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_inner={self.detach_inner}"


@register_routing("dynamic", kinds=("vector",), impl="fused", default=True)
class FusedDynamicRouting(DynamicRouting):
    """Dynamic routing, the fast implementation (``impl: fused``): the same settings and results as
    ``impl: reference``."""

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        v, c = fused_dynamic_routing(
            votes, iterations=self.iterations, detach_inner=self.detach_inner, layout=layout, trace=trace
        )
        return RoutingResult(v, v.norm(dim=-1), c)
