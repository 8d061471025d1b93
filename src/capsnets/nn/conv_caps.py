"""Convolutional capsule layer with EM routing (Hinton, Sabour & Frosst 2018, Sec. 3 and
Procedure 1): ConvCaps1 / ConvCaps2 of the smallNORB network.

Every parent (output position, out type) receives votes from the K x K x T_in children in its
receptive field; ``W`` is shared across positions. The layer hands its routing the votes by
patch and a :class:`~capsnets.nn.routing.ChildLayout` naming the input position of every slot,
so the routing can normalise a child over every parent whose receptive field contains it (the
paper's semantics) or otherwise (see ``normalisation`` in ``capsnets.nn.routing.em``).
"""

from __future__ import annotations

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.matrix_caps import POSE_SIZE, PoseKind, check_capsules, init_transforms, vote_weight
from capsnets.nn.routing import ChildLayout, Routing, VoteFactors
from capsnets.schema import PositiveFloat, PositiveInt, checked


def conv_child_index(
    height: int, width: int, *, kernel_size: int, stride: int, device: torch.device | None = None
) -> torch.Tensor:
    """Input position ``y * width + x`` of the child in every (output position, kernel offset) slot.

    Returns (H_out * W_out * K * K,) ordered as ``(oy, ox, ky, kx)``, i.e. slot ``(p, k)`` with
    ``p = oy * W_out + ox`` and ``k = ky * K + kx``; no padding ("valid"), any stride.
    """
    h_out, w_out = (height - kernel_size) // stride + 1, (width - kernel_size) // stride + 1
    offsets = torch.arange(kernel_size, device=device)
    iy = (torch.arange(h_out, device=device) * stride)[:, None] + offsets[None, :]  # (H_out, K)
    ix = (torch.arange(w_out, device=device) * stride)[:, None] + offsets[None, :]  # (W_out, K)
    index = iy[:, None, :, None] * width + ix[None, :, None, :]  # (H_out, W_out, K, K)
    return index.flatten()


class ConvCapsules(nn.Module):
    """K x K convolutional capsules, no padding: (B, H, W, T_in, 16) -> (B, H_out, W_out, T_out, 16).

    One ``W`` per (kernel offset, in type, out type): 4x4 for matrix poses, 16x16 for vector
    poses. Parameters: ``K*K * in_types * out_types * 16`` (matrix) or ``* 256`` (vector), plus
    the routing's (EM: ``2 * out_types`` for ``beta_u`` and ``beta_a``).

    Args:
        in_types, out_types: capsule types of the child and parent layers.
        kernel_size, stride: the receptive field K and its stride.
        routing: a matrix-capsule routing built for ``out_types`` (:func:`capsnets.nn.routing.build_routing`).
        pose: "matrix" (4x4 pose, ``V = M W``) or "vector" (16-vector, ``V = u W``, ablation).
        init_std: std of the initial ``W``; None = the routing's :meth:`~capsnets.nn.Routing.transform_init_std`,
            else 1/sqrt(rows of W).

    Slot ``(oy, ox, ky*K+kx)`` of the routing's assignments is the child at input position
    ``(oy*stride + ky, ox*stride + kx)``.
    """

    @checked("ConvCapsules")
    def __init__(
        self,
        *,
        in_types: PositiveInt,
        out_types: PositiveInt,
        kernel_size: PositiveInt,
        stride: PositiveInt,
        routing: Routing,
        pose: PoseKind = "matrix",
        init_std: PositiveFloat | None = None,
    ) -> None:
        super().__init__()
        self.in_types, self.out_types, self.kernel_size, self.stride = in_types, out_types, kernel_size, stride
        self.pose = pose
        if routing.kind != "matrix" or routing.out_types != out_types:
            raise ConfigError(
                f"ConvCapsules needs a matrix-capsule routing for {out_types} parent types, got {routing}."
            )
        if init_std is None:  # the routing's own scale, if its procedure has one (VB: the release's Xavier rule)
            init_std = routing.transform_init_std(in_types=in_types, kernel_size=kernel_size)
        # W_ij per (kernel offset, in type, out type), shared across positions
        self.weight = nn.Parameter(init_transforms(kernel_size**2, in_types, out_types, pose=pose, init_std=init_std))
        self.routing = routing

    def output_size(self, in_size: int) -> int:
        """Side length of the output grid for an ``in_size`` x ``in_size`` input grid."""
        return (in_size - self.kernel_size) // self.stride + 1

    def forward(self, pose: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses (B, H, W, T_in, 16), activations (B, H, W, T_in) -> poses (B, H_out, W_out, T_out, 16),
        activations (B, H_out, W_out, T_out)."""
        check_capsules(pose, a, types=self.in_types, layer="ConvCapsules")
        b, h, w, t_in, _ = pose.shape
        h_out, w_out = self.output_size(h), self.output_size(w)
        if h_out < 1 or w_out < 1:
            raise ValueError(
                f"ConvCapsules: input grid {h}x{w} is smaller than the {self.kernel_size}x{self.kernel_size} kernel."
            )
        kk = self.kernel_size**2
        child_index = conv_child_index(h, w, kernel_size=self.kernel_size, stride=self.stride, device=pose.device)
        with torch.autocast(device_type=pose.device.type, enabled=False):  # votes and routing in float32
            dtype = torch.promote_types(torch.promote_types(pose.dtype, self.weight.dtype), torch.float32)
            # gather every receptive field at once: (B, H*W, T_in, 16) -> (B, P*K*K, T_in, 16) -> (B, P, K*K, T_in, 16)
            M = pose.to(dtype).reshape(b, h * w, t_in, POSE_SIZE).index_select(1, child_index)
            M = M.view(b, h_out * w_out, kk, t_in, POSE_SIZE)
            a_in = a.to(dtype).reshape(b, h * w, t_in).index_select(1, child_index).view(b, h_out * w_out, kk, t_in)
            # the votes (B, P, K*K, T_in, T_out, 16) by their factors: formed by the routing (fused EM: straight into U)
            V = VoteFactors(M, vote_weight(self.weight.to(dtype), pose_kind=self.pose), kron=self.pose == "matrix")
            result = self.routing(V, a_in, ChildLayout(child_index, h * w))
        mu = result.poses.view(
            b, h_out, w_out, self.out_types, POSE_SIZE
        )  # (B, P, T_out, 16) -> (B, H_out, W_out, T_out, 16)
        return mu, result.activations.view(b, h_out, w_out, self.out_types)

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, out_types={self.out_types}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, pose={self.pose}"
        )
