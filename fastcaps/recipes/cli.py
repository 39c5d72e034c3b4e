"""The `fastcaps` command: `fastcaps train ...` and `fastcaps evaluate CHECKPOINT ...`."""
import importlib.metadata
import importlib.util
import sys

from .. import __version__
from . import evaluate, table1, train

COMMANDS = {"train": (train.main, "train the CapsNet on MNIST or MultiMNIST (the paper's recipe; --quick: a "
                                   "short CPU run)"),
            "evaluate": (evaluate.main, "test error, confusion matrix and figures of a checkpoint"),
            "table1": (table1.main, "the paper's Table 1: baseline CNN and CapsNet variants, mean +- std over seeds")}
USAGE = f"usage: fastcaps [--version] {{{','.join(COMMANDS)}}} [options]   (fastcaps COMMAND -h: its options)\n\n" + \
    "\n".join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())


def version_text() -> str:
    """fastcaps' version and those of what it runs on (Triton is read without importing it)."""
    import torch
    try:
        found = importlib.util.find_spec("triton") is not None
        triton = importlib.metadata.version("triton") if found else None
    except (ImportError, ValueError):
        triton = None
    triton = triton or "not installed (the fused routing needs it)"
    return f"fastcaps {__version__} (torch {torch.__version__}, triton {triton}, python {sys.version.split()[0]})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] in ("-V", "--version"):
        print(version_text())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"{USAGE}\n\nfastcaps: error: {problem}", file=sys.stderr)
        return 2
    run, _ = COMMANDS[argv[0]]
    return run(argv[1:], prog=f"fastcaps {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
