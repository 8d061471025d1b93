"""EM routing (Hinton, Sabour & Frosst 2018, "Matrix capsules with EM routing", Procedure 1).

Every tensor is laid out by *patch*: P parent positions, each seeing K child slots (the kernel
offsets of a conv-capsule layer, or every input position for the class layer), T_in child
types and T_out parent types; D = 16 pose elements h.

    V     (B, P, K, T_in, T_out, D)   votes V_ij of child i (slot k, type) for parent j (position p, type)
    a_in  (B, P, K, T_in)             activation a_i of the child in each slot
    R     (B, P, K, T_in, T_out)      assignment R_ij of child i to parent j

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

from capsnets.utils.validation import require_choice, require_int, require_positive

LAMBDA_SCHEDULES = ("official", "fixed")
OFFICIAL_LAMBDA = 0.01  # google-research capsule_em: lambda_t = 0.01 * (1 - 0.95 ** (t + 1))
OFFICIAL_LAMBDA_DECAY = 0.95


class EMRoutingResult(NamedTuple):
    """Parents after the final M-step, and the assignments it used (before ``R * a_i``)."""

    mu: torch.Tensor  # (B, P, T_out, D) parent poses
    sigma_sq: torch.Tensor  # (B, P, T_out, D) parent variances, >= var_floor
    a_out: torch.Tensor  # (B, P, T_out) parent activations in (0, 1)
    R: torch.Tensor  # (B, P, K, T_in, T_out)


def inverse_temperatures(iterations: int, *, schedule: str = "official", value: float = 0.01, scale: float = 1.0) -> list[float]:
    """lambda_t for routing iterations t = 0 .. iterations-1.

    "official": ``scale * 0.01 * (1 - 0.95 ** (t + 1))`` (the authors' code; ``scale=0.25`` at
    the class layer, where the code divides by 4); "fixed": ``scale * value`` every iteration.
    """
    if schedule == "official":
        return [scale * OFFICIAL_LAMBDA * (1 - OFFICIAL_LAMBDA_DECAY ** (t + 1)) for t in range(iterations)]
    return [scale * value] * iterations


def initial_assignments(V: torch.Tensor, child_index: torch.Tensor | None, num_children: int | None) -> torch.Tensor:
    """Procedure 1, line 2: R_ij uniform over the parents child i votes for, (B, P, K, T_in, T_out)."""
    b, p, k, t_in, t_out = V.shape[:5]
    if child_index is None:
        return V.new_full((b, p, k, t_in, t_out), 1.0 / t_out)
    covering = torch.bincount(child_index, minlength=num_children or 0)  # (N_children,) patches per child
    per_slot = covering.index_select(0, child_index).view(1, p, k, 1, 1).to(V.dtype)  # (1, P, K, 1, 1)
    return (1.0 / (per_slot * t_out)).expand(b, p, k, t_in, t_out)


def m_step(
    R: torch.Tensor, a_in: torch.Tensor, V: torch.Tensor, *, beta_u: torch.Tensor, beta_a: torch.Tensor,
    lambda_: float, var_floor: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Procedure 1, M-step for every parent j.

    Returns mu, sigma_sq (B, P, T_out, D); a_out and log a_out (B, P, T_out); and the squared
    deviations ``(V_ij - mu_j)^2`` (B, P, K, T_in, T_out, D), which the E-step reuses (same mu),
    so that autograd keeps one copy instead of two.
    """
    R = R * a_in[..., None]  # R_ij <- R_ij * a_i, (B, P, K, T_in, T_out)
    sum_R = R.sum(dim=(2, 3))  # sum_i R_ij, (B, P, T_out)
    R_norm = R / (sum_R[:, :, None, None, :] + eps)  # R_ij / sum_i R_ij; eps keeps empty parents finite
    mu = torch.einsum("bpkio,bpkiod->bpod", R_norm, V)  # mu_j^h
    # explicit (V - mu)^2, not E[V^2] - mu^2: the latter cancels catastrophically for large poses
    diff_sq = (V - mu[:, :, None, None]) ** 2  # (B, P, K, T_in, T_out, D)
    sigma_sq = torch.einsum("bpkio,bpkiod->bpod", R_norm, diff_sq) + var_floor
    cost = (beta_u[:, None] + 0.5 * torch.log(sigma_sq)) * sum_R[..., None]  # (beta_u + log sigma_j^h) sum_i R_ij
    logits = lambda_ * (beta_a - cost.sum(dim=-1))  # lambda (beta_a - sum_h cost^h), (B, P, T_out)
    # log a_j via logsigmoid stays finite when a_j underflows to 0 (needed by the E-step)
    return mu, sigma_sq, torch.sigmoid(logits), F.logsigmoid(logits), diff_sq


def normalise_over_parents(logits: torch.Tensor, child_index: torch.Tensor | None, num_children: int | None) -> torch.Tensor:
    """softmax of ``logits`` (B, P, K, T_in, T_out) over all parents of each child (log-sum-exp)."""
    if child_index is None:
        return torch.softmax(logits, dim=-1)
    b, p, k, t_in, _ = logits.shape
    index = child_index.view(1, p * k, 1).expand(b, p * k, t_in)  # (B, P*K, T_in) -> input position
    # max over every covering parent; detached, as the shift does not change the softmax
    slot_max = logits.detach().amax(dim=-1).view(b, p * k, t_in)  # (B, P*K, T_in)
    child_max = slot_max.new_full((b, num_children, t_in), -math.inf)
    child_max = child_max.scatter_reduce(1, index, slot_max, reduce="amax")  # (B, N_children, T_in)
    shift = child_max.index_select(1, child_index).view(b, p, k, t_in, 1)  # back to slots
    e = torch.exp(logits - shift)  # (B, P, K, T_in, T_out), the largest term per child is 1
    child_sum = e.new_zeros(b, num_children, t_in).index_add(1, child_index, e.sum(dim=-1).view(b, p * k, t_in))
    # children covered by no parent never appear in child_index, so no 0/0 is read back
    return e / child_sum.index_select(1, child_index).view(b, p, k, t_in, 1)


