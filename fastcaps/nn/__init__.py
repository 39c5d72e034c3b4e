"""Capsule modules on top of the routing op: PrimaryCaps, DigitCaps, FusedDigitCaps, Decoder, ConvCaps2d, FusedConvCaps2d."""
from .capsules import Decoder, DigitCaps, FusedDigitCaps, PrimaryCaps
from .conv import ConvCaps2d, FusedConvCaps2d

__all__ = ["PrimaryCaps", "DigitCaps", "FusedDigitCaps", "Decoder", "ConvCaps2d", "FusedConvCaps2d"]
