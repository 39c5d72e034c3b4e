"""Train the paper's MNIST CapsNet: `fastcaps train` / `python -m fastcaps.train`.

The recipe of Sabour et al. (2017) as the authors' code runs it (Sarasra/models,
research/capsules; the model and its initialisation are in fastcaps/model.py): 300k steps at
batch 128 (642 epochs, stopped at step 300000), Adam (eps 1e-8) with lr 1e-3 decayed by 0.96
every 2000 steps (smoothly, lr = 1e-3 * 0.96^(step / 2000), floored at 1e-6:
tf.train.exponential_decay without staircase), 3 routing iterations, the authors' loss
(margin loss / 20 + 0.0005 x the reconstruction SSE, see capsnet_loss), training images
shifted at random by up to 2 pixels in each direction with zero padding (the authors store all
25 shifts of every image; a uniform random one per image and step is the same distribution),
evaluation on the 10k MNIST test set after every epoch; the error of a run is that of its last
evaluation. --quick is a short run for a CPU (see QUICK). --schedule end-low is a shorter
variant (see build_parser).

Under `torchrun --nproc_per_node N` the same command trains with DistributedDataParallel
(NCCL on GPUs, gloo on CPUs). --batch is the global batch: every step, each process takes its
disjoint slice of the same global batch of the epoch's permutation, and the random shifts are
drawn for the whole global batch on every process, so all random state is the same on every
process, and the checkpoint that process 0 alone writes resumes with any number of processes.

Output folder: config.json; metrics.jsonl, JSON lines of kind "epoch" (train and test losses
and accuracies, test error, wall time since the first step, images/s, when the test accuracy
first reached 99.5% and 99.7%; one per epoch, and one for a partial epoch where --max-steps
stops a run) and of kind "progress" (the training losses of the last --log-every steps); and
last.pt, the checkpoint for --resume, written after every evaluation. On the CPU a run stopped
and resumed ends with bitwise the same weights as one that was not.
"""
import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import speed
from .data import load_mnist
from .evaluate import ConfigError, load_checkpoint, predict, run_reporting_errors
from .model import AUTHORS_ARCH, CapsNet, capsnet_loss

__all__ = ["draw_shifts", "shift_images", "ExponentialDecay", "DecayToFinal", "global_batch_slice", "build_parser",
           "parse_args", "train", "main", "QUICK", "FULL"]

# Defaults of the options that --quick changes; an option given on the command line wins.
FULL = {"epochs": 642, "max_steps": 300_000, "batch": 128, "log_every": 50, "out": "runs/mnist"}
# Well inside 10 minutes on 2 CPU cores, the full 10k test evaluation included (~0.37 s a step,
# ~50 s for the evaluation, on a quiet machine; up to ~2.5x that when the cores are shared):
# batch 32 costs less per image than 128 on a CPU and gives 4x the updates in the same time.
QUICK = {"epochs": 1, "max_steps": 300, "batch": 32, "log_every": 25, "out": "runs/quick"}
# Options that change what is trained: a resumed run must keep them.
RECIPE = ("batch", "lr", "lr_decay", "lr_decay_steps", "min_lr", "schedule", "final_lr", "iterations",
          "max_shift", "seed", "train_subset")
MILESTONES = (99.5, 99.7)  # test accuracies (%) whose first time is recorded


# ------------------------------------------------------------------------------ augmentation

def draw_shifts(n: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 2] integer (dy, dx) shifts, uniform over [-max_shift, max_shift], on the generator's device."""
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator, device=generator.device)


