"""Check and tune the fused routing kernels on a CUDA GPU.

For each launch configuration (fastcaps.kernels.routing.tuning keys) it checks the fused op's
v, du and dW against the float64 eager reference, then times forward and forward+backward
with triton.testing.do_bench (CUDA events, median over repetitions after warm-up, fresh
gradients each call via torch.autograd.grad). The eager reference is timed once per shape for
scale. Prints one table; --json writes every row.

    python scripts/tune_routing.py --batch 128 1024 --dtype float32 --grid stages --profile
"""
import argparse
import itertools
import json
import sys
import time

import torch
import triton
import triton.testing

import fastcaps
from fastcaps import reference
from fastcaps.kernels import routing as kernels

GRIDS = {
    "default": [{}],
    # block_b = 8 reads W once per 8 samples and issues fewer instructions (sm_90, MNIST, Triton 3.9:
    # forward 110.0 -> 93.4 per (b, i)) at 255 registers (half the warps per SM of block_b = 4)
    "fwd": [dict(block_b=b, splits=n) for b, n in itertools.product((2, 4, 8), (16, 32, 64, 128))],
    "grad": [dict(grad_tiles_per_chunk=t, grad_i_per_prog=i) for t, i in
             itertools.product((1, 4, 8, 32), (2, 5, 9, 18))],
    "warps": [dict(block_b=4 * w, num_warps=w, grad_num_warps=w) for w in (1, 2, 4)],
    "stages": [dict(stages=s, block_b=b) for s, b in itertools.product((1, 2, 3), (2, 4, 8))],
    # the fma final sweep's output capsules in two tiles (J = 10: 8 + 2 rows) or one of 16 rows (sm_90,
    # MNIST shape, fp32, Triton 3.9: 414.2 against 656.5 instructions per (b, i))
    "split_j": [dict(grad_split_j=s) for s in (True, False)],
    # the tc final pass's loop over r: 1-3 stages, 43 / 101 / 161 KB of shared memory at tf32x3
    # (sm_90, MNIST shape), so 2 / 2 / 1 programs per SM
    "tc_grad": [dict(kernels="tc", tc_grad_r_stages=s) for s in (1, 2, 3)],
    # the tc forward passes' loop over chunks in 1 or 2 stages: under Triton 3.6 the 16-bit passes
    # r >= 1 take 2 (no spill, 15.3 against 14.8 instructions per (b, i) and 8 B spilled; sm_90,
    # MNIST shape, bf16), under 3.9 1 (15.9 against 17.9)
    "tc_fwd_stages": [dict(kernels="tc", fwd_tc_stages=s) for s in (1, 2)],
}


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(batch, dtype, shape, seed=0):
    in_caps, out_caps, out_dim, in_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    u = fastcaps.squash(torch.randn(batch, in_caps, in_dim, device="cuda", generator=gen)).to(dtype)
    weight = (0.05 * torch.randn(in_caps, out_caps, out_dim, in_dim, device="cuda", generator=gen)).to(dtype)
    grad = torch.randn(batch, out_caps, out_dim, device="cuda", generator=gen).to(dtype)
    return u.requires_grad_(), weight.requires_grad_(), grad


def time_ms(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def print_profile(fn, reps=10):
    """Per-kernel CUDA time (torch.profiler), averaged over reps calls."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]:
        print(f"    {event.key[:60]:60} {event.device_time_total / reps:9.1f} us/call  x{event.count // reps}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[128])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--precision", default="ieee", choices=["ieee", "tf32x3", "tf32"],
                        help="fp32 input_precision (ieee: the fma kernels in either family)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=4, default=[1152, 10, 16, 8], metavar=("I", "J", "D", "K"))
    parser.add_argument("--grid", default="default", choices=sorted(GRIDS))
    parser.add_argument("--no-eager", action="store_true", help="skip timing the eager reference")
    parser.add_argument("--json", help="write all rows to this file")
    parser.add_argument("--profile", action="store_true", help="print per-kernel GPU time of one fwd+bwd")
    args = parser.parse_args(argv)
    torch.set_float32_matmul_precision("highest" if args.precision == "ieee" else "high")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"precision {args.precision} | shape I,J,D,K={args.shape} R={args.iterations}", flush=True)
    rows = []
    for dtype_name, batch in itertools.product(args.dtype, args.batch):
        dtype = getattr(torch, dtype_name)
        u, weight, grad = make_inputs(batch, dtype, args.shape)
        u64, w64 = u.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        v_ref = reference.dynamic_routing(u64, w64, args.iterations)
        du_ref, dw_ref = torch.autograd.grad(v_ref, [u64, w64], grad.double())
        eager = {}
        if not args.no_eager:
            def eager_fwd():
                return reference.dynamic_routing(u, weight, args.iterations)
            eager["fwd"] = time_ms(eager_fwd)
            eager["fwdbwd"] = time_ms(lambda: torch.autograd.grad(eager_fwd(), [u, weight], grad))
        for overrides in GRIDS[args.grid]:
            with kernels.tuning(**overrides):
                def fused_fwd():
                    return fastcaps.dynamic_routing(u, weight, args.iterations, input_precision=args.precision)
                start = time.perf_counter()
                v = fused_fwd()
                du, dw = torch.autograd.grad(v, [u, weight], grad)
                torch.cuda.synchronize()
                first_call_s = time.perf_counter() - start
                row = dict(dtype=dtype_name, batch=batch, config=overrides, first_call_s=first_call_s,
                           err_v=rel_err(v, v_ref), err_du=rel_err(du, du_ref), err_dw=rel_err(dw, dw_ref),
                           fwd_ms=time_ms(fused_fwd),
                           fwdbwd_ms=time_ms(lambda: torch.autograd.grad(fused_fwd(), [u, weight], grad)),
                           eager_fwd_ms=eager.get("fwd"), eager_fwdbwd_ms=eager.get("fwdbwd"))
                if args.profile:
                    print_profile(lambda: torch.autograd.grad(fused_fwd(), [u, weight], grad))
            rows.append(row)
            speed = (f" | x{row['eager_fwd_ms'] / row['fwd_ms']:6.1f} fwd x{row['eager_fwdbwd_ms'] / row['fwdbwd_ms']:6.1f} "
                     f"fwd+bwd vs eager ({row['eager_fwd_ms']:.3f} / {row['eager_fwdbwd_ms']:.3f} ms)" if eager else "")
            print(f"{dtype_name:9} B={batch:5} {json.dumps(overrides):70} err v {row['err_v']:.1e} du "
                  f"{row['err_du']:.1e} dW {row['err_dw']:.1e} | fwd {row['fwd_ms']:.4f} ms fwd+bwd "
                  f"{row['fwdbwd_ms']:.4f} ms{speed}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
