"""Convolutional capsule layers: `python -m benchmarks.convcaps [--quick] [options]` from the repository root.

Times the training forward and forward+backward of ConvCaps2d (eager: the votes tensor),
torch.compile of it and FusedConvCaps2d (the fused op), with their peak memory on CUDA, for the
SegCaps-like and DeepCaps-like layers of benchmarks/convcaps_memory.py (both transforms, batch
sizes 1, 8, 32), and writes benchmarks/results/<device>-convcaps.json and .md.

A measurement is benchmarks/harness.py's (`measure`: idle device before each repetition, CUDA
events, median with p20 / p80, peak memory of one extra untimed call), with the layer in place of
the routing op: x [B, T_in, K, H, W] and the layer's parameters (weight, bias) require grad;
"fwd" is v = layer(x) with autograd recording the graph, "bwd" torch.autograd.grad(v, (x, weight,
bias), grad_v) after an untimed forward, "fwd+bwd" both in one timed region; nothing is
accumulated into .grad. The three providers share one set of parameters (FusedConvCaps2d loads
ConvCaps2d's state_dict; torch.compile wraps the eager module). Input sets (x, grad_v) rotate
through more than 3x the L2 cache as for routing; the parameters are the same in every set.
One fp32 matmul precision for every provider (harness.set_precision; the fused op follows
torch.get_float32_matmul_precision()).

Peak memory is measured on CUDA only (torch.cuda.max_memory_allocated during a call minus what
was allocated before it: inputs and parameters excluded). On the CPU it is not measured: null
in the JSON, "–" in the tables. The bytes autograd saves for the backward, which do not depend
on the device, are benchmarks/convcaps_memory.py's table.

torch.compile: one compiled module per (layer, transform, dtype), dynamo's caches reset before
each (so no layer's graph is compiled with another layer's sizes made dynamic), its graphs
compiled and timed before that layer's measurements (harness.warm_up_graphs: one graph with a
dynamic batch, and the B = 1 graph when batch 1 is swept). On a 2-core CPU compiling one layer
takes 1-3 minutes even at the --quick shapes, so --quick leaves torch.compile out unless
--providers names it. The whole run keeps to --max-seconds as the routing sweep does
(benchmarks/run.py's Budget); a compilation already started is not interrupted.

A module of its own rather than a section of benchmarks/run.py: the routing sweep's rows,
ratios, roofline and plot are keyed by one routing shape (MNIST's), while each row here has a
layer and a transform, and a run of this one alone fits a short GPU loan.
"""
# first: without CUDA it sets TRITON_INTERPRET=1 before fastcaps is imported (the fused provider
# is skipped off CUDA whatever the setting); the layer shapes are that table's
from .convcaps_memory import BATCHES as FULL_BATCHES, ITERATIONS, LAYERS  # isort: skip

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fastcaps import reference  # noqa: E402
from fastcaps.nn.conv import TRANSFORMS, ConvCaps2d, FusedConvCaps2d  # noqa: E402

from . import harness, report, run  # noqa: E402

