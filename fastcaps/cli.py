"""The `fastcaps` command: `fastcaps train ...` and `fastcaps evaluate CHECKPOINT ...`."""
import sys

from . import evaluate, train

COMMANDS = {"train": (train.main, "train the CapsNet on MNIST or MultiMNIST (the paper's recipe; --quick: a "
                                   "short CPU run)"),
            "evaluate": (evaluate.main, "test error, confusion matrix and figures of a checkpoint")}
USAGE = "usage: fastcaps {train,evaluate} [options]   (fastcaps COMMAND -h: its options)\n\n" + "\n".join(
    f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"{USAGE}\n\nfastcaps: error: {problem}", file=sys.stderr)
        return 2
    run, _ = COMMANDS[argv[0]]
    return run(argv[1:], prog=f"fastcaps {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
