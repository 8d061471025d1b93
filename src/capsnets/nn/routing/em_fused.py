"""EM routing, fused (``impl: fused``): Procedure 1 with as few passes over the votes as possible, exact in float32.

The same mathematics as the readable :mod:`capsnets.nn.routing.em` (tests assert equal values
and gradients), organised for memory traffic: EM routing is memory-bound on the vote-sized
tensors (em_caps' ConvCaps1 holds ~5.3M vote elements per image), so they are touched as few
times as possible. Internally every parent j = (b, p, o) owns a contiguous block of its
N = K * T_in votes: G = B * P * T_out parents, votes laid out (G, N, D), R as (B, P, T_out, K, T_in).

**Votes.** One copy of the votes in the parents' layout, ``U = V - c0`` (G, N, D), with ``c0`` the
plain mean of each parent's votes (a constant: it only keeps ``U`` small, so that float32 sums of
``U`` lose digits relative to the spread of the votes, not to their size). A matrix-capsule layer hands
over the votes by their factors (:class:`~capsnets.nn.routing.VoteFactors`, child poses and transforms):
the votes are then formed straight into U, centred and laid out at once (``factor_votes`` of the kernels: eager
block by block, compiled in one loop), and V never exists besides U.

**M-step: the weighted mean and squared distances of every parent's votes** (``w_i = R_ij a_i / sum_i R_ij
a_i``, summing to ``m``: 1, or 0 for a parent without data), as two sums about a constant centre ``c``, the mean
``E[U] = sum_i w_i U_i`` rounded to the votes' dtype (:class:`Moments`, the kernels' ``moments``):

- ``E[U]`` and ``E[Q] = sum_i w_i Q_i`` with ``Q = (U - c)^2``; eager kernels take them in two passes (the mean,
  then the squares formed block by block where they are read); compiled kernels in one, accumulating ``sum w``,
  ``sum w X`` and ``sum w X^2`` of ``X = U - shift`` in float64 (the square of a difference of two float32 numbers
  is exact there) about ``shift``, the previous iteration's centre (the first iteration: 0, the plain mean), and
  taking the centre's part off by algebra, which costs float64's digits only (~1e-16 N ((mean - shift) /
  sigma)^2 of the variance);
- then ``mu = c0 m + E[U]`` (smoothed as the variant asks) and
  ``sigma^2 = sum_i w_i (U_i - (mu - c0))^2 = E[Q] - 2 (mu - c0 - c) (E[U] - m c) + m (mu - c0 - c)^2``,
  exact for any constant c; with c the rounded mean the last two terms are rounding-sized (or the smoothing's
  share of the mean's move), so nothing cancels: float32 votes give float32-accurate variances even for a tight
  cluster far from the plain mean (centring once, on the plain mean, lost ``2^-24 ((mu - c0) / sigma)^2`` of the
  variance). The per-parent arithmetic of lines 3-6 after the sums is one compiled function
  (:func:`parent_statistics`); the E-step's centre is mu - c0 rounded.

**E-step.** ``sum_h (V_h - mu_h)^2 / sigma_h^2 = sum_h Q_h / sigma_h^2 + sum_h U_h f_h + const`` with
``f = -2 (mu - c0 - c) / sigma^2``: two contractions (U with f, Q with ``1 / sigma^2``) and a per-parent
constant in one pass; nothing vote-sized is formed per E-step. The backward pass reads U once per use for the
gradients of the small operands (the M-step's weights: one pass of the E-step's kind) and once for the vote
gradient.

Per-parent statistics (means, variances, activations, assignments: at most 1/D of the votes' size) are
kept in float64 whatever ``moment_dtype`` is, so only the vote-sized tensors run in ``moment_dtype`` (float32
statistics were tried: the assignments then differ from float64 by up to 1.4e-4, measured).
The custom autograd functions below and in :mod:`~capsnets.nn.routing.vote_passes` make the backward pass
write the vote gradient once; they form ``2 (U - c) x`` as ``U x - c x``, so float32 gradients of votes in a
tight cluster far from c0 carry about the error a plain float32 run of the reference has (~5e-4 relative on
the tight-cluster test case; float64 moments are exact).

**Memory.** U is the only vote-sized tensor kept for the backward pass: every use of Q forms it block by
block (``vote_passes.CHUNK_ELEMENTS``), in the forward and again in the backward pass, and the vote gradient is
formed block by block too. em_caps at batch 32 (smallNORB 32x32, float32, jemalloc): peak RSS of a training step
3.2-3.4 GB, from 6.3 GB with the votes whole and Q kept per iteration (the readable reference: 10.3 GB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from capsnets.nn.routing.base import RoutingResult, RoutingTrace, VoteFactors, Votes, register_routing
from capsnets.nn.routing.em import PAPER, EMRoutingBase, EMVariant, activation_logits, smoothed_mean
from capsnets.nn.routing.kernels import EAGER, EagerKernels, KernelMode, vote_kernels
from capsnets.nn.routing.layout import ChildLayout, normalise_over_parents
from capsnets.nn.routing.vote_passes import FactorVotes, ParentVotes, first_order_only

STATS = torch.float64  # the per-parent statistics' dtype


class Moments(torch.autograd.Function):
    """An M-step's two sums over each parent's votes, ``E_U[g] = sum_n w[g, n] U[g, n]`` and ``E_Q[g] = sum_n w[g, n]
    (U[g, n] - c[g])^2`` about a constant centre c near the weighted mean, which the kernels choose and return:
    (G, N) -> (G, D) x 2 in float64 and c (G, D) in U's dtype (eager: two passes, the mean then the squares; compiled:
    one, in float64 about ``shift``, a guess of the mean). One plain and one scaled token pair (``dL/dU = w x (dE_U -
    2 c dE_Q) + U * (w x 2 dE_Q)``); the gradient for w, ``sum_h U dE_U + (U - c)^2 dE_Q``, is one more pass (the
    E-step's contraction)."""

    @staticmethod
    def forward(ctx, U, plain_n, plain_d, scaled_n, scaled_d, w, shift, kernels: EagerKernels = EAGER):  # type: ignore[override]
        E_U, E_Q, c = kernels.moments(U, w, shift)  # c a tensor of its own (no gradient), also for float64 votes
        ctx.save_for_backward(U, c, w)
        ctx.kernels = kernels
        ctx.mark_non_differentiable(c)
        return E_U, E_Q, c

    @staticmethod
    @first_order_only
    def backward(ctx, dE_U, dE_Q, _dc):  # type: ignore[override]
        U, c, w = ctx.saved_tensors
        right = (dE_U - 2.0 * c.to(dE_Q.dtype) * dE_Q).to(U.dtype)
        dw = ctx.kernels.pose_sum(U, c, dE_U.to(U.dtype), dE_Q.to(U.dtype)) if ctx.needs_input_grad[5] else None
        return None, w, right, w, (2.0 * dE_Q).to(U.dtype), dw, None, None


class PoseSum(torch.autograd.Function):
    """E-step contraction ``q[g, n] = sum_h U[g, n, h] f1[g, h] + Q[g, n, h] f2[g, h]`` with ``Q = (U - c)^2``:
    (G, D) x 2 -> (G, N); one plain and one scaled token pair. One read of U, Q formed from it."""

    @staticmethod
    def forward(ctx, U, c, plain_n, plain_d, scaled_n, scaled_d, f1, f2, kernels: EagerKernels = EAGER):  # type: ignore[override]
        ctx.save_for_backward(U, c, f1, f2)
        ctx.kernels = kernels
        return kernels.pose_sum(U, c, f1, f2)

    @staticmethod
    @first_order_only
    def backward(ctx, dq):  # type: ignore[override]
        U, c, f1, f2 = ctx.saved_tensors
        df1 = df2 = None
        if ctx.needs_input_grad[6] or ctx.needs_input_grad[7]:
            df1, df2 = ctx.kernels.pose_sum_grads(U, c, dq)
        # dL/dU = dq x f1 + 2 (U - c) * (dq x f2)
        return (
            None,
            None,
            dq,
            f1 - 2.0 * c * f2,
            dq,
            2.0 * f2,
            df1 if ctx.needs_input_grad[6] else None,
            df2 if ctx.needs_input_grad[7] else None,
            None,
        )


def spread(
    E_U: torch.Tensor, E_Q: torch.Tensor, c: torch.Tensor, mean: torch.Tensor, mass: torch.Tensor
) -> torch.Tensor:
    """``sum_i w_i (U_i - mean)^2`` per parent from :class:`Moments`' sums about c (all in STATS, (..., D); mass = sum_i
    w_i (..., 1)): ``E_Q - 2 delta (E_U - m c) + m delta^2`` with ``delta = mean - c``, exact for any constant c; with
    c near the mean nothing cancels (module docstring)."""
    delta = mean - c
    return E_Q - 2 * delta * (E_U - mass * c) + mass * delta**2


def parent_weights(
    R: torch.Tensor, a_in: torch.Tensor, eps: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each parent's weights of its votes, ``w_i = R_ij a_i / sum_i R_ij a_i`` (G, N) in ``dtype``, with ``sum_i R_ij
    a_i`` (B, P, T_out) and the weights' sum (B, P, T_out, 1): 1, or 0 for a parent without data. R (B, P, T_out, K,
    T_in), a_in broadcast to it."""
    R = R * a_in  # R_ij <- R_ij * a_i, (B, P, T_out, K, T_in)
    sum_R = R.sum(dim=(3, 4))  # sum_i R_ij, (B, P, T_out)
    R_norm = R / (sum_R[..., None, None] + eps)  # eps keeps empty parents finite
    mass = (sum_R / (sum_R + eps))[..., None]  # sum_i R_norm_ij: 1, or 0 for an empty parent, (B, P, T_out, 1)
    return R_norm.reshape(-1, R.shape[3] * R.shape[4]).to(dtype), sum_R, mass


def m_step(
    R: torch.Tensor,
    a_in: torch.Tensor,
    U: torch.Tensor,
    c0: torch.Tensor,
    tokens: Sequence[torch.Tensor],
    *,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambda_: float,
    var_floor: float,
    eps: float,
    variant: EMVariant = PAPER,
    mu_previous: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    kernels: EagerKernels = EAGER,
) -> tuple[torch.Tensor, ...]:
    """M-step for every parent from the sums of one pass over the votes U = V - c0 (module docstring).

    ``tokens``: a plain and a scaled pair from ``ParentVotes``. ``mu_previous``: the previous iteration's mean, for
    the release's mean smoothing. ``shift`` (G, D): a guess of mu - c0 in U's dtype (the previous iteration's c;
    default 0, the plain mean). Returns mu, sigma_sq (B, P, T_out, D), the logits of a_out (B, P, T_out), and for
    the E-step the centre c (G, D) of ``Q = (U - c)^2`` and ``mu - c0 - c`` (B, P, T_out, D).
    """
    w, sum_R, mass = kernels.stats("parent_weights", parent_weights, R, a_in, eps, U.dtype)
    shift = shift if shift is not None else U.new_zeros(U.shape[0], U.shape[2])  # contiguous: one compiled loop
    E_U, E_Q, c = Moments.apply(U, *tokens, w, shift, kernels)  # lines 3-4's sums, (G, D)
    stats = (E_U, E_Q, c, c0, mass, sum_R, mu_previous, beta_u, beta_a)
    return kernels.stats("parent_statistics", parent_statistics, *stats, lambda_, var_floor, variant)


def parent_statistics(
    E_U: torch.Tensor,
    E_Q: torch.Tensor,
    c: torch.Tensor,
    c0: torch.Tensor,
    mass: torch.Tensor,
    sum_R: torch.Tensor,
    mu_previous: torch.Tensor | None,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lambda_: float,
    var_floor: float,
    variant: EMVariant,
) -> tuple[torch.Tensor, ...]:
    """Lines 3-6 of the M-step from :class:`Moments`' sums E_U, E_Q about c (G, D), and c0 (G, D), mass (B, P, T_out,
    1), sum_R (B, P, T_out): returns what :func:`m_step` returns."""
    shape = (*sum_R.shape, c0.shape[-1])  # (B, P, T_out, D)
    E_U, E_Q, c0, c_s = (x.to(STATS).view(shape) for x in (E_U, E_Q, c0, c))
    mu = smoothed_mean(mass * c0 + E_U, mu_previous, variant)  # line 3, smoothed as the variant asks
    sigma_sq = spread(E_U, E_Q, c_s, mu - c0, mass)  # line 4: the weighted squared distances from mu
    # straight-through clamp: rounding can land a zero variance (a parent with one child) just below 0; the
    # forward pass clamps it, the backward pass keeps the true gradient (a plain clamp would zero the
    # gradient with respect to every other child's activation there)
    sigma_sq = sigma_sq + (sigma_sq.clamp_min(0) - sigma_sq).detach() + var_floor
    logits = activation_logits(sigma_sq, sum_R, beta_u=beta_u, beta_a=beta_a, lambda_=lambda_, variant=variant)
    # the E-step's centre: mu - c0 rounded to U's dtype (a constant), and what rounding left (mu's gradient)
    c_e = (mu - c0).detach().to(c.dtype)
    return mu, sigma_sq, logits, c_e.view_as(c), mu - c0 - c_e.to(STATS)


def e_step(
    U: torch.Tensor,
    c: torch.Tensor,
    tokens: Sequence[torch.Tensor],
    delta: torch.Tensor,
    sigma_sq: torch.Tensor,
    logits: torch.Tensor,
    layout: ChildLayout,
    normalisation: str,
    k: int,
    kernels: EagerKernels = EAGER,
) -> torch.Tensor:
    """E-step for every child i, ``R_ij = a_j p_ij / sum_k a_k p_ik`` in the log domain (module docstring).

    ``tokens``: a plain and a scaled pair from ``ParentVotes``. Returns R (B, P, T_out, K, T_in).
    """
    b, p, t_out, _ = delta.shape
    inv_var = 1.0 / sigma_sq  # (B, P, T_out, D)
    # sum_h (U - c - delta)^2 / sigma^2 = sum_h Q / sigma^2 + sum_h U f1 + sum_h (2 c delta + delta^2) / sigma^2
    f1 = (-2.0 * delta * inv_var).view(b * p * t_out, -1)
    f2 = inv_var.view(b * p * t_out, -1)
    q = PoseSum.apply(U, c, *tokens, f1.to(U.dtype), f2.to(U.dtype), kernels).view(b, p, t_out, k, -1)  # in U's dtype
    args = (q, c.to(STATS).view_as(delta), delta, inv_var, sigma_sq, logits, layout.child_index, layout.num_children)
    return kernels.stats("assignments", assignments, *args, normalisation)


def assignments(
    q: torch.Tensor,
    c: torch.Tensor,
    delta: torch.Tensor,
    inv_var: torch.Tensor,
    sigma_sq: torch.Tensor,
    logits: torch.Tensor,
    child_index: torch.Tensor | None,
    num_children: int | None,
    normalisation: str,
) -> torch.Tensor:
    """The E-step's assignments R (B, P, T_out, K, T_in) from ``q = sum_h (U - c)^2 / sigma^2 + U f1`` (B, P, T_out,
    K, T_in) and the parents' statistics (B, P, T_out, D) or (B, P, T_out), normalised over each child's parents in
    the layout ``child_index`` (:func:`~capsnets.nn.routing.layout.normalise_over_parents`)."""
    # log p_ij = sum_h log N(V_ij^h; mu_j^h, sigma_j^h) = -0.5 (q_ij + the parent's terms)
    per_parent = ((2 * c + delta) * delta * inv_var + torch.log(2 * math.pi * sigma_sq)).sum(dim=-1)  # (B, P, T_out)
    # log a_j + log p_ij: the parent's terms first, then q added in one pass over the (parent, child) pairs (in
    # STATS: q is widened as it is read)
    log_a_p = torch.add(
        (F.logsigmoid(logits) - 0.5 * per_parent)[..., None, None], q, alpha=-0.5
    )  # (B, P, T_out, K, T_in)
    # normalised over each child's parents in the routing layout (a permuted view: no copy)
    R = normalise_over_parents(log_a_p.permute(0, 1, 3, 4, 2), child_index, num_children, normalisation)
    return R.permute(0, 1, 4, 2, 3)


def fused_em_routing(
    V: torch.Tensor | VoteFactors,
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
    kernels: KernelMode = "eager",
) -> RoutingResult:
    """Procedure 1: ``len(lambdas)`` iterations of M-step (every parent) then E-step (every child).

    Args as :func:`capsnets.nn.routing.em.em_routing`; V (B, P, K, T_in, T_out, D) in any strides, or its
    :class:`~capsnets.nn.routing.VoteFactors` (formed straight into U, never whole besides it); ``moment_dtype`` the
    dtype of the vote-sized tensors (outputs are returned in it); ``kernels`` how the passes over the votes run
    (:func:`~capsnets.nn.routing.kernels.vote_kernels`: ``auto``, ``eager`` or ``compiled``). Runs with autocast off
    (as every routing does, :class:`~capsnets.nn.routing.base.Routing`), also when called directly.
    """
    if torch.is_autocast_enabled(V.device.type):
        with torch.autocast(device_type=V.device.type, enabled=False):
            return fused_em_routing(
                V,
                a_in,
                beta_u=beta_u,
                beta_a=beta_a,
                lambdas=lambdas,
                var_floor=var_floor,
                eps=eps,
                layout=layout,
                normalisation=normalisation,
                variant=variant,
                moment_dtype=moment_dtype,
                trace=trace,
                kernels=kernels,
            )
    layout = layout if layout is not None else ChildLayout()
    b, p, k, t_in, t_out, d = V.shape
    iterations = len(lambdas)
    a_in, beta_u, beta_a = (x.to(STATS) for x in (a_in, beta_u, beta_a))
    # token pairs: per M-step and per E-step a plain and a scaled one
    uses = (
        2 * iterations - 1,
        2 * iterations - 1,
        moment_dtype,
        True,
        vote_kernels(kernels, a_in.device),
    )
    kernels = uses[-1]
    if isinstance(V, VoteFactors):
        U, c0, *tokens = FactorVotes.apply(V.pose, V.weight, V.offset, *uses, V.kron)
    else:
        U, c0, *tokens = ParentVotes.apply(V, *uses)
    c0 = c0.to(STATS)  # (G, D)
    plain, scaled = tokens[: 2 * (2 * iterations - 1)], tokens[2 * (2 * iterations - 1) :]
    a_in = a_in[:, :, None]  # (B, P, 1, K, T_in), broadcast over R's T_out
    R = layout.initial(torch.Size((b, p, k, t_in, t_out)), like=a_in, over=normalisation).permute(0, 1, 4, 2, 3)
    mu = c = None
    for t, lambda_ in enumerate(lambdas):
        m_tokens = (*plain[4 * t : 4 * t + 2], *scaled[4 * t : 4 * t + 2])
        mu, sigma_sq, logits, c, delta = m_step(
            R,
            a_in,
            U,
            c0,
            m_tokens,
            beta_u=beta_u,
            beta_a=beta_a,
            lambda_=lambda_,
            var_floor=var_floor,
            eps=eps,
            variant=variant,
            mu_previous=mu,
            shift=c,
            kernels=kernels,
        )
        if trace is not None:
            trace.record(R.permute(0, 1, 3, 4, 2), torch.sigmoid(logits))  # R as (B, P, K, T_in, T_out)
        if t < iterations - 1:
            e_tokens = (*plain[4 * t + 2 : 4 * t + 4], *scaled[4 * t + 2 : 4 * t + 4])
            R = e_step(U, c, e_tokens, delta, sigma_sq, logits, layout, normalisation, k, kernels)
            if variant.detach_assignments:
                R = R.detach()
    out = (mu, torch.sigmoid(logits), R.permute(0, 1, 3, 4, 2))
    return RoutingResult(*(x.to(moment_dtype) for x in out))


@register_routing("em", kinds=("matrix",), impl="fused", default=True)
class FusedEMRouting(EMRoutingBase):
    """EM routing, the fast implementation (``impl: fused``): the same settings and results as ``impl: reference``;
    forms the votes itself, straight into its centred copy, when a layer hands over their factors."""

    takes_vote_factors = True

    def route(
        self, votes: Votes, a_in: torch.Tensor | None, layout: ChildLayout, trace: RoutingTrace | None
    ) -> RoutingResult:
        if a_in is None:
            a_in = torch.ones(votes.shape[:4], dtype=votes.dtype, device=votes.device)
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
            kernels=self.kernels,
        )
        return RoutingResult(*(x.to(votes.dtype) for x in result))
