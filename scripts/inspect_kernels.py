"""Compile the routing kernels for a CUDA target without a GPU and print the compiler's report.

Triton's wheel carries ptxas, so the whole pipeline (TTIR -> TTGIR -> PTX -> cubin) runs on
any machine. The launchers are called with CPU tensors of the requested problem and every
kernel launch is captured instead of run; each launch is then compiled with the
specialisation a real launch would get (integers equal to 1 become constants, 16-byte aligned
pointers and integers divisible by 16 are marked so). Per kernel: registers per thread,
stack (spills), shared memory, layout conversions in the TTGIR and the SASS instruction mix.

    python scripts/inspect_kernels.py --batch 128 --dtype float32 --precision tf32x3 [--kernels fma] [--dump DIR]

Run it without TRITON_INTERPRET=1: under the interpreter @triton.jit gives no compilable kernels.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcaps.kernels import common, routing, routing_fma, routing_tc

KERNELS = {routing_tc: ("_tc_forward_kernel", "_tc_reverse_kernel", "_tc_squash_backward_kernel",
                        "_tc_input_grad_kernel"),
           routing_fma: ("_forward_pass_kernel", "_reverse_pass_kernel", "_squash_backward_kernel",
                         "_input_grad_kernel")}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int32: "i32"}


class _Capture:
    """Stands in for a JITFunction: records launches instead of running them."""

    def __init__(self, fn, launches, keep_args):
        self.fn, self.launches, self.keep_args = fn, launches, keep_args

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, grid, args, kwargs) if self.keep_args else (self.fn, grid))
        return launch


@contextlib.contextmanager
def capture_launches(keep_args=True):
    """Inside, every kernel launch of both families is recorded in the yielded list instead of
    run: (JITFunction, grid, args, kwargs), or (JITFunction, grid) without keep_args (which then
    holds no reference to the launch's tensors, as a real launch holds none)."""
    launches = []
    saved = {(module, name): getattr(module, name) for module, names in KERNELS.items() for name in names}
    for (module, name), fn in saved.items():
        setattr(module, name, _Capture(fn, launches, keep_args))
    try:
        yield launches
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def compile_launch(fn, args, kwargs, arch):
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = args[index] if index < len(args) else kwargs[name]
        param = fn.params[index]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1 and not param.do_not_specialize:
            signature[name] = "constexpr"
            constexprs[(index,)] = 1
        else:
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def report(name, compiled, dump):
    """Write the TTGIR, PTX, cubin and SASS of one compiled kernel to `dump`; return its numbers:
    registers, stack (spills), shared memory, layout conversions, the SASS instruction mix and
    the path of the SASS file."""
    os.makedirs(dump, exist_ok=True)
    for kind in ("ttgir", "ptx"):
        with open(os.path.join(dump, f"{name}.{kind}"), "w") as f:
            f.write(compiled.asm[kind])
    cubin = os.path.join(dump, f"{name}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True).stdout
    with open(os.path.join(dump, f"{name}.sass"), "w") as f:
        f.write(sass)
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    record = dict(kernel=name, regs=int(regs.group(1)) if regs else -1, stack=int(stack.group(1)) if stack else -1,
                  shared=compiled.metadata.shared, cvt=compiled.asm["ttgir"].count("convert_layout"),
                  sass=os.path.join(dump, f"{name}.sass"))
    for op, pattern in (("LDL/STL", r"\b(?:LDL|STL)\b"), ("LDS/STS", r"\b(?:LDS|STS)"), ("BAR", r"BAR\.SYNC"),
                        ("FFMA", r"\bFFMA\b"), ("HMMA", r"\bHMMA"), ("HGMMA", r"\bHGMMA"), ("DMMA", r"\bDMMA"),
                        ("LDG", r"\bLDG"), ("SHFL", r"\bSHFL"), ("instr", r"^\s+/\*[0-9a-f]+\*/")):
        record[op] = len(re.findall(pattern, sass, flags=re.MULTILINE))
    return record


def format_record(record):
    fixed = ("kernel", "regs", "stack", "shared", "cvt", "sass", "function", "constants", "compile_s")
    return (f"{record['kernel']:34} regs {record['regs']:>4} stack {record['stack']:>5} shared {record['shared']:6} "
            f"| cvt {record['cvt']:3} | " + " ".join(f"{op} {n}" for op, n in record.items() if op not in fixed))


def compile_launches(batch, shape, dtype, precision, kernels="tc", iterations=3, overrides=None, arch=90, sms=132,
                     options=(), dump=None, only=None, skip=()):
    """Compile, for sm_`arch`, every distinct kernel specialisation that the launchers produce
    for one problem (forward, then backward with the given options, e.g. ("leaky",
    "detach_routing", "prior")), except those whose names contain a part in `skip` and, with
    `only`, those whose names contain none of its parts. Yields (name, grid, record); the
    record also names the @triton.jit function, its integer and boolean constexprs (the
    launch's BLOCK sizes, flags) and the seconds the compilation took."""
    in_caps, out_caps, out_dim, in_dim = shape
    u = torch.randn(batch, in_caps, in_dim, dtype=dtype)
    weight = torch.randn(in_caps, out_caps, out_dim, in_dim, dtype=dtype)
    bias = torch.randn(out_caps, out_dim, dtype=dtype) if "bias" in options else None
    prior = torch.randn(in_caps, out_caps, dtype=dtype) if "prior" in options else None
    target = lambda device, num_warps: 16 * sms // num_warps  # noqa: E731 (CPU tensors stand in for a GPU)
    saved_targets = {module: module.program_target for module in KERNELS}
    dump = dump or tempfile.mkdtemp(prefix="fastcaps-kernels-")
    try:
        for module in KERNELS:
            module.program_target = target
        with common.tuning(**(overrides or {})), capture_launches() as launches:
            v, s_all, v_sums = routing.routing_forward(u, weight, bias, iterations, "leaky" in options, precision,
                                                       kernels, prior)
            # (the buffers hold garbage: nothing ran; only the launches matter)
            routing.routing_backward(torch.ones_like(v), u, weight, s_all, v_sums, iterations, "leaky" in options,
                                     "detach_routing" in options, precision, kernels, prior)
    finally:
        for module, fn in saved_targets.items():
            module.program_target = fn
    seen = set()
    for fn, grid, largs, lkwargs in launches:
        flags = ",".join(f"{key}" for key, value in lkwargs.items() if value is True)
        name = f"{fn.__name__.strip('_').replace('_kernel', '')}[{flags}]"
        if name in seen or any(part in name for part in skip) or (only and not any(part in name for part in only)):
            continue
        seen.add(name)
        start = time.perf_counter()
        compiled = compile_launch(fn, largs, dict(lkwargs), arch)
        record = report(name, compiled, dump)
        record.update(function=fn.__name__, compile_s=round(time.perf_counter() - start, 2),
                      constants={key: value for key, value in lkwargs.items()
                                 if isinstance(value, (bool, int)) and key not in ("num_warps", "num_stages")})
        record["constants"]["num_warps"] = lkwargs.get("num_warps", 4)
        yield name, grid, record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--shape", type=int, nargs=4, default=[1152, 10, 16, 8], metavar=("I", "J", "D", "K"))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--precision", default="tf32x3", choices=list(routing.PRECISIONS))
    parser.add_argument("--kernels", default="tc", choices=["tc", "fma"])
    parser.add_argument("--options", default="", help="comma-separated: bias, prior, leaky, detach_routing")
    parser.add_argument("--tuning", default="", help="overrides, e.g. 'tc_block_b=32,tc_num_warps=2'")
    parser.add_argument("--only", default="", help="comma-separated parts of the kernel names to compile")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors of the target GPU")
    parser.add_argument("--dump", default=tempfile.mkdtemp(prefix="fastcaps-kernels-"))
    parser.add_argument("--json", action="store_true", help="print one JSON list of {name, grid, record}")
    args = parser.parse_args(argv)
    overrides = {key: int(value) for key, value in (item.split("=") for item in args.tuning.split(",") if item)}
    options = tuple(o for o in args.options.split(",") if o)
    unknown = sorted(set(options) - {"bias", "prior", "leaky", "detach_routing"})
    if unknown:
        parser.error(f"--options: unknown {', '.join(unknown)} (known: bias, prior, leaky, detach_routing)")
    launches = compile_launches(args.batch, args.shape, getattr(torch, args.dtype), args.precision, args.kernels,
                                args.iterations, overrides, args.arch, args.sms, options, args.dump,
                                [part for part in args.only.split(",") if part])
    if args.json:
        print(json.dumps([{"name": name, "grid": list(grid), "record": record} for name, grid, record in launches]))
        return 0
    print(f"# sm_{args.arch} triton {triton.__version__} {args.kernels} {args.dtype} {args.precision} B={args.batch} "
          f"shape={args.shape} R={args.iterations} options={options} tuning={overrides} dump={args.dump}")
    for name, grid, record in launches:
        print(format_record(record), flush=True)
        print(f"{'':34} grid {grid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
