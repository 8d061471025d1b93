"""Plain ``torch.nn`` building blocks for capsule networks, one concept per file."""

from capsnets.nn.class_caps import ClassCapsules, coordinate_offsets
from capsnets.nn.conv_caps import ConvCapsules, conv_child_index
from capsnets.nn.decoder import ReconstructionDecoder, mask_capsules
from capsnets.nn.dynamic_routing import RoutingCapsules, coupling_entropy, dynamic_routing
from capsnets.nn.em_routing import EMRouting, EMRoutingResult, em_routing, inverse_temperatures
from capsnets.nn.matrix_caps import PrimaryMatrixCapsules, capsule_votes
from capsnets.nn.primary_caps import PrimaryCapsules
from capsnets.nn.squash import squash

__all__ = [
    "ClassCapsules",
    "ConvCapsules",
    "EMRouting",
    "EMRoutingResult",
    "PrimaryCapsules",
    "PrimaryMatrixCapsules",
    "capsule_votes",
    "conv_child_index",
    "coordinate_offsets",
    "em_routing",
    "inverse_temperatures",
    "ReconstructionDecoder",
    "RoutingCapsules",
    "coupling_entropy",
    "dynamic_routing",
    "mask_capsules",
    "squash",
]
