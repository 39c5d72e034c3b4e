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
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .shifts import draw_shifts

__all__ = ["SIZE", "PAD", "MAX_SHIFT", "TEST_SEED", "Pairs", "PairIndex", "place_digits", "PartnerSampler",
           "make_pairs", "fixed_test_index"]

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
            raise ValueError("MultiMNIST needs digits of at least two classes")

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
