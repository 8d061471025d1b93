"""The capsule network of Tsai, Srivastava, Goh & Salakhutdinov (ICLR 2020), "Capsules with inverted dot-product
attention routing": the network, without training logic.

The paper's CIFAR architecture (its release, ``configs/resnet_backbone_CIFAR10.json``)::

    backbone: Conv 3x3, 64 -> BN, ReLU -> 3 residual blocks of 64 -> 4 residual blocks of 128, the first stride 2
              (``backbone: resnet``; ``simple``: one Conv 3x3 + ReLU)
    primary capsules: Conv 1x1 (no bias) -> 32 types x 16 pose elements per position, LayerNorm over the 16
    ConvCaps: 3x3, stride 2, 32 types;  ConvCaps: 3x3, stride 1, 32 types       (votes v_ij = M_i W_ij, 4x4 poses)
    class capsules: fully connected, one per class
    logits: one linear map shared by the classes, 16 -> 1, of each class capsule's pose; cross-entropy

Pose capsules (``kind: pose``) carry no activation; every routed layer takes any pose-capsule routing
(``model.routing``: ``inverted_dot_product``, or the ``uniform`` / ``random`` baselines).

**Concurrent routing** (``routing_mode: concurrent``, the paper's): one initialising pass through every
layer with uniform routing, then ``iterations - 1`` rounds in which every layer routes once from the
previous round's poses of the layer below (its votes) and of its own parents (their agreement). With
``sequential`` each layer finishes its iterations before the next starts (routing through the seam).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.nn.conv_caps import conv_child_index
from capsnets.nn.matrix_caps import MATRIX_SIDE, POSE_SIZE, vote_weight
from capsnets.nn.routing import ChildLayout, Routing, RoutingResult, RoutingTrace, VoteFactors, build_routing
from capsnets.schema import NumClasses, PositiveInt, check_parallel_lists, checked

Backbone = Literal["resnet", "simple"]
RoutingMode = Literal["concurrent", "sequential"]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut, as ResNet-18's."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def make_backbone(kind: str, in_channels: int, channels: int, stride: int) -> nn.Module:
    """``resnet``: the release's (3 blocks of 64, then 4 of ``channels``, the first with ``stride``);
    ``simple``: one 3x3 convolution (padding 1, ``stride``) with ReLU."""
    if kind == "simple":
        return nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1), nn.ReLU(inplace=True))
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
    ]
    layers += [ResidualBlock(64, 64) for _ in range(3)]
    layers += [ResidualBlock(64, channels, stride)] + [ResidualBlock(channels, channels) for _ in range(3)]
    return nn.Sequential(*layers)


class PoseCapsules(nn.Module):
    """Pose capsules routed from a grid of pose capsules: convolutional (``kernel_size``) or fully connected (None).

    Votes ``v_ij = M_i W_ij`` (4x4 poses, one ``W`` per (kernel offset, in type, out type), shared across
    positions; fully connected: one per (input position, in type, class)), initialised N(0, T_out / (4 fan_in))
    with fan_in the children of a parent, as the release. (B, H, W, T_in, 16) -> (B, H_out, W_out, T_out, 16).
    """

    @checked("PoseCapsules")
    def __init__(
        self,
        *,
        in_types: PositiveInt,
        out_types: PositiveInt,
        routing: Routing,
        kernel_size: PositiveInt | None = None,
        stride: PositiveInt = 1,
        in_size: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        if routing.kind != "pose" or routing.out_types != out_types:
            raise ConfigError(f"PoseCapsules needs a pose-capsule routing for {out_types} parent types, got {routing}.")
        if kernel_size is None and in_size is None:
            raise ConfigError("PoseCapsules: a fully connected layer (kernel_size=None) needs its in_size.")
        self.in_types, self.out_types, self.kernel_size, self.stride = in_types, out_types, kernel_size, stride
        slots = (kernel_size if kernel_size is not None else in_size) ** 2
        std = math.sqrt(out_types / (MATRIX_SIDE * slots * in_types))
        self.weight = nn.Parameter(std * torch.randn(slots, in_types, out_types, MATRIX_SIDE, MATRIX_SIDE))
        self.routing = routing

    def output_size(self, in_size: int) -> int:
        return 1 if self.kernel_size is None else (in_size - self.kernel_size) // self.stride + 1

    def votes(self, pose: torch.Tensor) -> tuple[VoteFactors, ChildLayout]:
        """Votes (B, P, K, T_in, T_out, 16) of the children in each patch by their factors (child poses and
        ``kron(I_4, W)``: a fused routing forms them itself, block by block), and their layout."""
        b, h, w, t_in, _ = pose.shape
        if self.kernel_size is None:  # one patch of every position and type
            if h * w != self.weight.shape[0]:
                raise ValueError(f"PoseCapsules built for {self.weight.shape[0]} input positions, got {h}x{w}.")
            M = pose.reshape(b, 1, h * w, t_in, POSE_SIZE)
            return VoteFactors(M, vote_weight(self.weight), kron=True), ChildLayout()
        h_out, w_out = self.output_size(h), self.output_size(w)
        index = conv_child_index(h, w, kernel_size=self.kernel_size, stride=self.stride, device=pose.device)
        M = pose.reshape(b, h * w, t_in, POSE_SIZE).index_select(1, index)
        M = M.view(b, h_out * w_out, self.kernel_size**2, t_in, POSE_SIZE)  # (B, P, K*K, T_in, 16)
        return VoteFactors(M, vote_weight(self.weight), kron=True), ChildLayout(index, h * w)

    def unflatten(self, pose: torch.Tensor, in_hw: tuple[int, int]) -> torch.Tensor:
        """(B, P, T_out, 16) parents -> (B, H_out, W_out, T_out, 16)."""
        h_out, w_out = self.output_size(in_hw[0]), self.output_size(in_hw[1])
        return pose.reshape(pose.shape[0], h_out, w_out, self.out_types, POSE_SIZE)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        """Route to the end through the seam (sequential routing)."""
        with torch.autocast(device_type=pose.device.type, enabled=False):  # votes and routing in float32
            V, layout = self.votes(pose.to(torch.promote_types(pose.dtype, torch.float32)))
            return self.unflatten(self.routing(V, None, layout).poses, pose.shape[1:3])

    def step(
        self,
        pose: torch.Tensor,
        previous: torch.Tensor | None,
        votes: tuple[VoteFactors, ChildLayout] | None = None,
    ) -> torch.Tensor:
        """One routing iteration from the children's poses and the parents' ``previous`` poses (None: first);
        ``votes``: this layer's votes of ``pose`` when already computed (they depend on ``pose`` only)."""
        routing = self.routing
        with torch.autocast(device_type=pose.device.type, enabled=False):  # votes and routing in float32
            V, layout = votes or self.votes(pose.to(torch.promote_types(pose.dtype, torch.float32)))
            if previous is None:
                routing.trace = RoutingTrace(layout) if routing.record_trace else None
            else:
                previous = previous.to(V.dtype).reshape(V.shape[0], V.shape[1], self.out_types, POSE_SIZE)
            if not routing.takes_vote_factors:
                V = V.materialise()  # (B, P, K, T_in, T_out, 16)
            result: RoutingResult = routing.step(V, previous, layout, routing.trace)
        return self.unflatten(result.poses, pose.shape[1:3])

    def extra_repr(self) -> str:
        kind = f"kernel_size={self.kernel_size}, stride={self.stride}" if self.kernel_size else "fully connected"
        return f"in_types={self.in_types}, out_types={self.out_types}, {kind}"


