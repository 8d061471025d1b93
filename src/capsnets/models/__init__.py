"""LightningModules, one per capsule variant (and the CNN baselines), sharing :class:`CapsuleClassifier`.

The networks themselves are plain ``torch.nn`` modules in :mod:`capsnets.nets`.
"""

from capsnets.models.base import CapsuleClassifier, CapsuleView
from capsnets.models.cnn import CNNModule
from capsnets.models.dr_caps import DRCapsModule, EfficientCapsModule
from capsnets.models.em_caps import EMCapsModule
from capsnets.models.ida_caps import IDACapsModule
from capsnets.nets import BaselineCNN, CapsNet, EfficientCapsNet, EMCapsNet, IDACapsNet

__all__ = [
    "BaselineCNN",
    "CNNModule",
    "CapsNet",
    "CapsuleClassifier",
    "CapsuleView",
    "DRCapsModule",
    "EMCapsModule",
    "EMCapsNet",
    "EfficientCapsModule",
    "EfficientCapsNet",
    "IDACapsModule",
    "IDACapsNet",
]