SCHEMA = "fastcaps-bench-convcaps/1"
# the same windows and padding on tiny grids, types and atoms: seconds on a CPU
QUICK_LAYERS = {
    "segcaps-like": (dict(in_types=4, in_dim=4, out_types=4, out_dim=4, kernel_size=5, padding=2), 8),
    "deepcaps-like": (dict(in_types=4, in_dim=4, out_types=4, out_dim=4, kernel_size=3, padding=1), 6),
}
QUICK_BATCHES = (2, 4)  # no batch 1: with --providers compile it would compile one more graph
DEFAULT_PASSES = ("fwd", "fwd+bwd")
QUICK_PROVIDERS = ("eager", "fused")
PEAK_MEMORY_NOTE = ("peak memory is measured on CUDA only (torch.cuda.max_memory_allocated during a call minus what "
                    "was allocated before it: inputs and parameters excluded); on the CPU it is not measured (null, "
                    "–); the bytes autograd saves, which do not depend on the device: python -m "
                    "benchmarks.convcaps_memory")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convcaps", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: tiny layers (the same windows), batches {','.join(map(str, QUICK_BATCHES))}, "
                             f"3-20 repetitions, providers {','.join(QUICK_PROVIDERS)} unless --providers is given, "
                             "budget 60 s")
    parser.add_argument("--providers", type=run._choices(harness.PROVIDERS), default=None,
                        help=f"comma-separated subset of {','.join(harness.PROVIDERS)} (default: all; "
                             f"{','.join(QUICK_PROVIDERS)} with --quick)")
    parser.add_argument("--passes", type=run._choices(harness.PASSES), default=DEFAULT_PASSES,
                        help=f"comma-separated subset of {','.join(harness.PASSES)} (default: "
                             f"{','.join(DEFAULT_PASSES)})")
    parser.add_argument("--dtypes", type=run._choices(tuple(harness.DTYPES)), default=("float32",),
                        help=f"comma-separated subset of {','.join(harness.DTYPES)} (default: float32)")
    parser.add_argument("--batches", type=run._positive_ints, default=None,
                        help=f"comma-separated batch sizes (default: {','.join(map(str, FULL_BATCHES))})")
    parser.add_argument("--layers", type=run._choices(tuple(LAYERS)), default=tuple(LAYERS),
                        help=f"comma-separated subset of {','.join(LAYERS)} (default: both)")
    parser.add_argument("--transforms", type=run._choices(TRANSFORMS), default=TRANSFORMS,
                        help=f"comma-separated subset of {','.join(TRANSFORMS)} (default: both)")
    parser.add_argument("--matmul-precision", choices=sorted(harness.MATMUL_PRECISIONS), default="highest",
                        help="torch.set_float32_matmul_precision for every provider (the fused op follows it): "
                             "highest -> ieee (default), high -> tf32x3, medium -> tf32")
    parser.add_argument("--kernels", choices=("tc", "fma"), default=None,
                        help="the fused op's kernel family (default: FASTCAPS_KERNELS, else the library's default)")
    parser.add_argument("--tag", default="",
                        help="suffix of the result files, <device>-convcaps-<tag>.json/.md (default: none)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="budget of the whole run, compilations included (default: 420, 60 with --quick)")
    parser.add_argument("--out-dir", type=Path, default=run.DEFAULT_OUT_DIR,
                        help=f"where <device>-convcaps.json/.md go (default: {run.DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    if args.kernels:  # read by every call of the op, the backward included
        os.environ["FASTCAPS_KERNELS"] = args.kernels
    args.providers = args.providers or (QUICK_PROVIDERS if args.quick else harness.PROVIDERS)
    args.batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    args.max_seconds = args.max_seconds or (60.0 if args.quick else 420.0)
    return args


# ----------------------------------------------------------------------------- layers, inputs, passes

def make_layers(spec: tuple, transform: str, providers, dtype: torch.dtype, device: torch.device) -> dict:
    """provider -> layer, all with the parameters of one seeded ConvCaps2d."""
    layer_args, _ = spec
    torch.manual_seed(0)
    eager = ConvCaps2d(**layer_args, iterations=ITERATIONS, transform=transform, bias=True).to(device, dtype)
    layers = {"eager": eager}
    if "compile" in providers:
        layers["compile"] = torch.compile(eager)  # the eager module's parameters
    if "fused" in providers:
        fused = FusedConvCaps2d(**layer_args, iterations=ITERATIONS, transform=transform, bias=True)
        fused.load_state_dict(eager.state_dict())
        layers["fused"] = fused.to(device, dtype)
    return layers


def make_inputs(spec: tuple, layer: ConvCaps2d, batch: int, dtype: torch.dtype, device: torch.device,
                n_sets: int, seed: int = 0) -> list[dict]:
    """`n_sets` inputs: x [B, T_in, K, H, W] squashed over its atoms (|x| < 1, like capsules), requiring
    grad, its batch dimension marked dynamic (for torch.compile) when batch >= 2; grad_v ~ N(0, 1)."""
    layer_args, size = spec
    out_h, out_w = layer.output_shape(size, size)
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(batch, layer_args["in_types"], layer_args["in_dim"], size, size, device=device, generator=gen)
        x = reference.squash(x, dim=2).to(dtype).requires_grad_()
        grad_v = torch.randn(batch, layer_args["out_types"], layer_args["out_dim"], out_h, out_w, device=device,
                             generator=gen).to(dtype)
        if batch >= 2:
            torch._dynamo.mark_dynamic(x, 0)
        sets.append({"x": x, "grad_v": grad_v})
    return sets


def input_sets_needed(spec: tuple, layer: ConvCaps2d, batch: int, dtype: torch.dtype, device: torch.device) -> int:
    layer_args, size = spec
    out_h, out_w = layer.output_shape(size, size)
    numel = batch * (layer_args["in_types"] * layer_args["in_dim"] * size * size
                     + layer_args["out_types"] * layer_args["out_dim"] * out_h * out_w)
    return harness.input_sets_for(numel * torch.finfo(dtype).bits // 8, device)


def make_pass(pass_: str, layer, params: tuple, sets: list[dict]):
    """(prepare, timed) for one pass of a layer, as harness.make_pass for the op: gradients of
    x and of the layer's parameters `params`."""
    def wrt(s):
        return (s["x"], *params)

    if pass_ == "fwd":
        def prepare(k):
            return sets[k]

        def timed(s):
            layer(s["x"])
    elif pass_ == "bwd":
        def prepare(k):
            return layer(sets[k]["x"]), sets[k]

        def timed(state):
            v, s = state
            torch.autograd.grad(v, wrt(s), s["grad_v"])
    elif pass_ == "fwd+bwd":
        def prepare(k):
            return sets[k]

        def timed(s):
            torch.autograd.grad(layer(s["x"]), wrt(s), s["grad_v"])
    else:
        raise ValueError(f"unknown pass {pass_!r}; known: {harness.PASSES}")
    return prepare, timed


def compile_warmup(compiled, params: tuple, spec: tuple, dtype: torch.dtype, device: torch.device,
                   batches) -> list[dict]:
    """harness.warm_up_graphs for a compiled layer: the first forward and backward at each batch
    it compiles a graph for, on a fresh input."""
    def first_calls(batch):
        (s,) = make_inputs(spec, compiled, batch, dtype, device, n_sets=1, seed=1)
        harness.synchronize(device)
        start = time.perf_counter()
        v = compiled(s["x"])
        harness.synchronize(device)
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        torch.autograd.grad(v, (s["x"], *params), s["grad_v"])
        harness.synchronize(device)
        return {"first_forward_s": forward_s, "first_backward_s": time.perf_counter() - start}

    return harness.warm_up_graphs(first_calls, device, batches)


# ----------------------------------------------------------------------------- the sweep

def _layer_config(layers: dict) -> dict:
    out = {}
    for name, (layer_args, size) in layers.items():
        shapes = {}
        for transform in TRANSFORMS:
            with torch.device("meta"):  # shapes only
                layer = ConvCaps2d(**layer_args, iterations=ITERATIONS, transform=transform, bias=True)
            shapes[transform] = list(layer.routing_shape)
        out[name] = {**layer_args, "size": size, "output": list(layer.output_shape(size, size)),
                     "routing_shape": shapes}
    return out


def sweep(args) -> dict:
    device = harness.default_device()
    precision = harness.set_precision(args.matmul_precision)
    env = harness.environment(device)
    timing = run.QUICK_TIMING if args.quick else run.FULL_TIMING
    budget = run.Budget(args.max_seconds, timing)
    all_layers = QUICK_LAYERS if args.quick else LAYERS
    layers = {name: all_layers[name] for name in args.layers}
    harness.log(f"fastcaps conv capsule benchmarks on {env['device']['name']} (torch {env['versions']['torch']}, "
                f"triton {env['versions']['triton']}, CUDA {env['versions']['cuda']}); precision {precision}; "
                f"budget {args.max_seconds:.0f} s")
    result = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.convcaps " + " ".join(sys.argv[1:]),
        **env,
        "precision": precision,
        "config": {"quick": args.quick, "providers": list(args.providers), "passes": list(args.passes),
                   "dtypes": list(args.dtypes), "batches": list(args.batches), "layers": _layer_config(layers),
                   "transforms": list(args.transforms), "iterations": ITERATIONS, "bias": True,
                   "max_seconds": args.max_seconds, "timing": {**timing, "target_s": list(timing["target_s"])}},
        "notes": {"peak_memory": PEAK_MEMORY_NOTE},
    }
    groups = [(name, transform, dtype_name) for name in layers for transform in args.transforms
              for dtype_name in args.dtypes]
    batches = [b for tier in run.batch_tiers(args.batches) for b in tier]  # the largest first
    jobs = {group: [(batch, provider, pass_) for batch in batches for provider in args.providers
                    for pass_ in args.passes] for group in groups}
    unavailable = {p: harness.unavailable_reason(p, device) for p in args.providers}
    left = sum(unavailable[p] is None for group in groups for _, p, _ in jobs[group])
    out_of_time = {"status": "skipped", "reason": f"time budget (--max-seconds {args.max_seconds:g}) exhausted"}
    rows, compile_records, done = [], [], 0
    total = sum(len(j) for j in jobs.values())
    for group in groups:
        name, transform, dtype_name = group
        spec, dtype = layers[name], harness.DTYPES[dtype_name]
        built = harness.guarded(lambda: {"layers": make_layers(spec, transform, args.providers, dtype, device)},
                                device)
        modules = built.get("layers", {})
        compile_failed = None
        if "compile" in args.providers and built["status"] == "ok" and unavailable["compile"] is None:
            if budget.exhausted():
                compile_failed = out_of_time
            else:
                torch._dynamo.reset()
                harness.log(f"[{budget.elapsed():6.1f}s] compiling {name} {transform} {dtype_name} ...")
                params = tuple(modules["eager"].parameters())
                for record in compile_warmup(modules["compile"], params, spec, dtype, device, args.batches):
                    compile_records.append({"layer": name, "transform": transform, "dtype": dtype_name, **record})
                    if record["status"] == "ok":
                        harness.log(f"  {record['graph']} at B={record['batch']}: first forward "
                                    f"{record['first_forward_s']:.1f} s, first backward "
                                    f"{record['first_backward_s']:.1f} s")
                    else:
                        harness.log(f"  {record['graph']} at B={record['batch']}: {record['status']}: "
                                    f"{record['reason']}")
                        if record["status"] == "error":
                            compile_failed = {"status": "error", "reason": f"compilation failed: {record['reason']}"}
        group_rows, sets_key, sets = [], None, None
        for batch, provider, pass_ in jobs[group]:
            row = {"layer": name, "transform": transform, "provider": provider, "pass": pass_, "batch": batch,
                   "iterations": ITERATIONS, "dtype": dtype_name}
            block = ({"status": "skipped", "reason": unavailable[provider]} if unavailable[provider]
                     else {"status": built["status"], "reason": built["reason"]} if built["status"] != "ok"
                     else compile_failed if provider == "compile" else None)
            if block or budget.exhausted():
                row.update(block or out_of_time)
            else:
                if sets_key != batch:  # the input sets of one batch at a time
                    sets_key, sets = batch, None
                    harness.free_memory(device)
                kwargs = run._timing_kwargs(timing, budget, left)

                def measure(provider=provider, pass_=pass_, batch=batch):
                    nonlocal sets
                    if sets is None:
                        n_sets = input_sets_needed(spec, modules["eager"], batch, dtype, device)
                        sets = make_inputs(spec, modules["eager"], batch, dtype, device, n_sets)
                    layer = modules[provider]
                    prepare, timed = make_pass(pass_, layer, tuple(layer.parameters()), sets)
                    return harness.measure(prepare, timed, device, n_sets=len(sets), **kwargs)

                row.update(harness.guarded(measure, device))
            if unavailable[provider] is None:
                left -= 1
            group_rows.append(row)
            done += 1
            harness.log(f"[{budget.elapsed():6.1f}s {done:3d}/{total}] {name} {transform:10s} {provider:7s} "
                        f"{pass_:7s} {dtype_name:8s} B={batch:<3d} {run._format_row(row)}")
        sets = None
        modules.clear()
        harness.free_memory(device)
        rows += group_rows
    result["compile"] = compile_records
    result["rows"] = rows
    result["ratios"] = ratios(rows)
    result["complete"] = not any(r.get("reason") == out_of_time["reason"] for r in rows)
    result["elapsed_s"] = budget.elapsed()
    return result


def ratios(rows: list[dict]) -> list[dict]:
    """report.ratios (fused / eager and fused / compile, time and peak memory) per layer and transform."""
    out = []
    for key in dict.fromkeys((r["layer"], r["transform"]) for r in rows):
        group = [r for r in rows if (r["layer"], r["transform"]) == key]
        out += [{"layer": key[0], "transform": key[1], **entry} for entry in report.ratios(group)]
    return out


# ----------------------------------------------------------------------------- results

def ratios_markdown(result: dict) -> str:
    lines = ["## Ratios fused / eager and fused / compile (median time; < 1: fused faster)", ""]
    if not result["ratios"]:
        return "\n".join(lines + ["No fused measurements on this device.", ""])
    body = [[e["layer"], e["transform"], e["pass"], e["dtype"], str(e["batch"]), report._ratio_cell(e, "eager"),
             report._ratio_cell(e, "compile"), report._num(e["memory_fused/eager"]),
             report._num(e["memory_fused/compile"])] for e in result["ratios"]]
    return "\n".join(lines + report._table(["layer", "transform", "pass", "dtype", "batch", "time fused/eager",
                                            "time fused/compile", "peak mem fused/eager", "peak mem fused/compile"],
                                           body) + [""])


def markdown(result: dict) -> str:
    dev, ver, prec, cfg = result["device"], result["versions"], result["precision"], result["config"]
    lines = [f"# fastcaps conv capsule benchmarks: {dev['name']}", "",
             f"- created {result['created']} by `{result['command']}`" + ("" if result["complete"] else
                                                                         " (**time budget ran out**: rows skipped)"),
             f"- torch {ver['torch']}, triton {ver['triton']}, CUDA {ver['cuda']}, Python {ver['python']}, "
             f"fastcaps {ver['fastcaps']} ({ver['git']})",
             "- device: " + ", ".join(f"{k} {v}" for k, v in dev.items() if k != "name"),
             f"- precision: float32 matmul precision `{prec['float32_matmul_precision']}` "
             f"(cuda.matmul.allow_tf32={prec['cuda_matmul_allow_tf32']}, cudnn.allow_tf32={prec['cudnn_allow_tf32']}),"
             f" fused input_precision `{prec['fused_input_precision']}`, for every provider; fused kernels "
             f"`{result.get('fused_kernels', 'fma')}`",
             f"- layers: ConvCaps2d (eager), torch.compile of it, FusedConvCaps2d; {cfg['iterations']} routing "
             "iterations, bias; x [B, T_in, K, H, W]",
             "- cells: median ms (p20–p80) over the repetitions; each repetition starts from an idle device; "
             "fwd = training forward, bwd = backward only (graph built outside the timed region), "
             "fwd+bwd = both; gradients of x and the parameters (benchmarks/convcaps.py)",
             f"- {result['notes']['peak_memory']}", ""]
    lines += report._table(["layer", "T_in x K -> T_out x D", "window, padding", "H x W -> H' x W'",
                            "I, J, D, K' per_offset", "I, J, D, K' per_type"],
                           [[name, f"{c['in_types']}x{c['in_dim']} -> {c['out_types']}x{c['out_dim']}",
                             f"{c['kernel_size']}x{c['kernel_size']}, {c['padding']}",
                             f"{c['size']}x{c['size']} -> {c['output'][0]}x{c['output'][1]}",
                             ", ".join(map(str, c["routing_shape"]["per_offset"])),
                             ", ".join(map(str, c["routing_shape"]["per_type"]))]
                            for name, c in cfg["layers"].items()]) + [""]
    index = {(r["layer"], r["transform"], r["provider"], r["pass"], r["dtype"], r["batch"]): r for r in result["rows"]}
    providers = cfg["providers"]
    for name in cfg["layers"]:
        for transform in cfg["transforms"]:
            for dtype in cfg["dtypes"]:
                for pass_ in cfg["passes"]:
                    lines += [f"## {name} {transform}, {pass_}, {dtype}", ""]
                    body = []
                    for batch in sorted(cfg["batches"]):
                        cells = [index.get((name, transform, p, pass_, dtype, batch)) for p in providers]
                        body.append([str(batch)] + [report._cell(c) for c in cells]
                                    + [report._num(c["peak_mb"]) if c and c["status"] == "ok" else "–"
                                       for c in cells])
                    lines += report._table(["batch"] + [f"{p} ms" for p in providers]
                                           + [f"{p} MB" for p in providers], body) + [""]
    lines.append(ratios_markdown(result))
    if result["compile"]:
        lines += ["## torch.compile (wall time of the first calls, where compilation happens; never in a timing)", ""]
        body = [[c["layer"], c["transform"], c["dtype"], c["graph"], str(c["batch"]),
                 report._num(c.get("first_forward_s")), report._num(c.get("first_backward_s")),
                 c["status"] + (f": {c['reason']}" if c.get("reason") else "")] for c in result["compile"]]
        lines += report._table(["layer", "transform", "dtype", "graph", "compiled at batch", "first forward s",
                                "first backward s", "status"], body) + [""]
    failed = [r for r in result["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["## Not measured", ""]
        reasons = {}
        for r in failed:
            what = f"{r['layer']} {r['transform']} {r['provider']} {r['pass']} {r['dtype']} B={r['batch']}"
            reasons.setdefault(f"{r['status']}: {r.get('reason', '')}", []).append(what)
        for reason, whats in reasons.items():
            lines.append(f"- {reason} ({len(whats)}): " + ", ".join(whats))
        lines.append("")
    return "\n".join(lines)


def write(result: dict, stem: Path) -> list[Path]:
    """Write stem.json and stem.md; returns the paths."""
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return [json_path, md_path]


def main(argv=None) -> int:
    args = parse_args(argv)
    result = sweep(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / (harness.device_slug(result) + "-convcaps" + (f"-{args.tag}" if args.tag else ""))
    paths = write(result, stem)
    harness.log("")
    harness.log(ratios_markdown(result))
    harness.log("wrote " + ", ".join(str(p) for p in paths) + f" ({result['elapsed_s']:.1f} s of measurements)")
    if not result["complete"]:
        harness.log("WARNING: the time budget ran out; some measurements are recorded as skipped (raise --max-seconds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
