"""Bytes autograd saves for the backward of a convolutional capsule layer, eager vs fused.

`python -m benchmarks.convcaps_memory [--check]` prints the table of the README.

Counted: every tensor that autograd packs for the backward during one training forward
(torch.autograd.graph.saved_tensors_hooks), as unique storages (a view and its base count
once, a storage saved by several ops once), in bytes of the whole storage, excluding the
storages of the layer's parameters and of its input x, which exist whether or not a graph is
recorded. Not counted: the output, and the transient memory of the forward and of the backward
(a GPU's peak memory, which the benchmark sweep measures: benchmarks/convcaps.py).

The shapes of the issue are far too large for the eager layer on this CPU (its SegCaps-like
votes alone are 1.7 GB per sample), so the table runs the layers on the meta device: the same
Python code and the same autograd graph, with shapes and no data. The fused op runs there on
its fake implementation (the one torch.compile traces), which returns tensors of the shapes its
kernels save. `--check` first confirms, at a small shape, that the meta counts are the counts
of real runs: the eager layer on the CPU, and the fused layer with its Triton kernels in the
interpreter (TRITON_INTERPRET=1, set by this module when no GPU is present).
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # before Triton is imported: the fused op's kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastcaps  # noqa: E402
from fastcaps.kernels import routing as kernels  # noqa: E402
from fastcaps.nn.conv import ConvCaps2d, FusedConvCaps2d  # noqa: E402

__all__ = ["LAYERS", "BATCHES", "saved_bytes", "fused_formula_bytes", "votes_bytes", "table", "check", "main"]

# name -> (ConvCaps2d arguments, input height = width)
LAYERS = {
    # SegCaps' middle layers: 16 types of 16-D in and out, 5x5 windows, on a 64x64 grid ('same' padding)
    "segcaps-like": (dict(in_types=16, in_dim=16, out_types=16, out_dim=16, kernel_size=5, padding=2), 64),
    # DeepCaps' 3x3 capsule cells: 32 types of 8-D in and out on 16x16 ('same' padding)
    "deepcaps-like": (dict(in_types=32, in_dim=8, out_types=32, out_dim=8, kernel_size=3, padding=1), 16),
}
BATCHES = (1, 8, 32)
ITERATIONS = 3


def _layer(cls, args: dict, transform: str, device) -> ConvCaps2d:
    return cls(**args, iterations=ITERATIONS, transform=transform, bias=True).to(device)


def saved_bytes(layer: ConvCaps2d, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves in layer(x), those of x and of the layer's
    parameters excluded (see the module docstring)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    exclude = {t.untyped_storage()._cdata for t in (x, *layer.parameters())}
    # the tensors stay alive in `saved`, so no two live storages share an address
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in saved}
    return sum(n for key, n in storages.items() if key not in exclude)


def _fused_on_meta():
    """Let fastcaps.dynamic_routing run its autograd Function on meta tensors (it otherwise
    falls back to the eager reference off CUDA and the interpreter)."""
    module = sys.modules[fastcaps.dynamic_routing.__module__]
    original = module.kernels_available

    class Patch:
        def __enter__(self):
            module.kernels_available = lambda device: device.type == "meta" or original(device)

        def __exit__(self, *exc):
            module.kernels_available = original
    return Patch()


def _measure(cls, args: dict, transform: str, batch: int, size: int, device) -> int:
    layer = _layer(cls, args, transform, device)
    x = torch.empty(batch, args["in_types"], args["in_dim"], size, size, device=device).normal_().requires_grad_()
    if device == "meta" and cls is FusedConvCaps2d:
        with _fused_on_meta():
            return saved_bytes(layer, x)
    return saved_bytes(layer, x)


def fused_formula_bytes(layer: ConvCaps2d, batch: int, height: int, width: int) -> int:
    """What the fused layer saves: the unfolded input [N, I, K'] and the op's routing state,
    s^(r) [R, N, J, D] and V^(r) [R-1, N, J, D] in fp32, for N = B * H' * W' (fp32 inputs)."""
    out_h, out_w = layer.output_shape(height, width)
    samples = batch * out_h * out_w
    in_caps, out_caps, out_dim, in_dim = layer.routing_shape
    return 4 * (samples * in_caps * in_dim + (2 * layer.iterations - 1) * samples * out_caps * out_dim)


def votes_bytes(layer: ConvCaps2d, batch: int, height: int, width: int) -> int:
    """One fp32 votes tensor [B, H', W', I, T_out, D]."""
    out_h, out_w = layer.output_shape(height, width)
    in_caps, out_caps, out_dim, _ = layer.routing_shape
    return 4 * batch * out_h * out_w * in_caps * out_caps * out_dim


def table(batches=BATCHES) -> list[dict]:
    rows = []
    for name, (args, size) in LAYERS.items():
        for transform in ("per_offset", "per_type"):
            shape_layer = _layer(ConvCaps2d, args, transform, "meta")
            for batch in batches:
                eager = _measure(ConvCaps2d, args, transform, batch, size, "meta")
                fused = _measure(FusedConvCaps2d, args, transform, batch, size, "meta")
                formula = fused_formula_bytes(shape_layer, batch, size, size)
                if fused != formula:
                    raise AssertionError(f"{name} {transform} B={batch}: fused saves {fused} bytes, formula {formula}")
                rows.append({"layer": name, "transform": transform, "batch": batch,
                             "routing_shape": shape_layer.routing_shape, "eager_bytes": eager, "fused_bytes": fused,
                             "votes_bytes": votes_bytes(shape_layer, batch, size, size)})
    return rows


def check(layers: dict = LAYERS, batch: int = 1, size: int = 3) -> list[str]:
    """The meta counts against real runs, for each layer's types, dims and window on a size x
    size input: the eager layer on the CPU, the fused one on its kernels (CUDA, or the
    interpreter). Returns one line per comparison; raises AssertionError on a difference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = []
    for name, (args, _) in layers.items():
        for transform in ("per_offset", "per_type"):
            meta_eager = _measure(ConvCaps2d, args, transform, batch, size, "meta")
            real_eager = _measure(ConvCaps2d, args, transform, batch, size, "cpu")
            meta_fused = _measure(FusedConvCaps2d, args, transform, batch, size, "meta")
            # one program per pass: the interpreter runs programs one at a time
            with kernels.tuning(block_b=64, splits=1):
                real_fused = _measure(FusedConvCaps2d, args, transform, batch, size, device)
            if (meta_eager, meta_fused) != (real_eager, real_fused):
                raise AssertionError(f"{name} {transform} on {size}x{size}: meta eager {meta_eager} / real "
                                     f"{real_eager} bytes, meta fused {meta_fused} / real {real_fused} bytes")
            lines.append(f"{name} {transform} B={batch} {size}x{size}: eager {real_eager} bytes, fused {real_fused} "
                         f"bytes, the same on the meta device")
    return lines


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | transform | I, J, D, K' per position | batch | eager saved MB | fused saved MB | eager / fused "
             "| one votes tensor MB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['transform']} | {', '.join(map(str, r['routing_shape']))} | {r['batch']} "
                     f"| {_mb(r['eager_bytes'])} | {_mb(r['fused_bytes'])} "
                     f"| {r['eager_bytes'] / r['fused_bytes']:.1f}x "
                     f"| {_mb(r['votes_bytes'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convcaps_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--check", action="store_true",
                        help="first compare the meta counts with real runs at a 3x3 input (the fused layer in "
                             "Triton's interpreter: about 4 minutes on 2 shared CPU cores)")
    args = parser.parse_args(argv)
    if args.check:
        for line in check():
            print("check:", line)
    layers = ", ".join(f"{name} {size}x{size}" for name, (_, size) in LAYERS.items())
    print(f"bytes autograd saves for the backward of one fp32 forward ({layers}; {ITERATIONS} iterations, bias; "
          f"parameters and the input excluded)\n")
    print(markdown(table(tuple(int(b) for b in args.batches.split(",")))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
