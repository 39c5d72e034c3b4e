"""Run folders, checkpoints and the commands' error boundary.

- `run_reporting_errors`: the one place where the commands turn what a user or a disk can do
  (a bad option, a missing or foreign file, a full disk, Ctrl-C, a diverged training) into a
  one-line `prog: error: ...` and an exit code, never a traceback.
- `write_atomic`: a file is replaced whole or not at all, and no temporary file stays behind.
- `RunLock`: one `fastcaps train` per run folder (an flock, released by the kernel when the
  process dies, so a crashed run never leaves a stale lock).
- `load_checkpoint`: `torch.load(weights_only=True)` (a crafted pickle cannot run code), then
  the format, the configuration and the tensor shapes are checked before anything is used.
- `read_metrics`: metrics.jsonl, with the torn last line of a crash dropped with a warning.
"""
import errno
import fcntl
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["ConfigError", "CheckpointError", "TrainingStopped", "run_reporting_errors", "write_atomic",
           "save_atomic", "RunLock", "prepare_out_dir", "load_checkpoint", "check_model_state", "read_metrics",
           "progress_bar", "parse_device", "resolve_routing", "MetricsLog", "tensorboard_writer", "require_tensorboard",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "EXIT_USAGE", "EXIT_FAILED",
           "EXIT_INTERRUPTED"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # 130: 128 + SIGINT, as shells report it
CHECKPOINT_FORMAT = "fastcaps-train-checkpoint"
CHECKPOINT_VERSION = 1
LOCK_NAME = ".lock"


class ConfigError(ValueError):
    """A bad option or input that the command line reports as an error, without a traceback."""


class CheckpointError(ConfigError):
    """A file that is not a usable fastcaps checkpoint."""


class TrainingStopped(RuntimeError):
    """Training stopped early (interrupted, or the loss stopped being finite); the message says
    where the last good checkpoint is. exit_code: what the command returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _os_error_text(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}: free some space and run the command again"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}"
    return f"{err.strerror or err}{where}"


def run_reporting_errors(prog: str, fn, *args, **kwargs) -> int:
    """Run a command's body and return its exit code: 0; 2 for a bad option or input
    (ConfigError, a missing file); 1 for a failure of the machine (disk, memory) or a stopped
    training; 130 for Ctrl-C. Each is reported as one line on stderr."""
    from .routing import TritonMissingError  # the fused op's own error: install Triton or use eager
    try:
        fn(*args, **kwargs)
    except (ConfigError, FileNotFoundError, TritonMissingError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except torch.OutOfMemoryError:
        print(f"{prog}: error: out of memory on the device: use a smaller batch (--batch, --eval-batch)",
              file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:
        print(f"{prog}: error: {_os_error_text(err)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# ---------------------------------------------------------------------------------- files

def write_atomic(path, data: bytes | str):
    """Replace `path` with `data` whole or not at all: written to a temporary file beside it,
    flushed to the disk, then renamed over it. On any failure (a full disk, Ctrl-C) the
    temporary file is removed and the old file, if any, is untouched."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself reaches the disk with the folder's entry
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the data are already on the disk
    finally:
        os.close(dir_fd)


def save_atomic(obj, path):
    """torch.save, atomically. Serialised in memory first: a full disk then surfaces as the
    OSError 'No space left on device' of a plain write, not as an error inside the zip writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


class RunLock:
    """An exclusive lock on a run folder: the second process that tries it gets a ConfigError.
    The lock is an flock on <folder>/.lock, dropped by the kernel when the process ends, however
    it ends; the file itself stays (an flock on a file that is removed would not exclude)."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by another fastcaps train"
                              + (f" (process {holder})" if holder else "")
                              + ": wait for it to finish, or pass another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def prepare_out_dir(folder, option: str = "--out") -> Path:
    """Create the output folder (and its parents) now, so that a path that names a file, or that
    cannot be created or written, is a one-line error before any work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file, not a folder: pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {folder}: cannot create the folder: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder}: the folder is not writable")
    return folder


# ---------------------------------------------------------------------------------- checkpoints

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


# ---------------------------------------------------------------------------------- metrics

def read_metrics(path, warn=None) -> list[dict]:
    """The records of a metrics.jsonl. A last line that is cut short (the process died while
    writing it) is dropped with a warning (warn(message), default warnings.warn); a damaged line
    before the last is a ConfigError."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    # a complete file ends with "\n", so its last element is ""; a torn last record is not
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "kind" not in record or "step" not in record:
                raise ValueError("not a metrics record")
        except ValueError as err:
            if index == len(numbered) - 1:
                message = (f"{path}: dropped the last line, which is incomplete (the run that wrote it "
                           f"stopped while writing it)")
                if warn is None:
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                else:
                    warn(message)
                break
            raise ConfigError(f"{path}: line {number} is damaged ({err}): fix or remove that line") from None
        records.append(record)
    return records


# ---------------------------------------------------------------------------------- devices, routing

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
    from .routing import TritonMissingError, _load_kernels, kernels_available
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


# ---------------------------------------------------------------------------------- metrics log

class MetricsLog:
    """Appends records to metrics.jsonl (one JSON object a line, flushed at once) and, with a
    TensorBoard folder, mirrors every number of every record as a scalar `<kind>/<key>` at the
    record's step."""

    def __init__(self, path, tensorboard_dir=None, purge_step: int | None = None):
        self.path = Path(path)
        self.writer = None
        if tensorboard_dir is not None:
            self.writer = tensorboard_writer(tensorboard_dir, purge_step)

    def append(self, record: dict):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def require_tensorboard():
    """torch.utils.tensorboard's SummaryWriter class, or a ConfigError naming the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'fastcaps[tensorboard]' "
                          "(or pip install tensorboard)") from None
    return SummaryWriter


def tensorboard_writer(folder, purge_step=None):
    """A SummaryWriter on `folder`. purge_step: a resumed run drops the events that the run
    before it wrote after its checkpoint."""
    return require_tensorboard()(log_dir=str(folder), purge_step=purge_step)


# ---------------------------------------------------------------------------------- progress

def progress_bar(total: int, desc: str | None, disable: bool = False, **kwargs):
    """A tqdm progress bar on stderr, disabled (a no-op object) unless both stdout and stderr
    are terminals: logs and pipes get the plain lines only. It disappears when closed."""
    from tqdm import tqdm
    enabled = not disable and sys.stdout.isatty() and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)
