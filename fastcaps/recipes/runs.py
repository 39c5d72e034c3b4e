"""Run folders: one run of one command per folder, files written whole or not at all, the metrics log.

- `run_folder`: what `fastcaps train` and `fastcaps table1` do before they write anything into
  their --out: create it, lock it for this process (`RunLock`), and refuse a folder that holds
  the files of another command's run.
- `write_atomic`: a file is replaced whole or not at all, and no temporary file stays behind.
- `RunLock`: one command per run folder (an flock, released by the kernel when the process
  dies, so a crashed run never leaves a stale lock).
- `read_metrics`: metrics.jsonl, with the torn last line of a crash dropped with a warning.
"""
import contextlib
import fcntl
import io
import json
import os
import warnings
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = ["write_atomic", "save_atomic", "RunLock", "prepare_out_dir", "run_folder", "RUN_FILES", "read_metrics",
           "MetricsLog", "tensorboard_writer", "require_tensorboard"]

LOCK_NAME = ".lock"
# the files that show which command's run a folder holds (any one of them is enough)
RUN_FILES = {"train": ("last.pt", "metrics.jsonl"), "table1": ("table1.json", "table1.md")}


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
    """An exclusive lock on a run folder: the second process that tries it gets a ConfigError
    naming the command and the process that hold it. The lock is an flock on <folder>/.lock,
    dropped by the kernel when the process ends, however it ends; the file itself stays (an
    flock on a file that is removed would not exclude)."""

    def __init__(self, folder, command: str = "train"):
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, command = os.pread(fd, 64, 0).decode("ascii", "replace").strip().partition(" ")
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by another fastcaps {command or 'command'}"
                              + (f" (process {pid})" if pid else "")
                              + ": wait for it to finish, or pass another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
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


@contextlib.contextmanager
def run_folder(folder, command: str, option: str = "--out"):
    """Claim `folder` for one run of `command` ("train" or "table1") for the duration of the block:
    create it (prepare_out_dir), hold its RunLock, and refuse (ConfigError) a folder that holds
    the run of another command. Whether the command may continue or replace a run of its own
    that is already there (--resume, --overwrite, the same recipe) is for the command to decide,
    inside the block, under the lock. Yields the folder as a Path."""
    if command not in RUN_FILES:
        raise ValueError(f"command must be one of {sorted(RUN_FILES)}, got {command!r}")
    folder = prepare_out_dir(folder, option)
    with RunLock(folder, command):
        for other, names in RUN_FILES.items():
            found = [name for name in names if other != command and (folder / name).exists()]
            if found:
                raise ConfigError(f"{option} {folder} holds a `fastcaps {other}` run ({', '.join(found)}): "
                                  f"pass another {option}")
        yield folder


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
