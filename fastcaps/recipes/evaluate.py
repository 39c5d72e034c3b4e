"""Evaluate a trained CapsNet: `fastcaps evaluate CHECKPOINT`.

Prints the test error and the confusion matrix and writes, into --out (default: a folder
`eval` beside the checkpoint): evaluation.json, confusion_matrix.csv and the figures
reconstructions.png (inputs above their reconstructions), perturbation.png (the paper's
Figure 4: each of the 16 dimensions of the predicted digit capsule moved over [-0.25, 0.25]
in steps of 0.05, then decoded) and training_curves.png (from metrics.jsonl beside the
checkpoint, when there is one). The figures need matplotlib (`pip install fastcaps[viz]`);
--no-figures writes the numbers only.

A checkpoint of `fastcaps train --dataset multimnist` is evaluated on the fixed MultiMNIST test
pairs instead (fastcaps.recipes.multimnist.evaluate_checkpoint): the paper's error, the "at least one
right" rate, evaluation.json and the Figure 5 picture multimnist.png.
"""
import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_mnist
from ..models import CapsNet, capsnet_loss
from . import multimnist
from .checkpoints import load_checkpoint, load_model
from .console import progress_bar
from .devices import parse_device, resolve_routing
from .errors import ConfigError, run_reporting_errors
from .figures import figure_class, save_perturbations, save_reconstructions, save_training_curves
from .runs import prepare_out_dir, read_metrics, write_atomic

__all__ = ["predict", "confusion_matrix", "perturbation_grid", "evaluate_checkpoint", "main"]

