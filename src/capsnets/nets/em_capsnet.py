"""Matrix-capsule network of Hinton, Sabour & Frosst (ICLR 2018): the network, without training logic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn import ClassCapsules, ConvCapsules, PrimaryMatrixCapsules
from capsnets.nn.matrix_caps import PoseKind
from capsnets.nn.routing import build_routing
from capsnets.schema import NumClasses, PositiveFloat, PositiveInt, checked


class EMCapsNet(nn.Module):
    """ReLU Conv1 (A, 5x5/2) -> PrimaryCaps (B types, 1x1) -> ConvCaps1 (C, 3x3/2) -> ConvCaps2 (D, 3x3/1)
    -> Class capsules (one per class, weights shared across positions, coordinate addition).

    On smallNORB 32x32x1 with 5 classes: A=B=C=D=32 gives 316,394 parameters (the paper's
    "310K"); A=64, B=8, C=D=16 gives 67,154 (the paper's "68K"). The difference to the
    paper's rounded figures is in what they counted (biases, betas), not in the architecture.
    ``conv1_norm="batch"`` (capsnets' config default, not the paper's) puts a BatchNorm between Conv1 and its
    ReLU and drops the conv bias: A more parameters.
    ``routing``: the config of a matrix-capsule routing (``model.routing``; default: EM routing),
    built once per capsule layer.
    """

    @checked("model.net")
    def __init__(
        self,
        *,
        in_channels: PositiveInt,
        image_size: PositiveInt,
        num_classes: NumClasses,
        A: PositiveInt = 32,
        B: PositiveInt = 32,
        C: PositiveInt = 32,
        D: PositiveInt = 32,
        conv1_kernel: PositiveInt = 5,
        conv1_stride: PositiveInt = 2,
        caps1_kernel: PositiveInt = 3,
        caps1_stride: PositiveInt = 2,
        caps2_kernel: PositiveInt = 3,
        caps2_stride: PositiveInt = 1,
        pose: PoseKind = "matrix",
        coordinate_addition: bool = True,
        coordinate_scale: PositiveFloat = 1.0,
        caps_init_std: PositiveFloat | None = None,
        class_init_std: PositiveFloat | None = None,
        conv1_norm: Literal["none", "batch"] = "none",
        routing: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        grid = (image_size - conv1_kernel) // conv1_stride + 1
        grid1 = (grid - caps1_kernel) // caps1_stride + 1 if grid >= caps1_kernel else 0
        grid2 = (grid1 - caps2_kernel) // caps2_stride + 1 if grid1 >= caps2_kernel else 0
        if grid2 < 1:
            raise ConfigError(
                f"model.net: image_size {image_size} is too small for Conv1 {conv1_kernel}/{conv1_stride}, "
                f"ConvCaps1 {caps1_kernel}/{caps1_stride} and ConvCaps2 {caps2_kernel}/{caps2_stride} "
                f"(grids {grid} -> {grid1} -> {grid2}); use larger images or smaller kernels/strides."
            )
        routing = routing or {"name": "em"}

        def route(out_types: int, role: str = "hidden"):  # one routing (and its own betas) per capsule layer
            return build_routing(routing, kind="matrix", out_types=out_types, role=role)

        # conv1_norm="batch": Conv -> BatchNorm -> ReLU (not in the paper or the authors' release; see em_caps.yaml)
        conv = nn.Conv2d(in_channels, A, conv1_kernel, stride=conv1_stride, bias=conv1_norm == "none")
        norm = [nn.BatchNorm2d(A)] if conv1_norm == "batch" else []
        self.conv1 = nn.Sequential(conv, *norm, nn.ReLU(inplace=True))
        self.primary = PrimaryMatrixCapsules(A, num_types=B)
        self.caps1 = ConvCapsules(
            in_types=B,
            out_types=C,
            kernel_size=caps1_kernel,
            stride=caps1_stride,
            routing=route(C),
            pose=pose,
            init_std=caps_init_std,
        )
        self.caps2 = ConvCapsules(
            in_types=C,
            out_types=D,
            kernel_size=caps2_kernel,
            stride=caps2_stride,
            routing=route(D),
            pose=pose,
            init_std=caps_init_std,
        )
        self.classes = ClassCapsules(
            in_types=D,
            num_classes=num_classes,
            routing=route(num_classes, "class"),
            coordinate_addition=coordinate_addition,
            coordinate_scale=coordinate_scale,
            pose=pose,
            init_std=class_init_std,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) images -> class poses (B, K, 16) and activations (B, K) in (0, 1)."""
        pose, a = self.primary(self.conv1(x))  # (B, 14, 14, B_types, 16), (B, 14, 14, B_types) on smallNORB
        pose, a = self.caps1(pose, a)  # (B, 6, 6, C, 16)
        pose, a = self.caps2(pose, a)  # (B, 4, 4, D, 16)
        return self.classes(pose, a)  # (B, K, 16), (B, K)
