"""Primary capsules (Sabour et al. 2017, Sec. 4): a convolution whose output channels are
grouped into capsule vectors, then squashed."""

from __future__ import annotations

import torch
from torch import nn

from capsnets.nn.conv import Conv2d, WeightGrad
from capsnets.nn.squash import squash


class PrimaryCapsules(nn.Module):
    """Conv ``kernel_size`` x ``kernel_size`` with ``num_types * capsule_dim`` channels.

    For MNIST (256 input channels, 9x9, stride 2, 32 types of 8D) this turns a 20x20 map
    into 6 x 6 x 32 = 1152 capsules of 8 dimensions. ``weight_grad``: how the convolution's weight
    gradient is computed (:class:`capsnets.nn.conv.Conv2d`; the same values either way).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_types: int,
        capsule_dim: int,
        kernel_size: int,
        stride: int,
        weight_grad: WeightGrad = "auto",
    ) -> None:
        super().__init__()
        self.num_types = num_types
        self.capsule_dim = capsule_dim
        self.conv = Conv2d(
            in_channels, num_types * capsule_dim, kernel_size=kernel_size, stride=stride, weight_grad=weight_grad
        )

    def output_size(self, in_size: int) -> int:
        """Spatial side length of the capsule grid for an ``in_size`` x ``in_size`` input."""
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        return (in_size - k) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (B, T*D, H, W)
        b, _, h, w = out.shape
        out = out.view(b, self.num_types, self.capsule_dim, h, w)  # (B, T, D, H, W)
        out = out.permute(0, 1, 3, 4, 2).reshape(b, self.num_types * h * w, self.capsule_dim)  # (B, N=T*H*W, D)
        return squash(out, dim=-1)