def e_step(
    diff_sq: torch.Tensor, sigma_sq: torch.Tensor, log_a_out: torch.Tensor,
    child_index: torch.Tensor | None, num_children: int | None,
) -> torch.Tensor:
    """Procedure 1, E-step for every child i: ``R_ij = a_j p_ij / sum_k a_k p_ik`` in the log domain.

    ``diff_sq`` is ``(V_ij - mu_j)^2`` (B, P, K, T_in, T_out, D) from the M-step just before.
    """
    # log p_ij = sum_h log N(V_ij^h; mu_j^h, sigma_j^h)
    mahalanobis = (diff_sq / sigma_sq[:, :, None, None]).sum(dim=-1)  # (B, P, K, T_in, T_out)
    log_norm = torch.log(2 * math.pi * sigma_sq).sum(dim=-1)[:, :, None, None]  # per parent, (B, P, 1, 1, T_out)
    log_p = -0.5 * (mahalanobis + log_norm)
    return normalise_over_parents(log_a_out[:, :, None, None, :] + log_p, child_index, num_children)


def em_routing(
    V: torch.Tensor, a_in: torch.Tensor, *, beta_u: torch.Tensor, beta_a: torch.Tensor, lambdas: Sequence[float],
    var_floor: float = 0.0005, eps: float = 1e-8, child_index: torch.Tensor | None = None, num_children: int | None = None,
) -> EMRoutingResult:
    """Procedure 1: ``len(lambdas)`` iterations of M-step (every parent) then E-step (every child).

    The E-step after the last M-step is skipped. Runs with autocast disabled in at least
    float32 (float64 inputs stay float64), so routing is unaffected by mixed precision.

    Args:
        V: votes (B, P, K, T_in, T_out, D); a_in: child activations (B, P, K, T_in).
        beta_u, beta_a: (T_out,), one per parent type, shared across positions.
        lambdas: inverse temperature of each iteration (see ``inverse_temperatures``).
        var_floor: added to every sigma_sq (0.0005 in the authors' code).
        eps: guards ``sum_i R_ij`` of parents that receive no data.
        child_index: (P*K,) input position of each (p, k) slot, in [0, num_children); None
            when every slot is a distinct child.
    """
    with torch.autocast(device_type=V.device.type, enabled=False):
        dtype = torch.promote_types(V.dtype, torch.float32)
        V, a_in, beta_u, beta_a = (x.to(dtype) for x in (V, a_in, beta_u, beta_a))
        R = initial_assignments(V, child_index, num_children)
        for t, lambda_ in enumerate(lambdas):
            mu, sigma_sq, a_out, log_a_out, diff_sq = m_step(
                R, a_in, V, beta_u=beta_u, beta_a=beta_a, lambda_=lambda_, var_floor=var_floor, eps=eps
            )
            if t < len(lambdas) - 1:
                R = e_step(diff_sq, sigma_sq, log_a_out, child_index, num_children)
    return EMRoutingResult(mu, sigma_sq, a_out, R)


class EMRouting(nn.Module):
    """EM routing with learned ``beta_u``, ``beta_a`` (one per parent type): 2 * out_types parameters."""

    def __init__(
        self, *, out_types: int, iterations: int = 3, lambda_schedule: str = "official", lambda_value: float = 0.01,
        lambda_scale: float = 1.0, var_floor: float = 0.0005, eps: float = 1e-8, layer: str = "EMRouting",
    ) -> None:
        super().__init__()
        require_int(f"{layer}.out_types", out_types)
        self.iterations = require_int(f"{layer}.iterations", iterations)
        self.lambda_schedule = require_choice(f"{layer}.lambda_schedule", lambda_schedule, LAMBDA_SCHEDULES)
        self.lambda_value = require_positive(f"{layer}.lambda_value", lambda_value)
        self.lambda_scale = require_positive(f"{layer}.lambda_scale", lambda_scale)
        self.var_floor = require_positive(f"{layer}.var_floor", var_floor)
        self.eps = require_positive(f"{layer}.eps", eps)
        self.beta_u = nn.Parameter(torch.zeros(out_types))
        self.beta_a = nn.Parameter(torch.zeros(out_types))

    @property
    def lambdas(self) -> list[float]:
        return inverse_temperatures(self.iterations, schedule=self.lambda_schedule, value=self.lambda_value, scale=self.lambda_scale)

    def forward(
        self, V: torch.Tensor, a_in: torch.Tensor, *, child_index: torch.Tensor | None = None, num_children: int | None = None
    ) -> EMRoutingResult:
        return em_routing(
            V, a_in, beta_u=self.beta_u, beta_a=self.beta_a, lambdas=self.lambdas, var_floor=self.var_floor,
            eps=self.eps, child_index=child_index, num_children=num_children,
        )

    def extra_repr(self) -> str:
        return (
            f"out_types={self.beta_u.numel()}, iterations={self.iterations}, lambda_schedule={self.lambda_schedule}, "
            f"lambda_scale={self.lambda_scale}, var_floor={self.var_floor}"
        )
