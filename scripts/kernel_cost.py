"""The routing kernels' cost per (sample, input capsule) on sm_90, counted in their SASS: no GPU needed.

For every kernel specialisation that the launchers make for a problem (scripts/inspect_kernels.py
compiles them with the Triton wheel's own ptxas), this prints the main loop's warp instructions per
(sample, input capsule) by class, the registers, spills and shared memory, and an issue-bound time
per pass, and how many programs of each kernel an SM holds at once (registers and shared memory
against an H100's limits). The README's kernel table and tests/kernel_budget.json (the budget that
tests/test_sm90_compile.py holds every kernel to) are written from it.

    python scripts/kernel_cost.py                      # the report set (below), a markdown table
    python scripts/kernel_cost.py --kernels tc --dtype bfloat16 --shape 37 3 7 5    # one problem
    python scripts/kernel_cost.py --json               # one JSON list, a row per specialisation
    python scripts/kernel_cost.py --write-budget --python ../venv36/bin/python   # the budget, Triton 3.9 and 3.6

Method. cuobjdump's SASS lists one instruction per 16-byte address. A branch to an earlier (or the
same) address closes a loop: the loop is the address range [target, branch] (branches that share a
target are one loop, ending at the last of them); loops nest by range containment. The main loop
of each kernel is named in MAIN_LOOPS below, in terms that do not depend on the compiler's code
placement:
- the fma kernels (forward pass, reverse pass, final sweep) and the tc forward and reverse passes:
  the largest innermost loop, the software-pipelined loop over input capsules (fma: one capsule
  per iteration; tc: CHUNK capsules). The other loops (the split reduction in the last program of
  a batch tile, the final sweep's loop over batch tiles) are outside it or enclose it.
- the tc final pass: the loop over batch tiles (one chunk of CHUNK capsules per program), which
  holds the loop over the routing iterations r = 1 .. R-1 (not unrolled); that loop counts once
  per trip (the trip count comes from the constexprs R and FIRST_TERM). Where the compiler emits
  no inner loop (one trip), the loop over batch tiles is itself the largest innermost loop.
Each instruction of the loop's range counts once per iteration (a static count: a block that a
branch skips in some iterations counts in all, so the figure is an upper bound there), times the
warps of a program (num_warps: every warp issues the whole body), divided by the samples x
capsules one iteration covers (BLOCK_B x CHUNK, or BLOCK_B x 1 for fma), both read from the
launch's constexprs. Hand check (Triton 3.9, fma forward_pass[], MNIST shape): the back-edge
`@P4 BRA 0x15e0` sits at 0x3ea0, so the body is (0x3ea0 - 0x15e0) / 16 + 1 = 653 instructions on
one warp of BLOCK_B = 4 samples and one capsule: 163.25 per (sample, capsule).

Classes (by SASS opcode): mma (HGMMA, HMMA, DMMA), fp (FFMA, FMUL, FADD and their fp64/fp16
forms), fsel (FSETP, FSEL, FMNMX: compares, selects, max), mufu (MUFU: exp2, rcp, sqrt),
shfl (SHFL), shared (LDS, STS, LDSM, STSM), global (LDG, STG, LDGSTS async copies, atomics,
TMA), spill (LDL, STL), sync (BAR, WARPSYNC, BSSY/BSYNC, fences, MEMBAR, DEPBAR and
WARPGROUP waits/arrives), int (integer and address arithmetic, uniform-datapath included), cvt
(F2F, F2FP, I2F, F2I), move (MOV, CS2R, SEL, PRMT, IMAD.MOV, S2R), other (branches, predicate
logic, NOP, ...).

Issue-bound time: a pass issues (instructions per (sample, capsule)) x B x I warp instructions;
an H100 SXM or H200 issues at most one per scheduler and cycle: 132 SMs x 4 schedulers x 1.98 GHz
(the boost clock; both have 132 SMs at ~1.98 GHz) = 1.045e12 warp instructions per second. It is
a lower bound on a pass's time (it ignores memory, latency and the tensor cores' own throughput).
"""
import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inspect_kernels  # noqa: E402  (the sibling script: capture and compile)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUDGET = ROOT / "tests" / "kernel_budget.json"
MNIST = (1152, 10, 16, 8)
ODD = (37, 3, 7, 5)
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9  # H100 SXM / H200: SMs, schedulers per SM, boost clock
# Per SM of an H100/H200 (sm_90; CUDA occupancy calculator): 64K registers allocated in units of 256
# per warp, 228 KB of shared memory of which a program may use 227 KB and 1 KB more is reserved per
# program, at most 64 warps and 32 programs
SM_REGISTERS, REGISTER_UNIT, SM_SHARED, SHARED_RESERVED, SM_WARPS, SM_PROGRAMS = 65536, 256, 228 * 1024, 1024, 64, 32


