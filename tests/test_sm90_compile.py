"""Compile the routing kernels for sm_90 (H100/H200) without a GPU: what the interpreter cannot check.

Triton's interpreter accepts dot shapes that NVIDIA compilation rejects, ignores input_precision
and never allocates registers or shared memory. This test captures the launches the host
launchers make for a problem (scripts/inspect_kernels.py) and compiles each specialisation with
the Triton wheel's own ptxas. It fails on a compile error, on shared memory beyond an H100's
227 KB per block, and on register spills (stack bytes) above the budget stated per kernel below.

Which problems: CONFIGS (run in CI) covers every kernel of both families at an odd shape, fp32
at every input_precision (exact fp32 always runs the fma kernels), fp16 and bf16, with the option
flags (bias, leaky, detach_routing); and at the MNIST shape the largest specialisations: tc at
tf32x3 and bf16, fma at fp32 and bf16. The MNIST-shape tc compilations dominate the time (about 2
and 1 minutes on a quiet 2-core machine; tf32 at the MNIST shape, the same code as tf32x3 with
one product instead of three, is left to the full set). FASTCAPS_COMPILE_ALL=1 adds every other
(family, shape, dtype, precision) combination, fp64 included.
"""
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
# one xdist worker compiles every config (the module fixture), two at a time: not once per worker
pytestmark = pytest.mark.xdist_group("sm90-compile")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "inspect_kernels.py"
H100_SHARED_BYTES = 227 * 1024
MNIST = (1152, 10, 16, 8)
ODD = (37, 3, 7, 5)

# Spill budgets in stack bytes per (family, kernel name prefix): the most that Triton 3.6 or 3.9
# needs for sm_90 at any CI config (README, "Kernel families and precision"). The goal is 0; the
# kernels that do not meet it yet: the fma reverse pass (8 B) and final sweep (24 B fp32, 184 B
# bf16), and the tc passes (the J = 10 accumulator tiles next to the tf32x3 operand splits). A
# kernel that needs more than its budget fails: a register regression shows here before a GPU.
# Keys (family, kernel name prefix, dtype or None for every dtype); the first match counts.
SPILL_BUDGET = {
    ("fma", "forward_pass", None): 0,
    ("fma", "squash_backward", None): 0,
    ("fma", "reverse_pass", None): 8,
    ("fma", "input_grad", "bfloat16"): 184,
    ("fma", "input_grad", None): 24,
    ("tc", "tc_squash_backward", None): 0,
    ("tc", "tc_forward", None): 568,
    ("tc", "tc_reverse", None): 592,
    ("tc", "tc_input_grad", None): 1048,
}
FP64_SPILL_BUDGET = 32768  # fp64 is a correctness path, not a fast one: it may spill

# (family, shape, dtype, input_precision, options): the CI set
CONFIGS = [
    ("tc", MNIST, "float32", "tf32x3", ()),
    ("tc", MNIST, "bfloat16", "ieee", ()),
    ("tc", ODD, "float16", "ieee", ("bias", "leaky")),
    ("tc", ODD, "float32", "tf32x3", ("detach_routing",)),
    ("tc", ODD, "float32", "tf32", ("leaky",)),
    ("fma", MNIST, "float32", "ieee", ()),
    ("fma", MNIST, "bfloat16", "ieee", ()),
    ("fma", ODD, "float16", "ieee", ("bias", "leaky")),
    ("fma", ODD, "float32", "tf32", ("detach_routing",)),
]
if os.environ.get("FASTCAPS_COMPILE_ALL") == "1":
    CONFIGS += [(family, shape, dtype, precision, ())
                for family, shape, (dtype, precision) in itertools.product(
                    ("tc", "fma"), (MNIST, ODD),
                    [("float32", p) for p in ("tf32x3", "tf32")] + [("float16", "ieee"), ("bfloat16", "ieee"),
                                                                     ("float64", "ieee")])
                if (family, shape, dtype, precision, ()) not in CONFIGS]


def _compile(config):
    """Compile one config's kernels in a subprocess (without TRITON_INTERPRET, which would make
    the kernels interpreted functions); returns [(name, record)] or the error text."""
    family, shape, dtype, precision, options = config
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated to silence its warning
    command = [sys.executable, str(SCRIPT), "--json", "--kernels", family, "--dtype", dtype, "--precision", precision,
               "--shape", *map(str, shape), "--options", ",".join(options)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        return (result.stderr or result.stdout).strip()[-3000:]
    return [(launch["name"], launch["record"]) for launch in json.loads(result.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def compiled():
    """Every config compiled once, two at a time (the compiler is single-threaded)."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel has no NVIDIA backend (ptxas)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CONFIGS, pool.map(_compile, CONFIGS)))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}-{c[3]}"
                         + "".join(f"-{o}" for o in c[4]))
def test_kernels_compile_for_sm90(config, compiled):
    result = compiled[config]
    assert not isinstance(result, str), f"compilation failed: {result}"
    assert result, "the launchers made no launch"
    family, dtype = config[0], config[2]
    problems = []
    for name, record in result:
        print(f"{family:3} {dtype:8} {config[3]:6} {name:32} regs {record['regs']:3} stack {record['stack']:5} "
              f"shared {record['shared']:6} MMA {record['HMMA'] + record['HGMMA'] + record['DMMA']:4} "
              f"FFMA {record['FFMA']:4}")
        if record["shared"] > H100_SHARED_BYTES:
            problems.append(f"{name}: {record['shared']} B of shared memory > {H100_SHARED_BYTES}")
        budget = FP64_SPILL_BUDGET if dtype == "float64" else next(
            b for (fam, prefix, dt), b in SPILL_BUDGET.items()
            if fam == family and name.startswith(prefix) and dt in (None, dtype))
        if record["stack"] > budget:
            problems.append(f"{name}: {record['stack']} B of spills > budget {budget}")
    assert not problems, "; ".join(problems)
