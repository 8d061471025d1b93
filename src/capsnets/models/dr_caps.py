"""CapsNet with dynamic routing (Sabour, Frosst & Hinton, NeurIPS 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.losses import margin_loss, reconstruction_loss
from capsnets.models.base import CapsuleClassifier
from capsnets.nn import PrimaryCapsules, ReconstructionDecoder, RoutingCapsules
from capsnets.utils.validation import require_int, require_positive, require_range


class CapsNet(nn.Module):
    """Conv1 (256, 9x9, ReLU) -> PrimaryCaps (32 x 8D, 9x9 stride 2) -> DigitCaps (K x 16D) [+ decoder].

    With MNIST shapes: 6,804,224 parameters without the decoder and 8,215,568 with it
    (the paper's 6.8M / 8.2M).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        conv1_channels: int = 256,
        conv1_kernel: int = 9,
        primary_types: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        class_dim: int = 16,
        routing_iterations: int = 3,
        detach_inner_u_hat: bool = False,
        reconstruction: bool = True,
        decoder_hidden: list[int] | tuple[int, ...] = (512, 1024),
        weight_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        for key, value in {
            "in_channels": in_channels, "image_size": image_size, "num_classes": num_classes,
            "conv1_channels": conv1_channels, "conv1_kernel": conv1_kernel, "primary_types": primary_types,
            "primary_dim": primary_dim, "primary_kernel": primary_kernel, "primary_stride": primary_stride,
            "class_dim": class_dim, "routing_iterations": routing_iterations,
        }.items():
            require_int(f"model.net.{key}", value, minimum=2 if key == "num_classes" else 1)
        for i, width in enumerate(decoder_hidden):
            require_int(f"model.net.decoder_hidden[{i}]", width)
        require_positive("model.net.weight_init_std", weight_init_std)
        conv1_out = image_size - conv1_kernel + 1
        if conv1_out < primary_kernel:
            raise ConfigError(
                f"model.net: image_size {image_size} is too small for conv1_kernel {conv1_kernel} followed by "
                f"primary_kernel {primary_kernel} (Conv1 leaves {conv1_out}x{conv1_out}); use smaller kernels or larger images."
            )
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, conv1_channels, conv1_kernel), nn.ReLU(inplace=True))
        self.primary = PrimaryCapsules(
            conv1_channels, num_types=primary_types, capsule_dim=primary_dim, kernel_size=primary_kernel, stride=primary_stride
        )
        grid = self.primary.output_size(conv1_out)
        self.digit = RoutingCapsules(
            in_caps=primary_types * grid * grid, in_dim=primary_dim, out_caps=num_classes, out_dim=class_dim,
            iterations=routing_iterations, detach_inner=detach_inner_u_hat, init_std=weight_init_std,
        )
        self.decoder = (
            ReconstructionDecoder(
                num_classes=num_classes, capsule_dim=class_dim, out_shape=(in_channels, image_size, image_size),
                hidden=tuple(decoder_hidden),
            )
            if reconstruction
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, K, class_dim) class capsules; class score = length."""
        u = self.primary(self.conv1(x))  # (B, 1152, 8) for MNIST
        return self.digit(u)  # (B, K, 16)


class DRCapsModule(CapsuleClassifier):
    """LightningModule for CapsNet: margin loss + ``recon_weight`` x reconstruction loss.

    The decoder is masked by the true label in training and by the prediction in
    validation/test, as in the paper.
    """

    def __init__(
        self,
        *,
        net: dict[str, Any],
        loss: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
    ) -> None:
        super().__init__(num_classes=net["num_classes"], optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(logger=False)  # train.py logs the whole resolved config instead
        require_range("model.loss.m_plus", loss["m_plus"], 0.0, 1.0)
        require_range("model.loss.m_minus", loss["m_minus"], 0.0, 1.0)
        require_range("model.loss.down_weight", loss["down_weight"], 0.0, float("inf"))
        require_range("model.loss.recon_weight", loss["recon_weight"], 0.0, float("inf"))
        self.loss_cfg = dict(loss)
        self.net = CapsNet(**net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def shared_step(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        v = self.net(x)  # (B, K, D)
        lengths = v.norm(dim=-1)  # (B, K): class scores
        cfg = self.loss_cfg
        l_margin = margin_loss(lengths, y, m_plus=cfg["m_plus"], m_minus=cfg["m_minus"], down_weight=cfg["down_weight"])
        parts = {"margin_loss": l_margin.detach()}
        loss = l_margin
        if self.net.decoder is not None:
            recon = self.net.decoder(v, y if stage == "train" else None)
            l_recon = reconstruction_loss(recon, x)
            parts["recon_loss"] = l_recon.detach()
            loss = loss + cfg["recon_weight"] * l_recon
        return loss, lengths, parts
