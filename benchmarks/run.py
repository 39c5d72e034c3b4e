"""The benchmark sweep: `python -m benchmarks.run [--quick] [options]` from the repository root.

For the device it runs on (the GPU when there is one) it measures routing fwd / bwd / fwd+bwd
for the eager reference, torch.compile of it and the fused op over batch sizes and dtypes, the
roofline of the fused op and a CapsNet training step, then writes
benchmarks/results/<device>.json, .md and .png and prints the fused/eager and fused/compile
ratios. What each timing covers: benchmarks/harness.py (routing), benchmarks/e2e.py (training
step), benchmarks/roofline.py (cost model and floors).

The whole run keeps to --max-seconds: every measurement gets an equal share of what is left
(between fixed bounds), batch sizes run coarse to fine, and measurements that no longer fit
are recorded as skipped.
"""
import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from fastcaps.recipes.console import progress_bar

from . import e2e, harness, report, roofline

FULL_BATCHES = tuple(2**p for p in range(14))  # 1 .. 8192
QUICK_BATCHES = (2, 8)  # no batch 1: its specialised torch.compile graph costs ~20 s on a 2-core CPU
# per-measurement timing: repetitions, bounds of the target time (s), warm-up (s)
FULL_TIMING = {"min_reps": 10, "max_reps": 1000, "target_s": (0.05, 0.5), "warmup_s": 0.05}
QUICK_TIMING = {"min_reps": 3, "max_reps": 20, "target_s": (0.005, 0.05), "warmup_s": 0.0}
TAIL_S = 10.0  # kept back from the budget for writing the results and the plot
HERE = Path(__file__).resolve().parent
# benchmarks/results of the checkout; an installed copy (fastcaps.benchmarks) writes to the current folder
DEFAULT_OUT_DIR = HERE / "results" if (HERE.parent / "setup.py").is_file() else Path("benchmark-results")


def _choices(allowed, convert=str):
    def parse(text):
        values = [convert(item) for item in text.split(",") if item]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(allowed)}, got {text!r}")
        return tuple(values)
    return parse


