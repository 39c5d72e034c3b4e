"""Benchmarks of the fused routing op against the eager reference and torch.compile of it.

- `python -m benchmarks.run`: the sweep (routing fwd / bwd / fwd+bwd over batch sizes and
  dtypes, roofline report, CapsNet training step); writes benchmarks/results/<device>.{json,md,png}.
- `python -m pytest benchmarks/ --benchmark-only`: the same routing timings as a
  pytest-benchmark suite.

Shared machinery lives in benchmarks.harness, the cost model in benchmarks.roofline.
"""
