"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021, Sci. Rep. 11:14634): the network, without training logic.

The paper's MNIST network (Sec. 3, Fig. 1)::

    input 28x28 -> Conv 5x5, 32  -> ReLU, BN      24x24
                -> Conv 3x3, 64  -> ReLU, BN      22x22
                -> Conv 3x3, 64  -> ReLU, BN      20x20
                -> Conv 3x3, 128, stride 2 -> ReLU, BN   9x9
                -> PrimaryCaps: depthwise Conv 9x9 (128 channels) -> 16 capsules of 8D, squash (Eq. 7)
                -> FCCaps: u_hat_{l,n} = u_l W_{l,n}, self-attention routing -> 10 capsules of 16D
    [+ decoder FC 512 ReLU -> FC 1024 ReLU -> FC 784 sigmoid, from the masked class capsules]

161,824 trainable parameters without the decoder (the paper: "161K"); the test
``test_efficient_capsnet_has_the_papers_parameter_count`` pins it. Convolutions are valid
(unpadded), as in the release. Other image sizes: the depthwise kernel (``primary_kernel``) keeps
its size, so a larger grid gives more primary capsules (16 per grid position).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn import ReconstructionDecoder, RoutingCapsules
from capsnets.nn.routing import build_routing
from capsnets.nn.squash import efficient_squash
from capsnets.schema import NumClasses, PositiveFloat, PositiveInt, check_parallel_lists, checked


class DepthwisePrimaryCapsules(nn.Module):
    """Efficient-CapsNet's PrimaryCaps: a depthwise ``kernel_size`` convolution, channels grouped into ``capsule_dim``-D
    capsules (channel c -> capsule c // capsule_dim, as the release reshapes), squashed with Eq. 7."""

    def __init__(self, channels: int, *, capsule_dim: int, kernel_size: int) -> None:
        super().__init__()
        if channels % capsule_dim:
            raise ConfigError(
                f"model.net: the last conv's {channels} channels do not split into capsules of primary_dim "
                f"{capsule_dim}. Fix: make conv_channels[-1] a multiple of model.net.primary_dim."
            )
        self.capsule_dim = capsule_dim
        self.conv = nn.Conv2d(channels, channels, kernel_size, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (B, C, H, W)
        b, c, h, w = out.shape
        out = out.permute(0, 2, 3, 1).reshape(b, h * w * c // self.capsule_dim, self.capsule_dim)  # (B, N, D)
        return efficient_squash(out, dim=-1)


class EfficientCapsNet(nn.Module):
    """Conv stack -> depthwise PrimaryCaps -> fully connected class capsules with any vector routing [+ decoder].

    Args:
        conv_channels, conv_kernels, conv_strides: the convolutional stem (each conv -> ReLU -> BN, as the release).
        primary_dim: dimension of the primary capsules (paper: 8; 128 channels -> 16 capsules).
        primary_kernel: the depthwise kernel (paper: 9, the whole 9x9 grid of MNIST).
        class_dim: dimension of the class capsules (paper: 16).
        routing: a vector-capsule routing config (``model.routing``; default: self-attention routing).
        weight_init_std: std of the normal init of ``W``; null: He-normal as the release draws its 4-D
            ``W`` (N_out, N_in, D_in, D_out), whose Keras fan-in is N_out x N_in x D_in (0.0395 on MNIST).
    """

    @checked("model.net")
    def __init__(
        self,
        *,
        in_channels: PositiveInt,
        image_size: PositiveInt,
        num_classes: NumClasses,
        conv_channels: Sequence[PositiveInt] = (32, 64, 64, 128),
        conv_kernels: Sequence[PositiveInt] = (5, 3, 3, 3),
        conv_strides: Sequence[PositiveInt] = (1, 1, 1, 2),
        primary_dim: PositiveInt = 8,
        primary_kernel: PositiveInt = 9,
        class_dim: PositiveInt = 16,
        routing: Mapping[str, Any] | None = None,
        reconstruction: bool = True,
        decoder_hidden: Sequence[PositiveInt] = (512, 1024),
        weight_init_std: PositiveFloat | None = None,
    ) -> None:
        super().__init__()
        lists = {"conv_channels": conv_channels, "conv_kernels": conv_kernels, "conv_strides": conv_strides}
        check_parallel_lists("model.net", lists, min_length=1)

        layers: list[nn.Module] = []
        channels, size, sizes = in_channels, image_size, []
        for out_channels, kernel, stride in zip(conv_channels, conv_kernels, conv_strides):
            # the release: Conv2D(..., activation="relu") then BatchNormalization, so BN follows the ReLU
            layers += [nn.Conv2d(channels, out_channels, kernel, stride=stride), nn.ReLU(inplace=True)]
            layers.append(nn.BatchNorm2d(out_channels))
            channels, size = out_channels, (size - kernel) // stride + 1 if size >= kernel else 0
            sizes.append(size)
        grid = size - primary_kernel + 1
        if min(sizes) < 1 or grid < 1:
            raise ConfigError(
                f"model.net: image_size {image_size} is too small for the conv stem (grids {sizes}) followed by "
                f"primary_kernel {primary_kernel}; use larger images or smaller kernels/strides."
            )
        self.stem = nn.Sequential(*layers)
        for conv in self.stem:
            if isinstance(conv, nn.Conv2d):  # the release: he_normal
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        self.primary = DepthwisePrimaryCapsules(channels, capsule_dim=primary_dim, kernel_size=primary_kernel)
        in_caps = grid * grid * channels // primary_dim
        std = weight_init_std if weight_init_std is not None else math.sqrt(2.0 / (num_classes * in_caps * primary_dim))
        self.digit = RoutingCapsules(
            in_caps=in_caps,
            in_dim=primary_dim,
            out_caps=num_classes,
            out_dim=class_dim,
            routing=build_routing(
                routing or {"name": "self_attention"},
                kind="vector",
                out_types=num_classes,
                role="class",
                in_slots=(in_caps, 1),
            ),
            init_std=std,
        )
        self.decoder = (
            ReconstructionDecoder(
                num_classes=num_classes,
                capsule_dim=class_dim,
                out_shape=(in_channels, image_size, image_size),
                hidden=tuple(decoder_hidden),
            )
            if reconstruction
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, K, class_dim) class capsules; class score = length."""
        u = self.primary(self.stem(x))  # (B, 16, 8) for MNIST
        return self.digit(u)  # (B, K, 16)
