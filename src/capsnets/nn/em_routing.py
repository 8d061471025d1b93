"""EM routing (Hinton, Sabour & Frosst 2018, "Matrix capsules with EM routing", Procedure 1).

Votes come in laid out by *patch*: P parent positions, each seeing K child slots (the kernel
offsets of a conv-capsule layer, or every input position for the class layer), T_in child
types and T_out parent types; D = 16 pose elements h.

    V     (B, P, K, T_in, T_out, D)   votes V_ij of child i (slot k, type) for parent j (position p, type), any strides
    a_in  (B, P, K, T_in)             activation a_i of the child in each slot

Internally every parent j = (b, p, o) owns a contiguous block of its N = K * T_in votes:
G = B * P * T_out parents, R (B, P, T_out, K, T_in). The routing is memory-bound on the
vote-sized tensors, so they are touched as few times as possible (see ``CentredVotes``): the
votes are centred once, V' = V - c, and every M-step and E-step is one contraction over
[V', V'^2] with a small operand; nothing vote-sized is written per iteration.

A child can sit in several patches (overlapping conv kernels). ``child_index`` (P*K,) names
the input position of each (p, k) slot; the E-step then normalises each child's assignments
over *every* parent whose receptive field contains it (all positions and all types), the
paper's semantics, with scatter reductions (valid for any stride). Without ``child_index``
each slot is its own child and is normalised over the T_out parent types (class capsules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from capsnets.utils.validation import require_choice, require_int, require_positive

LAMBDA_SCHEDULES = ("official", "fixed")
MOMENT_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the least precision of the routing arithmetic
OFFICIAL_LAMBDA = 0.01  # google-research capsule_em: lambda_t = 0.01 * (1 - 0.95 ** (t + 1))
OFFICIAL_LAMBDA_DECAY = 0.95


class EMRoutingResult(NamedTuple):
    """Parents after the final M-step, and the assignments it used (before ``R * a_i``)."""

    mu: torch.Tensor  # (B, P, T_out, D) parent poses
    sigma_sq: torch.Tensor  # (B, P, T_out, D) parent variances, >= var_floor
    a_out: torch.Tensor  # (B, P, T_out) parent activations in (0, 1)
    R: torch.Tensor  # (B, P, K, T_in, T_out), a permuted view


class EMRoutingTrace(NamedTuple):
    """Every routing iteration of one call, for routing statistics (recorded only on request).

    ``assignments[t]`` is the R that the M-step of iteration t used (the uniform start for
    t = 0, before ``R * a_i``), ``activations[t]`` the parent activations it produced; the
    child layout needed to group R by child (see :func:`child_assignment_stats`) is kept too.
    """

    assignments: list[torch.Tensor]  # t -> (B, P, K, T_in, T_out), detached
    activations: list[torch.Tensor]  # t -> (B, P, T_out), detached
    child_index: torch.Tensor | None  # (P*K,) input position of each slot, None = every slot its own child
    num_children: int | None


def inverse_temperatures(iterations: int, *, schedule: str = "official", value: float = 0.01, scale: float = 1.0) -> list[float]:
    """lambda_t for routing iterations t = 0 .. iterations-1.

    "official": ``scale * 0.01 * (1 - 0.95 ** (t + 1))`` (the authors' code; ``scale=0.25`` at
    the class layer, where the code divides by 4); "fixed": ``scale * value`` every iteration.
    """
    if schedule == "official":
        return [scale * OFFICIAL_LAMBDA * (1 - OFFICIAL_LAMBDA_DECAY ** (t + 1)) for t in range(iterations)]
    return [scale * value] * iterations


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
    @once_differentiable
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
    @once_differentiable
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
    @once_differentiable
    def backward(ctx, dq):  # type: ignore[override]
        X, f = ctx.saved_tensors
        df = torch.bmm(dq.unsqueeze(1), X).squeeze(1) if ctx.needs_input_grad[3] else None  # (G, 2D)
        return None, dq, f, df  # dL/dX = dq x f


def initial_assignments(shape: torch.Size, child_index: torch.Tensor | None, num_children: int | None, like: torch.Tensor) -> torch.Tensor:
    """Procedure 1, line 2: R_ij uniform over the parents child i votes for, (B, P, T_out, K, T_in)."""
    b, p, t_out, k, t_in = shape
    if child_index is None:
        return like.new_full((1, 1, 1, 1, 1), 1.0 / t_out).expand(shape)
    covering = torch.bincount(child_index, minlength=num_children or 0)  # (N_children,) patches per child
    per_slot = covering.index_select(0, child_index).view(1, p, 1, k, 1).to(like.dtype)  # (1, P, 1, K, 1)
    return (1.0 / (per_slot * t_out)).expand(shape)


def m_step(
    R: torch.Tensor, a_in: torch.Tensor, X: torch.Tensor, c: torch.Tensor, tokens: Sequence[torch.Tensor], *,
    beta_u: torch.Tensor, beta_a: torch.Tensor, lambda_: float, var_floor: float, eps: float,
) -> tuple[torch.Tensor, ...]:
    """Procedure 1, M-step for every parent j, from the centred votes X = [V' | V'^2].

    Returns mu, sigma_sq and ``mu - c`` (B, P, T_out, D); a_out and log a_out (B, P, T_out).
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
    sigma_sq = (E_sq - 2 * mu_c * E_c + mass * mu_c**2).clamp_min(0) + var_floor
    cost = (beta_u[:, None] + 0.5 * torch.log(sigma_sq)) * sum_R[..., None]  # (beta_u + log sigma_j^h) sum_i R_ij
    logits = lambda_ * (beta_a - cost.sum(dim=-1))  # lambda (beta_a - sum_h cost^h), (B, P, T_out)
    # log a_j via logsigmoid stays finite when a_j underflows to 0 (needed by the E-step)
    return c + mu_c, sigma_sq, mu_c, torch.sigmoid(logits), F.logsigmoid(logits)


