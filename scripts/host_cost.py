"""Host cost of one fused routing call: kernel launches, torch ops and host time per call.

For one forward (fastcaps.dynamic_routing with u and W requiring grad) and one backward
(torch.autograd.grad of its v), per kernel family, dtype and batch at one shape (default the
MNIST DigitCaps: I=1152, J=10, D=16, K=8, R=3):
- launches: Triton kernel launches (captured by scripts/inspect_kernels.capture_launches, never run);
- ops: every aten op the call dispatches (a TorchDispatchMode, inside the custom ops too), split
  into views (no device work), allocations (torch.empty and the like: no device work) and
  compute (a fill, copy, cast or reduction: one device kernel each on a GPU);
- kernels: launches + compute ops, the device kernels one call would run on a GPU;
- host µs: the median wall time of one call, launches captured, over many calls.

The tensors live on the "meta" device by default: torch ops there do their host work (dispatch,
shape and stride computation) and no arithmetic, as a CUDA call's host side does none (its
kernels run asynchronously). The custom ops' real implementations run on them (their fake
implementations would otherwise stand in on meta). With --device cpu the torch ops also compute
on the CPU, which at this shape costs far more than their host work (a copy of W alone is
milliseconds). Launch configurations are those of a GPU of --sms multiprocessors.

    python scripts/host_cost.py [--batch 1 16 128] [--options bias,prior,leaky,detach_routing]
                                [--calls 200] [--device meta|cpu] [--ops] [--json]

Run it without TRITON_INTERPRET=1, so that the launchers are plain Python.
"""
import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastcaps  # noqa: E402
from fastcaps.kernels import routing, routing_fma, routing_tc  # noqa: E402
from fastcaps.ops import routing as routing_op  # noqa: E402
from inspect_kernels import capture_launches  # noqa: E402

# (family, dtype) -> input_precision: exact fp32 for fma, three tf32 products for tc
CASES = {("fma", "float32"): "ieee", ("tc", "float32"): "tf32x3", ("fma", "bfloat16"): "ieee",
         ("tc", "bfloat16"): "ieee"}
ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}


class _RealOps(TorchDispatchMode):
    """Runs the fastcaps custom ops' real implementations (on meta tensors too, where the
    dispatcher would pick their fake ones); with `ops` a list, records every other aten op
    dispatched, inside the custom ops as well, as (name, kind)."""

    def __init__(self, ops=None):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastcaps":
            impl = OPDEFS[func.name()]._init_fn
            if self.ops is None:
                return impl(*args, **kwargs)
            with self:  # the handler runs with the mode off: back on, to see the ops inside
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.ops is not None:
            self.ops.append((func.name().split("::")[-1], _kind(func, args, kwargs, out)))
        return out


def _storages(tensors):
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}


def _kind(func, args, kwargs, out):
    """"compute" (a device kernel on a GPU: a fill, copy, cast or reduction, in place, out= or
    not), "view" (every output aliases an input: a view, or a no-op such as .contiguous() of a
    contiguous tensor) or "alloc" (an uninitialised tensor)."""
    if any(arg.alias_info is not None and arg.alias_info.is_write for arg in func._schema.arguments):
        return "compute"  # writes into a tensor: in place (copy_, fill_, zero_) or out=
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if _storages(outs) <= _storages(list(args) + list(kwargs.values())):
        return "view"
    return "alloc" if func._schema.name.split("::")[-1] in ALLOCATIONS else "compute"


@contextlib.contextmanager
def _host_only(sms):
    """Kernels available on any device, GPU launch configurations, launches captured."""
    saved = routing_op.kernels_available, {m: m.program_target for m in (routing_fma, routing_tc)}
    routing_op.kernels_available = lambda device: True
    for module in saved[1]:
        module.program_target = lambda device, num_warps: 16 * sms // num_warps
    try:
        with capture_launches(keep_args=False) as launches:
            yield launches
    finally:
        routing_op.kernels_available = saved[0]
        for module, fn in saved[1].items():
            module.program_target = fn