def _positive_ints(text):
    values = _choices(None, int)(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: batches {','.join(map(str, QUICK_BATCHES))}, 3-20 repetitions, small "
                             "roofline sizes, CapsNet batch 4, budget 110 s")
    parser.add_argument("--providers", type=_choices(harness.PROVIDERS), default=harness.PROVIDERS,
                        help=f"comma-separated subset of {','.join(harness.PROVIDERS)} (default: all)")
    parser.add_argument("--passes", type=_choices(harness.PASSES), default=harness.PASSES,
                        help=f"comma-separated subset of {','.join(harness.PASSES)} (default: all)")
    parser.add_argument("--dtypes", type=_choices(tuple(harness.DTYPES)), default=tuple(harness.DTYPES),
                        help=f"comma-separated subset of {','.join(harness.DTYPES)} (default: both)")
    parser.add_argument("--batches", type=_positive_ints, default=None,
                        help=f"comma-separated batch sizes (default: powers of 2 from {FULL_BATCHES[0]} to "
                             f"{FULL_BATCHES[-1]})")
    parser.add_argument("--iterations", type=int, default=3, help="routing iterations R (default: 3)")
    parser.add_argument("--matmul-precision", choices=sorted(harness.MATMUL_PRECISIONS), default="highest",
                        help="torch.set_float32_matmul_precision for every provider; the fused op gets the "
                             "matching input_precision: highest -> ieee (default), high -> tf32x3, medium -> tf32")
    parser.add_argument("--kernels", choices=("tc", "fma"), default=None,
                        help="the fused op's kernel family (default: FASTCAPS_KERNELS, else the library's default)")
    parser.add_argument("--tag", default="",
                        help="suffix of the result files, <device>-<tag>.json/.md/.png (default: none)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="budget of the whole run (default: 280, 110 with --quick)")
    parser.add_argument("--e2e-batch", type=int, default=None,
                        help="CapsNet training-step batch (default: 128, 4 with --quick)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the CapsNet training-step benchmark")
    parser.add_argument("--no-roofline", action="store_true", help="skip measuring the device's rates")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help=f"where <device>.json/.md/.png go (default: {DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    if args.kernels:  # read by every call of the op, the backward included
        os.environ["FASTCAPS_KERNELS"] = args.kernels
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    args.batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    args.max_seconds = args.max_seconds or (110.0 if args.quick else 280.0)
    args.e2e_batch = args.e2e_batch or (4 if args.quick else 128)
    return args


class Budget:
    """Splits what is left of --max-seconds evenly over the measurements still to run."""

    def __init__(self, seconds: float, timing: dict):
        self.start = time.perf_counter()
        self.deadline = self.start + seconds - TAIL_S
        self.lo, self.hi = timing["target_s"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return time.perf_counter() >= self.deadline

    def target_s(self, measurements_left: int) -> float:
        # half of the share: warm-up, the memory call and the untimed forward of "bwd" take the rest
        share = (self.deadline - time.perf_counter()) / max(1, measurements_left)
        return min(self.hi, max(self.lo, 0.5 * share))


def batch_tiers(batches) -> list[list[int]]:
    """Coarse to fine: every other batch size from the largest down, with the smallest, then
    the rest. A sweep cut short by the budget loses resolution, not the ends of the range; the
    largest batches (the headline rows, and any OOM) come first."""
    desc = sorted(set(batches), reverse=True)
    coarse = desc[0::2] + ([desc[-1]] if len(desc) % 2 == 0 else [])
    return [coarse, [b for b in desc if b not in coarse]]


def _timing_kwargs(timing: dict, budget: Budget, left: int) -> dict:
    return {"min_reps": timing["min_reps"], "max_reps": timing["max_reps"], "warmup_s": timing["warmup_s"],
            "target_s": budget.target_s(left)}


class _InputCache:
    """The input sets of one (dtype, batch) at a time: built at first use, freed before the next."""

    def __init__(self, device, shape):
        self.device, self.shape = device, shape
        self.key, self.sets = None, None

    def get(self, dtype_name: str, batch: int) -> list[dict]:
        if self.key != (dtype_name, batch):
            self.clear()
            dtype = harness.DTYPES[dtype_name]
            n_sets = harness.input_sets_needed(batch, dtype, self.device, self.shape)
            self.sets = harness.make_inputs(batch, dtype, self.device, self.shape, n_sets)
            self.key = (dtype_name, batch)
        return self.sets

    def clear(self):
        if self.key is not None:
            self.key, self.sets = None, None
            harness.free_memory(self.device)


def _measure_routing(inputs: _InputCache, routing, pass_: str, dtype_name: str, batch: int, **timing) -> dict:
    sets = inputs.get(dtype_name, batch)
    prepare, timed = harness.make_pass(pass_, routing, sets)
    return harness.measure(prepare, timed, inputs.device, n_sets=len(sets), **timing)


def _format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason', '')}"
    peak = "" if row["peak_mb"] is None else f", peak {row['peak_mb']:.1f} MB"
    return (f"{row['median_ms']:.4f} ms (p20 {row['p20_ms']:.4f}, p80 {row['p80_ms']:.4f}, "
            f"{row['reps']} reps, {row['input_sets']} sets){peak}")


def _compile_all(args, device, routing, budget) -> tuple[list, dict]:
    """Compile torch.compile's graphs for every dtype before any timing; returns the records
    and, per dtype whose compilation failed (not for lack of memory), the failed record."""
    records, failed = [], {}
    for dtype_name in args.dtypes:
        harness.log(f"[{budget.elapsed():6.1f}s] compiling the reference for {dtype_name} ...")
        for record in harness.compile_warmup(routing, harness.DTYPES[dtype_name], device, harness.MNIST_SHAPE,
                                             args.batches):
            records.append({"dtype": dtype_name, **record})
            if record["status"] == "ok":
                harness.log(f"  {record['graph']} at B={record['batch']}: first forward "
                            f"{record['first_forward_s']:.1f} s, first backward {record['first_backward_s']:.1f} s")
            else:
                harness.log(f"  {record['graph']} at B={record['batch']}: {record['status']}: {record['reason']}")
                if record["status"] == "error":
                    failed[dtype_name] = record
    return records, failed


def sweep(args) -> dict:
    device = harness.default_device()
    precision = harness.set_precision(args.matmul_precision)
    env = harness.environment(device)
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    budget = Budget(args.max_seconds, timing)
    shape = harness.MNIST_SHAPE
    harness.log(f"fastcaps benchmarks on {env['device']['name']} (torch {env['versions']['torch']}, "
                f"triton {env['versions']['triton']}, CUDA {env['versions']['cuda']}); precision {precision}; "
                f"budget {args.max_seconds:.0f} s")

    result = {
        "schema": "fastcaps-bench/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        **env,
        "precision": precision,
        "config": {"quick": args.quick, "providers": list(args.providers), "passes": list(args.passes),
                   "dtypes": list(args.dtypes), "batches": list(args.batches), "iterations": args.iterations,
                   "shape": shape, "max_seconds": args.max_seconds, "timing": {**timing, "target_s": list(timing["target_s"])},
                   "e2e_batch": None if args.no_e2e else args.e2e_batch},
    }

    if args.no_roofline:
        rates = None
    else:  # first: the large products also bring the GPU to its working clocks
        harness.log(f"[{budget.elapsed():6.1f}s] measuring copy bandwidth and matmul rates ...")
        rates = roofline.measure_rates(device, quick=args.quick)
        for name, entry in rates.items():
            harness.log(f"  {name}: {report.rate_text(entry)}")

    routing = {p: harness.make_routing(p, args.iterations, precision["fused_input_precision"])
               for p in args.providers}
    compile_failed = {}
    if "compile" in args.providers:
        result["compile"], compile_failed = _compile_all(args, device, routing["compile"], budget)

    tiers = batch_tiers(args.batches)

    def routing_jobs(tier):
        return [("routing", (dtype_name, batch, provider, pass_)) for dtype_name in args.dtypes for batch in tier
                for provider in args.providers for pass_ in args.passes]

    e2e_jobs = [] if args.no_e2e else [("e2e", (r, p)) for p in e2e.E2E_PRECISIONS for r in e2e.E2E_PROVIDERS]
    # the CapsNet step runs between the coarse and the fine batch sizes: a short budget cannot starve it
    jobs = routing_jobs(tiers[0]) + e2e_jobs + routing_jobs(tiers[1])

    def blocked(kind, key) -> dict | None:
        """Why a job cannot run, whatever the budget."""
        provider = key[2] if kind == "routing" else key[0]
        reason = harness.unavailable_reason(provider, device)
        if reason:
            return {"status": "skipped", "reason": reason}
        if kind == "routing" and provider == "compile" and key[0] in compile_failed:
            return {"status": "error", "reason": f"compilation failed: {compile_failed[key[0]]['reason']}"}
        return None

    blocks = [blocked(*job) for job in jobs]
    out_of_time = {"status": "skipped", "reason": f"time budget (--max-seconds {args.max_seconds:g}) exhausted"}
    inputs = _InputCache(device, shape)
    rows, e2e_rows = [], []
    bar = progress_bar(len(jobs), "sweep", unit="job")  # shown on a terminal only
    for index, ((kind, key), block) in enumerate(zip(jobs, blocks)):
        left = sum(b is None for b in blocks[index:])  # measurements still to run share the budget
        if kind == "routing":
            dtype_name, batch, provider, pass_ = key
            row = {"provider": provider, "pass": pass_, "batch": batch, "iterations": args.iterations,
                   "dtype": dtype_name}
            if block or budget.exhausted():
                row.update(block or out_of_time)
            else:
                kwargs = _timing_kwargs(timing, budget, left)
                row.update(harness.guarded(lambda: _measure_routing(inputs, routing[provider], pass_, dtype_name,
                                                                    batch, **kwargs), device))
            rows.append(row)
            what = f"{provider:7s} {pass_:7s} {dtype_name:8s} B={batch:<5d}"
        else:
            routing_name, e2e_precision = key
            inputs.clear()  # the routing inputs are not needed by the CapsNet
            if block or budget.exhausted():
                row = {"routing": routing_name, "precision": e2e_precision, "batch": args.e2e_batch,
                       "iterations": args.iterations, **(block or out_of_time)}
            else:
                row = e2e.train_step_row(routing_name, e2e_precision, args.e2e_batch, device, args.iterations,
                                         **_timing_kwargs(timing, budget, left))
            e2e_rows.append(row)
            what = f"CapsNet step {routing_name:5s} {e2e_precision:13s} B={args.e2e_batch}"
        harness.log(f"[{budget.elapsed():6.1f}s {index + 1:3d}/{len(jobs)}] {what} {_format_row(row)}")
        bar.update()
    bar.close()
    inputs.clear()
    result["rows"], result["e2e"] = rows, e2e_rows
    result["ratios"] = report.ratios(rows)

    if rates is None:
        result["roofline"] = {"status": "skipped", "reason": "--no-roofline"}
    else:
        result["roofline"] = {"status": "ok", "rates": rates,
                              "rows": roofline.roofline_rows(rows, rates, shape, precision["fused_input_precision"])}
    result["complete"] = not any(r.get("reason") == out_of_time["reason"] for r in rows + e2e_rows)
    result["elapsed_s"] = budget.elapsed()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = sweep(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / (harness.device_slug(result) + (f"-{args.tag}" if args.tag else ""))
    paths = report.write(result, stem)
    harness.log("")
    harness.log(report.ratios_markdown(result))
    harness.log(report.roofline_markdown(result))
    harness.log("wrote " + ", ".join(str(p) for p in paths) + f" ({result['elapsed_s']:.1f} s of measurements)")
    if not result["complete"]:
        harness.log(f"WARNING: the time budget ran out; some measurements are recorded as skipped "
                    f"(raise --max-seconds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
