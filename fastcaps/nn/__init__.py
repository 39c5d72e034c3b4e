"""Capsule modules on top of the routing op: PrimaryCaps, DigitCaps, FusedDigitCaps, Decoder, ConvCaps2d,
FusedConvCaps2d, and convert_weight (another CapsNet's routing weight in fastcaps' layout)."""
from .capsules import Decoder, DigitCaps, FusedDigitCaps, PrimaryCaps
from .conv import ConvCaps2d, FusedConvCaps2d
from .convert import convert_weight

__all__ = ["PrimaryCaps", "DigitCaps", "FusedDigitCaps", "Decoder", "ConvCaps2d", "FusedConvCaps2d", "convert_weight"]
