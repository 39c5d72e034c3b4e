"""Capsule modules on top of the routing op: PrimaryCaps, DigitCaps, FusedDigitCaps, Decoder, and
convert_weight (another CapsNet's routing weight in fastcaps' layout)."""
from .capsules import Decoder, DigitCaps, FusedDigitCaps, PrimaryCaps
from .convert import convert_weight

__all__ = ["PrimaryCaps", "DigitCaps", "FusedDigitCaps", "Decoder", "convert_weight"]
