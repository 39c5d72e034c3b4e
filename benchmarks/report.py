"""Result files of the sweep: <device>.json (everything), <device>.md (tables), <device>.png
(time and peak memory vs batch, log-log, per provider / pass / dtype)."""
import json
from pathlib import Path

from . import harness

_COLORS = {"eager": "tab:blue", "compile": "tab:orange", "fused": "tab:green"}
_STYLES = {"float32": "-", "bfloat16": "--"}


def ratios(rows: list[dict]) -> list[dict]:
    """Per (pass, dtype, batch) with a measured fused row: time and peak-memory ratios
    fused / eager and fused / compile (< 1: fused is faster or smaller), and the status of the
    other provider where it has no number (e.g. "oom")."""
    index = {(r["provider"], r["pass"], r["dtype"], r["batch"]): r for r in rows}
    out = []
    for (provider, pass_, dtype, batch), fused in index.items():
        if provider != "fused" or fused["status"] != "ok":
            continue
        entry = {"pass": pass_, "dtype": dtype, "batch": batch}
        for other in ("eager", "compile"):
            base = index.get((other, pass_, dtype, batch))
            ok = base is not None and base["status"] == "ok"
            entry[f"time_fused/{other}"] = fused["median_ms"] / base["median_ms"] if ok else None
            entry[f"memory_fused/{other}"] = (fused["peak_mb"] / base["peak_mb"]
                                              if ok and fused["peak_mb"] is not None and base["peak_mb"] else None)
            entry[f"{other}_status"] = None if base is None else base["status"]
        out.append(entry)
    return out


