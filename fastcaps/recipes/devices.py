"""Devices and processes of a command: the --device option, the routing that can run there, torchrun's process group."""
import os

import torch
import torch.distributed as dist

from ..ops.routing import TritonMissingError, _load_kernels, kernels_available
from .errors import ConfigError

__all__ = ["parse_device", "resolve_routing", "setup_processes", "all_sum", "sync"]


def parse_device(text: str | None, option: str = "--device") -> torch.device:
    """The device an option names (default: cuda when available, else cpu); a ConfigError for
    anything fastcaps cannot run on (a typo, meta, mps, a GPU that is not there)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{option} {text!r}: {str(err).splitlines()[0]}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option} {text}: fastcaps runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {text}: no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"cuda:{device.index} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return device


def resolve_routing(requested: str | None, device: torch.device) -> tuple[str, str | None]:
    """(the routing that will run, a note for the user or None). The default is fused on CUDA
    (where Triton is installed) and eager elsewhere. An explicit fused runs where the Triton
    kernels do (CUDA, or the CPU under TRITON_INTERPRET=1) and becomes eager elsewhere, with a
    note saying so, so that what is printed and recorded is what ran. Without Triton, an
    explicit fused is a ConfigError naming the fix."""
    if requested == "eager" or (requested is None and device.type != "cuda"):
        return "eager", None
    if requested == "fused":
        try:
            _load_kernels()
        except TritonMissingError as err:
            raise ConfigError(f"--routing fused: {err}") from None
    if kernels_available(device):
        return "fused", None
    if requested is None:
        return "eager", "Triton is not installed: using the eager routing (pip install triton for the fused one)"
    return "eager", (f"--routing fused: the Triton kernels do not run on {device.type} tensors here (they run "
                     "on CUDA, or on the CPU with TRITON_INTERPRET=1); using the eager routing")


def setup_processes(device_arg):
    """(rank, world size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = parse_device(device_arg)
    if device.type == "cuda":
        # an explicit index: torch.cuda.set_device, DDP and NCCL refuse a bare "cuda"
        if world > 1:
            index = int(os.environ["LOCAL_RANK"])
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"cuda:{index} does not exist: {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if world > 1:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return rank, world, device


def all_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `tensor` in place over the processes of a torchrun run (a no-op for one process)."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def sync(device):
    """Wait for the device's queued work; only for timing: kernels run asynchronously on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
