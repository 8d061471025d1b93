"""The CNN baselines the capsule papers compare against, trained with the same DataModules.

* ``sabour2017``: three 5x5 stride-1 convolutions with 256, 256 and 128 channels, then fully
  connected layers of 328 and 192 units and, through dropout, the class softmax (Sabour et
  al. 2017, Sec. 5): 35,445,522 parameters on MNIST (the paper's 35.4M).
* ``hinton2018``: two 5x5 convolutions with 32 and 64 channels, each followed by 2x2 max
  pooling, a 1024-unit fully connected layer with dropout and the class softmax (Hinton et
  al. 2018, Sec. 5): 4,252,549 parameters on smallNORB 32x32x1 (the paper's 4.2M).

"Same" padding keeps the spatial size through each convolution, which is what reproduces
the published parameter counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from capsnets.utils.validation import require_int, require_range

ARCHITECTURES = ("sabour2017", "hinton2018")


class BaselineCNN(nn.Module):
    """Conv stack (5x5, same padding, ReLU, optional 2x2 max pool) -> FC layers -> dropout -> logits."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        conv_channels: list[int] | tuple[int, ...],
        pool: bool,
        fc_units: list[int] | tuple[int, ...],
        kernel_size: int = 5,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        for key, value in {"in_channels": in_channels, "image_size": image_size, "kernel_size": kernel_size}.items():
            require_int(f"model.net.{key}", value)
        require_int("model.net.num_classes", num_classes, minimum=2)
        for i, width in enumerate(conv_channels):
            require_int(f"model.net.conv_channels[{i}]", width)
        for i, width in enumerate(fc_units):
            require_int(f"model.net.fc_units[{i}]", width)
        require_range("model.net.dropout", dropout, 0.0, 0.99)
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width in conv_channels:
            layers += [nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = width
        require_int("model.net.image_size (after pooling)", size)
        self.features = nn.Sequential(*layers)
        sizes = [channels * size * size, *fc_units]
        fc: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            fc += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        fc += [nn.Dropout(dropout), nn.Linear(sizes[-1], num_classes)]
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> class logits (B, K)."""
        return self.classifier(self.features(x))


PRESETS: dict[str, dict[str, Any]] = {
    "sabour2017": {"conv_channels": (256, 256, 128), "pool": False, "fc_units": (328, 192)},
    "hinton2018": {"conv_channels": (32, 64), "pool": True, "fc_units": (1024,)},
}
