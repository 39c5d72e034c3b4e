"""The options of `fastcaps train`: the recipe's defaults, the --quick presets, and their checks."""
import argparse
import math

from ..data.multimnist import MAX_SHIFT, PAD
from . import speed
from .checkpoints import MODELS

__all__ = ["FULL", "QUICK", "FULL_MULTIMNIST", "QUICK_MULTIMNIST", "RECIPE", "build_parser", "parse_args"]

# Defaults of the options that --quick changes; an option given on the command line wins.
FULL = {"epochs": 642, "max_steps": 300_000, "batch": 128, "log_every": 50, "out": "runs/mnist",
        "checkpoint_every_min": 5.0, "max_shift": 2}


# Well inside 10 minutes on 2 CPU cores, the full 10k test evaluation included (~0.37 s a step,
# ~50 s for the evaluation, on a quiet machine; up to ~2.5x that when the cores are shared):
# batch 32 costs less per image than 128 on a CPU and gives 4x the updates in the same time.
# A checkpoint every minute: a crash of the ~3-minute run loses at most a minute of it.
QUICK = {"epochs": 1, "max_steps": 300, "batch": 32, "log_every": 25, "out": "runs/quick",
         "checkpoint_every_min": 1.0, "max_shift": 2}


# MultiMNIST (--dataset multimnist): the paper's 4-pixel shifts and 100 test pairs per test digit (1M);
# its --quick (a step costs ~2.2x an MNIST one) evaluates one pair for each of 2000 test digits.
FULL_MULTIMNIST = FULL | {"out": "runs/multimnist", "max_shift": MAX_SHIFT, "test_pairs": 100}


QUICK_MULTIMNIST = QUICK | {"max_steps": 150, "out": "runs/multimnist-quick", "max_shift": MAX_SHIFT,
                            "test_pairs": 1, "test_subset": 2000}


# Options that change what is trained: a resumed run must keep them.
RECIPE = ("dataset", "model", "batch", "lr", "lr_decay", "lr_decay_steps", "min_lr", "schedule", "final_lr",
          "iterations", "max_shift", "seed", "train_subset")


IMAGE_SIZE = 28


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train the CapsNet of Sabour et al. (2017) on MNIST or MultiMNIST. Multi-GPU: "
                               "run the same command under `torchrun --nproc_per_node N`.")
    parser.add_argument("--dataset", choices=("mnist", "multimnist"), default="mnist",
                        help="mnist, or multimnist: pairs of overlapping digits, 36x36 (default mnist)")
    parser.add_argument("--model", choices=MODELS, default="capsnet",
                        help="capsnet: the paper's CapsNet; convcaps: ConvCapsNet, a convolutional capsule layer "
                             "between the primary and the digit capsules (fastcaps/models/convcaps.py) "
                             "(default capsnet)")
    parser.add_argument("--quick", action="store_true",
                        help=f"short CPU run (~3 min on 2 idle cores, ~96%% test accuracy): {QUICK}")
    parser.add_argument("--epochs", type=int, help=f"epochs (default {FULL['epochs']})")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all")
    parser.add_argument("--batch", type=int,
                        help=f"global batch, split over the processes (default {FULL['batch']})")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--lr-decay", type=float, default=0.96, help="decay factor per --lr-decay-steps (0.96)")
    parser.add_argument("--lr-decay-steps", type=int, default=2000, help="(default 2000)")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="floor of the learning rate (default 1e-6)")
    parser.add_argument("--schedule", choices=("authors", "end-low"), default="authors",
                        help="authors: lr x --lr-decay every --lr-decay-steps (the recipe); end-low: a variant "
                             "for short runs, lr decays exponentially to --final-lr at the last step "
                             "(default authors)")
    parser.add_argument("--final-lr", type=float, default=1e-5, help="last lr of --schedule end-low (1e-5)")
    parser.add_argument("--iterations", type=int, default=3, help="routing iterations (default 3)")
    parser.add_argument("--max-shift", type=int,
                        help="random shift in pixels, 0 = none (default 2; multimnist: 4, at most 4)")
    parser.add_argument("--routing", choices=("fused", "eager"),
                        help="fused Triton routing or the eager reference (default: fused on CUDA, eager elsewhere)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available); under torchrun each "
                                         "process uses cuda:LOCAL_RANK")
    parser.add_argument("--seed", type=int, default=0, help="(default 0)")
    parser.add_argument("--out", help=f"output folder (default {FULL['out']}, with --quick {QUICK['out']})")
    parser.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                        help="continue from CHECKPOINT (default: last.pt of --out) with the same recipe options")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    parser.add_argument("--checkpoint-every-min", type=float,
                        help="also write last.pt when this many minutes have passed since the last one, at the "
                             f"next --log-every step (default {FULL['checkpoint_every_min']:g}, with --quick "
                             f"{QUICK['checkpoint_every_min']:g})")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also log the metrics to <out>/tensorboard (needs: pip install 'fastcaps[tensorboard]')")
    parser.add_argument("--log-every", type=int, help=f"steps between progress lines (default {FULL['log_every']})")
    parser.add_argument("--eval-batch", type=int, default=200, help="evaluation batch size (default 200)")
    parser.add_argument("--train-subset", type=int, help="train on the first N training images only")
    parser.add_argument("--test-subset", type=int, help="evaluate on the first N test images (multimnist: "
                                                                "test digits) only")
    parser.add_argument("--test-pairs", type=int, help="multimnist: test pairs per test digit (default 100, "
                                                       "with --quick 1)")
    speed.add_arguments(parser)
    return parser


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    presets = {"mnist": (FULL, QUICK), "multimnist": (FULL_MULTIMNIST, QUICK_MULTIMNIST)}[args.dataset]
    for name, value in presets[args.quick].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    positive = ("epochs", "max_steps", "batch", "lr_decay_steps", "iterations", "log_every", "eval_batch",
                "train_subset", "test_subset", "test_pairs")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.max_shift < IMAGE_SIZE:
        parser.error(f"--max-shift must be between 0 and {IMAGE_SIZE - 1} pixels, got {args.max_shift}")
    if args.dataset == "multimnist" and args.max_shift > PAD:
        parser.error(f"--max-shift {args.max_shift}: multimnist shifts must lie within its {PAD}-pixel "
                     "padding (at most 4)")
    if args.dataset == "mnist" and args.test_pairs is not None:
        parser.error("--test-pairs is an option of --dataset multimnist")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be between 0 and 2^63 - 1, got {args.seed}")
    if not all(math.isfinite(v) for v in (args.lr, args.lr_decay, args.min_lr)) or not args.lr > 0 \
            or not 0 < args.lr_decay <= 1 or not 0 <= args.min_lr <= args.lr:
        parser.error("need finite --lr > 0, 0 < --lr-decay <= 1 and 0 <= --min-lr <= --lr")
    if not 0 < args.final_lr <= args.lr:  # also false for nan
        parser.error(f"need 0 < --final-lr <= --lr, got --final-lr {args.final_lr}")
    if not (math.isfinite(args.checkpoint_every_min) and args.checkpoint_every_min > 0):
        parser.error(f"--checkpoint-every-min must be > 0, got {args.checkpoint_every_min}")
    speed.check_arguments(args, parser)
    return args
