"""The data of a training run behind one interface: MNIST with random shifts, and MultiMNIST pairs.

Both offer batch(idx, generator, global_batch, lo) -> (inputs, labels, reconstruction targets)
for this process's share [lo, lo + len(idx)) of a global batch, with the random draws made
for the whole global batch (so every process draws the same numbers); correct(lengths,
labels); evaluate(model, batch_size, bf16, progress) -> float64 [loss, margin, recon, correct,
images, *extra_metrics] summed over this process's shard of the test set (progress: the label
of a progress bar, or None); and train_size, test_size, input_size, extra_metrics.
"""
import torch

from ..data import draw_shifts, load_mnist, shift_images
from ..data.multimnist import MAX_SHIFT, PAD, SIZE, PairIndex, PartnerSampler, fixed_test_index, make_pairs
from .errors import ConfigError
from .evaluate import predict
from .multimnist import evaluate_pairs, pair_hits

__all__ = ["MNISTData", "MultiMNISTData"]


class MNISTData:
    """The MNIST data of a run: the training images shifted at random by up to max_shift pixels,
    and this process's shard of the test set."""

    input_size = 28
    extra_metrics = ()

    def __init__(self, device, max_shift: int, train_subset=None, test_subset=None, rank: int = 0, world: int = 1):
        self.max_shift = max_shift
        self.images, self.labels = load_mnist("train", device, limit=train_subset)
        test_images, test_labels = load_mnist("test", device, limit=test_subset)
        self.train_size, self.test_size = len(self.labels), len(test_labels)
        # each process evaluates a disjoint shard of the test set; the counts are summed
        self.test_images, self.test_labels = test_images[rank::world], test_labels[rank::world]

    def batch(self, idx, generator, global_batch, lo):
        shifts = draw_shifts(global_batch, self.max_shift, generator)[lo:lo + len(idx)]
        x = shift_images(self.images[idx], shifts, self.max_shift)
        return x, self.labels[idx], x

    @staticmethod
    def correct(lengths, labels):
        return (lengths.argmax(dim=1) == labels).sum()

    def evaluate(self, model, batch_size, bf16=False, progress=None):
        predictions, sums = predict(model, self.test_images, self.test_labels, batch_size, bf16, progress)
        count = torch.tensor(len(self.test_labels), dtype=torch.float64, device=sums.device)
        return torch.cat([sums, torch.stack([(predictions == self.test_labels).sum().double(), count])])


class MultiMNISTData:
    """The data of one MultiMNIST run: the training digits with their fixed
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
        try:
            self.sampler = PartnerSampler(self.labels)
            index = fixed_test_index(test_labels, test_pairs, max_shift)
        except ValueError as err:  # the one way the options can make pairs impossible
            raise ConfigError(f"{err}: --train-subset or --test-subset too small") from None
        base_gen = torch.Generator(device=self.images.device).manual_seed(seed)
        self.base_shift = draw_shifts(self.train_size, max_shift, base_gen)
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
