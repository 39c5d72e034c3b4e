"""Table 1 of Sabour et al. (2017) by one command: `fastcaps table1`.

Rows: the baseline CNN (fastcaps.models.baseline) and CapsNet with 1 and 3 routing iterations, each
without and with reconstruction; --seeds runs of each. The test error of a run is that of its
last evaluation (the end of training), never the best epoch. Writes, into --out, table1.md (the
markdown table: mean +- sample std over the seeds next to the paper's column) and table1.json
(every run, its error, time and settings), the JSON after every run: a command stopped and run
again with the same options keeps the runs already done. The folder has the guarantees of
`fastcaps train`'s (runs.run_folder): one command at a time holds it (a lock), both files are
replaced whole or not at all, and a folder that holds a training run, or Table 1 runs of
another recipe, is refused with one line saying what to pass instead.

Every row trains with the recipe of `fastcaps train` (Adam, the authors' loss weighting and
schedule, shifts of up to 2 pixels, batch 128; the baseline with cross entropy), by default
for the authors' 300k steps. --schedule end-low with fewer --epochs is the short variant.
--quick: a CPU smoke test on tiny subsets (--quick-train / --quick-test images, one epoch).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..data import draw_shifts, load_mnist, shift_images
from ..models import AUTHORS_ARCH, BaselineCNN, CapsNet, baseline_loss, capsnet_loss
from . import speed
from .devices import parse_device, resolve_routing
from .errors import ConfigError, run_reporting_errors
from .runs import run_folder, write_atomic
from .schedules import lr_factor

__all__ = ["ROWS", "build_parser", "parse_args", "train_one", "evaluate_error", "run_table", "summarise", "markdown",
           "main"]

# name -> (label in the table, model, routing iterations, reconstruction, paper's error % (mean, std))
ROWS = {
    "baseline": ("Baseline CNN", "baseline", None, None, (0.39, None)),
    "caps-r1": ("CapsNet", "capsnet", 1, False, (0.34, 0.032)),
    "caps-r1-rec": ("CapsNet", "capsnet", 1, True, (0.29, 0.011)),
    "caps-r3": ("CapsNet", "capsnet", 3, False, (0.35, 0.036)),
    "caps-r3-rec": ("CapsNet", "capsnet", 3, True, (0.25, 0.005)),
}
FULL = {"epochs": 642, "max_steps": 300_000, "batch": 128, "seeds": 3, "out": "runs/table1"}
QUICK = {"epochs": 1, "max_steps": None, "batch": 32, "seeds": 1, "out": "runs/table1-quick"}
# options whose change makes earlier runs in --out incomparable
RECIPE = ("epochs", "max_steps", "batch", "lr", "schedule", "final_lr", "max_shift", "train_images",
          "test_images", "bf16")


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Table 1 of Sabour et al. (2017): MNIST test error of "
                                     "the baseline CNN and of CapsNet (1 or 3 routing iterations, with or without "
                                     "reconstruction), mean and std over seeds.")
    parser.add_argument("--quick", action="store_true",
                        help=f"CPU smoke test: {QUICK}, --quick-train/--quick-test images")
    parser.add_argument("--quick-train", type=int, default=256, help="training images with --quick (256)")
    parser.add_argument("--quick-test", type=int, default=200, help="test images with --quick (200)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {','.join(ROWS)})")
    parser.add_argument("--seeds", type=int, help=f"runs per row, seeds 0..N-1 (default {FULL['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {FULL['epochs']})")
    parser.add_argument("--max-steps", type=int, help=f"steps per run at most (default {FULL['max_steps']})")
    parser.add_argument("--batch", type=int, help=f"batch (default {FULL['batch']})")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--schedule", choices=("authors", "end-low"), default="authors",
                        help="as fastcaps train: authors (0.96 per 2000 steps, floor 1e-6) or end-low")
    parser.add_argument("--final-lr", type=float, default=1e-5, help="last lr of --schedule end-low (1e-5)")
    parser.add_argument("--max-shift", type=int, default=2, help="random shift in pixels (2)")
    parser.add_argument("--routing", choices=("fused", "eager"), help="default: fused on CUDA, eager elsewhere")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--eval-batch", type=int, default=500, help="evaluation batch (500)")
    parser.add_argument("--out", help=f"output folder (default {FULL['out']}, with --quick {QUICK['out']})")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that holds other runs")
    speed.add_arguments(parser)
    return parser


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("seeds", "epochs", "max_steps", "batch", "eval_batch", "quick_train", "quick_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_shift < 0 or not args.lr > 0 or not 0 < args.final_lr <= args.lr:
        parser.error("need --max-shift >= 0, --lr > 0 and 0 < --final-lr <= --lr")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: unknown row(s) {unknown or args.rows!r}; choose from {','.join(ROWS)}")
    args.rows = rows
    speed.check_arguments(args, parser)
    return args


# ------------------------------------------------------------------------------ one run

def _build(row: str, routing: str):
    _, kind, iterations, _, _ = ROWS[row]
    if kind == "baseline":
        return BaselineCNN()
    return CapsNet(routing=routing, iterations=iterations, **AUTHORS_ARCH)


def _loss(row: str, model_out, x, y):
    """(loss, scores [B, classes])"""
    if ROWS[row][1] == "baseline":
        return baseline_loss(model_out, y), model_out
    _, _, _, reconstruction, _ = ROWS[row]
    loss, _, _ = capsnet_loss(model_out, x, y, recon_weight=0.0005 if reconstruction else 0.0)
    return loss, model_out.lengths


@torch.inference_mode()
def evaluate_error(model, images, labels, batch: int, args) -> float:
    """Test error (%) of the model (class = the longest capsule, or the largest logit)."""
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=images.device)
    for start in range(0, len(images), batch):
        x = speed.to_memory_format(images[start:start + batch], args)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x)
        scores = out if torch.is_tensor(out) else out.lengths
        wrong += (scores.argmax(dim=1) != labels[start:start + batch]).sum()
    model.train()
    return 100.0 * wrong.item() / len(images)


def train_one(row: str, seed: int, data, args, device, routing: str, say=print) -> dict:
    """Train one row with one seed; returns its result (error at the last evaluation)."""
    images, labels, test_images, test_labels = data
    torch.manual_seed(seed)
    model = speed.apply_memory_format(_build(row, routing).to(device), args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda" or None)
    steps_per_epoch = len(images) // args.batch
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    decay = lr_factor(args.schedule, args.lr, total_steps, final_lr=args.final_lr)  # the authors' decay constants
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    net = speed.compile_model(model, args)
    order_gen = torch.Generator().manual_seed(seed)
    shift_gen = torch.Generator(device=device).manual_seed(seed)
    step, epoch, error, evaluations = 0, 0, None, []
    started = time.perf_counter()
    model.train()
    while step < total_steps:
        perm = torch.randperm(len(images), generator=order_gen).to(device)
        sums, count = torch.zeros(2, dtype=torch.float64, device=device), 0   # loss, correct; images
        epoch_start = time.perf_counter()
        for epoch_step in range(steps_per_epoch):
            if step == total_steps:
                break
            idx = perm[epoch_step * args.batch:(epoch_step + 1) * args.batch]
            x = shift_images(images[idx], draw_shifts(len(idx), args.max_shift, shift_gen), args.max_shift)
            x, y = speed.to_memory_format(x, args), labels[idx]
            speed.mark_step(args)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss, scores = _loss(row, net(x, y) if ROWS[row][1] == "capsnet" else net(x), x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += torch.stack([loss.detach().double() * len(y), (scores.argmax(1) == y).sum().double()])
            count += len(y)
            step += 1
        epoch += 1
        loss_sum, correct = sums.tolist()  # a host sync once per epoch
        line = (f"  {row} seed {seed} epoch {epoch} step {step}/{total_steps}: train loss {loss_sum / count:.4f} "
                f"acc {100 * correct / count:.2f}%, {count / (time.perf_counter() - epoch_start):.0f} img/s")
        if step == total_steps or epoch % args.eval_every == 0:
            error = evaluate_error(model, test_images, test_labels, args.eval_batch, args)
            evaluations.append({"epoch": epoch, "step": step, "test_error": error,
                                "wall_s": time.perf_counter() - started})
            line += f" | test error {error:.2f}%"
        say(line, flush=True)
    return {"row": row, "seed": seed, "test_error": error, "best_test_error": min(e["test_error"] for e in evaluations),
            "steps": step, "epochs": epoch, "wall_s": time.perf_counter() - started, "evaluations": evaluations}


# ------------------------------------------------------------------------------ the table

def _std(values):
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(runs: list, rows: list) -> list:
    """Per row: the errors of its runs (last evaluation), mean, sample std, best, and the paper's."""
    table = []
    for row in rows:
        label, kind, iterations, reconstruction, (paper_mean, paper_std) = ROWS[row]
        errors = [r["test_error"] for r in runs if r["row"] == row]
        table.append({"row": row, "method": label, "routing": iterations, "reconstruction": reconstruction,
                      "runs": len(errors), "errors": errors,
                      "mean": sum(errors) / len(errors) if errors else None, "std": _std(errors),
                      "min": min(errors) if errors else None, "paper_mean": paper_mean, "paper_std": paper_std})
    return table


