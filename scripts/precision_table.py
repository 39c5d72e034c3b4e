"""Error of the fused op against a float64 reference, per kernel family and input precision.

    python scripts/precision_table.py            # CPU: runs the kernels in Triton's interpreter

Prints the markdown table of the README ("Kernel families and precision"): relative error
||x - x_64|| / ||x_64|| of v, du and dW for one routing problem (B = 20, I = 37, J = 10, D = 16,
K = 8, R = 3). The tc kernels round their tf32 operands themselves, so the interpreter computes
the GPU's products. bf16 is left out: the interpreter has no bf16 (the GPU tests measure it).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton's jit is imported

import fastcaps  # noqa: E402
from fastcaps import reference  # noqa: E402
from fastcaps.kernels import routing as kernels  # noqa: E402

ROWS = [("fma", torch.float32, "ieee"), ("tc", torch.float32, "tf32x3"), ("tc", torch.float32, "tf32"),
        ("fma", torch.float32, "tf32"), ("tc", torch.float16, "ieee"), ("fma", torch.float16, "ieee")]


def errors(family, dtype, precision, device, shape=(20, 37, 10, 16, 8), seed=0):
    batch, in_caps, out_caps, out_dim, in_dim = shape
    gen = torch.Generator().manual_seed(seed)
    u64 = fastcaps.squash(3.0 * torch.randn(batch, in_caps, in_dim, generator=gen, dtype=torch.float64))
    w64 = torch.randn(in_caps, out_caps, out_dim, in_dim, generator=gen, dtype=torch.float64) / in_dim ** 0.5
    grad64 = torch.randn(batch, out_caps, out_dim, generator=gen, dtype=torch.float64)
    # the reference sees the same rounded inputs: only the op's own error is measured
    u, w = (t.to(dtype).requires_grad_() for t in (u64, w64))
    u_ref, w_ref = (t.detach().double().requires_grad_() for t in (u, w))
    with kernels.tuning(kernels=family):
        v = fastcaps.dynamic_routing(u.to(device), w.to(device), 3, input_precision=precision)
    outs = (v,) + torch.autograd.grad(v, (u, w), grad64.to(device, dtype))
    v_ref = reference.dynamic_routing(u_ref, w_ref, 3)
    refs = (v_ref,) + torch.autograd.grad(v_ref, (u_ref, w_ref), grad64)
    return [((o.double().cpu() - r).norm() / r.norm()).item() for o, r in zip(outs, refs)]


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("| inputs | `input_precision` | family | v | du | dW |\n|---|---|---|---|---|---|")
    for family, dtype, precision in ROWS:
        errs = errors(family, dtype, precision, device)
        name = str(dtype).removeprefix("torch.")
        shown = f"`{precision}`" if dtype == torch.float32 else "-"
        print(f"| {name} | {shown} | {family} | " + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