def normalise_over_parents(logits: torch.Tensor, child_index: torch.Tensor | None, num_children: int | None) -> torch.Tensor:
    """softmax of ``logits`` (B, P, T_out, K, T_in) over all parents of each child (log-sum-exp)."""
    if child_index is None:
        return torch.softmax(logits, dim=2)
    b, p, _, k, t_in = logits.shape
    index = child_index.view(1, p * k, 1).expand(b, p * k, t_in)  # (B, P*K, T_in) -> input position
    # max over every covering parent; detached, as the shift does not change the softmax
    slot_max = logits.detach().amax(dim=2).view(b, p * k, t_in)  # (B, P*K, T_in)
    child_max = slot_max.new_full((b, num_children, t_in), -math.inf)
    child_max = child_max.scatter_reduce(1, index, slot_max, reduce="amax")  # (B, N_children, T_in)
    shift = child_max.index_select(1, child_index).view(b, p, 1, k, t_in)  # back to slots
    e = torch.exp(logits - shift)  # (B, P, T_out, K, T_in), the largest term per child is 1
    child_sum = e.new_zeros(b, num_children, t_in).index_add(1, child_index, e.sum(dim=2).view(b, p * k, t_in))
    # children covered by no parent never appear in child_index, so no 0/0 is read back
    return e / child_sum.index_select(1, child_index).view(b, p, 1, k, t_in)


def e_step(
    X: torch.Tensor, tokens: Sequence[torch.Tensor], mu_c: torch.Tensor, sigma_sq: torch.Tensor, log_a_out: torch.Tensor,
    child_index: torch.Tensor | None, num_children: int | None, k: int,
) -> torch.Tensor:
    """Procedure 1, E-step for every child i: ``R_ij = a_j p_ij / sum_k a_k p_ik`` in the log domain.

    ``sum_h (V - mu)^2 / sigma^2 = sum_h (V'^2 - 2 V' (mu - c)) / sigma^2 + sum_h (mu - c)^2 / sigma^2``:
    one contraction of X, no vote-sized difference. Returns R (B, P, T_out, K, T_in).
    """
    b, p, t_out, _ = mu_c.shape
    inv_var = 1.0 / sigma_sq  # (B, P, T_out, D)
    f = torch.cat([-2.0 * mu_c * inv_var, inv_var], dim=-1).view(b * p * t_out, -1)  # (G, 2D), matches [V' | V'^2]
    mahalanobis = PoseSum.apply(X, *tokens, f).view(b, p, t_out, k, -1)  # minus the per-parent constant
    # log p_ij = sum_h log N(V_ij^h; mu_j^h, sigma_j^h); the parent's terms broadcast over its children
    per_parent = (mu_c**2 * inv_var + torch.log(2 * math.pi * sigma_sq)).sum(dim=-1)  # (B, P, T_out)
    log_p = -0.5 * (mahalanobis + per_parent[..., None, None])
    return normalise_over_parents(log_a_out[..., None, None] + log_p, child_index, num_children)