def programs_per_sm(regs, shared, num_warps):
    """How many programs of a kernel an H100/H200 SM holds at once: the least of what its
    registers (regs per thread, rounded up per warp), its shared memory and the warp and
    program limits allow. Fewer resident warps hide less latency: a kernel's issue-bound time
    assumes enough of them."""
    warp_registers = math.ceil(regs * 32 / REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (SM_REGISTERS // warp_registers) // num_warps
    by_shared = SM_SHARED // (shared + SHARED_RESERVED)
    return min(by_registers, by_shared, SM_WARPS // num_warps, SM_PROGRAMS)


BUDGET_MARGIN = 0.02  # budget = measured x (1 + margin), at least + 0.5 instruction per (sample, capsule)

# The report set: both families at every precision they serve, at the MNIST shape and an odd one,
# then the configurations with options that tests/test_sm90_compile.py compiles in CI.
# (family, shape, dtype, input_precision, options). fp32 "ieee" always runs the fma kernels and
# the fma kernels serve "tf32x3" with exact products, so neither appears twice.
PRECISIONS = [("float32", "ieee"), ("float32", "tf32x3"), ("float32", "tf32"), ("float16", "ieee"),
              ("bfloat16", "ieee")]
REPORT_SET = [(family, shape, dtype, precision, ())
              for shape in (MNIST, ODD) for family in ("fma", "tc") for dtype, precision in PRECISIONS
              if not ((dtype, precision) == ("float32", "ieee") and family == "tc")
              and not (family == "fma" and precision == "tf32x3")]
OPTION_SET = [
    ("tc", ODD, "float16", "ieee", ("bias", "leaky")),
    ("tc", ODD, "float32", "tf32x3", ("detach_routing",)),
    ("tc", ODD, "float32", "tf32", ("leaky",)),
    ("tc", ODD, "float32", "tf32x3", ("prior", "leaky")),
    ("fma", ODD, "float16", "ieee", ("bias", "leaky")),
    ("fma", ODD, "float32", "tf32", ("detach_routing",)),
    ("fma", ODD, "float32", "ieee", ("prior", "bias")),
]
# What tests/test_sm90_compile.py compiles in CI and holds to the budget: every kernel of both
# families at the odd shape (every precision, fp16, every option flag), and at the MNIST shape
# the largest specialisations (tc tf32x3 and bf16, fma fp32 and bf16, fma bf16 and tc fp16 with a
# prior). MNIST tf32 is tf32x3's code with one product instead of three; the rest of the report set
# is left to a run of this script.
CI_SET = [
    ("tc", MNIST, "float32", "tf32x3", ()),
    ("tc", MNIST, "bfloat16", "ieee", ()),
    ("fma", MNIST, "float32", "ieee", ()),
    ("fma", MNIST, "bfloat16", "ieee", ()),
    # the prior's final sweep, whose bf16 build spilled at this shape (16 B) until W was read in fp32
    ("fma", MNIST, "bfloat16", "ieee", ("prior",)),
    # the tc final pass with a prior, whose fp16 build spilled at this shape (8 B on 3.9) until its
    # r = 0 term was formed on W scaled once (routing_tc._Config.grad_scaled_prior)
    ("tc", MNIST, "float16", "ieee", ("prior",)),
] + OPTION_SET


def _r_trips(constants):
    """Trips of the tc final pass's loop over r: range(FIRST_TERM + (FIRST_TERM == 0), R)."""
    first = constants["FIRST_TERM"]
    return len(range(first + (first == 0), constants["R"]))


# Per @triton.jit function: what one iteration of its main loop covers (constexpr names or
# numbers) and, for a main loop that encloses a non-unrolled loop, that loop's trip count.
MAIN_LOOPS = {
    "_forward_pass_kernel": dict(samples="BLOCK_B", capsules=1),
    "_reverse_pass_kernel": dict(samples="BLOCK_B", capsules=1),
    "_input_grad_kernel": dict(samples="BLOCK_B", capsules=1),
    "_tc_forward_kernel": dict(samples="BLOCK_B", capsules="CHUNK"),
    "_tc_reverse_kernel": dict(samples="BLOCK_B", capsules="CHUNK"),
    "_tc_input_grad_kernel": dict(samples="BLOCK_B", capsules="CHUNK", inner_trips=_r_trips),
}
ROLES = {"_forward_pass_kernel": "forward", "_tc_forward_kernel": "forward",
         "_reverse_pass_kernel": "reverse", "_tc_reverse_kernel": "reverse",
         "_input_grad_kernel": "final", "_tc_input_grad_kernel": "final",
         "_squash_backward_kernel": "squash_backward", "_tc_squash_backward_kernel": "squash_backward"}

CLASSES = ("mma", "fp", "fsel", "mufu", "shfl", "shared", "global", "spill", "sync", "int", "cvt", "move", "other")
_CLASS_OF = {}
for _cls, _ops in {
    "mma": "HGMMA HMMA DMMA IMMA",
    "fp": "FFMA FMUL FADD FFMA2 FMUL2 FADD2 DFMA DMUL DADD HFMA2 HMUL2 HADD2",
    "fsel": "FSETP FSEL FMNMX FCHK DSETP HSETP2 HMNMX2",
    "mufu": "MUFU",
    "shfl": "SHFL",
    "shared": "LDS STS LDSM STSM ATOMS",
    "global": "LDG STG LDGSTS ATOMG ATOM RED LD ST UTMALDG UTMASTG UTMAPF UBLKCP UTMACCTL",
    "spill": "LDL STL",
    "sync": "BAR WARPSYNC BSSY BSYNC MEMBAR FENCE DEPBAR LDGDEPBAR WARPGROUP SYNCS ERRBAR CGAERRBAR CCTL",
    "int": "IADD3 IMAD LEA SHF LOP3 ISETP IMNMX IABS POPC FLO BREV SGXT BMSK VIADD VIMNMX IDP LEA.HI "
           "UIADD3 UIMAD ULEA USHF ULOP3 UISETP UIMNMX UFLO UPOPC USGXT UBMSK UPRMT",
    "cvt": "F2F F2FP I2F F2I FRND I2FP F2IP I2I",
    "move": "MOV CS2R SEL PRMT S2R S2UR UMOV USEL ULDC LDC R2UR UR2R",
}.items():
    _CLASS_OF.update(dict.fromkeys(_ops.split(), _cls))

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(sass):
    """[(address, opcode with modifiers, operands)] of the first function in cuobjdump's SASS."""
    return [(int(m.group(1), 16), m.group(2), m.group(3).strip())
            for m in map(_INSTRUCTION.match, sass.splitlines()) if m]


def classify(opcode, operands):
    """The class (CLASSES) of one SASS instruction."""
    base = opcode.split(".")[0]
    if base == "IMAD" and opcode.startswith("IMAD.MOV"):
        return "move"
    if base == "HFMA2" and ".MMA" in opcode and "-RZ, RZ" in operands:
        return "move"  # ptxas's idiom to load a constant
    return _CLASS_OF.get(base, "other")


def find_loops(instructions):
    """Loops as dicts {head, tail (addresses, inclusive), parent, children}: a branch to an earlier
    address closes one; branches to the same head are one loop; nesting by containment."""
    tails = {}
    for address, opcode, operands in instructions:
        if opcode.split(".")[0] in ("BRA", "JMP"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address:
                head = int(target.group(1), 16)
                tails[head] = max(tails.get(head, address), address)
    loops = [dict(head=head, tail=tail, parent=None, children=[]) for head, tail in sorted(tails.items())]
    for index, loop in enumerate(loops):
        enclosing = [other for other in loops if other is not loop and other["head"] <= loop["head"]
                     and loop["tail"] <= other["tail"]]
        if enclosing:
            loop["parent"] = min(enclosing, key=lambda other: other["tail"] - other["head"])
            loop["parent"]["children"].append(loop)
    return loops


def _count(instructions, loop, trips_of_children):
    """Class counts of one iteration of `loop`: its own instructions once, each child loop's times
    trips_of_children."""
    counts = dict.fromkeys(CLASSES, 0)
    for address, opcode, operands in instructions:
        if loop["head"] <= address <= loop["tail"]:
            inside = any(child["head"] <= address <= child["tail"] for child in loop["children"])
            counts[classify(opcode, operands)] += trips_of_children if inside else 1
    return counts


def main_loop_cost(function, constants, sass):
    """The main loop's warp instructions per (sample, input capsule), by class, for one compiled
    kernel (`function`, the @triton.jit name; `constants`, its launch's constexprs and num_warps);
    None for kernels without a main loop (the squash backward)."""
    spec = MAIN_LOOPS.get(function)
    if spec is None:
        return None
    instructions = parse_sass(sass)
    loops = find_loops(instructions)
    innermost = [loop for loop in loops if not loop["children"]]
    if not innermost:
        raise ValueError(f"{function}: no loop in the SASS")
    size = lambda loop: loop["tail"] - loop["head"]  # noqa: E731
    loop = max(innermost, key=size)
    trips = 1
    if "inner_trips" in spec and loop["parent"] is not None:
        loop, trips = loop["parent"], spec["inner_trips"](constants)
        if len(loop["children"]) != 1:
            raise ValueError(f"{function}: expected one loop inside the main loop, found {len(loop['children'])}")
    value = lambda key: spec[key] if isinstance(spec[key], int) else constants[spec[key]]  # noqa: E731
    per = value("samples") * value("capsules")
    counts = _count(instructions, loop, trips)
    warps = constants["num_warps"]
    per_bi = {cls: n * warps / per for cls, n in counts.items()}
    per_bi["total"] = sum(counts.values()) * warps / per
    return dict(per_bi=per_bi, loop=[hex(loop["head"]), hex(loop["tail"])], body=sum(counts.values()),
                inner_trips=trips, warps=warps, samples=value("samples"), capsules=value("capsules"))


def _role(name, function):
    role = ROLES.get(function, function)
    flags = name[name.index("[") + 1:-1].split(",") if "[" in name else []
    if role == "forward":
        return "forward r=0" if "FIRST" in flags else ("forward last" if "LAST" in flags else "forward r>=1")
    if role == "reverse":
        return "reverse top" if "TOP" in flags else "reverse"
    return role


def canonical(config):
    """The (family, shape, dtype, precision, options) whose kernels a config runs: exact fp32
    always runs the fma kernels, which serve "tf32x3" with exact products too; half and fp64
    inputs have one precision of their own ("ieee")."""
    family, shape, dtype, precision, options = config
    if dtype != "float32":
        precision = "ieee"
    elif family == "fma" or precision == "ieee":
        family, precision = "fma", ("ieee" if precision == "tf32x3" else precision)
    return family, tuple(shape), dtype, precision, tuple(options)


def measure(config, batch=128, iterations=3, dump=None, only=None, skip=(), overrides=None):
    """Compile one config's kernels (those whose names contain a part in `only`, if given, and
    none in `skip`), with the launch parameters `overrides` (tuning keys), and cost them;
    [row] with the config, kernel name, role, registers, stack bytes, shared memory, main-loop
    cost and issue-bound time per pass."""
    family, shape, dtype, precision, options = canonical(config)
    launches = inspect_kernels.compile_launches(batch, shape, getattr(torch, dtype), precision, family, iterations,
                                                overrides=overrides, options=options, dump=dump, only=only,
                                                skip=skip)
    rows = []
    for name, grid, record in launches:
        num_warps = record["constants"]["num_warps"]
        with open(record["sass"]) as f:
            cost = main_loop_cost(record["function"], record["constants"], f.read())
        row = dict(family=family, shape=list(shape), dtype=dtype, precision=precision, options=list(options),
                   batch=batch, kernel=name, function=record["function"], role=_role(name, record["function"]),
                   grid=list(grid), regs=record["regs"], stack=record["stack"], shared=record["shared"],
                   compile_s=record["compile_s"], triton=triton.__version__, cost=cost, num_warps=num_warps,
                   programs_per_sm=programs_per_sm(record["regs"], record["shared"], num_warps))
        if cost is not None:
            row["issue_us"] = cost["per_bi"]["total"] * batch * shape[0] / (SMS * SCHEDULERS * CLOCK_HZ) * 1e6
        rows.append(row)
    return rows


def budget_key(row):
    """The budget file's key of one row: family, shape, dtype-precision, options, kernel."""
    options = ",".join(row["options"]) or "-"
    return (f"{row['family']}/{'x'.join(map(str, row['shape']))}/{row['dtype']}-{row['precision']}/{options}/"
            f"{row['kernel']}")


def _measure_in_subprocess(python, config, batch, iterations):
    """measure() under another interpreter (e.g. Triton 3.6's venv), without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated to silence its warning
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    family, shape, dtype, precision, options = config
    command = [python, __file__, "--json", "--kernels", family, "--shape", *map(str, shape), "--dtype", dtype,
               "--precision", precision, "--options", ",".join(options), "--batch", str(batch),
               "--iterations", str(iterations)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_configs(configs, pythons, batch, iterations, workers):
    """Every config under every interpreter, `workers` compilations at a time (each single-threaded)."""
    jobs = [(python, config) for python in pythons for config in configs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda job: _measure_in_subprocess(job[0], job[1], batch, iterations), jobs)
        return [row for rows in results for row in rows]


def write_budget(rows, path=BUDGET):
    """tests/kernel_budget.json: per kernel, the most spilled bytes and the most instructions per
    (sample, capsule) measured under any of the Triton versions in `rows`, the latter plus
    BUDGET_MARGIN."""
    kernels = {}
    for row in rows:
        entry = kernels.setdefault(budget_key(row), dict(stack=0, measured={}))
        entry["stack"] = max(entry["stack"], row["stack"])
        measured = round(row["cost"]["per_bi"]["total"], 2) if row["cost"] else None
        entry["measured"][row["triton"]] = dict(stack=row["stack"], per_bi=measured)
        if measured is not None:
            budget = max(measured * (1 + BUDGET_MARGIN), measured + 0.5)
            entry["per_bi"] = max(entry.get("per_bi", 0.0), math.ceil(budget * 10) / 10)
    for entry in kernels.values():
        if entry["stack"] > 0:
            entry["spill_target"] = 0  # the goal for every kernel except fp64: today's spill is the budget
    document = {
        "about": "Budgets of tests/test_sm90_compile.py, written by `python scripts/kernel_cost.py --write-budget` "
                 "(see its docstring): per kernel specialisation (family/shape/dtype-precision/options/kernel), "
                 "the spilled bytes allowed (stack; the target is 0 wherever spill_target says so) and the main "
                 "loop's warp instructions per (sample, input capsule) allowed (per_bi: measured + "
                 f"{BUDGET_MARGIN:.0%}, at least + 0.5), the most of the Triton versions in measured.",
        "batch": rows[0]["batch"] if rows else None,
        "kernels": dict(sorted(kernels.items())),
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows):
    """One table row per kernel specialisation; spills flagged."""
    header = ("| Triton | family | inputs | shape | kernel | warps | regs | spill B | shared KB | programs/SM | "
              "per (b, i) | "
              + " | ".join(CLASSES) + " | µs/pass |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cost = row["cost"]
        classes = [_fmt(cost["per_bi"][cls]) if cost else "-" for cls in CLASSES]
        spill = f"**{row['stack']}** ⚠" if row["stack"] > 0 else "0"
        inputs = row["dtype"] if row["dtype"] != "float32" else f"fp32 {row['precision']}"
        inputs += "".join(f" +{option}" for option in row["options"])
        lines.append(f"| {row['triton']} | {row['family']} | {inputs} | {'x'.join(map(str, row['shape']))} | "
                     f"{row['kernel']} | {row['num_warps']} | {row['regs']} | {spill} | {row['shared'] / 1024:.1f} | "
                     f"{row['programs_per_sm']} | "
                     f"{_fmt(cost['per_bi']['total'] if cost else None)} | " + " | ".join(classes)
                     + f" | {_fmt(row.get('issue_us'), 2)} |")
    return "\n".join(lines)


def summary(rows):
    """The README's table: per family and inputs at the MNIST shape, forward (r >= 1), reverse and
    final pass: instructions per (sample, capsule), warps, registers, spills, shared memory,
    programs per SM."""
    lines = ["| Triton | family, inputs | pass | per (b, i) | MMA | FFMA/FMUL/FADD | warps | regs | spill B | shared KB | "
             "programs/SM | issue-bound µs/pass (B = 128) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if tuple(row["shape"]) != MNIST or row["options"] or row["role"] not in ("forward r>=1", "reverse", "final"):
            continue
        inputs = f"{row['family']}, " + (row["dtype"] if row["dtype"] != "float32" else f"fp32 {row['precision']}")
        per_bi = row["cost"]["per_bi"]
        lines.append(f"| {row['triton']} | {inputs} | {row['role']} | {per_bi['total']:.1f} | {per_bi['mma']:.1f} | "
                     f"{per_bi['fp']:.1f} | {row['num_warps']} | {row['regs']} | {row['stack']} | "
                     f"{row['shared'] / 1024:.1f} | {row['programs_per_sm']} | {row['issue_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", choices=["tc", "fma"], help="one problem: this family (else the report set)")
    parser.add_argument("--shape", type=int, nargs=4, default=list(MNIST), metavar=("I", "J", "D", "K"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--precision", default="tf32x3", choices=["ieee", "tf32x3", "tf32"])
    parser.add_argument("--options", default="", help="comma-separated: bias, prior, leaky, detach_routing")
    parser.add_argument("--tuning", default="", help="one problem: launch overrides, e.g. 'grad_num_warps=2'")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--only", default="", help="one problem: comma-separated parts of the kernel names to compile")
    parser.add_argument("--skip", default="", help="one problem: comma-separated parts of the kernel names not to compile")
    parser.add_argument("--python", action="append", default=[],
                        help="also measure under this interpreter (another Triton); repeatable")
    parser.add_argument("--workers", type=int, default=2, help="compilations at a time")
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    parser.add_argument("--summary", action="store_true", help="print the README's table too")
    parser.add_argument("--set", choices=["report", "ci"], default="report",
                        help="without --kernels: the report set (both families, every precision, both shapes, "
                             "then the option configs) or the CI set (what tests/test_sm90_compile.py compiles)")
    parser.add_argument("--write-budget", action="store_true",
                        help=f"write {BUDGET.relative_to(ROOT)} from the CI set (every --python too)")
    args = parser.parse_args(argv)
    if args.kernels and not (args.write_budget or args.python):
        config = (args.kernels, tuple(args.shape), args.dtype, args.precision,
                  tuple(o for o in args.options.split(",") if o))
        rows = measure(config, args.batch, args.iterations, only=[part for part in args.only.split(",") if part],
                       skip=[part for part in args.skip.split(",") if part],
                       overrides={key: int(value) for key, value in (item.split("=") for item in args.tuning.split(",")
                                                                    if item)})
    else:
        configs = CI_SET if (args.write_budget or args.set == "ci") else REPORT_SET + OPTION_SET
        rows = run_configs(configs, [sys.executable] + args.python, args.batch, args.iterations, args.workers)
    if args.write_budget:
        write_budget(rows)
    if args.json:
        print(json.dumps(rows))
        return 0
    versions = sorted({row["triton"] for row in rows})
    print(f"# sm_90, Triton {' and '.join(versions)}, batch {args.batch}, R = {args.iterations}; per (b, i): the "
          f"main loop's warp instructions per (sample, input capsule); µs/pass: issue-bound at "
          f"{SMS} SMs x {SCHEDULERS} x {CLOCK_HZ / 1e9} GHz")
    print(markdown(rows))
    if args.summary:
        print()
        print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
