"""Triton kernels of fastcaps, one module per op (installed as fastcaps.kernels)."""