def em_routing(
    V: torch.Tensor, a_in: torch.Tensor, *, beta_u: torch.Tensor, beta_a: torch.Tensor, lambdas: Sequence[float],
    var_floor: float = 0.0005, eps: float = 1e-8, child_index: torch.Tensor | None = None, num_children: int | None = None,
    moment_dtype: torch.dtype | None = None, trace: EMRoutingTrace | None = None,
) -> EMRoutingResult:
    """Procedure 1: ``len(lambdas)`` iterations of M-step (every parent) then E-step (every child).

    The E-step after the last M-step is skipped. Runs with autocast disabled in at least
    float32 (float64 inputs stay float64), so routing is unaffected by mixed precision.

    Args:
        V: votes (B, P, K, T_in, T_out, D), any strides; a_in: child activations (B, P, K, T_in).
        beta_u, beta_a: (T_out,), one per parent type, shared across positions.
        lambdas: inverse temperature of each iteration (see ``inverse_temperatures``).
        var_floor: added to every sigma_sq (0.0005 in the authors' code).
        eps: guards ``sum_i R_ij`` of parents that receive no data.
        child_index: (P*K,) input position of each (p, k) slot, in [0, num_children); None
            when every slot is a distinct child.
        moment_dtype: dtype of the centred votes and of the routing arithmetic (default: that of
            the votes, at least float32; outputs keep it). The moments lose about
            ``2^-24 ((mu - c) / sigma)^2`` to cancellation in float32, c the plain mean of a
            parent's votes: nothing for spread-out votes, digits for a tight cluster far from c
            (large poses that agree); ``torch.float64`` is exact there, at about twice the cost.
        trace: if given, each iteration's assignments and parent activations are appended to
            its lists (detached; routing statistics). None, the default, records nothing.
    """
    with torch.autocast(device_type=V.device.type, enabled=False):
        dtype = torch.promote_types(V.dtype, torch.float32)
        moment_dtype = torch.promote_types(moment_dtype or dtype, dtype)
        V = V.to(dtype)
        a_in, beta_u, beta_a = (x.to(moment_dtype) for x in (a_in, beta_u, beta_a))
        b, p, k, t_in, t_out = V.shape[:5]
        X, c, *tokens = CentredVotes.apply(V, 2 * len(lambdas) - 1, moment_dtype)  # two per contraction of X
        a_in = a_in[:, :, None]  # (B, P, 1, K, T_in)
        R = initial_assignments(torch.Size((b, p, t_out, k, t_in)), child_index, num_children, like=X)
        for t, lambda_ in enumerate(lambdas):
            mu, sigma_sq, mu_c, a_out, log_a_out = m_step(
                R, a_in, X, c, tokens[4 * t:4 * t + 2], beta_u=beta_u, beta_a=beta_a, lambda_=lambda_, var_floor=var_floor, eps=eps
            )
            if trace is not None:
                trace.assignments.append(R.detach().permute(0, 1, 3, 4, 2))  # (B, P, K, T_in, T_out)
                trace.activations.append(a_out.detach())
            if t < len(lambdas) - 1:
                R = e_step(X, tokens[4 * t + 2:4 * t + 4], mu_c, sigma_sq, log_a_out, child_index, num_children, k)
    result = (mu, sigma_sq, a_out, R.permute(0, 1, 3, 4, 2))  # R back to (B, P, K, T_in, T_out)
    return EMRoutingResult(*(x.to(dtype) for x in result))


