"""Benchmarks of the fused routing op against the eager reference and torch.compile of it.

- `python -m benchmarks.run`: the sweep (routing fwd / bwd / fwd+bwd over batch sizes and
  dtypes, roofline report, CapsNet training step); writes benchmarks/results/<device>.{json,md,png}.
- `python -m pytest benchmarks/ --benchmark-only`: the same routing timings as a
  pytest-benchmark suite.
- `python -m benchmarks.convcaps`: the convolutional capsule layers (ConvCaps2d eager, compiled
  and fused; fwd / fwd+bwd, peak memory on CUDA); writes benchmarks/results/<device>-convcaps.{json,md}.
- `python -m benchmarks.convcaps_memory`: the bytes those layers save for the backward.

Shared machinery lives in benchmarks.harness, the cost model in benchmarks.roofline.
"""
