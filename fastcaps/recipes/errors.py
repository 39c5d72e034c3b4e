"""The commands' error boundary: the errors a command reports in one line, and the exit codes.

`run_reporting_errors` is the one place where the commands turn what a user or a disk can do
(a bad option, a missing or foreign file, a full disk, Ctrl-C, a diverged training) into a
one-line `prog: error: ...` and an exit code, never a traceback.
"""
import errno
import sys

import torch

from ..ops.routing import TritonMissingError

__all__ = ["ConfigError", "CheckpointError", "TrainingStopped", "run_reporting_errors", "EXIT_USAGE", "EXIT_FAILED",
           "EXIT_INTERRUPTED"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # 130: 128 + SIGINT, as shells report it


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
    try:
        fn(*args, **kwargs)
    except (ConfigError, FileNotFoundError, TritonMissingError) as err:  # TritonMissingError: install it or use eager
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
