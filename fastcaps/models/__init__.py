"""Models built from the capsule modules."""
