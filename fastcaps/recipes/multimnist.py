"""MultiMNIST (Sabour et al. 2017, section 6): pairs of overlapping MNIST digits, made on the fly.

The construction of the authors' research/capsules/input_data/mnist/mnist_shift.py
(shift_write_multi_mnist), with the paper's sizes:
- each 28x28 digit is padded with 4 zero pixels to 36x36 and shifted by up to 4 pixels along
  each axis (integers uniform in [-4, 4], zeros shifted in: the digit never leaves the image);
- a base digit is paired with a digit of a different class from the same split; the base
  keeps one shift for all its pairs and each partner gets a fresh shift;
- the pair is merged as min(a + b, 1), pixel by pixel;
- an example keeps both labels (base first) and both shifted single digits, the targets of the
  two reconstructions.

What differs from the authors' files, and why: nothing is stored (the paper's 60M training
pairs would be 78 GB of floats): pairs are drawn on the fly, on the device of the digits,
from seeded torch.Generators. Partners are drawn with replacement (the authors draw each
base's partners without replacement; among ~9000 candidates the difference is immaterial).
The training stream takes every training digit once per epoch as a base, with its own fixed
shift (drawn once from the seed), and draws its partner and the partner's shift at each use.
The test set is fixed: K pairs per test digit (default 100; the paper's 1K would be 10M pairs)
drawn on the CPU from a constant seed, so it is the same on every machine and in every run,
and it is stored as indices and shifts only; its images are made batch by batch.

Model and metrics (the authors' capsule_model._remake and layers.evaluate): CapsNet with
input_size 36 (10x10x32 = 3200 input capsules), margin loss (/ 20, as capsnet_loss) against
the two-hot label, the
decoder run once per true label and each reconstruction scored against its own shifted single
digit (0.0005 x SSE each); an example is right when the two longest capsules are exactly its
two labels, and "at least one right" when one of them is.
"""
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .data import load_mnist
from .evaluate import _figure_module, load_model
from .model import CapsNet, capsnet_loss
from .runio import CheckpointError, ConfigError, progress_bar, write_atomic

__all__ = ["SIZE", "PAD", "MAX_SHIFT", "TEST_SEED", "Pairs", "PairIndex", "place_digits", "draw_shifts",
           "PartnerSampler", "make_pairs", "fixed_test_index", "pair_hits", "multimnist_loss", "MultiMNISTData",
           "evaluate_pairs", "evaluate_checkpoint", "save_figure"]

PAD = 4                  # 28x28 -> 36x36
SIZE = 28 + 2 * PAD
MAX_SHIFT = 4            # the paper's "up to 4 pixels in each direction"
TEST_SEED = 20171026     # the fixed test set (the paper's arXiv date); not the training seed


class Pairs(NamedTuple):
    images: torch.Tensor   # [B, 1, 36, 36], min(base + partner, 1)
    singles: torch.Tensor  # [B, 2, 1, 36, 36], the shifted base and partner digits
    labels: torch.Tensor   # [B, 2], base class, partner class (always different)


class PairIndex(NamedTuple):
    """A set of pairs as indices into a split and shifts: [N] base, [N] partner, [N, 2] each shift."""
    base: torch.Tensor
    partner: torch.Tensor
    base_shift: torch.Tensor
    partner_shift: torch.Tensor

    def __len__(self):
        return len(self.base)

    def select(self, which) -> "PairIndex":
        return PairIndex(*(t[which] for t in self))

    def to(self, device) -> "PairIndex":
        return PairIndex(*(t.to(device) for t in self))


def draw_shifts(n: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 2] integer (dy, dx) shifts, uniform over [-max_shift, max_shift], on the generator's device."""
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator, device=generator.device)


