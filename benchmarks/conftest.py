"""Options of the pytest-benchmark suite (benchmarks/test_routing_bench.py).

Run from the repository root:  python -m pytest benchmarks/ --benchmark-only
"""
import pytest
import torch

from benchmarks import harness

# CUDA: the sweep's batch sizes; CPU (a smoke test only): two tiny ones, no batch-1 recompile
CUDA_BATCHES = ",".join(str(2**p) for p in range(14))  # 1 .. 8192
CPU_BATCHES = "2,8"


def pytest_addoption(parser):
    group = parser.getgroup("fastcaps routing benchmarks")
    group.addoption("--routing-batches", default=None,
                    help=f"comma-separated batch sizes (default {CUDA_BATCHES} on CUDA, {CPU_BATCHES} on the CPU)")
    group.addoption("--routing-precision", choices=sorted(harness.MATMUL_PRECISIONS), default="highest",
                    help="torch.set_float32_matmul_precision for every provider; the fused op gets the matching "
                         "input_precision (highest -> ieee, high -> tf32)")
    group.addoption("--routing-seconds", type=float, default=None,
                    help="target timed seconds per benchmark (default 0.5 on CUDA, 0.05 on the CPU)")
    group.addoption("--routing-iterations", type=int, default=3, help="routing iterations R")


def _batches(config) -> list[int]:
    text = config.getoption("--routing-batches") or (
        CUDA_BATCHES if harness.default_device().type == "cuda" else CPU_BATCHES)
    return [int(b) for b in text.split(",") if b]


def pytest_generate_tests(metafunc):
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", _batches(metafunc.config))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastcaps"] = harness.environment(harness.default_device())


@pytest.fixture(scope="session")
def suite(request):
    """Session state: device, precision settings (applied for the whole session, restored at
    the end), the providers' routing functions and torch.compile's compile records."""
    previous = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    config = request.config
    device = harness.default_device()
    precision = harness.set_precision(config.getoption("--routing-precision"))
    iterations = config.getoption("--routing-iterations")
    state = {
        "device": device,
        "device_name": harness.environment(device)["device"]["name"],
        "precision": precision,
        "iterations": iterations,
        "batches": _batches(config),
        "seconds": config.getoption("--routing-seconds") or (0.5 if device.type == "cuda" else 0.05),
        "routing": {p: harness.make_routing(p, iterations, precision["fused_input_precision"])
                    for p in harness.PROVIDERS},
        "compile_records": {},
    }
    yield state
    torch.set_float32_matmul_precision(previous[0])
    torch.backends.cudnn.allow_tf32 = previous[1]
