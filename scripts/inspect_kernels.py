"""Compile the routing kernels for a CUDA target without a GPU and print the compiler's report.

Triton's wheel carries ptxas, so the whole pipeline (TTIR -> TTGIR -> PTX -> cubin) runs on
any machine. The launchers are called with CPU tensors of the requested problem and every
kernel launch is captured instead of run; each launch is then compiled with the
specialisation a real launch would get (integers equal to 1 become constants, 16-byte aligned
pointers and integers divisible by 16 are marked so). Per kernel: registers per thread,
stack (spills), shared memory, layout conversions in the TTGIR and the SASS instruction mix.

    python scripts/inspect_kernels.py --batch 128 --dtype float32 [--dump DIR]
"""
import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcaps.kernels import routing as k

KERNELS = ("_forward_pass_kernel", "_reverse_pass_kernel", "_squash_backward_kernel", "_input_grad_kernel")
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int32: "i32"}


class _Capture:
    """Stands in for a JITFunction: records launches instead of running them."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def capture_launches():
    launches = []
    saved = {name: getattr(k, name) for name in KERNELS}
    for name, fn in saved.items():
        setattr(k, name, _Capture(fn, launches))
    try:
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(k, name, fn)


def compile_launch(fn, args, kwargs, arch):
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
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
    counts = {op: len(re.findall(pattern, sass)) for op, pattern in
              (("LDL/STL", r"\b(?:LDL|STL)\b"), ("LDS/STS", r"\b(?:LDS|STS)"), ("BAR", r"BAR\.SYNC"),
               ("FFMA", r"\bFFMA\b"), ("MMA", r"\b(?:HMMA|HGMMA)"), ("LDG", r"\bLDG"), ("LDG.128", r"LDG\.E\.128"),
               ("SHFL", r"\bSHFL"))}
    print(f"{name:28} regs {regs.group(1) if regs else '?':>4} stack {stack.group(1) if stack else '?':>5} "
          f"shared {compiled.metadata.shared:6} | cvt {compiled.asm['ttgir'].count('convert_layout'):3} | "
          + " ".join(f"{op} {n}" for op, n in counts.items()), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--shape", type=int, nargs=4, default=[1152, 10, 16, 8], metavar=("I", "J", "D", "K"))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--precision", default="ieee", choices=["ieee", "tf32"])
    parser.add_argument("--tuning", default="", help="overrides, e.g. 'block_b=32,num_warps=4'")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors of the target GPU")
    parser.add_argument("--dump", default=tempfile.mkdtemp(prefix="fastcaps-kernels-"))
    args = parser.parse_args(argv)
    overrides = {key: int(value) for key, value in (item.split("=") for item in args.tuning.split(",") if item)}
    in_caps, out_caps, out_dim, in_dim = args.shape
    dtype = getattr(torch, args.dtype)
    u = torch.randn(args.batch, in_caps, in_dim, dtype=dtype)
    weight = torch.randn(in_caps, out_caps, out_dim, in_dim, dtype=dtype)
    k._program_target = lambda device, num_warps: 16 * args.sms // num_warps  # CPU tensors stand in for a GPU
    with k.tuning(**overrides), capture_launches() as launches:
        v, s_all, v_sums = k.routing_forward(u, weight, None, args.iterations, False, args.precision)
        # (the buffers hold garbage: nothing ran; only the launches matter)
        k.routing_backward(torch.ones_like(v), u, weight, s_all, v_sums, args.iterations, False, False,
                           args.precision)
    print(f"# sm_{args.arch} triton {triton.__version__} {args.dtype} {args.precision} B={args.batch} "
          f"shape={args.shape} R={args.iterations} tuning={overrides} dump={args.dump}")
    seen = set()
    for fn, grid, largs, lkwargs in launches:
        flags = ",".join(f"{key}" for key, value in lkwargs.items() if value is True)
        name = f"{fn.__name__.strip('_').replace('_kernel', '')}[{flags}]"
        if name in seen:
            continue
        seen.add(name)
        report(name, compile_launch(fn, largs, dict(lkwargs), args.arch), args.dump)
        print(f"{'':28} grid {grid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
