"""Capsule modules on top of the routing op: PrimaryCaps, DigitCaps, FusedDigitCaps, Decoder."""
from .capsules import Decoder, DigitCaps, FusedDigitCaps, PrimaryCaps

__all__ = ["PrimaryCaps", "DigitCaps", "FusedDigitCaps", "Decoder"]