def _num(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def rate_text(entry: dict) -> str:
    """One measured device rate (benchmarks.roofline.measure_rates) as text."""
    if "GBps" in entry:
        return f"{_num(entry['GBps'])} GB/s"
    if "TFLOPS" in entry:
        return f"{_num(entry['TFLOPS'])} TFLOP/s"
    return f"{entry['status']}: {entry['reason']}"


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    return f"{_num(row['median_ms'])} ({_num(row['p20_ms'])}–{_num(row['p80_ms'])})"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _ratio_cell(entry: dict, other: str) -> str:
    value = entry[f"time_fused/{other}"]
    if value is not None:
        return f"{value:.3g}"
    return f"{other} {entry[f'{other}_status']}" if entry[f"{other}_status"] else "–"


def ratios_markdown(result: dict) -> str:
    lines = ["## Ratios fused / eager and fused / compile (median time; < 1: fused faster)", ""]
    entries = result.get("ratios", [])
    if not entries:
        return "\n".join(lines + ["No fused measurements on this device.", ""])
    body = [[e["pass"], e["dtype"], str(e["batch"]), _ratio_cell(e, "eager"), _ratio_cell(e, "compile"),
             _num(e["memory_fused/eager"]), _num(e["memory_fused/compile"])] for e in entries]
    return "\n".join(lines + _table(["pass", "dtype", "batch", "time fused/eager", "time fused/compile",
                                     "peak mem fused/eager", "peak mem fused/compile"], body) + [""])


def roofline_markdown(result: dict) -> str:
    lines = ["## Roofline of the fused op", ""]
    roof = result.get("roofline", {})
    if roof.get("status") != "ok":
        return "\n".join(lines + [f"Skipped: {roof.get('reason', 'not measured')}.", ""])
    rates = roof["rates"]
    rate_cells = [[name, rate_text(entry)] for name, entry in rates.items()]
    lines += ["Measured rates (copy: bytes read + written; matmul: large square torch.mm):", ""]
    lines += _table(["rate", "value"], rate_cells) + [""]
    if not roof["rows"]:
        return "\n".join(lines + ["No fused measurements on this device.", ""])
    lines += ["Floor = max(minimal bytes / copy bandwidth, FLOPs / rate); fraction = floor / measured median. "
              "matching: products at the rate of the precision used, the rest at fp32; cuda_core: all at fp32; "
              "tensor_core: all at the tensor-core rate (unreachable; shown as a bound). "
              "Cost model: benchmarks/roofline.py.", ""]
    body = []
    for r in roof["rows"]:
        floors, fractions = r["floor_ms"], r["fraction"]
        body.append([r["pass"], r["dtype"], str(r["batch"]), _num(r["flops"] / 1e9), _num(r["bytes"] / 1e6),
                     _num(r["measured_ms"]), _num(r["achieved_tflops"]), _num(floors["matching"]),
                     _num(fractions["matching"]), _num(fractions["cuda_core"]), _num(fractions["tensor_core"])])
    lines += _table(["pass", "dtype", "batch", "GFLOP", "MB", "measured ms", "TFLOP/s", "floor ms (matching)",
                     "fraction matching", "fraction cuda_core", "fraction tensor_core"], body)
    return "\n".join(lines + [""])


def markdown(result: dict) -> str:
    dev, ver, prec, cfg = result["device"], result["versions"], result["precision"], result["config"]
    lines = [f"# fastcaps benchmarks: {dev['name']}", "",
             f"- created {result['created']} by `{result['command']}`" + ("" if result["complete"] else
                                                                         " (**time budget ran out**: rows skipped)"),
             f"- torch {ver['torch']}, triton {ver['triton']}, CUDA {ver['cuda']}, Python {ver['python']}, "
             f"fastcaps {ver['fastcaps']} ({ver['git']})",
             f"- device: " + ", ".join(f"{k} {v}" for k, v in dev.items() if k != "name"),
             f"- precision: float32 matmul precision `{prec['float32_matmul_precision']}` "
             f"(cuda.matmul.allow_tf32={prec['cuda_matmul_allow_tf32']}, cudnn.allow_tf32={prec['cudnn_allow_tf32']}),"
             f" fused input_precision `{prec['fused_input_precision']}`, for every provider; fused kernels "
             f"`{result.get('fused_kernels', 'fma')}`",
             f"- shape: I={cfg['shape']['in_caps']}, K={cfg['shape']['in_dim']}, J={cfg['shape']['out_caps']}, "
             f"D={cfg['shape']['out_dim']}, R={cfg['iterations']} routing iterations",
             "- cells: median ms (p20–p80) over the repetitions; each repetition starts from an idle device; "
             "fwd = training forward, bwd = backward only (graph built outside the timed region), "
             "fwd+bwd = both (benchmarks/harness.py); peak MB = max allocated during a call minus allocated before it",
             "- bfloat16 rows: bf16 inputs and outputs for every provider; the fused op does its arithmetic in fp32, "
             "the reference (eager and compiled) keeps its intermediates in bf16 (its squash in fp32)",
             ""]
    rows = result["rows"]
    index = {(r["provider"], r["pass"], r["dtype"], r["batch"]): r for r in rows}
    providers = cfg["providers"]
    for dtype in cfg["dtypes"]:
        for pass_ in cfg["passes"]:
            lines += [f"## Routing {pass_}, {dtype}", ""]
            header = ["batch"] + [f"{p} ms" for p in providers] + [f"{p} MB" for p in providers]
            body = []
            for batch in sorted(cfg["batches"]):
                cells = [index.get((p, pass_, dtype, batch)) for p in providers]
                body.append([str(batch)] + [_cell(c) for c in cells]
                            + [_num(c["peak_mb"]) if c and c["status"] == "ok" else "–" for c in cells])
            lines += _table(header, body) + [""]
    lines.append(ratios_markdown(result))
    if result.get("compile"):
        lines += ["## torch.compile (wall time of the first calls, where compilation happens; never in a timing)", ""]
        body = [[c["dtype"], c["graph"], str(c["batch"]), _num(c.get("first_forward_s")),
                 _num(c.get("first_backward_s")), c["status"] + (f": {c['reason']}" if c.get("reason") else "")]
                for c in result["compile"]]
        lines += _table(["dtype", "graph", "compiled at batch", "first forward s", "first backward s", "status"],
                        body) + [""]
    lines.append(roofline_markdown(result))
    if result.get("e2e"):
        lines += ["## CapsNet training step (forward, margin + reconstruction loss, backward, Adam step)", ""]
        body = [[r["routing"], r["precision"], str(r["batch"]), _cell(r),
                 _num(r["peak_mb"]) if r["status"] == "ok" else "–"] for r in result["e2e"]]
        lines += _table(["routing", "precision", "batch", "ms (p20–p80)", "peak MB"], body) + [""]
    failed = [r for r in rows + result.get("e2e", []) if r["status"] != "ok"]
    if failed:
        lines += ["## Not measured", ""]
        reasons = {}
        for r in failed:
            what = (f"{r['provider']} {r['pass']} {r['dtype']} B={r['batch']}" if "provider" in r
                    else f"CapsNet {r['routing']} {r['precision']} B={r['batch']}")
            reasons.setdefault(f"{r['status']}: {r.get('reason', '')}", []).append(what)
        for reason, whats in reasons.items():
            lines.append(f"- {reason} ({len(whats)}): " + ", ".join(whats))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path):
    """Time and peak memory vs batch, log-log: one column per pass, a colour per provider and
    a line style per dtype; error bars span p20-p80. Providers with no number at some batch
    say why in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    passes = cfg["passes"]
    fig, axes = plt.subplots(2, len(passes), figsize=(5.5 * len(passes), 8), squeeze=False)
    for col, pass_ in enumerate(passes):
        time_ax, mem_ax = axes[0][col], axes[1][col]
        plotted = {time_ax: False, mem_ax: False}
        for provider in cfg["providers"]:
            for dtype in cfg["dtypes"]:
                rows = sorted((r for r in result["rows"] if (r["provider"], r["pass"], r["dtype"]) ==
                               (provider, pass_, dtype)), key=lambda r: r["batch"])
                ok = [r for r in rows if r["status"] == "ok"]
                missing = sorted({r["status"] for r in rows if r["status"] != "ok"})
                label = f"{provider} {dtype}" + (f" ({', '.join(missing)} at some B)" if missing and ok else
                                                 f" ({', '.join(missing)})" if missing else "")
                style = dict(color=_COLORS[provider], linestyle=_STYLES.get(dtype, ":"), marker="o", markersize=3)
                if not ok:
                    time_ax.plot([], [], label=label, **style)
                    continue
                batches = [r["batch"] for r in ok]
                medians = [r["median_ms"] for r in ok]
                errors = [[m - r["p20_ms"] for m, r in zip(medians, ok)], [r["p80_ms"] - m for m, r in zip(medians, ok)]]
                time_ax.errorbar(batches, medians, yerr=errors, label=label, capsize=2, **style)
                plotted[time_ax] = True
                mem = [(r["batch"], r["peak_mb"]) for r in ok if r["peak_mb"]]
                if mem:
                    mem_ax.plot(*zip(*mem), **style)
                    plotted[mem_ax] = True
        time_ax.set_title(f"routing {pass_}: median time")
        time_ax.set_ylabel("ms")
        mem_ax.set_title(f"routing {pass_}: peak memory above inputs")
        mem_ax.set_ylabel("MB")
        if plotted[time_ax] and not plotted[mem_ax]:
            mem_ax.text(0.5, 0.5, "peak memory is measured on CUDA only", ha="center", transform=mem_ax.transAxes)
        for ax in (time_ax, mem_ax):
            ax.set_xlabel("batch")
            if plotted[ax]:  # log scales need data
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        time_ax.legend(fontsize=7)
    fig.suptitle(f"fastcaps routing, {result['device']['name']}, R={cfg['iterations']}, "
                 f"fp32 precision {result['precision']['float32_matmul_precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, stem: Path) -> list[Path]:
    """Write stem.png (when matplotlib is installed), stem.json and stem.md; returns the paths."""
    paths = []
    png = stem.with_suffix(".png")
    try:
        plot(result, png)
        result["plot"] = png.name
        paths.append(png)
    except ImportError:
        result["plot"] = None
        harness.log("matplotlib is not installed (pip install -e .[bench]): no plot written")
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return [json_path, md_path] + paths