PERTURBATIONS = torch.arange(-5, 6) * 0.05  # the paper's [-0.25, 0.25] in steps of 0.05; exactly 0 in the middle


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
            bf16: bool = False, progress: str | None = None):
    """Predicted classes [N] and the test losses summed over the N images (float64 [3]: total,
    margin, reconstruction). The decoder sees the predicted capsule, as at test time in the paper.
    progress: the label of a progress bar over the images (shown on a terminal only)."""
    model.eval()
    predictions = torch.empty_like(labels)
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)
    with progress_bar(len(images), progress, unit="img", disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
                losses = capsnet_loss(out, x, y)
            predictions[start:start + len(x)] = out.lengths.argmax(dim=1)
            sums += torch.stack(losses).double() * len(x)
            bar.update(len(x))
    return predictions, sums


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """[true class, predicted class] counts."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes ** 2).view(num_classes, num_classes).cpu()


def format_confusion(matrix: torch.Tensor) -> str:
    width = max(5, len(str(int(matrix.max()))) + 1)
    lines = ["true\\pred" + "".join(f"{j:>{width}}" for j in range(matrix.shape[1]))]
    lines += [f"{i:>9}" + "".join(f"{int(n):>{width}}" for n in row) for i, row in enumerate(matrix)]
    return "\n".join(lines)


@torch.inference_mode()
def perturbation_grid(model: CapsNet, image: torch.Tensor) -> torch.Tensor:
    """Decodings of one image's predicted digit capsule with one dimension moved at a time:
    [16 dimensions, 11 perturbations, 28, 28]."""
    caps = model(image[None]).caps[0].float()                  # [10, 16]
    digit = int(caps.norm(dim=-1).argmax())
    dims, steps = caps.shape[1], len(PERTURBATIONS)
    moved = caps[digit].expand(dims, steps, dims).clone()      # [dimension, step, capsule value]
    eye = torch.eye(dims, device=caps.device)
    moved += eye[:, None, :] * PERTURBATIONS.to(caps.device)[None, :, None]
    masked = torch.zeros(dims, steps, *caps.shape, device=caps.device)
    masked[:, :, digit] = moved
    return model.decoder(masked.flatten(0, 1)).view(dims, steps, 28, 28).cpu()


def evaluate_checkpoint(checkpoint_path, out=None, device=None, routing=None, batch_size=200, bf16=False,
                        test_subset=None, samples=10, perturb=3, figures=True, test_pairs=None) -> dict:
    """Everything `fastcaps evaluate` does; returns the summary written to evaluation.json.
    test_pairs: MultiMNIST test pairs per test digit (default: as in training)."""
    device = parse_device(device)
    routing, routing_note = resolve_routing(routing, device)
    if routing_note:
        print(f"note: {routing_note}")
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    # the output folder is checked before the evaluation, which can take minutes
    out = prepare_out_dir(out if out is not None else checkpoint_path.parent / "eval")
    if checkpoint["config"].get("dataset", "mnist") == "multimnist":
        return multimnist.evaluate_checkpoint(checkpoint, checkpoint_path, out, device, routing, batch_size, bf16,
                                              test_subset, test_pairs or checkpoint["config"]["test_pairs"],
                                              samples, figures)
    if test_pairs is not None:
        raise ConfigError("--test-pairs: the checkpoint is an MNIST one; test pairs are for multimnist")
    if figures:
        figure_class()  # fail before the evaluation, not after it
    model = load_model(checkpoint, routing, device, checkpoint_path)
    images, labels = load_mnist("test", device, limit=test_subset)
    samples, perturb = min(samples, len(images)), min(perturb, len(images))

    start = time.perf_counter()
    predictions, sums = predict(model, images, labels, batch_size, bf16, progress="evaluating")
    matrix = confusion_matrix(labels, predictions)
    n = len(labels)
    correct = int(matrix.trace())
    summary = {"checkpoint": str(checkpoint_path), "step": checkpoint["step"], "routing": routing, "images": n,
               "test_acc": 100 * correct / n, "test_error": 100 * (n - correct) / n,
               "test_loss": float(sums[0]) / n, "test_margin": float(sums[1]) / n,
               "test_recon": float(sums[2]) / n, "eval_s": time.perf_counter() - start,
               "confusion_matrix": matrix.tolist()}

    write_atomic(out / "evaluation.json", json.dumps(summary, indent=1) + "\n")
    csv = io.StringIO()
    np.savetxt(csv, matrix.numpy(), fmt="%d", delimiter=",",
               header="rows: true class 0-9, columns: predicted class 0-9")
    write_atomic(out / "confusion_matrix.csv", csv.getvalue())
    print(f"test error {summary['test_error']:.2f}% ({n - correct} of {n} wrong), "
          f"accuracy {summary['test_acc']:.2f}%, loss {summary['test_loss']:.4f}")
    print("confusion matrix:\n" + format_confusion(matrix))

    written = ["evaluation.json", "confusion_matrix.csv"]
    if figures:
        written += _save_figures(out, model, images, labels, predictions, samples, perturb,
                                 checkpoint_path.parent / "metrics.jsonl")
    print(f"wrote {', '.join(written)} to {out}")
    return summary


def _save_figures(out, model, images, labels, predictions, samples, perturb, metrics_path) -> list[str]:
    with torch.inference_mode():
        recon = model(images[:samples]).reconstruction.float().cpu()
    save_reconstructions(out / "reconstructions.png", images[:samples].cpu(), recon, labels[:samples].cpu(),
                         predictions[:samples].cpu())
    grids = [perturbation_grid(model, images[k]) for k in range(perturb)]
    save_perturbations(out / "perturbation.png", grids,
                       [f"test image {k}: label {int(labels[k])}, pred {int(predictions[k])}" for k in range(perturb)],
                       PERTURBATIONS)
    written = ["reconstructions.png", "perturbation.png"]
    warn = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    records = read_metrics(metrics_path, warn) if metrics_path.is_file() else []
    if any(r["kind"] == "epoch" for r in records):
        save_training_curves(out / "training_curves.png", records)
        written.append("training_curves.png")
    else:
        print(f"no training curves: {metrics_path} is missing or has no epoch record")
    return written


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Evaluate a CapsNet checkpoint on the MNIST (or the fixed MultiMNIST) test set.")
    parser.add_argument("checkpoint", help="a checkpoint written by `fastcaps train` (e.g. runs/mnist/last.pt)")
    parser.add_argument("--out", help="output folder (default: eval/ beside the checkpoint)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--routing", choices=("fused", "eager"),
                        help="fused Triton routing or the eager reference (default: fused on CUDA, eager elsewhere)")
    parser.add_argument("--batch", type=int, default=200, help="evaluation batch size (default 200)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--test-subset", type=int, help="only the first N test images")
    parser.add_argument("--test-pairs", type=int,
                        help="multimnist checkpoints: test pairs per test digit (default: as in training)")
    parser.add_argument("--samples", type=int, default=10, help="images in reconstructions.png (default 10)")
    parser.add_argument("--perturb", type=int, default=3, help="images in perturbation.png (default 3)")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="only the numbers: no PNG, no matplotlib needed")
    return parser


def main(argv=None, prog=None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for name in ("batch", "test_subset", "test_pairs", "samples", "perturb"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return run_reporting_errors(parser.prog, evaluate_checkpoint, args.checkpoint, args.out, args.device, args.routing,
                                args.batch, args.bf16, args.test_subset, args.samples, args.perturb, args.figures,
                                args.test_pairs)


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastcaps.recipes.evaluate"))
