"""A/B of two sweeps of the fused op: `python -m benchmarks.compare A.json B.json`.

Prints, for every (pass, dtype, batch) measured ok in both result files of benchmarks.run, the
fused op's median time in each and the ratio B / A (< 1: B faster), with the kernel family and
matmul precision each sweep ran with, and eager and torch.compile where B's sweep measured them.
"""
import argparse
import json
import sys


def _fused(result: dict) -> dict:
    return {(r["pass"], r["dtype"], r["batch"]): r for r in result["rows"]
            if r.get("provider") == "fused" and r.get("status") == "ok"}


def _label(result: dict) -> str:
    return f"{result.get('fused_kernels', 'fma')} @ {result['precision']['float32_matmul_precision']}"


def compare(a: dict, b: dict) -> str:
    fused_a, fused_b = _fused(a), _fused(b)
    others = {(r["provider"], r["pass"], r["dtype"], r["batch"]): r["median_ms"] for r in b["rows"]
              if r.get("status") == "ok" and r.get("provider") in ("eager", "compile")}
    lines = [f"A = {_label(a)}, B = {_label(b)} ({b['device']['name']})", "",
             "| pass | dtype | batch | A ms | B ms | B / A | eager ms | compile ms |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(set(fused_a) & set(fused_b), key=lambda k: (k[0], k[1], k[2])):
        ta, tb = fused_a[key]["median_ms"], fused_b[key]["median_ms"]
        eager, comp = others.get(("eager",) + key), others.get(("compile",) + key)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {ta:.4g} | {tb:.4g} | {tb / ta:.2f} | "
                     f"{'' if eager is None else f'{eager:.4g}'} | {'' if comp is None else f'{comp:.4g}'} |")
    if len(lines) == 4:
        lines.append("(no (pass, dtype, batch) measured in both)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="result JSON of benchmarks.run (the baseline)")
    parser.add_argument("b", help="result JSON of benchmarks.run (the candidate)")
    args = parser.parse_args(argv)
    try:
        with open(args.a) as fa, open(args.b) as fb:
            print(compare(json.load(fa), json.load(fb)))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"benchmarks.compare: cannot read the results: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
