"""Self-attention routing (Mazzia, Salvetti & Chiaberge 2021, "Efficient-CapsNet: capsule network with
self-attention routing", Sec. 3.2, Eqs. 3-7), for vector capsules.

One pass, no iterations. For every parent n, the predictions of all children l attend to each
other, and a child is coupled to the parents whose other predictions agree with its own:

    Eq. 3:  u_hat_{l,n} = u_l W_{l,n}                              predictions (the layer computes them)
    Eq. 4:  A_n = U_hat_n U_hat_n^T / sqrt(d)                       (N_l x N_l) self-attention of parent n
    Eq. 5:  C_{l,n} = exp(sum_l' A_n[l, l']) / sum_k exp(sum_l' A_k[l, l'])
                                                                    couplings: softmax over the parents n
    Eq. 6:  s_n = sum_l u_hat_{l,n} (C_{l,n} + B_{l,n})             B: learned log priors, initialised to 0
    Eq. 7:  v_n = (1 - 1/e^{|s_n|}) s_n / |s_n|                     the paper's squash

``sum_l' A_n[l, l'] = u_hat_{l,n} . (sum_l' u_hat_{l',n}) / sqrt(d)``, so the N_l x N_l matrix is
never formed. In the routing layout (:mod:`capsnets.nn.routing.base`), the children l of a parent
are the K x T_in slots of its patch, and ``C`` is normalised over each child's parents
(:class:`~capsnets.nn.routing.layout.ChildLayout`: over the parent types of a fully connected
layer, as the paper; over every covering parent in a convolutional one).

The authors' release adds ``B`` after the softmax, as Eq. 6 does; the assignments reported to
routing statistics are ``C`` (which sum to 1 over each child's parents).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.routing.base import Routing, RoutingResult, RoutingTrace, register_routing, routing_key
from capsnets.nn.routing.layout import ChildLayout
from capsnets.nn.squash import SQUASHES, Squash
from capsnets.schema import PositiveInt, checked


def self_attention_routing(
    u_hat: torch.Tensor,
    *,
    log_prior: torch.Tensor | None = None,
    squash: str = "efficient",
    layout: ChildLayout | None = None,
    trace: RoutingTrace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route predictions ``u_hat`` (B, P, K, T_in, T_out, D) in one self-attention pass (Eqs. 4-7).

    Args:
        log_prior: ``B`` (K, T_in, T_out), added to the couplings (Eq. 6); None: no prior.
        squash: ``efficient`` (Eq. 7) or ``sabour`` (Sabour et al. 2017, Eq. 1).
        layout: which child sits in each slot (couplings are normalised over each child's parents).

    Returns:
        ``v`` (B, P, T_out, D), the parents, and the couplings ``C`` (B, P, K, T_in, T_out).
    """
    layout = layout if layout is not None else ChildLayout()
    d = u_hat.shape[-1]
    # Eq. 4, summed over l': sum_l' A_n[l, l'] = u_hat_{l,n} . sum_l' u_hat_{l',n} / sqrt(d)
    total = u_hat.sum(dim=(2, 3))  # (B, P, T_out, D): sum over the children of each parent
    attention = torch.einsum("bpkiod,bpod->bpkio", u_hat, total) / math.sqrt(d)  # (B, P, K, T_in, T_out)
    # Eq. 5: C_{l,n}, a softmax over the parents n of each child l (never over the children)
    c = layout.softmax(attention)  # (B, P, K, T_in, T_out)
    # Eq. 6: s_n = sum_l u_hat_{l,n} (C_{l,n} + B_{l,n})
    weights = c + log_prior if log_prior is not None else c  # (B, P, K, T_in, T_out)
    s = torch.einsum("bpkio,bpkiod->bpod", weights, u_hat)  # (B, P, T_out, D)
    # Eq. 7
    v = SQUASHES[squash](s, dim=-1)
    if trace is not None:
        trace.record(c, v.norm(dim=-1))
    return v, c


@register_routing("self_attention", kinds=("vector",))
class SelfAttentionRouting(Routing):
    """Efficient-CapsNet's self-attention routing: ``poses`` are the parents ``v_n``, activations their lengths.

    Args:
        iterations: 1 (the procedure is one pass; any other value is refused).
        prior: learn the log priors ``B`` (one per child slot and parent, Eq. 6; the paper's). They
            need the layer's slots (``in_slots``); the dr_caps and efficient_caps class layers give them.
        squash: ``efficient`` (the paper's Eq. 7) or ``sabour``.
    """

    @checked(routing_key)
    def __init__(
        self, *, iterations: PositiveInt = 1, prior: bool = True, squash: Squash = "efficient", **base: Any
    ) -> None:
        super().__init__(iterations=iterations, **base)
        if self.iterations != 1:
            raise ConfigError(
                f"{self.key}.iterations={iterations}: self-attention routing is a single pass. "
                f"Fix: {self.key}.iterations=1."
            )
        self.prior = prior
        self.squash = squash
        self.log_prior: nn.Parameter | None = None
        if self.prior:
            if self.in_slots is None:
                raise ConfigError(
                    f"{self.key}.prior: the learned log priors are one per child slot and this layer does not "
                    f"state its slots. Fix: {self.key}.prior=false."
                )
            k, t_in = self.in_slots
            self.log_prior = nn.Parameter(torch.zeros(k, t_in, self.out_types))  # B_{l,n}, (K, T_in, T_out)

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        log_prior = None
        if self.log_prior is not None:
            if tuple(votes.shape[2:4]) != tuple(self.log_prior.shape[:2]):
                raise ValueError(
                    f"self-attention routing built for {tuple(self.log_prior.shape[:2])} child slots (K, T_in), "
                    f"got votes with {tuple(votes.shape[2:4])}."
                )
            log_prior = self.log_prior.to(votes.dtype)
        v, c = self_attention_routing(votes, log_prior=log_prior, squash=self.squash, layout=layout, trace=trace)
        return RoutingResult(v, v.norm(dim=-1), c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prior={self.prior}, squash={self.squash}"
