"""Summary (markdown) of a scripts/gpu_training.sh results folder: throughput per setting, the
main recipe over its seeds (test error at the last epoch: mean +- sample std; best epoch; time
to 99.5% and 99.7%), and Table 1.

    python scripts/gpu_training_summary.py results/<device>
"""
import json
import statistics
import sys
from pathlib import Path


def records(folder: Path, kind: str) -> list:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def throughput(root: Path) -> list:
    lines = ["## Throughput (400 steps at batch 128; images/s: median of the progress records after step 100)", "",
             "| setting | images/s | wall s (400 steps, incl. compile) |", "|---|---:|---:|"]
    for folder in sorted((root / "throughput").glob("*")):
        steady = [r["images_per_s"] for r in records(folder, "progress") if r["step"] > 100]
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
        flags = [name for name in ("channels_last", "bf16", "compile", "cuda_graphs") if config.get(name)]
        epochs = records(folder, "epoch")
        lines.append(f"| {' + '.join(flags) or 'fp32 NCHW (no option)'} | "
                     f"{statistics.median(steady):,.0f} | {epochs[-1]['wall_s']:.1f} |" if steady and epochs
                     else f"| {folder.name} | failed | |")
    return lines


def main_recipe(root: Path) -> list:
    rows, last, best = [], [], []
    for folder in sorted((root / "main").glob("seed*")):
        epochs = [r for r in records(folder, "epoch")]
        if not epochs:
            rows.append(f"| {folder.name} | failed | | | | | | |")
            continue
        final = epochs[-1]
        low = min(epochs, key=lambda r: r["test_error"])
        last.append(final["test_error"])
        best.append(low["test_error"])
        hits = final["milestones"]
        when = [f"{hits[t]['wall_s']:.0f} s (epoch {hits[t]['epoch']})" if t in hits else "not reached"
                for t in ("99.5", "99.7")]
        rows.append(f"| {folder.name} | {final['test_error']:.2f} (epoch {final['epoch']}) | "
                    f"{low['test_error']:.2f} (epoch {low['epoch']}) | {when[0]} | {when[1]} | "
                    f"{final['images_per_s']:,.0f} | {statistics.median(r['eval_s'] for r in epochs):.2f} | "
                    f"{final['wall_s']:.0f} |")
    lines = ["## Main recipe (--schedule end-low)", "",
             "| seed | test error % at the last epoch | best epoch's error % | time to 99.5% | time to 99.7% | "
             "images/s (last epoch) | evaluation s (median) | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"] + rows
    if last:
        std = statistics.stdev(last) if len(last) > 1 else float("nan")
        lines += ["", f"Last epoch: mean {statistics.mean(last):.3f}% ± {std:.3f} (sample std, {len(last)} seeds); "
                      f"best single value over all epochs and seeds {min(best):.2f}% (a best-epoch figure is "
                      f"selected on the test set: optimistic)."]
    return lines


def main(root: str) -> int:
    root = Path(root)
    lines = [f"# GPU training figures: {root.name}", ""]
    env = root / "environment.txt"
    if env.exists():
        lines += [env.read_text().strip(), ""]
    lines += throughput(root) + [""] + main_recipe(root) + [""]
    table = root / "table1" / "table1.md"
    lines += ["## Table 1", "", table.read_text().strip() if table.exists() else "not run"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