class EMRouting(nn.Module):
    """EM routing with learned ``beta_u``, ``beta_a`` (one per parent type): 2 * out_types parameters.

    ``moment_dtype`` "float64" routes exactly also where float32 moments cancel (see ``em_routing``).

    With ``record_routing = True`` (off by default; see
    :func:`capsnets.callbacks.routing_stats.record_routing`) every call leaves an
    :class:`EMRoutingTrace` of all iterations in ``routing_trace``; otherwise it is None.
    """

    def __init__(
        self, *, out_types: int, iterations: int = 3, lambda_schedule: str = "official", lambda_value: float = 0.01,
        lambda_scale: float = 1.0, var_floor: float = 0.0005, eps: float = 1e-8, moment_dtype: str = "float64",
        layer: str = "EMRouting",
    ) -> None:
        super().__init__()
        require_int(f"{layer}.out_types", out_types)
        self.iterations = require_int(f"{layer}.iterations", iterations)
        self.lambda_schedule = require_choice(f"{layer}.lambda_schedule", lambda_schedule, LAMBDA_SCHEDULES)
        self.lambda_value = require_positive(f"{layer}.lambda_value", lambda_value)
        self.lambda_scale = require_positive(f"{layer}.lambda_scale", lambda_scale)
        self.var_floor = require_positive(f"{layer}.var_floor", var_floor)
        self.eps = require_positive(f"{layer}.eps", eps)
        self.moment_dtype = require_choice(f"{layer}.moment_dtype", moment_dtype, tuple(MOMENT_DTYPES))
        self.beta_u = nn.Parameter(torch.zeros(out_types))
        self.beta_a = nn.Parameter(torch.zeros(out_types))
        self.record_routing = False  # keep every iteration's R and a_out in routing_trace
        self.routing_trace: EMRoutingTrace | None = None

    @property
    def lambdas(self) -> list[float]:
        return inverse_temperatures(self.iterations, schedule=self.lambda_schedule, value=self.lambda_value, scale=self.lambda_scale)

    def forward(
        self, V: torch.Tensor, a_in: torch.Tensor, *, child_index: torch.Tensor | None = None, num_children: int | None = None
    ) -> EMRoutingResult:
        trace = EMRoutingTrace([], [], child_index, num_children) if self.record_routing else None
        result = em_routing(
            V, a_in, beta_u=self.beta_u, beta_a=self.beta_a, lambdas=self.lambdas, var_floor=self.var_floor,
            eps=self.eps, child_index=child_index, num_children=num_children, moment_dtype=MOMENT_DTYPES[self.moment_dtype],
            trace=trace,
        )
        self.routing_trace = trace
        return result

    def extra_repr(self) -> str:
        return (
            f"out_types={self.beta_u.numel()}, iterations={self.iterations}, lambda_schedule={self.lambda_schedule}, "
            f"lambda_scale={self.lambda_scale}, var_floor={self.var_floor}, moment_dtype={self.moment_dtype}"
        )


def child_assignment_stats(
    R: torch.Tensor, child_index: torch.Tensor | None = None, num_children: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-child summaries of assignments R (B, P, K, T_in, T_out) that sum to 1 per child.

    A child is one (input position, type) when ``child_index`` maps the (p, k) slots to input
    positions (conv-capsule layers; the child's distribution spans every covering parent, all
    positions and types), else one (p, k, type) slot spread over the T_out parents (class
    capsules). Children that no parent covers are left out.

    Returns, each (B, N, T_in) with N the covered children (or P*K slots):
        entropy: entropy in nats of the child's assignment distribution;
        uniform: the entropy of a uniform split over its parents, ``log(#parents)``;
        largest: the largest single assignment (1 = all to one parent, 1/#parents = uniform).
    """
    b, p, k, t_in, t_out = R.shape
    R = R.float()
    plogp = (R * torch.log(R.clamp_min(1e-30))).sum(-1).reshape(b, p * k, t_in)  # (B, P*K, T_in)
    largest = R.amax(-1).reshape(b, p * k, t_in)
    if child_index is None:
        uniform = torch.full_like(largest, math.log(t_out))
        return -plogp, uniform, largest
    children = num_children if num_children is not None else int(child_index.max()) + 1
    covering = torch.bincount(child_index, minlength=children)  # (N_children,) patches per child
    covered = covering > 0
    index = child_index.view(1, p * k, 1).expand(b, p * k, t_in)
    entropy = -(plogp.new_zeros(b, children, t_in).index_add(1, child_index, plogp))  # (B, N_children, T_in)
    largest = largest.new_zeros(b, children, t_in).scatter_reduce(1, index, largest, reduce="amax")
    uniform = torch.log(covering.to(entropy.dtype) * t_out).view(1, children, 1).expand(b, children, t_in)
    return entropy[:, covered], uniform[:, covered], largest[:, covered]