class IDACapsNet(nn.Module):
    """Backbone -> primary pose capsules -> convolutional pose capsules -> class capsules -> shared linear logits.

    Args:
        backbone, backbone_channels, backbone_stride: see :func:`make_backbone` (release: resnet, 128, 2).
        primary_types: primary capsule types (16 pose elements each; release: 32).
        caps_types, caps_kernels, caps_strides: the convolutional capsule layers (release: 32/3/2, 32/3/1).
        routing: a pose-capsule routing config (``model.routing``; default: inverted dot-product, 2 iterations).
        routing_mode: ``concurrent`` (the paper's) or ``sequential``.
    """

    @checked("model.net")
    def __init__(
        self,
        *,
        in_channels: PositiveInt,
        image_size: PositiveInt,
        num_classes: NumClasses,
        backbone: Backbone = "resnet",
        backbone_channels: PositiveInt = 128,
        backbone_stride: PositiveInt = 2,
        primary_types: PositiveInt = 32,
        caps_types: Sequence[PositiveInt] = (32, 32),
        caps_kernels: Sequence[PositiveInt] = (3, 3),
        caps_strides: Sequence[PositiveInt] = (2, 1),
        routing: Mapping[str, Any] | None = None,
        routing_mode: RoutingMode = "concurrent",
    ) -> None:
        super().__init__()
        self.routing_mode = routing_mode
        lists = {"caps_types": caps_types, "caps_kernels": caps_kernels, "caps_strides": caps_strides}
        check_parallel_lists("model.net", lists)
        routing = routing or {"name": "inverted_dot_product"}

        self.backbone = make_backbone(backbone, in_channels, backbone_channels, backbone_stride)
        size = (image_size - 1) // backbone_stride + 1  # 3x3 convolutions with padding 1
        self.primary = nn.Conv2d(backbone_channels, primary_types * POSE_SIZE, 1, bias=False)
        self.primary_norm = nn.LayerNorm(POSE_SIZE)
        self.primary_types = primary_types
        layers, sizes, t_in = [], [size], primary_types
        for t_out, kernel, stride in zip(caps_types, caps_kernels, caps_strides):
            layer = PoseCapsules(
                in_types=t_in,
                out_types=t_out,
                kernel_size=kernel,
                stride=stride,
                routing=build_routing(routing, kind="pose", out_types=t_out, in_slots=(kernel**2, t_in)),
            )
            size = layer.output_size(size)
            if size < 1:
                raise ConfigError(
                    f"model.net: image_size {image_size} is too small for the capsule layers (grids {sizes} then "
                    f"a {kernel}x{kernel} kernel); use larger images or smaller kernels/strides."
                )
            layers.append(layer)
            sizes.append(size)
            t_in = t_out
        self.caps = nn.ModuleList(layers)
        self.classes = PoseCapsules(
            in_types=t_in,
            out_types=num_classes,
            in_size=size,
            routing=build_routing(routing, kind="pose", out_types=num_classes, role="class", in_slots=(size**2, t_in)),
        )
        self.classifier = nn.Linear(POSE_SIZE, 1)  # shared by the classes (release: "fixed classifier")

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, H', W', T, 16) layer-normalised primary poses."""
        u = self.primary(self.backbone(x))  # (B, T*16, H', W')
        b, _, h, w = u.shape
        u = u.permute(0, 2, 3, 1).reshape(b, h, w, self.primary_types, POSE_SIZE)
        return self.primary_norm(u)

    def class_poses(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_classes, 16) class capsule poses."""
        layers = [*self.caps, self.classes]
        pose = self.primary_capsules(x)
        concurrent = self.routing_mode == "concurrent" and all(hasattr(layer.routing, "step") for layer in layers)
        if not concurrent:
            for layer in layers:
                pose = layer(pose)
            return pose.flatten(1, 3)
        iterations = max(layer.routing.iterations for layer in layers)
        with torch.autocast(device_type=pose.device.type, enabled=False):  # the primary capsules never change:
            first = layers[0].votes(pose.to(torch.promote_types(pose.dtype, torch.float32)))  # their votes once
        values = [pose, layers[0].step(pose, None, first)]
        for layer in layers[1:]:  # the initialising pass: uniform routing, layer after layer
            values.append(layer.step(values[-1], None))
        for _ in range(iterations - 1):  # every layer at once, from the previous round's poses
            values = [
                values[0],
                layers[0].step(values[0], values[1], first),
                *(layer.step(values[i], values[i + 1]) for i, layer in enumerate(layers) if i > 0),
            ]
        return values[-1].flatten(1, 3)  # (B, 1, 1, K, 16) -> (B, K, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) images -> class poses (B, K, 16) and logits (B, K)."""
        poses = self.class_poses(x)
        return poses, self.classifier(poses).squeeze(-1)