def shift_images(images: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """out[n, :, y, x] = images[n, :, y - dy_n, x - dx_n], zero where that falls outside.

    One gather over the zero-padded batch, no per-image loop and no host sync. Every shift
    must lie in [-max_shift, max_shift] (the padding), which draw_shifts guarantees.
    """
    if images.dim() != 4 or shifts.shape != (images.shape[0], 2):
        raise ValueError(f"expected images [N, C, H, W] and shifts [N, 2], got {tuple(images.shape)} "
                         f"and {tuple(shifts.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    n, c, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p)).flatten(2)                                    # [N, C, (H+2p)(W+2p)]
    rows = torch.arange(h, device=images.device) + p - shifts[:, :1]                    # [N, H]
    cols = torch.arange(w, device=images.device) + p - shifts[:, 1:]                    # [N, W]
    index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, index).view(n, c, h, w)


# ------------------------------------------------------------------------------ schedule, sharding

class ExponentialDecay:
    """LambdaLR factor of tf.train.exponential_decay (staircase=False), with the authors' floor:
    lr(step) = max(lr0 * rate^(step / steps), min_lr)."""

    def __init__(self, rate: float, steps: int, min_factor: float):
        self.rate, self.steps, self.min_factor = rate, steps, min_factor

    def __call__(self, step: int) -> float:
        return max(self.rate ** (step / self.steps), self.min_factor)


class DecayToFinal:
    """LambdaLR factor of --schedule end-low: lr decays exponentially, smoothly, from lr0 at step 0
    to final_lr at the last step: lr(step) = lr0 * (final_lr / lr0)^(step / total_steps)."""

    def __init__(self, final_factor: float, total_steps: int):
        self.final_factor, self.total_steps = final_factor, total_steps

    def __call__(self, step: int) -> float:
        return self.final_factor ** (min(step, self.total_steps) / self.total_steps)


def global_batch_slice(epoch_step: int, batch: int, rank: int, world: int) -> slice:
    """The positions, in the epoch's permutation, of this process's share of step epoch_step's
    global batch: the processes take disjoint, contiguous, equal parts of it."""
    local = batch // world
    start = epoch_step * batch + rank * local
    return slice(start, start + local)


# ------------------------------------------------------------------------------ options

def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train the MNIST CapsNet of Sabour et al. (2017). Multi-GPU: run the same "
                               "command under `torchrun --nproc_per_node N`.")
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
    parser.add_argument("--max-shift", type=int, default=2, help="random shift in pixels, 0 = none (default 2)")
    parser.add_argument("--routing", choices=("fused", "eager"),
                        help="fused Triton routing or the eager reference (default: fused on CUDA, eager elsewhere)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available); under torchrun each "
                                         "process uses cuda:LOCAL_RANK")
    parser.add_argument("--seed", type=int, default=0, help="(default 0)")
    parser.add_argument("--out", help=f"output folder (default {FULL['out']}, with --quick {QUICK['out']})")
    parser.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                        help="continue from CHECKPOINT (default: last.pt of --out) with the same recipe options")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    parser.add_argument("--log-every", type=int, help=f"steps between progress lines (default {FULL['log_every']})")
    parser.add_argument("--eval-batch", type=int, default=200, help="evaluation batch size (default 200)")
    parser.add_argument("--train-subset", type=int, help="train on the first N training images only")
    parser.add_argument("--test-subset", type=int, help="evaluate on the first N test images only")
    speed.add_arguments(parser)
    return parser


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    positive = ("epochs", "max_steps", "batch", "lr_decay_steps", "iterations", "log_every", "eval_batch",
                "train_subset", "test_subset")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_shift < 0:
        parser.error(f"--max-shift must be >= 0, got {args.max_shift}")
    if not args.lr > 0 or not 0 < args.lr_decay <= 1 or not 0 <= args.min_lr <= args.lr:
        parser.error("need --lr > 0, 0 < --lr-decay <= 1 and 0 <= --min-lr <= --lr")
    if not 0 < args.final_lr <= args.lr:
        parser.error(f"need 0 < --final-lr <= --lr, got --final-lr {args.final_lr}")
    speed.check_arguments(args, parser)
    return args


# ------------------------------------------------------------------------------ processes, devices

