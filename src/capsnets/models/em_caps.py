"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018)."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback
from torch import nn

from capsnets.callbacks import SpreadMarginSchedule
from capsnets.errors import ConfigError
from capsnets.losses import margin_loss, spread_loss
from capsnets.models.base import CapsuleClassifier
from capsnets.nn import ClassCapsules, ConvCapsules, PrimaryMatrixCapsules
from capsnets.utils.validation import require_choice, require_int, require_positive, require_range

LOSSES = ("spread", "margin", "cross_entropy")


class EMCapsNet(nn.Module):
    """ReLU Conv1 (A, 5x5/2) -> PrimaryCaps (B types, 1x1) -> ConvCaps1 (C, 3x3/2) -> ConvCaps2 (D, 3x3/1)
    -> Class capsules (one per class, weights shared across positions, coordinate addition).

    On smallNORB 32x32x1 with 5 classes: A=B=C=D=32 gives 316,394 parameters (the paper's
    "310K"); A=64, B=8, C=D=16 gives 67,154 (the paper's "68K"). The difference to the
    paper's rounded figures is in what they counted (biases, betas), not in the architecture.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        A: int = 32,
        B: int = 32,
        C: int = 32,
        D: int = 32,
        conv1_kernel: int = 5,
        conv1_stride: int = 2,
        caps1_kernel: int = 3,
        caps1_stride: int = 2,
        caps2_kernel: int = 3,
        caps2_stride: int = 1,
        iterations: int = 3,
        pose: str = "matrix",
        coordinate_addition: bool = True,
        lambda_schedule: str = "official",
        lambda_value: float = 0.01,
        class_lambda_scale: float = 0.25,
        var_floor: float = 0.0005,
        moment_dtype: str = "float64",
    ) -> None:
        super().__init__()
        sizes = {"in_channels": in_channels, "image_size": image_size, "A": A, "B": B, "C": C, "D": D,
                 "conv1_kernel": conv1_kernel, "conv1_stride": conv1_stride, "caps1_kernel": caps1_kernel,
                 "caps1_stride": caps1_stride, "caps2_kernel": caps2_kernel, "caps2_stride": caps2_stride,
                 "iterations": iterations}
        for key, value in sizes.items():
            require_int(f"model.net.{key}", value)
        require_int("model.net.num_classes", num_classes, minimum=2)
        require_choice("model.net.pose", pose, ("matrix", "vector"))
        require_choice("model.net.lambda_schedule", lambda_schedule, ("official", "fixed"))
        require_positive("model.net.lambda_value", lambda_value)
        require_positive("model.net.class_lambda_scale", class_lambda_scale)
        require_positive("model.net.var_floor", var_floor)
        require_choice("model.net.moment_dtype", moment_dtype, ("float32", "float64"))
        grid = (image_size - conv1_kernel) // conv1_stride + 1
        grid1 = (grid - caps1_kernel) // caps1_stride + 1 if grid >= caps1_kernel else 0
        grid2 = (grid1 - caps2_kernel) // caps2_stride + 1 if grid1 >= caps2_kernel else 0
        if grid2 < 1:
            raise ConfigError(
                f"model.net: image_size {image_size} is too small for Conv1 {conv1_kernel}/{conv1_stride}, "
                f"ConvCaps1 {caps1_kernel}/{caps1_stride} and ConvCaps2 {caps2_kernel}/{caps2_stride} "
                f"(grids {grid} -> {grid1} -> {grid2}); use larger images or smaller kernels/strides."
            )
        routing = dict(
            iterations=iterations, pose=pose, lambda_schedule=lambda_schedule, lambda_value=lambda_value,
            var_floor=var_floor, moment_dtype=moment_dtype,
        )
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, A, conv1_kernel, stride=conv1_stride), nn.ReLU(inplace=True))
        self.primary = PrimaryMatrixCapsules(A, num_types=B)
        self.caps1 = ConvCapsules(in_types=B, out_types=C, kernel_size=caps1_kernel, stride=caps1_stride, **routing)
        self.caps2 = ConvCapsules(in_types=C, out_types=D, kernel_size=caps2_kernel, stride=caps2_stride, **routing)
        self.classes = ClassCapsules(
            in_types=D, num_classes=num_classes, coordinate_addition=coordinate_addition, lambda_scale=class_lambda_scale, **routing
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) images -> class poses (B, K, 16) and activations (B, K) in (0, 1)."""
        pose, a = self.primary(self.conv1(x))  # (B, 14, 14, B_types, 16), (B, 14, 14, B_types) on smallNORB
        pose, a = self.caps1(pose, a)  # (B, 6, 6, C, 16)
        pose, a = self.caps2(pose, a)  # (B, 4, 4, D, 16)
        return self.classes(pose, a)  # (B, K, 16), (B, K)


class EMCapsModule(CapsuleClassifier):
    """LightningModule for matrix capsules; class score = class-capsule activation.

    Loss by ``model.loss.name``: ``spread`` (paper; the margin follows
    :class:`SpreadMarginSchedule`, which this module supplies itself through
    ``configure_callbacks``), ``margin`` (Sabour et al.'s margin loss on the activations) or
    ``cross_entropy`` (on the activations' logits ``log(a / (1 - a))``), as in the paper's
    loss ablation.
    """

    def __init__(
        self, *, net: dict[str, Any], loss: dict[str, Any], optimizer: dict[str, Any], scheduler: dict[str, Any]
    ) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)  # train.py logs the whole resolved config instead
        self.loss_name = require_choice("model.loss.name", loss.get("name"), LOSSES)
        self.loss_cfg = dict(loss)
        if self.loss_name == "margin":
            for key in ("m_plus", "m_minus"):
                require_range(f"model.loss.{key}", loss[key], 0.0, 1.0)
            require_range("model.loss.down_weight", loss["down_weight"], 0.0, float("inf"))
        self.margin_schedule_cfg = dict(loss.get("margin_schedule") or {})
        # the schedule object validates its settings now, before any data is read
        self._margin_schedule = SpreadMarginSchedule(**self.margin_schedule_cfg) if self.loss_name == "spread" else None
        # the spread-loss margin in use; set before every training batch by the schedule callback
        self.spread_margin = self._margin_schedule.margin(0) if self._margin_schedule else 0.0
        self.net = EMCapsNet(**net)

    def configure_callbacks(self) -> list[Callback]:
        return [self._margin_schedule] if self._margin_schedule is not None else []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x)

    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        _, a = self.net(x)  # (B, K) class activations
        a = a.float()
        if self.loss_name == "spread":
            loss = spread_loss(a, y, self.spread_margin)
        elif self.loss_name == "margin":
            cfg = self.loss_cfg
            loss = margin_loss(a, y, m_plus=cfg["m_plus"], m_minus=cfg["m_minus"], down_weight=cfg["down_weight"])
        else:
            logits = torch.logit(a, eps=1e-6)
            loss = torch.nn.functional.cross_entropy(logits, y)
        return loss, a, {}
