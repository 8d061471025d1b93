"""Plain ``torch.nn`` building blocks for capsule networks, one concept per file."""

from capsnets.nn.decoder import ReconstructionDecoder, mask_capsules
from capsnets.nn.dynamic_routing import RoutingCapsules, coupling_entropy, dynamic_routing
from capsnets.nn.primary_caps import PrimaryCapsules
from capsnets.nn.squash import squash

__all__ = [
    "PrimaryCapsules",
    "ReconstructionDecoder",
    "RoutingCapsules",
    "coupling_entropy",
    "dynamic_routing",
    "mask_capsules",
    "squash",
]
