"""Capsule modules on top of the routing op."""
