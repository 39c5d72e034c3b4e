"""MultiMNIST's model-side recipe: the loss, the paper's metrics, and `fastcaps evaluate` of a MultiMNIST checkpoint.

The pairs themselves are made by fastcaps.data.multimnist. Model and metrics (the authors'
capsule_model._remake and layers.evaluate): CapsNet with input_size 36 (10x10x32 = 3200 input
capsules), margin loss (/ 20, as capsnet_loss) against the two-hot label, the decoder run once
per true label and each reconstruction scored against its own shifted single digit (0.0005 x
SSE each); an example is right when the two longest capsules are exactly its two labels, and
"at least one right" when one of them is.
"""
import json
import time
from pathlib import Path

import torch

from ..data import load_mnist
from ..data.multimnist import PAD, SIZE, TEST_SEED, PairIndex, Pairs, fixed_test_index, make_pairs
from ..models import CapsNet, capsnet_loss
from .checkpoints import load_model
from .console import progress_bar
from .errors import CheckpointError, ConfigError
from .figures import figure_class, have_matplotlib, save_png
from .runs import write_atomic

__all__ = ["pair_hits", "multimnist_loss", "evaluate_pairs", "evaluate_checkpoint", "save_figure"]


def pair_hits(lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: how many of an example's labels ([B, T]) are among its T longest capsules. The
    example is right (the paper's measure) when this is T, "at least one right" when >= 1."""
    top = lengths.topk(labels.shape[1], dim=1).indices
    return (labels[:, :, None] == top[:, None, :]).any(dim=2).sum(dim=1)


def multimnist_loss(output, pairs: Pairs):
    """margin loss against the two-hot label (weighted as capsnet_loss does: the authors' 1/20)
    + 0.0005 x SSE of each reconstruction against its own shifted digit; output must come from model(pairs.images, pairs.labels). Returns
    (total, margin, reconstruction)."""
    return capsnet_loss(output, pairs.singles, pairs.labels)


@torch.inference_mode()
def evaluate_pairs(model, images, labels, index: PairIndex, batch_size: int, bf16: bool = False,
                   progress: str | None = None):
    """Scores the pairs `index` of a split: float64 [loss, margin, recon, right, images, at least
    one right] summed over the pairs (the losses with the decoder fed the true labels, as in the
    authors' code), and the hits per pair ([N] uint8: 0, 1 or 2 labels among the two longest).
    progress: the label of a progress bar over the pairs (shown on a terminal only)."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=images.device)
    hits = torch.empty(len(index), dtype=torch.uint8, device=images.device)
    with progress_bar(len(index), progress, unit="pair", disable=progress is None) as bar:
        for start in range(0, len(index), batch_size):
            pairs = make_pairs(images, labels, index.select(slice(start, start + batch_size)))
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(pairs.images, pairs.labels)
                losses = multimnist_loss(out, pairs)
            n = len(pairs.labels)
            found = pair_hits(out.lengths, pairs.labels)
            hits[start:start + n] = found.to(torch.uint8)
            sums += torch.cat([torch.stack(losses).double() * n,
                               torch.stack([(found == 2).sum(), found.new_tensor(n), (found >= 1).sum()]).double()])
            bar.update(n)
    return sums, hits


def evaluate_checkpoint(checkpoint: dict, checkpoint_path: Path, out: Path, device, routing: str, batch_size: int,
                        bf16: bool, test_subset, test_pairs: int, samples: int, figures: bool) -> dict:
    """`fastcaps evaluate` for a MultiMNIST checkpoint: the paper's error (an example is right
    only when the two longest capsules are its two labels), the "at least one right" rate, and
    the Figure 5 picture. Returns the summary written to evaluation.json."""
    config = checkpoint["config"]
    if not 0 <= config["max_shift"] <= PAD:
        raise CheckpointError(f"not a fastcaps checkpoint: {checkpoint_path} (damaged: MultiMNIST max_shift "
                              f"{config['max_shift']})")
    model = load_model(checkpoint, routing, device, checkpoint_path, input_size=SIZE)
    images, labels = load_mnist("test", device, limit=test_subset)
    try:
        index = fixed_test_index(labels, test_pairs, config["max_shift"]).to(device)
    except ValueError as err:  # too few test digits to pair
        raise ConfigError(f"{err}: --test-subset too small") from None

    start = time.perf_counter()
    sums, hits = evaluate_pairs(model, images, labels, index, batch_size, bf16, progress="evaluating")
    loss, margin, recon, right, n, one_right = sums.tolist()
    n = int(n)
    summary = {"checkpoint": str(checkpoint_path), "dataset": "multimnist", "step": checkpoint["step"],
               "test_digits": len(labels), "pairs_per_digit": test_pairs, "pairs": n, "test_seed": TEST_SEED,
               "test_error": 100 * (n - right) / n, "test_acc": 100 * right / n,
               "test_one_right": 100 * one_right / n, "test_loss": loss / n, "test_margin": margin / n,
               "test_recon": recon / n, "eval_s": time.perf_counter() - start,
               "hits_histogram": torch.bincount(hits.long(), minlength=3).tolist()}
    write_atomic(out / "evaluation.json", json.dumps(summary, indent=1) + "\n")
    print(f"MultiMNIST test error {summary['test_error']:.2f}% ({n - int(right)} of {n} pairs without both "
          f"digits among the two longest capsules); at least one digit right: {summary['test_one_right']:.2f}%; "
          f"loss {summary['test_loss']:.4f}")
    written = ["evaluation.json"]
    if figures and not have_matplotlib():
        print("no figure: multimnist.png needs matplotlib (pip install 'fastcaps[viz]'); the numbers are written")
    elif figures:
        # one pair per base digit for variety (the pairs of a base are consecutive), then failures
        shown = torch.arange(0, n, test_pairs, device=hits.device)[:samples]
        failures = (hits < 2).nonzero().flatten()
        shown = torch.cat([shown, failures[~torch.isin(failures, shown)][:max(1, samples // 2)]])
        save_figure(out / "multimnist.png", model, images, labels, index.select(shown))
        written.append("multimnist.png")
    print(f"wrote {', '.join(written)} to {out}")
    return summary


@torch.inference_mode()
def save_figure(path, model: CapsNet, images, labels, index: PairIndex):
    """The paper's Figure 5: each column an input pair (top) and, below, the reconstructions
    from the two longest capsules, the first in red and the second in green. Titles give the
    labels L and the capsules R used; a * marks pairs that are wrong."""
    Figure = figure_class()
    model.eval()
    pairs = make_pairs(images, labels, index)
    lengths = model(pairs.images).lengths
    chosen = lengths.topk(2, dim=1).indices                                        # [B, 2]: R
    recon = model(pairs.images, chosen).reconstruction.float().clamp(0, 1).cpu()   # [B, 2, 1, S, S]
    rgb = torch.stack([recon[:, 0, 0], recon[:, 1, 0], torch.zeros_like(recon[:, 0, 0])], dim=-1)
    right = pair_hits(lengths, pairs.labels) == 2
    n = len(index)
    fig = Figure(figsize=(1.15 * n, 2.8))
    axes = fig.subplots(2, n, squeeze=False)
    for k in range(n):
        axes[0, k].imshow(pairs.images[k, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, k].imshow(rgb[k].numpy())
        (la, lb), (ra, rb) = pairs.labels[k].tolist(), chosen[k].tolist()
        axes[0, k].set_title(f"L:({la},{lb})", fontsize=8)
        axes[1, k].set_title(f"R:({ra},{rb})" + ("" if right[k] else " *"), fontsize=8)
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("red, green")
    save_png(fig, path)
