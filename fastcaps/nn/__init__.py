"""Subpackage of fastcaps (modules: nn layers and their conversion helpers)."""
