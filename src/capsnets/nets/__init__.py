"""The networks of the papers as plain ``torch.nn`` modules (no Lightning, no torchvision).

:mod:`capsnets.models` wraps each in a LightningModule with its loss, metrics and optimiser.
"""

from capsnets.nets.capsnet import CapsNet
from capsnets.nets.cnn import ARCHITECTURES, PRESETS, BaselineCNN
from capsnets.nets.efficient_capsnet import EfficientCapsNet
from capsnets.nets.em_capsnet import EMCapsNet
from capsnets.nets.ida_capsnet import IDACapsNet

__all__ = ["ARCHITECTURES", "PRESETS", "BaselineCNN", "CapsNet", "EMCapsNet", "EfficientCapsNet", "IDACapsNet"]
