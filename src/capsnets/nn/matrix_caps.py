"""Matrix capsules (Hinton, Sabour & Frosst 2018, "Matrix capsules with EM routing", Sec. 2-3):
the primary capsule layer and the vote transform ``V_ij = M_i W_ij`` shared by the conv and
class capsule layers.

A capsule layer is a pair of tensors: poses (B, H, W, T, 16), each a 4x4 matrix flattened
row-major, and activations (B, H, W, T) in (0, 1). ``pose="vector"`` is the paper's ablation
(Sec. 5, "vector instead of matrix"): the 16 numbers are a vector and each ``W_ij`` is 16x16.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from capsnets.schema import PositiveInt, checked

PoseKind = Literal["matrix", "vector"]
POSE_SIZE = 16  # 4x4 pose matrix, flattened row-major
MATRIX_SIDE = 4


def init_transforms(*leading: int, pose: str, init_std: float | None = None) -> torch.Tensor:
    """Random transformation matrices ``W`` of shape (*leading, 4, 4) or (*leading, 16, 16).

    ``init_std=None`` uses 1/sqrt(rows), so that a vote has the variance of the pose it came
    from (the sum in ``V^{ad} = sum_c M^{ac} W^{cd}`` runs over 4 terms for matrices, 16 for vectors).
    """
    side = MATRIX_SIDE if pose == "matrix" else POSE_SIZE
    std = side**-0.5 if init_std is None else init_std
    return torch.randn(*leading, side, side) * std


def vote_weight(W: torch.Tensor, *, pose_kind: str = "matrix") -> torch.Tensor:
    """The (..., 16, 16) vector transform of the votes: ``W`` itself for vector poses; for matrix poses
    ``kron(I_4, W)``, since row-major ``vec(M W) = vec(M) kron(I_4, W)`` (the einsum of the votes then keeps each
    vote's 16 elements together; ``M W`` itself would interleave them with T_out)."""
    if pose_kind != "matrix":
        return W
    eye = torch.eye(MATRIX_SIDE, dtype=W.dtype, device=W.device)
    return torch.einsum("ab,...cd->...acbd", eye, W).reshape(*W.shape[:-2], POSE_SIZE, POSE_SIZE)


def capsule_votes(pose: torch.Tensor, W: torch.Tensor, *, pose_kind: str = "matrix") -> torch.Tensor:
    """Votes ``V_ij = M_i W_ij`` of every child type i for every parent type j (paper Sec. 2).

    Args:
        pose: child poses (B, N, K, T_in, 16): N patches of K slots (kernel offsets).
        W: transformation matrices (K, T_in, T_out, 4, 4) for matrix poses, or
            (K, T_in, T_out, 16, 16) for vector poses (the vote is the row vector ``u_i W_ij``).
        pose_kind: "matrix" or "vector".

    Returns:
        votes (B, N, K, T_in, T_out, 16), each flattened row-major: a strided view whose 16
        elements are contiguous (EM routing reads it in any layout, without a copy).
    """
    # einsum batches over (k, i) and never materialises the poses broadcast over T_out
    return torch.einsum("bnkic,kijcd->bnkijd", pose, vote_weight(W, pose_kind=pose_kind))  # (B, N, K, T_in, T_out, 16)


def check_capsules(pose: torch.Tensor, a: torch.Tensor, *, types: int, layer: str) -> None:
    """Raise ValueError unless ``pose`` is (B, H, W, types, 16) and ``a`` is (B, H, W, types)."""
    if pose.dim() != 5 or pose.shape[-2:] != (types, POSE_SIZE) or a.shape != pose.shape[:-1]:
        raise ValueError(
            f"{layer} expects poses (B, H, W, {types}, {POSE_SIZE}) and activations (B, H, W, {types}); "
            f"got {tuple(pose.shape)} and {tuple(a.shape)}."
        )


class PrimaryMatrixCapsules(nn.Module):
    """PrimaryCaps of the EM-routing network (paper Sec. 4, Fig. 1).

    A 1x1 convolution to ``num_types * 16`` pose channels (one 4x4 matrix per capsule type and
    position) and a 1x1 convolution to ``num_types`` activation logits followed by a sigmoid.
    Parameters: ``(in_channels + 1) * num_types * 17`` (both convolutions have a bias).

    Input (B, C, H, W) -> poses (B, H, W, T, 16) and activations (B, H, W, T).
    """

    @checked("PrimaryMatrixCapsules")
    def __init__(self, in_channels: PositiveInt, *, num_types: PositiveInt) -> None:
        super().__init__()
        self.num_types = num_types
        self.pose_conv = nn.Conv2d(in_channels, num_types * POSE_SIZE, kernel_size=1)
        self.activation_conv = nn.Conv2d(in_channels, num_types, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        pose = self.pose_conv(x).view(b, self.num_types, POSE_SIZE, h, w)  # (B, T, 16, H, W)
        pose = pose.permute(0, 3, 4, 1, 2).contiguous()  # (B, H, W, T, 16)
        a = torch.sigmoid(self.activation_conv(x)).permute(0, 2, 3, 1).contiguous()  # (B, T, H, W) -> (B, H, W, T)
        return pose, a

    def extra_repr(self) -> str:
        return f"in_channels={self.pose_conv.in_channels}, num_types={self.num_types}"
