"""Class capsules with EM routing and coordinate addition (Hinton, Sabour & Frosst 2018,
Sec. 3.1 "Coordinate Addition" and Procedure 1).

Every child capsule, at every position of the input grid, votes for every class capsule with
one ``W`` per (in type, class) shared across positions. Sharing would throw away *where* a
child is, so coordinate addition adds the scaled (row, col) of the child's position to its
vote. The E-step normalises each child's assignments over the classes.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.matrix_caps import (
    MATRIX_SIDE,
    POSE_SIZE,
    PoseKind,
    check_capsules,
    init_transforms,
    vote_weight,
)
from capsnets.nn.routing import Routing, VoteFactors
from capsnets.schema import PositiveFloat, PositiveInt, checked

# vote elements that receive (row, col): the first two entries of the right-hand column of the
# 4x4 matrix, i.e. [0, 3] and [1, 3] -> flattened row-major 3 and 7; a vector pose has no
# columns, so its first two elements receive them.
COORDINATE_ELEMENTS = {"matrix": (MATRIX_SIDE - 1, 2 * MATRIX_SIDE - 1), "vector": (0, 1)}


def coordinate_offsets(
    height: int,
    width: int,
    *,
    pose: str = "matrix",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(H*W, 16) offsets: ``(y + 0.5) / H`` and ``(x + 0.5) / W`` at grid position (y, x), zero elsewhere."""
    row = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height  # (H,) centre of each row, in (0, 1)
    col = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width  # (W,)
    offsets = torch.zeros(height, width, POSE_SIZE, device=device, dtype=dtype)
    row_element, col_element = COORDINATE_ELEMENTS[pose]
    offsets[:, :, row_element] = row[:, None]
    offsets[:, :, col_element] = col[None, :]
    return offsets.view(height * width, POSE_SIZE)


class ClassCapsules(nn.Module):
    """Fully connected (shared-weight) capsules from a (B, H, W, T_in) grid to K classes.

    Parameters: ``in_types * num_classes * 16`` (matrix) or ``* 256`` (vector) for ``W``, plus
    the routing's (EM: ``2 * num_classes`` for ``beta_u`` and ``beta_a``).

    Args:
        in_types: capsule types of the input grid.
        num_classes: K, one class capsule per class.
        routing: a matrix-capsule routing built for ``num_classes`` types with ``role="class"``.
        coordinate_addition: add each child's scaled position to its votes (Sec. 3.1).
        coordinate_scale: multiplies the added coordinates, ``(y + 0.5) / H`` and ``(x + 0.5) / W`` in (0, 1)
            (the paper: "scaled" coordinates, the scale unstated; the authors' release adds pixel
            coordinates / 100, about +-0.16 on 32 px).
        pose: "matrix" or "vector" (ablation; coordinates go to vote elements 0 and 1).
        init_std: std of the initial ``W``; None = the routing's :meth:`~capsnets.nn.Routing.transform_init_std`,
            else 1/sqrt(rows of W).

    Slot ``(y * W + x)`` of the routing's assignments is the child at grid position (y, x).
    """

    @checked("ClassCapsules")
    def __init__(
        self,
        *,
        in_types: PositiveInt,
        num_classes: PositiveInt,
        routing: Routing,
        coordinate_addition: bool = True,
        coordinate_scale: PositiveFloat = 1.0,
        pose: PoseKind = "matrix",
        init_std: PositiveFloat | None = None,
    ) -> None:
        super().__init__()
        self.in_types, self.num_classes = in_types, num_classes
        self.pose = pose
        self.coordinate_addition = coordinate_addition
        self.coordinate_scale = float(coordinate_scale)
        if routing.kind != "matrix" or routing.out_types != num_classes:
            raise ConfigError(f"ClassCapsules needs a matrix-capsule routing for {num_classes} classes, got {routing}.")
        if init_std is None:  # the routing's own scale, if its procedure has one; W is shared over positions (1x1)
            init_std = routing.transform_init_std(in_types=in_types, kernel_size=1)
        self.weight = nn.Parameter(
            init_transforms(in_types, num_classes, pose=pose, init_std=init_std)
        )  # W_ij per (in type, class)
        self.routing = routing

    def vote_factors(self, pose: torch.Tensor) -> VoteFactors:
        """The votes (B, 1, H*W, T_in, K, 16) of poses (B, H, W, T_in, 16) by their factors: one patch whose slots are
        the H*W positions, ``W`` shared by them, and the scaled coordinates as each slot's offset if switched on."""
        b, h, w, t_in, _ = pose.shape
        M = pose.reshape(b, 1, h * w, t_in, POSE_SIZE)  # one parent position, every grid position a slot
        W = vote_weight(self.weight.to(pose.dtype), pose_kind=self.pose)  # (T_in, K, 16, 16)
        W = W.expand(h * w, *W.shape)  # shared over the H*W slots: (H*W, T_in, K, 16, 16), a view
        offset = None
        if self.coordinate_addition:
            offset = self.coordinate_scale * coordinate_offsets(
                h, w, pose=self.pose, device=pose.device, dtype=pose.dtype
            )
        return VoteFactors(M, W, offset, kron=self.pose == "matrix")

    def votes(self, pose: torch.Tensor) -> torch.Tensor:
        """Votes (B, H*W, T_in, K, 16) of poses (B, H, W, T_in, 16), with coordinates if switched on."""
        return self.vote_factors(pose).materialise().squeeze(1)

    def forward(self, pose: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses (B, H, W, T_in, 16), activations (B, H, W, T_in) -> class poses (B, K, 16), activations (B, K)."""
        check_capsules(pose, a, types=self.in_types, layer="ClassCapsules")
        b, h, w, t_in, _ = pose.shape
        with torch.autocast(device_type=pose.device.type, enabled=False):  # votes and routing in float32
            dtype = torch.promote_types(torch.promote_types(pose.dtype, self.weight.dtype), torch.float32)
            V = self.vote_factors(pose.to(dtype))  # one parent position: (B, 1, H*W, T_in, K, 16)
            a_in = a.to(dtype).reshape(b, 1, h * w, t_in)  # (B, 1, H*W, T_in)
            result = self.routing(V, a_in)  # every slot its own child, normalised over the K classes
        return result.poses.squeeze(1), result.activations.squeeze(1)  # (B, K, 16), (B, K)

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, num_classes={self.num_classes}, "
            f"coordinate_addition={self.coordinate_addition}, pose={self.pose}"
        )