def _pm(mean, std, digits):
    if mean is None:
        return "not run"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(table: list, note: str) -> str:
    lines = ["| Method | Routing | Reconstruction | MNIST test error % (ours: mean ± std) | seeds | paper |",
             "|---|---:|---|---:|---:|---:|"]
    for r in table:
        routing = "-" if r["routing"] is None else str(r["routing"])
        recon = "-" if r["reconstruction"] is None else ("yes" if r["reconstruction"] else "no")
        lines.append(f"| {r['method']} | {routing} | {recon} | {_pm(r['mean'], r['std'], 3)} | {r['runs']} | "
                     f"{_pm(r['paper_mean'], r['paper_std'], 3 if r['paper_std'] else 2)} |")
    return "\n".join(lines) + f"\n\n{note}\n"


def run_table(args) -> dict:
    """Train the rows' runs that --out does not hold yet and write the table; returns what table1.json holds."""
    with run_folder(args.out, "table1") as out:
        return _run_table(args, out)


def _previous_runs(json_path: Path, recipe: dict, overwrite: bool) -> list:
    """The runs kept from an earlier call with the same recipe (none with --overwrite)."""
    if overwrite or not json_path.exists():
        return []
    try:
        previous = json.loads(json_path.read_text(encoding="utf-8"))
        previous_recipe, runs = previous.get("recipe"), previous["runs"]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        raise ConfigError(f"{json_path} is damaged ({type(err).__name__}: {str(err)[:100]}): pass --overwrite "
                          "to start over, or another --out") from None
    if previous_recipe != recipe:
        raise ConfigError(f"{json_path.parent} holds runs of another recipe ({previous_recipe}); pass --overwrite "
                          "or another --out")
    return runs


