"""Fully connected vector capsules (DigitCaps of Sabour et al. 2017): predictions, then any vector routing."""

from __future__ import annotations

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.routing import Routing


class RoutingCapsules(nn.Module):
    """Fully connected capsule layer: ``u_hat_{j|i} = W_ij u_i``, routed to N_out parent capsules.

    One ``D_out x D_in`` matrix ``W_ij`` per (child, parent) pair: 1152 x 10 matrices of 16x8 for
    MNIST, i.e. 1,474,560 weights and no bias, as in the paper's count of 6.8M.

    Args:
        in_caps, in_dim: children and their dimension.
        out_caps, out_dim: parents and their dimension.
        routing: a vector-capsule routing built for ``out_caps`` parent types
            (:func:`capsnets.nn.routing.build_routing`).
        init_std: std of the normal init of ``W``.
    """

    def __init__(
        self, *, in_caps: int, in_dim: int, out_caps: int, out_dim: int, routing: Routing, init_std: float = 0.01
    ) -> None:
        super().__init__()
        if routing.kind != "vector" or routing.out_types != out_caps:
            raise ConfigError(f"RoutingCapsules needs a vector routing for {out_caps} parents, got {routing}.")
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * init_std)  # W_ij
        self.routing = routing

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """``u_hat_{j|i} = W_ij u_i``: (B, N_in, D_in) -> (B, N_in, N_out, D_out)."""
        return torch.einsum("ijdk,bik->bijd", self.weight.to(u.dtype), u)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(B, N_in, D_in) children -> (B, N_out, D_out) parents."""
        # predictions in float32 even under mixed precision, as the routing that reads them
        with torch.autocast(device_type=u.device.type, enabled=False):
            u_hat = self.predictions(u.to(torch.promote_types(u.dtype, torch.float32)))  # (B, N_in, N_out, D_out)
            votes = u_hat[:, None, :, None]  # one patch of N_in slots, one child type: (B, 1, N_in, 1, N_out, D_out)
            result = self.routing(votes)
        return result.poses.squeeze(1)  # (B, N_out, D_out)

    def extra_repr(self) -> str:
        n_in, n_out, d_out, d_in = self.weight.shape
        return f"in_caps={n_in}, in_dim={d_in}, out_caps={n_out}, out_dim={d_out}"