def place_digits(digits: torch.Tensor, shifts: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Pad [N, C, H, W] digits with `pad` zeros on every side and shift each by its (dy, dx):
    out[n, :, y, x] = digits[n, :, y - pad - dy, x - pad - dx], zero outside. Positive shifts move
    the digit down and right (np.roll in the authors' shift_2d). One gather, no host sync: every
    shift must lie in [-pad, pad], which draw_shifts(max_shift <= pad) guarantees."""
    if digits.dim() != 4 or shifts.shape != (digits.shape[0], 2):
        raise ValueError(f"expected digits [N, C, H, W] and shifts [N, 2], got {tuple(digits.shape)} "
                         f"and {tuple(shifts.shape)}")
    n, c, h, w = digits.shape
    margin = 2 * pad  # zero border wide enough for the padding plus the largest shift
    padded = F.pad(digits, (margin,) * 4).flatten(2)                                 # [N, C, (H+4p)(W+4p)]
    rows = torch.arange(h + 2 * pad, device=digits.device) + pad - shifts[:, :1]      # [N, H+2p]
    cols = torch.arange(w + 2 * pad, device=digits.device) + pad - shifts[:, 1:]      # [N, W+2p]
    index = rows[:, :, None] * (w + 2 * margin) + cols[:, None, :]
    out = padded.gather(2, index.view(n, 1, -1).expand(n, c, -1))
    return out.view(n, c, h + 2 * pad, w + 2 * pad)


class PartnerSampler:
    """Draws for each base digit a partner uniformly among the digits of the split whose class
    differs from the base's: with the split sorted by class, the digits of other classes are
    the positions outside the base class's block, so a uniform rank among them is one multiply
    and one conditional jump over the block (vectorised, on the labels' device)."""

    def __init__(self, labels: torch.Tensor, num_classes: int = 10):
        if labels.dim() != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty [N] tensor, got shape {tuple(labels.shape)}")
        self.order = labels.argsort(stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = self.counts.cumsum(0) - self.counts
        self.size = len(labels)
        if int((self.counts > 0).sum()) < 2:
            raise ConfigError("MultiMNIST needs digits of at least two classes: --train-subset or --test-subset "
                              "too small")

    def __call__(self, base_labels: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Partner indices [B] for base classes [B], given uniforms [B] in [0, 1) (float64)."""
        count = self.counts[base_labels]
        others = self.size - count
        rank = (uniforms * others).long().clamp_(max=others - 1)
        rank += count * (rank >= self.starts[base_labels])
        return self.order[rank]


def make_pairs(images: torch.Tensor, labels: torch.Tensor, index: PairIndex, pad: int = PAD) -> Pairs:
    """The merged images, the shifted singles and the labels of the pairs `index` of a split."""
    n = len(index)
    digits = torch.cat([images[index.base], images[index.partner]])
    shifted = place_digits(digits, torch.cat([index.base_shift, index.partner_shift]), pad)
    singles = shifted.unflatten(0, (2, n)).transpose(0, 1)                               # [B, 2, 1, S, S]
    merged = singles.sum(dim=1).clamp_(max=1)
    return Pairs(merged, singles, torch.stack([labels[index.base], labels[index.partner]], dim=1))


def fixed_test_index(labels: torch.Tensor, pairs_per_digit: int, max_shift: int = MAX_SHIFT,
                    seed: int = TEST_SEED) -> PairIndex:
    """The fixed test set: `pairs_per_digit` pairs with every digit of the split as the base
    (pairs k*K .. k*K+K-1 have base k), drawn on the CPU from `seed`, returned on the CPU."""
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    base_shift = draw_shifts(n, max_shift, gen)                 # one shift per base digit, for all its pairs
    base = torch.arange(n).repeat_interleave(pairs_per_digit)
    partner = PartnerSampler(labels)(labels[base], torch.rand(len(base), dtype=torch.float64, generator=gen))
    return PairIndex(base, partner, base_shift[base], draw_shifts(len(base), max_shift, gen))


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


class MultiMNISTData:
    """The data of one MultiMNIST run, for fastcaps.train: the training digits with their fixed
    base shifts, and this process's shard of the fixed test pairs.

    batch(idx, generator, global_batch, lo): the pairs whose bases are the training digits idx,
    this process's share [lo, lo + len(idx)) of a global batch; the partners and their shifts
    are drawn for the whole global batch from `generator` (on the data's device), so that every
    process draws the same numbers and the generator's state alone resumes the stream."""

    input_size = SIZE
    extra_metrics = ("test_one_right",)

    def __init__(self, device, seed: int, max_shift: int = MAX_SHIFT, train_subset=None, test_subset=None,
                 test_pairs: int = 100, rank: int = 0, world: int = 1):
        if not 0 <= max_shift <= PAD:
            raise ValueError(f"MultiMNIST shifts must lie within the {PAD}-pixel padding, got max_shift {max_shift}")
        self.max_shift = max_shift
        self.images, self.labels = load_mnist("train", device, limit=train_subset)
        test_images, test_labels = load_mnist("test", device, limit=test_subset)
        self.train_size = len(self.labels)
        self.sampler = PartnerSampler(self.labels)
        base_gen = torch.Generator(device=self.images.device).manual_seed(seed)
        self.base_shift = draw_shifts(self.train_size, max_shift, base_gen)
        index = fixed_test_index(test_labels, test_pairs, max_shift)
        self.test_size = len(index)
        self.test = (test_images, test_labels, index.select(slice(rank, None, world)).to(device))

    def batch(self, idx: torch.Tensor, generator: torch.Generator, global_batch: int, lo: int):
        """(inputs, labels [B, 2], reconstruction targets [B, 2, 1, 36, 36])."""
        share = slice(lo, lo + len(idx))
        uniforms = torch.rand(global_batch, dtype=torch.float64, generator=generator, device=generator.device)
        partner_shift = draw_shifts(global_batch, self.max_shift, generator)[share]
        partner = self.sampler(self.labels[idx], uniforms[share])
        pairs = make_pairs(self.images, self.labels, PairIndex(idx, partner, self.base_shift[idx], partner_shift))
        return pairs.images, pairs.labels, pairs.singles

    @staticmethod
    def correct(lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (pair_hits(lengths, labels) == labels.shape[1]).sum()

    def evaluate(self, model, batch_size: int, bf16: bool = False, progress: str | None = None) -> torch.Tensor:
        """float64 [loss, margin, recon, right, images, one right], summed over this shard."""
        sums, _ = evaluate_pairs(model, *self.test, batch_size, bf16, progress)
        return sums


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


# ---------------------------------------------------------------------------- fastcaps evaluate

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
    index = fixed_test_index(labels, test_pairs, config["max_shift"]).to(device)

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
    if figures and not _have_matplotlib():
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


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@torch.inference_mode()
def save_figure(path, model: CapsNet, images, labels, index: PairIndex):
    """The paper's Figure 5: each column an input pair (top) and, below, the reconstructions
    from the two longest capsules, the first in red and the second in green. Titles give the
    labels L and the capsules R used; a * marks pairs that are wrong."""
    Figure = _figure_module()
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
    fig.savefig(path, dpi=100, bbox_inches="tight")