def _run_table(args, out: Path) -> dict:
    device = parse_device(args.device)
    speed.resolve(args, device, ConfigError)
    routing, routing_note = resolve_routing(args.routing, device)
    if routing_note:
        print(f"note: {routing_note}", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    images, labels = load_mnist("train", device)
    test_images, test_labels = load_mnist("test", device)
    if args.quick:
        images, labels = images[:args.quick_train], labels[:args.quick_train]
        test_images, test_labels = test_images[:args.quick_test], test_labels[:args.quick_test]
    if len(images) < args.batch:
        raise ConfigError(f"{len(images)} training images are fewer than one batch (--batch {args.batch})")
    args.train_images, args.test_images = len(images), len(test_images)
    recipe = {k: getattr(args, k) for k in RECIPE}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    json_path = out / "table1.json"
    runs = _previous_runs(json_path, recipe, args.overwrite)
    plan = [(row, seed) for row in args.rows for seed in range(args.seeds)]
    print(f"Table 1: {len(plan)} runs ({', '.join(args.rows)} x {args.seeds} seeds) on {device_name}, {routing} "
          f"routing, {len(images)} training / {len(test_images)} test images, batch {args.batch}, "
          f"{_length(args)}, {args.schedule} schedule; {speed.describe(args)}",
          flush=True)
    data = (images, labels, test_images, test_labels)
    started = time.perf_counter()
    result = None
    for number, (row, seed) in enumerate(plan, 1):
        done = [r for r in runs if (r["row"], r["seed"]) == (row, seed)]
        if done:
            print(f"[{number}/{len(plan)}] {row} seed {seed}: kept from {json_path}: test error "
                  f"{done[0]['test_error']:.2f}%", flush=True)
            continue
        print(f"[{number}/{len(plan)}] {row} seed {seed}", flush=True)
        run = train_one(row, seed, data, args, device, routing)
        runs.append(run)
        print(f"[{number}/{len(plan)}] {row} seed {seed}: test error {run['test_error']:.2f}% at the last epoch "
              f"(best {run['best_test_error']:.2f}%), {run['wall_s']:.0f} s", flush=True)
        result = _write(out, runs, args, recipe, device_name, routing)
    if result is None:
        result = _write(out, runs, args, recipe, device_name, routing)
    print(f"\n{result['markdown']}\nwrote {out / 'table1.md'} and {json_path} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def _length(args) -> str:
    return f"{args.epochs} epochs" + (f" (at most {args.max_steps} steps)" if args.max_steps else "")


def _write(out: Path, runs: list, args, recipe: dict, device_name: str, routing: str) -> dict:
    table = summarise(runs, args.rows)
    note = (f"Test error at the last epoch of each run ({'--quick subsets: ' if args.quick else ''}"
            f"{args.train_images} training and {args.test_images} test images), on {device_name}; "
            f"{args.schedule} schedule, {_length(args)}, batch {args.batch}; "
            f"std: sample std over the seeds. Paper: Sabour et al. (2017), Table 1 (mean ± std of 3 trials).")
    text = markdown(table, note)
    result = {"recipe": recipe, "device": device_name, "routing": routing, "throughput": speed.describe(args),
              "table": table, "runs": runs, "markdown": text}
    write_atomic(out / "table1.json", json.dumps(result, indent=1) + "\n")  # first: it is what a rerun keeps
    write_atomic(out / "table1.md", text)
    return result


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    return run_reporting_errors(prog or "fastcaps table1", run_table, args)


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastcaps.recipes.table1"))
