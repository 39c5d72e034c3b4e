"""Test setup: kernels run compiled on CUDA when a GPU is present, else in Triton's interpreter.

TRITON_INTERPRET must be set before fastcaps (and so Triton's jit) is imported; this file is
loaded by pytest before any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def _start_rank(item):
    """The sm_90 compile tests first, the MNIST-shape ones (up to 2 minutes each, one ptxas
    subprocess) before the rest: started last, one of them would hold up the end of a
    parallel run while the other worker idles."""
    if "test_sm90_compile" not in item.nodeid:
        return 2
    return 0 if "1152x" in item.nodeid else 1


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_rank)  # stable: the order within each rank stays the file order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run in this session: 'cuda', or 'cpu' under the interpreter."""
    return KERNEL_DEVICE
