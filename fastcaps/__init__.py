"""fastcaps: fused Triton kernels for dynamic routing in capsule networks.

Layers, from the bottom: kernels (Triton) -> ops (the eager reference, the fused op) -> nn
(capsule modules) -> models (CapsNet, the baseline CNN) -> recipes (the `fastcaps` command);
data feeds the recipes. The names below are the public API.
"""
import sys

from .models import CapsNet, CapsNetOutput, ConvCapsNet, capsnet_loss, margin_loss, reconstruction_loss
from .nn import ConvCaps2d, Decoder, DigitCaps, FusedConvCaps2d, FusedDigitCaps, PrimaryCaps, convert_weight
from .ops import dynamic_routing, kernels_available, reference, squash

__version__ = "0.1.0"
__all__ = ["dynamic_routing", "squash", "reference", "kernels_available", "PrimaryCaps", "DigitCaps",
           "FusedDigitCaps", "Decoder", "convert_weight", "CapsNet", "CapsNetOutput", "margin_loss",
           "reconstruction_loss", "capsnet_loss", "export_onnx", "ConvCaps2d", "FusedConvCaps2d", "ConvCapsNet"]

# `import fastcaps.reference` keeps working: the eager spec's public name since fastcaps 0.1
sys.modules[f"{__name__}.reference"] = reference


def __getattr__(name):
    # export_onnx needs the optional onnxscript (the [export] extra): imported on first use
    if name == "export_onnx":
        from .ops.onnx import export_onnx
        return export_onnx
    raise AttributeError(f"module 'fastcaps' has no attribute {name!r}")
