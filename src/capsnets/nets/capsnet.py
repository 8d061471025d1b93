"""CapsNet (Sabour, Frosst & Hinton, NeurIPS 2017): the network, without training logic."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn import PrimaryCapsules, ReconstructionDecoder, RoutingCapsules
from capsnets.nn.conv import WeightGrad
from capsnets.nn.routing import build_routing
from capsnets.schema import NumClasses, PositiveFloat, PositiveInt, checked


class CapsNet(nn.Module):
    """Conv1 (256, 9x9, ReLU) -> PrimaryCaps (32 x 8D, 9x9 stride 2) -> DigitCaps (K x 16D) [+ decoder].

    With MNIST shapes: 6,804,224 parameters without the decoder and 8,215,568 with it
    (the paper's 6.8M / 8.2M). ``routing``: the config of a vector-capsule routing for DigitCaps
    (``model.routing``; default: dynamic routing with 3 iterations). ``primary_weight_grad``: how
    PrimaryCaps' weight gradient is computed (``auto``: as a forward convolution on a CPU, where that
    gradient alone runs 1.8x (float32) to 3x (bf16) faster and the training step 1.2-1.4x; torch's kernel on a
    GPU; the same values, :mod:`capsnets.nn.conv`).
    """

    @checked("model.net")
    def __init__(
        self,
        *,
        in_channels: PositiveInt,
        image_size: PositiveInt,
        num_classes: NumClasses,
        conv1_channels: PositiveInt = 256,
        conv1_kernel: PositiveInt = 9,
        primary_types: PositiveInt = 32,
        primary_dim: PositiveInt = 8,
        primary_kernel: PositiveInt = 9,
        primary_stride: PositiveInt = 2,
        primary_weight_grad: WeightGrad = "auto",
        class_dim: PositiveInt = 16,
        routing: Mapping[str, Any] | None = None,
        reconstruction: bool = True,
        decoder_hidden: Sequence[PositiveInt] = (512, 1024),
        weight_init_std: PositiveFloat = 0.01,
    ) -> None:
        super().__init__()
        conv1_out = image_size - conv1_kernel + 1
        if conv1_out < primary_kernel:
            raise ConfigError(
                f"model.net: image_size {image_size} is too small for conv1_kernel {conv1_kernel} followed by "
                f"primary_kernel {primary_kernel} (Conv1 leaves {conv1_out}x{conv1_out}); "
                "use smaller kernels or larger images."
            )
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, conv1_channels, conv1_kernel), nn.ReLU(inplace=True))
        self.primary = PrimaryCapsules(
            conv1_channels,
            num_types=primary_types,
            capsule_dim=primary_dim,
            kernel_size=primary_kernel,
            stride=primary_stride,
            weight_grad=primary_weight_grad,
        )
        grid = self.primary.output_size(conv1_out)
        self.digit = RoutingCapsules(
            in_caps=primary_types * grid * grid,
            in_dim=primary_dim,
            out_caps=num_classes,
            out_dim=class_dim,
            routing=build_routing(
                routing or {"name": "dynamic"},
                kind="vector",
                out_types=num_classes,
                role="class",
                in_slots=(primary_types * grid * grid, 1),
            ),
            init_std=weight_init_std,
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
        u = self.primary(self.conv1(x))  # (B, 1152, 8) for MNIST
        return self.digit(u)  # (B, K, 16)
