"""Models built from the capsule modules: the paper's MNIST CapsNet with its losses, Table 1's baseline CNN, and ConvCapsNet."""
from .baseline import BaselineCNN, baseline_loss
from .capsnet import (AUTHORS_ARCH, LEGACY_ARCH, CapsNet, CapsNetOutput, capsnet_loss, margin_loss,
                      reconstruction_loss)
from .convcaps import ConvCapsNet

__all__ = ["CapsNet", "CapsNetOutput", "margin_loss", "reconstruction_loss", "capsnet_loss", "AUTHORS_ARCH",
           "LEGACY_ARCH", "BaselineCNN", "baseline_loss", "ConvCapsNet"]
