"""EM routing, fused (``impl: fused``): Procedure 1 with as few passes over the votes as possible.

The same mathematics as the readable :mod:`capsnets.nn.routing.em` (tests assert equal values
and gradients), organised for memory traffic: EM routing is memory-bound on the vote-sized
tensors (em_caps' ConvCaps1 holds ~5.3M vote elements per image), so they are touched as few
times as possible. Internally every parent j = (b, p, o) owns a contiguous block of its
N = K * T_in votes: G = B * P * T_out parents, R laid out (B, P, T_out, K, T_in).

**The two moment identities.** The votes are centred once, ``V' = V - c`` with c any constant
per parent (here the plain mean of its votes, which keeps cancellation small), and stored side
by side with their squares as ``X = [V' | V'^2]`` (G, N, 2D). With ``w_i = R_ij / sum_i R_ij``
(summing to ``m``: 1, or 0 for a parent without data) every step is one contraction of X:

1. M-step. ``E[V'] = sum_i w_i V'_i`` and ``E[V'^2] = sum_i w_i V'^2_i`` give
   ``mu - c = E[V'] - (1 - m) c`` (so ``mu = sum_i w_i V_i`` exactly) and
   ``sigma^2 = sum_i w_i (V'_i - (mu - c))^2 = E[V'^2] - 2 (mu - c) E[V'] + m (mu - c)^2``.
2. E-step. ``sum_h (V_h - mu_h)^2 / sigma_h^2 = sum_h (V'^2_h - 2 V'_h (mu_h - c_h)) / sigma_h^2
   + sum_h (mu_h - c_h)^2 / sigma_h^2``: one contraction of X with ``[-2 (mu - c) / sigma^2 | 1 / sigma^2]``
   plus a per-parent constant; nothing vote-sized is formed per iteration.

Float32 moments lose about ``2^-24 ((mu - c) / sigma)^2`` to cancellation (a tight cluster of large
votes far from their plain mean); ``moment_dtype: float64`` is exact there at about twice the cost.
The custom autograd functions below make the backward pass write one vote-sized gradient in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from capsnets.nn.routing.base import RoutingResult, RoutingTrace, register_routing
from capsnets.nn.routing.em import PAPER, EMRoutingBase, EMVariant, activation_logits
from capsnets.nn.routing.layout import ChildLayout


def first_order_only(backward):
    """Backward of a custom Function that has no derivative of its own: computes under no_grad and refuses
    ``create_graph=True`` (second derivatives, e.g. gradient penalties) instead of silently dropping terms."""

    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "EM routing impl=fused has no second derivatives (create_graph=True, e.g. a gradient penalty "
                "through routing): use model.routing.impl=reference, plain autograd, which has them"
            )
        with torch.no_grad():
            return backward(ctx, *grads)

    checked.__name__, checked.__doc__ = backward.__name__, backward.__doc__
    return checked


class CentredVotes(torch.autograd.Function):
    """``X = [V' | V'^2]`` (G, N, 2D) with ``V' = V - c``, written once per forward in ``dtype``.

    ``c`` (B, P, T_out, D) is the plain mean of each parent's votes, a constant (no gradient):
    mu and sigma_sq are rebuilt from E[V'] and E[V'^2] exactly for any c (see ``m_step``); c
    only keeps the cancellation in ``E[V'^2] - E[V']^2`` small. Every later use of X is a
    contraction with a small operand (``ChildSum``, ``PoseSum``), whose gradient with respect
    to X is an outer product ``left (G, N) x right (G, 2D)``. Each use hands its two factors
    back as the gradients of its own pair of ``tokens``, and the backward here sums them in one
    bmm: one vote-sized gradient in all, instead of one per use plus an accumulation each.
    """

    @staticmethod
    def forward(ctx, V: torch.Tensor, uses: int, dtype: torch.dtype):  # type: ignore[override]
        b, p, k, t_in, t_out, d = V.shape
        ctx.set_materialize_grads(False)  # X and c get no gradient: never allocate zeros for them
        V_par = V.permute(0, 1, 4, 2, 3, 5)  # (B, P, T_out, K, T_in, D), a view
        c = V_par.mean(dim=(3, 4), keepdim=True).to(dtype)  # (B, P, T_out, 1, 1, D)
        X = V.new_empty(b, p, t_out, k, t_in, 2, d, dtype=dtype)  # [V' | V'^2] of each vote side by side
        torch.sub(V_par, c, out=X.select(5, 0))  # one pass: centres and lays out each parent's votes contiguously
        torch.mul(X.select(5, 0), X.select(5, 0), out=X.select(5, 1))
        X = X.view(b * p * t_out, k * t_in, -1)  # (G, N, 2D)
        c = c.view(b, p, t_out, d)
        ctx.save_for_backward(X)
        ctx.layout = torch.empty_like(V, device="meta")  # V's shape, strides and dtype, without keeping V alive
        ctx.mark_non_differentiable(X, c)
        # distinct (G, N) and (G, 2D) tokens for each use (shared ones would sum factors before the product)
        tokens = [X.new_zeros(()).expand(X.shape[0], X.shape[1 + i % 2]) for i in range(2 * uses)]
        return (X, c, *tokens)

    @staticmethod
    @first_order_only
    def backward(ctx, _dX, _dc, *token_grads):  # type: ignore[override]
        pairs = [(left, right) for left, right in zip(token_grads[::2], token_grads[1::2]) if left is not None]
        if not pairs:
            return None, None, None
        (X,) = ctx.saved_tensors
        left = torch.stack([left for left, _ in pairs], dim=1)  # (G, uses, N): stacking on dim 2 copies slowly
        right = torch.stack([right for _, right in pairs], dim=1)  # (G, uses, 2D)
        dX = torch.bmm(left.transpose(1, 2), right)  # (G, N, 2D)
        layout = ctx.layout
        b, p, k, t_in, t_out, d = layout.shape
        # V's own strides, so that the backward of the vote einsum needs no copy
        dV = torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=X.device)
        dV_par = dV.permute(0, 1, 4, 2, 3, 5)  # (B, P, T_out, K, T_in, D)
        dX, X = (x.view(b, p, t_out, k, t_in, 2, d) for x in (dX, X))
        # dL/dV = dL/dV' + 2 V' dL/dV'^2 (c is a constant)
        if dV.dtype == dX.dtype:
            torch.addcmul(dX.select(5, 0), X.select(5, 0), dX.select(5, 1), value=2.0, out=dV_par)
        else:
            dV_par.copy_(dX.select(5, 0).addcmul_(X.select(5, 0), dX.select(5, 1), value=2.0))
        return dV, None, None


class ChildSum(torch.autograd.Function):
    """M-step contraction ``S[g] = sum_n w[g, n] X[g, n]``: (G, N) -> (G, 2D).

    ``tokens``: this use's pair from ``CentredVotes``; their gradients are the factors of dL/dX.
    """

    @staticmethod
    def forward(ctx, X: torch.Tensor, token_n: torch.Tensor, token_2d: torch.Tensor, w: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(X, w)
        return torch.bmm(w.unsqueeze(1), X).squeeze(1)  # (G, 1, N) @ (G, N, 2D) -> (G, 2D)

    @staticmethod
    @first_order_only
    def backward(ctx, dS):  # type: ignore[override]
        X, w = ctx.saved_tensors
        # (G, 1, 2D) @ (G, 2D, N): reads X faster than (G, N, 2D) @ (G, 2D, 1)
        dw = torch.bmm(dS.unsqueeze(1), X.transpose(1, 2)).squeeze(1) if ctx.needs_input_grad[3] else None  # (G, N)
        return None, w, dS, dw  # dL/dX = w x dS


class PoseSum(torch.autograd.Function):
    """E-step contraction ``q[g, n] = sum_h X[g, n, h] f[g, h]`` over the 2D elements: (G, 2D) -> (G, N)."""

    @staticmethod
    def forward(ctx, X: torch.Tensor, token_n: torch.Tensor, token_2d: torch.Tensor, f: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(X, f)
        return torch.bmm(f.unsqueeze(1), X.transpose(1, 2)).squeeze(1)  # (G, 1, 2D) @ (G, 2D, N) -> (G, N)

    @staticmethod
    @first_order_only
    def backward(ctx, dq):  # type: ignore[override]
        X, f = ctx.saved_tensors
        df = torch.bmm(dq.unsqueeze(1), X).squeeze(1) if ctx.needs_input_grad[3] else None  # (G, 2D)
        return None, dq, f, df  # dL/dX = dq x f


def m_step(
    R: torch.Tensor,
    a_in: torch.Tensor,
    X: torch.Tensor,
    c: torch.Tensor,
    tokens: Sequence[torch.Tensor],
    *,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambda_: float,
    var_floor: float,
    eps: float,
    variant: EMVariant = PAPER,
    mu_previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """M-step for every parent j from the centred votes X = [V' | V'^2] (identity 1 of the module docstring).

    Returns mu, sigma_sq and ``mu - c`` (B, P, T_out, D), and the logits of a_out (B, P, T_out).
    ``mu_previous``: the previous iteration's mean, for the release's mean smoothing.
    """
    b, p, t_out = R.shape[:3]
    R = R * a_in  # R_ij <- R_ij * a_i, (B, P, T_out, K, T_in)
    sum_R = R.sum(dim=(3, 4))  # sum_i R_ij, (B, P, T_out)
    R_norm = R / (sum_R[..., None, None] + eps)  # eps keeps empty parents finite
    mass = (sum_R / (sum_R + eps))[..., None]  # sum_i R_norm_ij: 1, or 0 for an empty parent, (B, P, T_out, 1)
    E_c, E_sq = ChildSum.apply(X, *tokens, R_norm.reshape(b * p * t_out, -1)).view(b, p, t_out, 2, -1).unbind(3)
    # exact for any constant c: mu = sum_i R_norm V = mass c + E[V'], and
    # sigma_sq = sum_i R_norm (V' - (mu - c))^2 = E[V'^2] - 2 (mu - c) E[V'] + mass (mu - c)^2
    mu_c = E_c - (1 - mass) * c  # mu_j - c_j
    if variant.mean_smoothing:  # the release: (1 - s) mu + s mu_previous (mu_previous = 0 at first), minus c
        s = variant.mean_smoothing
        mu_c = (1 - s) * mu_c + s * ((mu_previous - c) if mu_previous is not None else -c)
    # (the identity holds for any mu: the variance is taken around the smoothed mean)
    sigma_sq = E_sq - 2 * mu_c * E_c + mass * mu_c**2
    # straight-through clamp: rounding can land a zero variance (a parent with one child) just below 0; the
    # forward pass clamps it, the backward pass keeps the true gradient (a plain clamp would zero the
    # gradient with respect to every other child's activation there)
    sigma_sq = sigma_sq + (sigma_sq.clamp_min(0) - sigma_sq).detach() + var_floor
    logits = activation_logits(sigma_sq, sum_R, beta_u=beta_u, beta_a=beta_a, lambda_=lambda_, variant=variant)
    return c + mu_c, sigma_sq, mu_c, logits


def e_step(
    X: torch.Tensor,
    tokens: Sequence[torch.Tensor],
    mu_c: torch.Tensor,
    sigma_sq: torch.Tensor,
    logits: torch.Tensor,
    layout: ChildLayout,
    normalisation: str,
    k: int,
) -> torch.Tensor:
    """E-step for every child i, ``R_ij = a_j p_ij / sum_k a_k p_ik`` in the log domain (identity 2).

    Returns R (B, P, T_out, K, T_in).
    """
    b, p, t_out, _ = mu_c.shape
    inv_var = 1.0 / sigma_sq  # (B, P, T_out, D)
    f = torch.cat([-2.0 * mu_c * inv_var, inv_var], dim=-1).view(b * p * t_out, -1)  # (G, 2D), matches [V' | V'^2]
    mahalanobis = PoseSum.apply(X, *tokens, f).view(b, p, t_out, k, -1)  # minus the per-parent constant
    # log p_ij = sum_h log N(V_ij^h; mu_j^h, sigma_j^h); the parent's terms broadcast over its children
    per_parent = (mu_c**2 * inv_var + torch.log(2 * math.pi * sigma_sq)).sum(dim=-1)  # (B, P, T_out)
    log_p = -0.5 * (mahalanobis + per_parent[..., None, None])
    log_a_p = F.logsigmoid(logits)[..., None, None] + log_p  # (B, P, T_out, K, T_in)
    # normalised over each child's parents in the routing layout (a permuted view: no copy)
    return layout.softmax(log_a_p.permute(0, 1, 3, 4, 2), over=normalisation).permute(0, 1, 4, 2, 3)


def fused_em_routing(
    V: torch.Tensor,
    a_in: torch.Tensor,
    *,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambdas: Sequence[float],
    var_floor: float = 0.0005,
    eps: float = 1e-8,
    layout: ChildLayout | None = None,
    normalisation: str = "covering",
    variant: EMVariant = PAPER,
    moment_dtype: torch.dtype = torch.float32,
    trace: RoutingTrace | None = None,
) -> RoutingResult:
    """Procedure 1: ``len(lambdas)`` iterations of M-step (every parent) then E-step (every child).

    Args as :func:`capsnets.nn.routing.em.em_routing`; V (B, P, K, T_in, T_out, D) in any strides,
    ``moment_dtype`` the dtype of the centred votes and of the routing arithmetic (outputs keep it).
    """
    layout = layout if layout is not None else ChildLayout()
    b, p, k, t_in, t_out = V.shape[:5]
    a_in, beta_u, beta_a = (x.to(moment_dtype) for x in (a_in, beta_u, beta_a))
    X, c, *tokens = CentredVotes.apply(V, 2 * len(lambdas) - 1, moment_dtype)  # two tokens per contraction of X
    a_in = a_in[:, :, None]  # (B, P, 1, K, T_in), broadcast over R's T_out
    R = layout.initial(torch.Size((b, p, k, t_in, t_out)), like=X, over=normalisation).permute(0, 1, 4, 2, 3)
    mu = None
    for t, lambda_ in enumerate(lambdas):
        mu, sigma_sq, mu_c, logits = m_step(
            R,
            a_in,
            X,
            c,
            tokens[4 * t : 4 * t + 2],
            beta_u=beta_u,
            beta_a=beta_a,
            lambda_=lambda_,
            var_floor=var_floor,
            eps=eps,
            variant=variant,
            mu_previous=mu,
        )
        if trace is not None:
            trace.record(R.permute(0, 1, 3, 4, 2), torch.sigmoid(logits))  # R as (B, P, K, T_in, T_out)
        if t < len(lambdas) - 1:
            R = e_step(X, tokens[4 * t + 2 : 4 * t + 4], mu_c, sigma_sq, logits, layout, normalisation, k)
            if variant.detach_assignments:
                R = R.detach()
    return RoutingResult(mu, torch.sigmoid(logits), R.permute(0, 1, 3, 4, 2))


@register_routing("em", kinds=("matrix",), impl="fused", default=True)
class FusedEMRouting(EMRoutingBase):
    """EM routing, the fast implementation (``impl: fused``): the same settings and results as ``impl: reference``."""

    def route(
        self, votes: torch.Tensor, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        a_in = a_in if a_in is not None else votes.new_ones(votes.shape[:4])
        result = fused_em_routing(
            votes,
            a_in,
            beta_u=self.beta_u,
            beta_a=self.beta_a,
            lambdas=self.lambdas,
            var_floor=self.var_floor,
            eps=self.eps,
            layout=layout,
            normalisation=self.normalisation,
            variant=self.variant,
            moment_dtype=self.dtype_for(votes),
            trace=trace,
        )
        return RoutingResult(*(x.to(votes.dtype) for x in result))
