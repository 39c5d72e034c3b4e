"""fastcaps: fused Triton kernels for dynamic routing in capsule networks."""
from . import reference
from .layers import Decoder, DigitCaps, PrimaryCaps
from .nn.convert import convert_weight
from .model import CapsNet, CapsNetOutput, capsnet_loss, margin_loss, reconstruction_loss
from .reference import squash
from .routing import FusedDigitCaps, dynamic_routing, kernels_available

__version__ = "0.1.0"
