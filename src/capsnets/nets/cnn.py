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

from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

import torch
from torch import nn

from capsnets.errors import ConfigError
from capsnets.schema import NumClasses, PositiveInt, Range, checked

Architecture = Literal["sabour2017", "hinton2018"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


class BaselineCNN(nn.Module):
    """Conv stack (5x5, same padding, ReLU, optional 2x2 max pool) -> FC layers -> dropout -> logits."""

    @checked("model.net")
    def __init__(
        self,
        *,
        in_channels: PositiveInt,
        image_size: PositiveInt,
        num_classes: NumClasses,
        conv_channels: Sequence[PositiveInt],
        pool: bool,
        fc_units: Sequence[PositiveInt],
        kernel_size: PositiveInt = 5,
        dropout: Annotated[float, Range(0, 0.99)] = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width in conv_channels:
            layers += [nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = width
        if size < 1:  # a rule of two settings: image_size against the number of 2x2 poolings
            raise ConfigError(
                f"model.net.image_size={image_size} pools down to nothing (after pooling: {size} px) through "
                f"{len(conv_channels)} 2x2 poolings. Fix: larger images, or fewer model.net.conv_channels."
            )
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