def measure(family, dtype, batch, shape=(1152, 10, 16, 8), iterations=3, calls=200, device="meta", sms=132,
            options=()):
    """Counts and host time of one forward and one backward call; a dict. options: any of
    "bias", "prior" (each a learnable input), "leaky", "detach_routing"."""
    in_caps, out_caps, out_dim, in_dim = shape
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    precision = CASES.get((family, str(dtype).split(".")[-1]), "ieee")
    options = tuple(options)
    make = lambda *size: torch.empty(size, dtype=dtype, device=device)  # noqa: E731
    u, weight = make(batch, in_caps, in_dim), make(in_caps, out_caps, out_dim, in_dim)
    bias = make(out_caps, out_dim) if "bias" in options else None
    prior = make(in_caps, out_caps) if "prior" in options else None
    grad = make(batch, out_caps, out_dim)
    leaves = [t for t in (u, weight, bias, prior) if t is not None]
    for t in leaves + [grad]:
        if device == "cpu":
            t.normal_()
    for t in leaves:
        t.requires_grad_()
    forward = lambda: fastcaps.dynamic_routing(  # noqa: E731
        u, weight, iterations, bias=bias, prior=prior, leaky="leaky" in options,
        detach_routing="detach_routing" in options, input_precision=precision, kernels=family)
    backward = lambda v: torch.autograd.grad(v, leaves, grad, allow_unused=True)  # noqa: E731
    record = dict(family=family, dtype=str(dtype).split(".")[-1], precision=precision, batch=batch,
                  shape=list(shape), iterations=iterations, options=list(options), device=device)
    with _host_only(sms) as launches:
        with _RealOps():
            backward(forward())  # plans built: the counts are those of every later call
        with _RealOps():
            v0 = forward()
        for name, call in (("fwd", forward), ("bwd", lambda: backward(v0))):
            ops, count = [], len(launches)
            with _RealOps(ops):
                call()
            kinds = collections.Counter(kind for _, kind in ops)
            record[name] = dict(launches=len(launches) - count, ops=len(ops), views=kinds["view"],
                                allocs=kinds["alloc"], compute=kinds["compute"],
                                kernels=len(launches) - count + kinds["compute"],
                                op_names=[op for op, _ in ops])
        with _RealOps():
            times = collections.defaultdict(list)
            for step in range(calls + calls // 10):  # the first tenth warms up
                start = time.perf_counter()
                v = forward()
                middle = time.perf_counter()
                backward(v)
                end = time.perf_counter()
                if step >= calls // 10:
                    times["fwd"].append(middle - start)
                    times["bwd"].append(end - middle)
                del v
                launches.clear()
        for name in ("fwd", "bwd"):
            record[name]["host_us"] = round(statistics.median(times[name]) * 1e6, 1)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--shape", type=int, nargs=4, default=[1152, 10, 16, 8], metavar=("I", "J", "D", "K"))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["fma", "tc"], choices=["fma", "tc"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--options", default="", help="comma-separated: bias, prior, leaky, detach_routing")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case (median)")
    parser.add_argument("--device", default="meta", choices=["meta", "cpu"])
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU the configs are for")
    parser.add_argument("--ops", action="store_true", help="also list the torch ops of each call")
    parser.add_argument("--json", action="store_true", help="print one JSON list of records")
    args = parser.parse_args(argv)
    if routing.INTERPRET:
        parser.error("run without TRITON_INTERPRET=1: the launchers must be plain Python")
    options = tuple(option for option in args.options.split(",") if option)
    records = [measure(family, dtype, batch, tuple(args.shape), args.iterations, args.calls, args.device, args.sms,
                       options) for family in args.families for dtype in args.dtypes for batch in args.batch]
    if args.json:
        print(json.dumps(records))
        return 0
    print(f"# shape I,J,D,K={args.shape} R={args.iterations} options={options} device={args.device} sms={args.sms} "
          f"torch {torch.__version__}; ops = views + allocs + compute; kernels = launches + compute")
    print(f"{'family':6} {'dtype':8} {'prec':6} {'B':>4} | {'fwd: launch':>11} {'ops':>4} {'(v/a/c)':>9} "
          f"{'kern':>4} {'host µs':>8} | {'bwd: launch':>11} {'ops':>4} {'(v/a/c)':>9} {'kern':>4} {'host µs':>8}")
    for r in records:
        kinds = {n: f"{r[n]['views']}/{r[n]['allocs']}/{r[n]['compute']}" for n in ("fwd", "bwd")}
        cells = [f"{r[n]['launches']:>11} {r[n]['ops']:>4} {kinds[n]:>9} {r[n]['kernels']:>4} {r[n]['host_us']:>8.1f}"
                 for n in ("fwd", "bwd")]
        print(f"{r['family']:6} {r['dtype']:8} {r['precision']:6} {r['batch']:>4} | {cells[0]} | {cells[1]}")
        if args.ops:
            for n in ("fwd", "bwd"):
                print(f"{'':30}{n}: {' '.join(r[n]['op_names'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
