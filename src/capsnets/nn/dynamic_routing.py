"""Routing-by-agreement (Sabour et al. 2017, Procedure 1) and the capsule layer that uses it."""

from __future__ import annotations

import torch
from torch import nn

from capsnets.nn.squash import squash


def dynamic_routing(
    u_hat: torch.Tensor, *, iterations: int, detach_inner: bool = False, trace: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route predictions ``u_hat`` from children i to parents j.

    Args:
        u_hat: predictions ``u_hat_{j|i} = W_ij u_i`` of shape (B, N_in, N_out, D_out).
        iterations: r, the number of routing iterations (>= 1).
        detach_inner: if True, the iterations before the last use ``u_hat.detach()`` so
            gradients reach ``W`` only through the final iteration (as some ports do). The
            official code lets gradients flow through every iteration (False).
        trace: if a list is given, the couplings ``c`` (B, N_in, N_out) that iteration r
            used are appended to it, detached, one entry per iteration (routing statistics;
            None, the default, records nothing).

    Returns:
        ``v`` (B, N_out, D_out), the squashed parent capsules, and the final couplings
        ``c`` (B, N_in, N_out); each child's couplings sum to 1 over the parents.
    """
    batch, n_in, n_out, _ = u_hat.shape
    # Line 2: b_ij = 0, reset for every example.
    b_ij = u_hat.new_zeros(batch, n_in, n_out)
    u_hat_inner = u_hat.detach() if detach_inner else u_hat
    for r in range(iterations):
        last = r == iterations - 1
        u = u_hat if last else u_hat_inner
        # Line 4: c_i = softmax(b_i) over the parents j (dim 2), never over the children.
        c_ij = torch.softmax(b_ij, dim=2)  # (B, N_in, N_out)
        if trace is not None:
            trace.append(c_ij.detach())
        # Line 5: s_j = sum_i c_ij u_hat_{j|i}.
        s_j = torch.einsum("bij,bijd->bjd", c_ij, u)  # (B, N_out, D_out)
        # Line 6: v_j = squash(s_j).
        v_j = squash(s_j, dim=-1)
        if not last:
            # Line 7: b_ij <- b_ij + u_hat_{j|i} . v_j (skipped after the last iteration).
            b_ij = b_ij + torch.einsum("bijd,bjd->bij", u, v_j)
    return v_j, c_ij


class RoutingCapsules(nn.Module):
    """Fully connected capsule layer with dynamic routing (DigitCaps in the paper).

    One ``D_out x D_in`` matrix ``W_ij`` per (child, parent) pair: 1152 x 10 matrices of
    16x8 for MNIST, i.e. 1,474,560 weights and no bias, as in the paper's count of 6.8M.

    After ``forward``, ``last_couplings`` holds the detached final couplings (B, N_in, N_out).
    With ``record_routing = True`` (off by default; see
    :func:`capsnets.callbacks.routing_stats.record_routing`), ``routing_trace`` also holds the
    couplings of every iteration, a list of r tensors (B, N_in, N_out); otherwise it is None.
    """

    def __init__(
        self,
        *,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        iterations: int = 3,
        detach_inner: bool = False,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.iterations = iterations
        self.detach_inner = detach_inner
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * init_std)  # W_ij
        self.last_couplings: torch.Tensor | None = None
        self.record_routing = False  # keep the couplings of every iteration in routing_trace
        self.routing_trace: list[torch.Tensor] | None = None

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """``u_hat_{j|i} = W_ij u_i``: (B, N_in, D_in) -> (B, N_in, N_out, D_out)."""
        return torch.einsum("ijdk,bik->bijd", self.weight, u)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # Routing runs in float32 even under mixed precision: softmax/squash of many small
        # agreements lose too much in bf16/fp16.
        with torch.autocast(device_type=u.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(u.dtype, self.weight.dtype), torch.float32)
            u_hat = torch.einsum("ijdk,bik->bijd", self.weight.to(dtype), u.to(dtype))  # (B, N_in, N_out, D_out)
            trace: list[torch.Tensor] | None = [] if self.record_routing else None
            v, c = dynamic_routing(u_hat, iterations=self.iterations, detach_inner=self.detach_inner, trace=trace)
        self.last_couplings = c.detach()
        self.routing_trace = trace
        return v

    def extra_repr(self) -> str:
        n_in, n_out, d_out, d_in = self.weight.shape
        return f"in_caps={n_in}, in_dim={d_in}, out_caps={n_out}, out_dim={d_out}, iterations={self.iterations}"


def coupling_entropy(c: torch.Tensor) -> torch.Tensor:
    """Mean entropy (in nats) of each child's coupling distribution over parents; log(N_out) = uniform."""
    return child_coupling_entropy(c).mean()


def child_coupling_entropy(c: torch.Tensor) -> torch.Tensor:
    """Entropy (in nats) of every child's couplings over the parents: (..., N_out) -> (...).

    0 when a child sends everything to one parent, ``log(N_out)`` when it splits evenly.
    """
    return -(c * torch.log(c.clamp_min(1e-12))).sum(-1)
