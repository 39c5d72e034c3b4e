"""Compile the routing kernels for sm_90 (H100/H200) without a GPU: what the interpreter cannot check.

Triton's interpreter accepts dot shapes that NVIDIA compilation rejects, ignores input_precision
and never allocates registers or shared memory. Each test compiles one problem's kernels with
the Triton wheel's own ptxas (scripts/kernel_cost.py, which captures the launches the host
launchers make and counts each kernel's SASS) and fails on a compile error, on shared memory
beyond an H100's 227 KB per block, and on any kernel above its budget in tests/kernel_budget.json:
the spilled bytes and the main loop's warp instructions per (sample, input capsule) measured
under the Triton that runs the test (3.9 or 3.6; instructions + 2%, at least + 0.5; under a
version the budget was not measured with, only the compile and shared-memory checks apply, and
the test says so). The budget is a regression
guard: the goal is no spill anywhere (the budget's spill_target), and a kernel that gets leaner
lowers its budget by `python scripts/kernel_cost.py --write-budget --python <Triton 3.6 python>`.

Which problems: kernel_cost.CI_SET, every kernel of both families at an odd shape (fp32 at every
input_precision, fp16, the option flags bias, prior, leaky, detach_routing) and at the MNIST
shape the largest specialisations (tc at tf32x3 and bf16, fma at fp32 and bf16, and bf16 with a
prior). Each test is one compilation subprocess (at the MNIST shape, one for the final pass and
one for the other kernels), so pytest-xdist spreads them over the cores like any other test.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kernel_cost.py"
BUDGET = json.loads((ROOT / "tests" / "kernel_budget.json").read_text())
H100_SHARED_BYTES = 227 * 1024
FP64_SPILL_BUDGET = 32768  # fp64 is a correctness path, not a fast one: it may spill


sys.path.insert(0, str(ROOT / "scripts"))
import kernel_cost  # noqa: E402  (the script: its config sets and budget keys; it compiles in a subprocess)

CONFIGS = kernel_cost.CI_SET
# At the MNIST shape the final pass alone takes about as long to compile as the config's other
# kernels together (tc tf32x3: 130 s of 210, most of it in Triton's coalescing passes): one test
# each, so that the pytest-xdist workers share a config. (only, skip): parts of kernel names.
FINAL_PASS, OTHERS = (("input_grad",), ()), ((), ("input_grad",))
CASES = [(config, part) for config in CONFIGS
         for part in ((FINAL_PASS, OTHERS) if config[1] == kernel_cost.MNIST else (((), ()),))]


def _prefix(config):
    """The budget keys' start for one config's kernels (family/shape/dtype-precision/options/)."""
    family, shape, dtype, precision, options = kernel_cost.canonical(config)
    return kernel_cost.budget_key(dict(family=family, shape=shape, dtype=dtype, precision=precision,
                                       options=options, kernel=""))


def _budget_for(budget, version):
    """(spilled bytes, instructions per (b, i)) allowed under this Triton: its own measurement (the
    instructions + BUDGET_MARGIN, at least + 0.5). A Triton the budget was not measured under
    generates other code, so there only the compile and shared-memory checks hold (no limits)."""
    measured = budget["measured"].get(version)
    if measured is None:
        return float("inf"), float("inf")
    per_bi = measured["per_bi"]
    if per_bi is None:
        return measured["stack"], float("inf")
    margin = max(per_bi * kernel_cost.BUDGET_MARGIN, 0.5)
    return measured["stack"], math.ceil((per_bi + margin) * 10) / 10


def _measure(config, only=(), skip=()):
    """kernel_cost.py's rows for one config's kernels (those whose names contain a part in `only`,
    if given, and none in `skip`), in a subprocess without TRITON_INTERPRET (which would make the
    kernels interpreted functions)."""
    family, shape, dtype, precision, options = config
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated to silence its warning
    command = [sys.executable, str(SCRIPT), "--json", "--kernels", family, "--shape", *map(str, shape),
               "--dtype", dtype, "--precision", precision, "--options", ",".join(options),
               "--batch", str(BUDGET["batch"]), "--only", ",".join(only), "--skip", ",".join(skip)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"compilation failed: {(result.stderr or result.stdout).strip()[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _case_id(case):
    (family, shape, dtype, precision, options), (only, skip) = case
    return (f"{family}-{'x'.join(map(str, shape))}-{dtype}-{precision}" + "".join(f"-{o}" for o in options)
            + "".join(f"-{p}" for p in only) + "".join(f"-no_{p}" for p in skip))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels_compile_for_sm90_within_budget(case):
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel has no NVIDIA backend (ptxas)")
    config, (only, skip) = case
    rows = _measure(config, only, skip)
    assert rows, "the launchers made no launch"
    if any(rows[0]["triton"] not in entry["measured"] for entry in BUDGET["kernels"].values()):
        print(f"Triton {rows[0]['triton']}: no budget measured with it; compile and shared memory checked only")
    problems = []
    for row in rows:
        per_bi = row["cost"]["per_bi"]["total"] if row["cost"] else None
        key = kernel_cost.budget_key(row)
        print(f"{row['triton']} {key:70} regs {row['regs']:3} stack {row['stack']:5} "
              f"shared {row['shared']:6} per (b, i) {per_bi if per_bi is None else round(per_bi, 1)}")
        if row["shared"] > H100_SHARED_BYTES:
            problems.append(f"{row['kernel']}: {row['shared']} B of shared memory > {H100_SHARED_BYTES}")
        budget = BUDGET["kernels"].get(key)
        if budget is None:
            problems.append(f"{row['kernel']}: no budget in tests/kernel_budget.json for {key} "
                            "(a new kernel or config: regenerate it with scripts/kernel_cost.py --write-budget)")
            continue
        stack_budget, per_bi_budget = _budget_for(budget, row["triton"])
        if config[2] == "float64":
            stack_budget = FP64_SPILL_BUDGET
        if row["stack"] > stack_budget:
            problems.append(f"{row['kernel']}: {row['stack']} B of spills > budget {stack_budget} (Triton {row['triton']})")
        if per_bi is not None and per_bi > per_bi_budget:
            problems.append(f"{row['kernel']}: {per_bi:.1f} warp instructions per (sample, capsule) in the main "
                            f"loop > budget {per_bi_budget} (Triton {row['triton']})")
    assert not problems, "; ".join(problems)


def test_every_budgeted_kernel_is_compiled():
    """The budget names no config that CI no longer compiles (a stale budget guards nothing)."""
    prefixes = {_prefix(config) for config in CONFIGS}
    stale = [key for key in BUDGET["kernels"] if key[:key.rindex("/") + 1] not in prefixes]
    assert not stale, f"budget entries of configs CI does not compile: {stale[:5]}"


def test_report_set_covers_every_precision_of_both_families():
    """The report (the README's kernel table, the issue's figures) has every (dtype, precision)
    each family serves at both shapes: tc at fp32 tf32x3/tf32 and at fp16/bf16, fma at fp32
    ieee/tf32 and at fp16/bf16."""
    served = {"tc": {("float32", "tf32x3"), ("float32", "tf32"), ("float16", "ieee"), ("bfloat16", "ieee")},
              "fma": {("float32", "ieee"), ("float32", "tf32"), ("float16", "ieee"), ("bfloat16", "ieee")}}
    for shape in (kernel_cost.MNIST, kernel_cost.ODD):
        for family, precisions in served.items():
            reported = {(dtype, precision) for fam, shp, dtype, precision, options in kernel_cost.REPORT_SET
                        if fam == family and shp == shape and not options}
            assert reported == precisions, (family, shape, sorted(reported))


@pytest.mark.parametrize("regs, shared_kb, num_warps, expected", [
    (255, 101, 4, 2),   # registers: 8 warps of 255 (256 per warp unit) fill 64K
    (255, 161, 4, 1),   # shared memory: 161 KB + 1 KB reserved, twice, exceeds 228 KB
    (168, 51, 4, 3),    # 168 x 32 = 5376 registers per warp: 12 warps
    (169, 51, 4, 2),    # 5408, rounded up to 5632 per warp: 11 warps, two programs of 4
    (32, 0, 1, 32),     # the program limit
    (32, 0, 8, 8),      # the warp limit: 64 warps
])
def test_programs_per_sm(regs, shared_kb, num_warps, expected):
    """The report's occupancy column against hand-computed H100 limits."""
    assert kernel_cost.programs_per_sm(regs, shared_kb * 1024, num_warps) == expected
