"""Training checkpoints: the format, loading with every field checked, the model and random state they hold.

- `load_checkpoint`: `torch.load(weights_only=True)` (a crafted pickle cannot run code), then
  the format, the configuration and the tensor shapes are checked before anything is used.
- `load_model`: the model of a checkpoint (`build_model`: CapsNet or ConvCapsNet), with its
  architecture and routing iterations.
"""
import errno
import math
import random
from pathlib import Path

import numpy as np
import torch

from ..models import AUTHORS_ARCH, LEGACY_ARCH, CapsNet, ConvCapsNet
from .errors import CheckpointError

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "check_model_state", "load_model",
           "MODELS", "build_model", "rng_state", "set_rng_state", "check_optimizer_state"]

CHECKPOINT_FORMAT = "fastcaps-train-checkpoint"
CHECKPOINT_VERSION = 1
# `fastcaps train --model`, recorded in the checkpoint's config ("model"; absent: capsnet)
MODELS = ("capsnet", "convcaps")


# key -> accepted types of the training state; anything else is not a checkpoint of ours
_CHECKPOINT_KEYS = {
    "config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "step": int, "epoch": int,
    "epoch_step": int, "elapsed_s": (int, float), "epoch_train_s": (int, float), "epoch_sums": torch.Tensor,
    "milestones": dict, "rng": dict,
}


# recipe options a checkpoint must carry, with their types (checked before they are compared or used)
_CONFIG_KEYS = {
    "batch": int, "lr": (int, float), "lr_decay": (int, float), "lr_decay_steps": int, "min_lr": (int, float),
    "iterations": int, "max_shift": int, "seed": int, "train_subset": (int, type(None)), "routing": str,
    "device_type": str,
}


def load_checkpoint(path) -> dict:
    """A checkpoint of `fastcaps train`, on the CPU, checked: the file is a torch zip archive
    that loads with weights_only=True (no code can run), of our format and version, with every
    key of the training state and a valid configuration. Raises FileNotFoundError or
    CheckpointError with one line saying what is wrong. The model's tensor shapes are checked
    by check_model_state, against the model that will load them."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: pass the checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    bad = f"not a fastcaps checkpoint: {path}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EISDIR):
            raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
        raise CheckpointError(f"{bad} (unreadable: {err})") from None
    except Exception as err:  # noqa: BLE001 - whatever the loader says of a damaged or foreign file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" in reason.lower() or "unsupported global" in str(err).lower():
            reason = "it holds Python objects other than tensors and plain data, which are never loaded"
        elif path.stat().st_size == 0:
            reason = "the file is empty"
        raise CheckpointError(f"{bad} ({reason[:200]})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{bad} (it holds a {type(checkpoint).__name__}, not a training checkpoint)")
    # checkpoints of fastcaps 0.1.0 carried no format fields; their content is that of version 1
    legacy = "format" not in checkpoint and "config" in checkpoint and "model" in checkpoint
    if not legacy and checkpoint.get("format") != CHECKPOINT_FORMAT:
        hint = " (a bare state_dict? fastcaps evaluate and --resume need the last.pt that fastcaps train writes)" \
            if all(isinstance(v, torch.Tensor) for v in checkpoint.values()) else ""
        raise CheckpointError(f"{bad}{hint}")
    version = CHECKPOINT_VERSION if legacy else checkpoint.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r}, this fastcaps reads version "
                              f"{CHECKPOINT_VERSION}: use the fastcaps that wrote it")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool):
            raise CheckpointError(f"{bad} (damaged: {key!r} is missing or has the wrong type)")
    config = checkpoint["config"]
    for key, kind in _CONFIG_KEYS.items():
        if key not in config or not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise CheckpointError(f"{bad} (damaged: config {key!r} is missing or has the wrong type)")
    if config["iterations"] < 1 or config["batch"] < 1 or not all(
            math.isfinite(config[k]) for k in ("lr", "lr_decay", "min_lr")):
        raise CheckpointError(f"{bad} (damaged: invalid config {config})")
    # --dataset multimnist (absent: mnist) evaluates config["test_pairs"] pairs per test digit
    if config.get("model", "capsnet") not in MODELS:
        raise CheckpointError(f"{bad} (damaged: unknown model {config['model']!r} in its config)")
    dataset = config.get("dataset", "mnist")
    if dataset not in ("mnist", "multimnist") or dataset == "multimnist" and not (
            type(config.get("test_pairs")) is int and config["test_pairs"] >= 1):
        raise CheckpointError(f"{bad} (damaged: invalid dataset {dataset!r} or test pairs in its config)")
    if min(checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]) < 0:
        raise CheckpointError(f"{bad} (damaged: negative step or epoch)")
    rng = checkpoint["rng"]
    if not all(isinstance(rng.get(k), torch.Tensor) and rng[k].dtype == torch.uint8
               for k in ("order_epoch_start", "shift")) or not isinstance(rng.get("global"), dict):
        raise CheckpointError(f"{bad} (damaged: the random generator states are missing or malformed)")
    if not all(isinstance(v, torch.Tensor) for v in checkpoint["model"].values()):
        raise CheckpointError(f"{bad} (damaged: the model state holds values that are not tensors)")
    return checkpoint


def check_model_state(state: dict, model: torch.nn.Module, path) -> None:
    """CheckpointError unless `state` has exactly the model's keys, each with the model's shape."""
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"] if extra else [])
        raise CheckpointError(f"{path} is not a checkpoint of this CapsNet: {'; '.join(parts)}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(f"{path} holds a model of another size: {name} is {list(state[name].shape)}, "
                                  f"this CapsNet has {list(tensor.shape)}")


def build_model(name: str, routing: str, iterations: int, input_size: int = 28, arch: dict = AUTHORS_ARCH):
    """The model `fastcaps train --model NAME` trains: "capsnet", CapsNet with `arch`, or
    "convcaps", ConvCapsNet (which has no variants)."""
    if name == "convcaps":
        return ConvCapsNet(routing=routing, iterations=iterations, input_size=input_size)
    return CapsNet(routing=routing, iterations=iterations, input_size=input_size, **arch)


def load_model(checkpoint: dict, routing: str, device, path="checkpoint", input_size: int = 28) -> CapsNet:
    """The model of a training checkpoint (from load_checkpoint), with its number of routing
    iterations and its architecture (a CapsNet checkpoint of fastcaps 0.1 has none: it is
    LEGACY_ARCH), for input_size x input_size images (MultiMNIST: 36); a CheckpointError if its
    tensors do not fit this model."""
    config = checkpoint["config"]
    name = config.get("model", "capsnet")
    arch = config.get("arch", LEGACY_ARCH)
    if name == "capsnet" and arch not in (AUTHORS_ARCH, LEGACY_ARCH):
        raise CheckpointError(f"not a fastcaps checkpoint: {path} (damaged: unknown model architecture {arch!r})")
    model = build_model(name, routing, config["iterations"], input_size, arch).to(device)
    check_model_state(checkpoint["model"], model, path)
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def rng_state(device) -> dict:
    """The global random states (torch, Python, numpy, and CUDA on a GPU) as plain data for a checkpoint."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (algorithm, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    """Restore what rng_state saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    algorithm, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_optimizer_state(optimizer, model):
    """Adam's moments must have the shapes of the parameters they belong to (load_state_dict
    does not check, and the first step would fail)."""
    for param in model.parameters():
        for name, value in optimizer.state.get(param, {}).items():
            if name != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise ValueError(f"optimizer state {name} has shape {list(value.shape)}, "
                                 f"its parameter {list(param.shape)}")
