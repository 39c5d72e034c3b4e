"""The routing op: the eager specification (reference) and the fused Triton op built on fastcaps.kernels."""
from . import conv_reference, reference
from .reference import squash
from .routing import FusedRoutingFunction, TritonMissingError, dynamic_routing, kernels_available

__all__ = ["reference", "conv_reference", "squash", "dynamic_routing", "kernels_available", "TritonMissingError", "FusedRoutingFunction"]
