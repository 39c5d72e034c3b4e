"""fastcaps: fused Triton kernels for dynamic routing in capsule networks."""
from . import reference
from .layers import Decoder, DigitCaps, PrimaryCaps
from .nn.convert import convert_weight
from .model import CapsNet, CapsNetOutput, capsnet_loss, margin_loss, reconstruction_loss
from .reference import squash
from .routing import FusedDigitCaps, dynamic_routing, kernels_available

__version__ = "0.1.0"


def __getattr__(name):
    # export_onnx needs the optional onnxscript (the [export] extra): imported on first use
    if name == "export_onnx":
        from .ops.onnx import export_onnx
        return export_onnx
    raise AttributeError(f"module 'fastcaps' has no attribute {name!r}")