def _setup_processes(device_arg):
    """(rank, world size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ConfigError(f"--device: {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is available")
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


def _all_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def _sync(device):
    # only for timing: kernels run asynchronously on a GPU
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ checkpoints

def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (algorithm, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    algorithm, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_atomic(obj, path: Path):
    # a crash while writing must not destroy the previous checkpoint
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_record(path: Path, record: dict):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _check_resume(checkpoint: dict, args, device):
    saved = checkpoint["config"]
    if saved.get("arch") != AUTHORS_ARCH:
        raise ConfigError("cannot resume: the checkpoint holds a model of fastcaps 0.1 (no bias on the digit "
                          "capsules, unscaled primary capsules); `fastcaps evaluate` still reads it")
    changed = [f"--{k.replace('_', '-')} {saved[k]} (now {getattr(args, k)})" for k in RECIPE
               if saved[k] != getattr(args, k)]
    if changed:
        raise ConfigError("cannot resume: the checkpoint was trained with " + ", ".join(changed)
                          + "; pass the same options (--quick included) as the run that wrote it")
    if saved["device_type"] != device.type:
        # the state of the shift generator is that of a CPU or a CUDA generator, not both
        raise ConfigError(f"cannot resume on {device.type}: the checkpoint was trained on {saved['device_type']}")


# ------------------------------------------------------------------------------ training

def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def train(args: argparse.Namespace) -> CapsNet:
    """Train as the options say; returns the trained model (unwrapped from DDP)."""
    rank, world, device = _setup_processes(args.device)
    try:
        return _train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(args, rank, world, device) -> CapsNet:
    started = time.perf_counter()
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    if args.batch % world:
        raise ConfigError(f"--batch {args.batch} must be divisible by the number of processes ({world})")
    speed.resolve(args, device, ConfigError)
    routing = args.routing or ("fused" if device.type == "cuda" else "eager")
    out = Path(args.out)
    metrics_path, checkpoint_path = out / "metrics.jsonl", out / "last.pt"

    checkpoint = None
    if args.resume is not None:
        checkpoint = load_checkpoint(args.resume or checkpoint_path)
        _check_resume(checkpoint, args, device)
    elif metrics_path.exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds a run: continue it with --resume, or pass --overwrite "
                          f"or another --out")

    images, labels = load_mnist("train", device)
    test_images, test_labels = load_mnist("test", device)
    if args.train_subset is not None:
        images, labels = images[:args.train_subset], labels[:args.train_subset]
    if args.test_subset is not None:
        test_images, test_labels = test_images[:args.test_subset], test_labels[:args.test_subset]
    if len(images) < args.batch:
        raise ConfigError(f"{len(images)} training images are fewer than one batch (--batch {args.batch})")
    # each process evaluates a disjoint shard of the test set; the counts are summed
    test_images, test_labels = test_images[rank::world], test_labels[rank::world]

    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = speed.apply_memory_format(CapsNet(routing=routing, iterations=args.iterations, **AUTHORS_ARCH).to(device),
                                      args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda" or None)
    steps_per_epoch = len(images) // args.batch  # the last partial batch of an epoch is dropped
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if args.schedule == "end-low":
        decay = DecayToFinal(args.final_lr / args.lr, total_steps)
    else:
        decay = ExponentialDecay(args.lr_decay, args.lr_decay_steps, args.min_lr / args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    # separate generators: the data order and the shifts do not depend on anything else drawn
    order_gen = torch.Generator().manual_seed(args.seed)
    shift_gen = torch.Generator(device=device).manual_seed(args.seed)
    step = epoch = epoch_step = 0
    elapsed_before, epoch_train_s = 0.0, 0.0
    epoch_sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, margin, recon, correct, images
    milestones = {}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        speed.match_optimizer_state(optimizer)
        scheduler.load_state_dict(checkpoint["scheduler"])  # restores the decay's own fields too
        if args.schedule == "end-low" and decay.total_steps != total_steps:
            raise ConfigError(f"cannot resume: --schedule end-low decays over the {decay.total_steps} steps of the "
                              f"run that wrote the checkpoint, not {total_steps}: pass its --epochs/--max-steps")
        step, epoch, epoch_step = checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]
        elapsed_before, epoch_train_s = checkpoint["elapsed_s"], checkpoint["epoch_train_s"]
        milestones = checkpoint["milestones"]
        # the sums are global: process 0 carries them, the others add their own from here
        if main_process:
            epoch_sums.copy_(checkpoint["epoch_sums"])
        order_gen.set_state(checkpoint["rng"]["order_epoch_start"])
        shift_gen.set_state(checkpoint["rng"]["shift"])
        _set_rng_state(checkpoint["rng"]["global"], device)
    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = speed.compile_model(net, args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes
    local = args.batch // world
    lo = rank * local

    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            metrics_path.write_text("", encoding="utf-8")
        else:  # drop records written after the checkpoint by a run that then died
            kept = [line for line in metrics_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= step] if metrics_path.exists() else []
            metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        config = vars(args) | {"routing": routing, "device": str(device), "world_size": world,
                               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                               "train_images": len(images), "torch": torch.__version__,
                               "python": platform.python_version()}
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    say(f"training CapsNet ({routing} routing, {args.iterations} iterations) on {device} x {world}: "
        f"{len(images)} images, batch {args.batch}, {steps_per_epoch} steps/epoch, steps {step} -> {total_steps}"
        + f"; {speed.describe(args)}", flush=True)
    if step >= total_steps:
        say(f"nothing to do: the checkpoint is at step {step}")
        return model

    window = torch.zeros(5, dtype=torch.float64, device=device)
    local_count = torch.tensor(float(local), dtype=torch.float64, device=device)  # made once: no copy per step
    first_step = time.perf_counter()
    window_start = epoch_start = first_step
    perm, record = None, None
    net.train()
    while step < total_steps:
        if perm is None:
            epoch_start_state = order_gen.get_state()
            perm = torch.randperm(len(images), generator=order_gen).to(device)
        idx = perm[global_batch_slice(epoch_step, args.batch, rank, world)]
        shifts = draw_shifts(args.batch, args.max_shift, shift_gen)[lo:lo + local]
        x, y = speed.to_memory_format(shift_images(images[idx], shifts, args.max_shift), args), labels[idx]
        speed.mark_step(args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            output = net(x, y)
            loss, margin, recon = capsnet_loss(output, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # accumulated on the device: reading them is a host sync, done every --log-every steps
        correct = (output.lengths.argmax(dim=1) == y).sum()
        stats = torch.cat([torch.stack([loss, margin, recon]).detach().double() * local,
                           torch.stack([correct.double(), local_count])])
        epoch_sums += stats
        window += stats
        step += 1
        epoch_step += 1

        if step % args.log_every == 0:
            loss_sum, margin_sum, recon_sum, correct_sum, count = _all_sum(window, world).tolist()
            now = time.perf_counter()
            progress = {"kind": "progress", "epoch": epoch + 1, "epochs_done": step / steps_per_epoch, "step": step,
                        "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum / count,
                        "train_margin": margin_sum / count, "train_recon": recon_sum / count,
                        "train_acc": 100 * correct_sum / count, "images_per_s": count / (now - window_start),
                        "wall_s": elapsed_before + now - first_step}
            say(f"step {step}/{total_steps} epoch {epoch + 1} loss {progress['train_loss']:.4f} "
                f"(margin {progress['train_margin']:.4f} recon {progress['train_recon']:.4f}) "
                f"acc {progress['train_acc']:.2f}% lr {progress['lr']:.2e} {progress['images_per_s']:.0f} img/s",
                flush=True)
            if main_process:
                _append_record(metrics_path, progress)
            window.zero_()
            window_start = now

        epoch_end = epoch_step == steps_per_epoch
        if epoch_end and step < total_steps and (epoch + 1) % args.eval_every:
            # no evaluation (--eval-every): the training sums run on into the next record
            epoch, epoch_step, perm = epoch + 1, 0, None
            continue
        if not (epoch_end or step == total_steps):
            continue
        _sync(device)
        epoch_train_s += time.perf_counter() - epoch_start
        loss_sum, margin_sum, recon_sum, correct_sum, count = _all_sum(epoch_sums, world).tolist()
        eval_start = time.perf_counter()
        predictions, test_sums = predict(model, test_images, test_labels, args.eval_batch, args.bf16)
        test_count = torch.tensor(len(test_labels), dtype=torch.float64, device=device)
        test_stats = torch.cat([test_sums, torch.stack([(predictions == test_labels).sum().double(), test_count])])
        test_loss, test_margin, test_recon, test_correct, test_n = _all_sum(test_stats, world).tolist()
        net.train()
        now = time.perf_counter()
        wall_s = elapsed_before + now - first_step
        test_acc = 100 * test_correct / test_n
        for threshold in MILESTONES:
            if test_acc >= threshold and str(threshold) not in milestones:
                milestones[str(threshold)] = {"wall_s": wall_s, "epoch": epoch + 1, "step": step}
        record = {"kind": "epoch", "epoch": epoch + 1, "epochs_done": step / steps_per_epoch, "step": step,
                  "partial": not epoch_end, "lr": scheduler.get_last_lr()[0],
                  "train_loss": loss_sum / count, "train_margin": margin_sum / count,
                  "train_recon": recon_sum / count, "train_acc": 100 * correct_sum / count,
                  "test_loss": test_loss / test_n, "test_margin": test_margin / test_n,
                  "test_recon": test_recon / test_n, "test_acc": test_acc, "test_error": 100 - test_acc,
                  "test_images": int(test_n), "wall_s": wall_s, "eval_s": now - eval_start,
                  "images_per_s": count / epoch_train_s, "milestones": dict(milestones)}
        say(f"epoch {epoch + 1}{' (partial)' if not epoch_end else ''} step {step}: "
            f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% | "
            f"test loss {record['test_loss']:.4f} acc {test_acc:.2f}% (error {record['test_error']:.2f}%) | "
            f"{record['images_per_s']:.0f} img/s, eval {_fmt_time(record['eval_s'])}, "
            f"wall {_fmt_time(wall_s)}", flush=True)
        if epoch_end:
            epoch, epoch_step, epoch_train_s, perm = epoch + 1, 0, 0.0, None
            epoch_sums.zero_()
            epoch_start_state = order_gen.get_state()
        if main_process:
            _append_record(metrics_path, record)
            _save_atomic({"config": {k: getattr(args, k) for k in RECIPE} | {"routing": routing,
                                                                               "device_type": device.type,
                                                                               "arch": AUTHORS_ARCH},
                          "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                          "epoch_step": epoch_step, "elapsed_s": wall_s, "epoch_train_s": epoch_train_s,
                          "epoch_sums": epoch_sums, "milestones": milestones,
                          "rng": {"order_epoch_start": epoch_start_state, "shift": shift_gen.get_state(),
                                  "global": _rng_state(device)}}, checkpoint_path)
        window.zero_()
        window_start = epoch_start = time.perf_counter()

    say(f"final test accuracy {record['test_acc']:.2f}% (error {record['test_error']:.2f}%) on "
        f"{record['test_images']} test images after {step} steps ({record['epochs_done']:.2f} epochs), "
        f"wall {_fmt_time(record['wall_s'])} since the first step")
    for threshold in MILESTONES:
        hit = milestones.get(str(threshold))
        say(f"test accuracy >= {threshold}%: " + (f"first at {_fmt_time(hit['wall_s'])} (epoch {hit['epoch']}, "
                                                   f"step {hit['step']})" if hit else "not reached"))
    say(f"total time {_fmt_time(time.perf_counter() - started)}; checkpoint {checkpoint_path}")
    return model


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    return run_reporting_errors(prog or "fastcaps train", train, args)


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastcaps.train"))
