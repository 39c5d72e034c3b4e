"""Train the paper's MNIST CapsNet: `fastcaps train`.

The recipe of Sabour et al. (2017) as the authors' code runs it (Sarasra/models,
research/capsules; the model and its initialisation are in fastcaps/models/capsnet.py;
the options and their defaults in train_options.py): 300k steps at
batch 128 (642 epochs, stopped at step 300000), Adam (eps 1e-8) with lr 1e-3 decayed by 0.96
every 2000 steps (smoothly, lr = 1e-3 * 0.96^(step / 2000), floored at 1e-6:
tf.train.exponential_decay without staircase), 3 routing iterations, the authors' loss
(margin loss / 20 + 0.0005 x the reconstruction SSE, see capsnet_loss), training images
shifted at random by up to 2 pixels in each direction with zero padding (the authors store all
25 shifts of every image; a uniform random one per image and step is the same distribution),
evaluation on the 10k MNIST test set after every epoch; the error of a run is that of its last
evaluation. --quick is a short run for a CPU (see QUICK). --schedule end-low is a shorter
variant (see build_parser).

--dataset multimnist trains the same recipe on MultiMNIST (fastcaps.data.multimnist: pairs of
overlapping digits made on the device, 36x36 inputs, two reconstructions, an example right only
when the two longest capsules are its two labels); an epoch takes every training digit once as
the base of a pair, and the test set is a fixed set of --test-pairs pairs per test digit.

Under `torchrun --nproc_per_node N` the same command trains with DistributedDataParallel
(NCCL on GPUs, gloo on CPUs). --batch is the global batch: every step, each process takes its
disjoint slice of the same global batch of the epoch's permutation, and the random shifts are
drawn for the whole global batch on every process, so all random state is the same on every
process, and the checkpoint that process 0 alone writes resumes with any number of processes.

Output folder: config.json; metrics.jsonl, JSON lines of kind "epoch" (train and test losses
and accuracies, test error, wall time since the first step, images/s, when the test accuracy
first reached 99.5% and 99.7%; one per epoch, and one for a partial epoch where --max-steps
stops a run) and of kind "progress" (the training losses of the last --log-every steps); and
last.pt, the checkpoint for --resume, written after every evaluation, every
--checkpoint-every-min minutes (at the next --log-every step) and when Ctrl-C stops the run. On
the CPU a run stopped and resumed ends with bitwise the same weights as one that was not.
A run folder is locked while a run uses it; a loss that stops being finite stops the run
before anything non-finite is saved.
"""
import argparse
import contextlib
import json
import math
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..models import AUTHORS_ARCH, CapsNet, capsnet_loss
from . import speed
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, build_model, check_model_state,
                          check_optimizer_state, load_checkpoint, rng_state, set_rng_state)
from .console import fmt_time, printer, progress_bar
from .datasets import MNISTData, MultiMNISTData
from .devices import all_sum, resolve_routing, setup_processes, sync
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, CheckpointError, ConfigError, TrainingStopped, run_reporting_errors
from .runs import RUN_FILES, MetricsLog, read_metrics, require_tensorboard, run_folder, save_atomic, write_atomic
from .schedules import lr_factor
from .train_options import FULL, QUICK, RECIPE, build_parser, parse_args

__all__ = ["global_batch_slice", "train", "main", "build_parser", "parse_args", "FULL", "QUICK"]

MILESTONES = (99.5, 99.7)  # test accuracies (%) whose first time is recorded


def global_batch_slice(epoch_step: int, batch: int, rank: int, world: int) -> slice:
    """The positions, in the epoch's permutation, of this process's share of step epoch_step's
    global batch: the processes take disjoint, contiguous, equal parts of it."""
    local = batch // world
    start = epoch_step * batch + rank * local
    return slice(start, start + local)


def _check_resume(checkpoint: dict, args, device):
    saved = checkpoint["config"]
    saved = {"dataset": "mnist", "model": "capsnet"} | saved  # from before --dataset / --model
    if saved["model"] == "capsnet" and saved.get("arch") != AUTHORS_ARCH:
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


def _parameters_finite(model) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


class _StopRequest:
    """Ctrl-C during a single-process run: the first one asks the loop to stop after the current
    step (with a checkpoint), a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(args: argparse.Namespace) -> CapsNet:
    """Train as the options say; returns the trained model (unwrapped from DDP)."""
    rank, world, device = setup_processes(args.device)
    try:
        with contextlib.ExitStack() as stack:
            if rank == 0:  # one writer per run folder: the second run refuses instead of interleaving
                stack.enter_context(run_folder(args.out, "train"))
            # under torchrun every process gets the signal at its own step: Ctrl-C just ends them
            stop = stack.enter_context(_StopRequest()) if world == 1 else None
            return _train(args, rank, world, device, stop)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(args, rank, world, device, stop=None) -> CapsNet:
    started = time.perf_counter()
    main_process = rank == 0
    say = printer(main_process)
    if args.batch % world:
        raise ConfigError(f"--batch {args.batch} must be divisible by the number of processes ({world})")
    speed.resolve(args, device, ConfigError)
    routing, routing_note = resolve_routing(args.routing, device)
    if routing_note:
        say(f"note: {routing_note}")
    out = Path(args.out)
    metrics_path, checkpoint_path = out / "metrics.jsonl", out / "last.pt"

    checkpoint = None
    if args.resume is not None:
        checkpoint = load_checkpoint(args.resume or checkpoint_path)
        _check_resume(checkpoint, args, device)
    elif any((out / name).exists() for name in RUN_FILES["train"]) and not args.overwrite:
        raise ConfigError(f"{out} already holds a run: continue it with --resume, or pass --overwrite "
                          f"or another --out")
    if args.tensorboard:
        require_tensorboard()  # before the data are loaded, not after the first epoch

    if args.dataset == "multimnist":
        data = MultiMNISTData(device, args.seed, args.max_shift, args.train_subset, args.test_subset,
                                         args.test_pairs, rank, world)
    else:
        data = MNISTData(device, args.max_shift, args.train_subset, args.test_subset, rank, world)
    if data.train_size < args.batch:
        raise ConfigError(f"{data.train_size} training images are fewer than one batch (--batch {args.batch})")

    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = speed.apply_memory_format(
        build_model(args.model, routing, args.iterations, data.input_size).to(device),
        args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda" or None)
    steps_per_epoch = data.train_size // args.batch  # the last partial batch of an epoch is dropped
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    decay = lr_factor(args.schedule, args.lr, total_steps, final_lr=args.final_lr, lr_decay=args.lr_decay,
                      lr_decay_steps=args.lr_decay_steps, min_lr=args.min_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    # separate generators: the data order and the shifts do not depend on anything else drawn
    order_gen = torch.Generator().manual_seed(args.seed)
    shift_gen = torch.Generator(device=device).manual_seed(args.seed)
    step = epoch = epoch_step = 0
    elapsed_before, epoch_train_s = 0.0, 0.0
    epoch_sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, margin, recon, correct, images
    milestones = {}
    saved = None  # (path, step) of the last checkpoint that holds this run, for the messages
    if checkpoint is not None:
        resume_path = Path(args.resume or checkpoint_path)
        check_model_state(checkpoint["model"], model, resume_path)
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            speed.match_optimizer_state(optimizer)
            scheduler.load_state_dict(checkpoint["scheduler"])  # restores the decay's own fields too
            step, epoch, epoch_step = checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]
            elapsed_before, epoch_train_s = checkpoint["elapsed_s"], checkpoint["epoch_train_s"]
            milestones = checkpoint["milestones"]
            # the sums are global: process 0 carries them, the others add their own from here
            if main_process:
                epoch_sums.copy_(checkpoint["epoch_sums"])
            order_gen.set_state(checkpoint["rng"]["order_epoch_start"])
            shift_gen.set_state(checkpoint["rng"]["shift"])
            set_rng_state(checkpoint["rng"]["global"], device)
            check_optimizer_state(optimizer, model)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{resume_path}: damaged training state ({str(err).splitlines()[0][:200]})") \
                from None
        if args.schedule == "end-low" and decay.total_steps != total_steps:
            raise ConfigError(f"cannot resume: --schedule end-low decays over the {decay.total_steps} steps of the "
                              f"run that wrote the checkpoint, not {total_steps}: pass its --epochs/--max-steps")
        saved = (resume_path, step)
    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = speed.compile_model(net, args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes
    local = args.batch // world
    lo = rank * local

    log = None
    if main_process:
        if checkpoint is None:
            checkpoint_path.unlink(missing_ok=True)  # --overwrite: nothing of the old run may survive
            write_atomic(metrics_path, "")
        else:  # drop records written after the checkpoint by a run that then died
            kept = [r for r in read_metrics(metrics_path, warn=lambda m: say(f"warning: {m}"))
                    if r["step"] <= step] if metrics_path.exists() else []
            write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        config = vars(args) | {"routing": routing, "routing_requested": args.routing, "device": str(device),
                               "world_size": world, "steps_per_epoch": steps_per_epoch,
                               "total_steps": total_steps, "train_images": data.train_size,
                               "test_images": data.test_size, "torch": torch.__version__,
                               "python": platform.python_version()}
        write_atomic(out / "config.json", json.dumps(config, indent=1) + "\n")
        # TensorBoard drops older events from this step on: those a resumed run repeats, or, for a
        # run started over with --overwrite, all of the old run's
        log = MetricsLog(metrics_path, out / "tensorboard" if args.tensorboard else None,
                         purge_step=step + 1 if checkpoint is not None else 0)
    say(f"training {type(model).__name__} ({routing} routing, {args.iterations} iterations) on {device} x {world}: "
        f"{args.dataset}, {data.train_size} images, batch {args.batch}, {steps_per_epoch} steps/epoch, "
        f"steps {step} -> {total_steps}; {speed.describe(args)}")
    if step >= total_steps:
        say(f"nothing to do: the checkpoint is at step {step}")
        return model

    arch = AUTHORS_ARCH if args.model == "capsnet" else None  # ConvCapsNet has no variants

    def save_checkpoint():
        """last.pt for --resume; first makes sure that nothing non-finite is saved."""
        nonlocal saved
        if not _parameters_finite(model):
            raise _diverged("the weights are no longer finite", step, saved, args)
        save_atomic({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                     "config": {k: getattr(args, k) for k in RECIPE} | {"routing": routing,
                                                                         "device_type": device.type,
                                                                         "arch": arch,
                                                                         "test_pairs": args.test_pairs},
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                     "epoch_step": epoch_step, "elapsed_s": elapsed_before + time.perf_counter() - first_step,
                     "epoch_train_s": epoch_train_s + time.perf_counter() - epoch_start,
                     "epoch_sums": epoch_sums, "milestones": milestones,
                     "rng": {"order_epoch_start": epoch_start_state, "shift": shift_gen.get_state(),
                             "global": rng_state(device)}}, checkpoint_path)
        saved = (checkpoint_path, step)

    def mid_epoch_checkpoint():
        """A checkpoint between evaluations: process 0 carries the global sums of the epoch so far."""
        all_sum(epoch_sums, world)
        if not main_process:
            epoch_sums.zero_()
        if main_process:
            save_checkpoint()

    window = torch.zeros(5, dtype=torch.float64, device=device)
    local_count = torch.tensor(float(local), dtype=torch.float64, device=device)  # made once: no copy per step
    first_step = time.perf_counter()
    window_start = epoch_start = last_checkpoint = first_step
    window_first_step = step + 1
    epoch_start_state = order_gen.get_state()
    perm, record, last_progress = None, None, None
    bar = None
    net.train()
    try:
        while step < total_steps:
            if stop is not None and stop.requested:
                if step == 0:
                    raise TrainingStopped("interrupted before the first step: nothing to save", EXIT_INTERRUPTED)
                if saved is None or saved[1] != step:
                    mid_epoch_checkpoint()
                raise TrainingStopped(f"interrupted at step {step}: {_resume_hint(saved)}", EXIT_INTERRUPTED)
            if perm is None:
                epoch_start_state = order_gen.get_state()
                perm = torch.randperm(data.train_size, generator=order_gen).to(device)
            if bar is None and main_process:
                bar = progress_bar(min(steps_per_epoch, total_steps - step + epoch_step),
                                   f"epoch {epoch + 1}/{args.epochs}", initial=epoch_step, unit="step")
                say.bar = bar
            idx = perm[global_batch_slice(epoch_step, args.batch, rank, world)]
            x, y, targets = data.batch(idx, shift_gen, args.batch, lo)
            x = speed.to_memory_format(x, args)
            speed.mark_step(args)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                output = net(x, y)
                loss, margin, recon = capsnet_loss(output, targets, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # accumulated on the device: reading them is a host sync, done every --log-every steps
            correct = data.correct(output.lengths, y)
            stats = torch.cat([torch.stack([loss, margin, recon]).detach().double() * local,
                               torch.stack([correct.double(), local_count])])
            epoch_sums += stats
            window += stats
            step += 1
            epoch_step += 1
            if bar is not None:
                bar.update()

            if step % args.log_every == 0:
                loss_sum, margin_sum, recon_sum, correct_sum, count = all_sum(window, world).tolist()
                if not math.isfinite(loss_sum):
                    raise _diverged(f"the training loss is {loss_sum / count} over steps {window_first_step}-{step}",
                                    step, saved, args)
                now = time.perf_counter()
                progress = {"kind": "progress", "epoch": epoch + 1, "epochs_done": step / steps_per_epoch,
                            "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum / count,
                            "train_margin": margin_sum / count, "train_recon": recon_sum / count,
                            "train_acc": 100 * correct_sum / count, "images_per_s": count / (now - window_start),
                            "wall_s": elapsed_before + now - first_step}
                last_progress = progress | {"steps": step - window_first_step + 1}
                say(f"step {step}/{total_steps} epoch {epoch + 1} loss {progress['train_loss']:.4f} "
                    f"(margin {progress['train_margin']:.4f} recon {progress['train_recon']:.4f}) "
                    f"acc {progress['train_acc']:.2f}% lr {progress['lr']:.2e} {progress['images_per_s']:.0f} img/s")
                if bar is not None:
                    bar.set_postfix(loss=f"{progress['train_loss']:.4f}", acc=f"{progress['train_acc']:.1f}%")
                if main_process:
                    log.append(progress)
                window.zero_()
                window_start, window_first_step = now, step + 1
                if _checkpoint_due(last_checkpoint, args.checkpoint_every_min, world, device) \
                        and epoch_step != steps_per_epoch and step != total_steps:
                    # at an epoch's end the evaluation's checkpoint follows now (under --eval-every
                    # one that evaluates nothing: the next --log-every step's)
                    mid_epoch_checkpoint()
                    # the next window's images/s and the next interval start after the write
                    window_start = last_checkpoint = time.perf_counter()

            epoch_end = epoch_step == steps_per_epoch
            if epoch_end and step < total_steps and (epoch + 1) % args.eval_every:
                # no evaluation (--eval-every): the training sums run on into the next record
                epoch, epoch_step, perm = epoch + 1, 0, None
                epoch_start_state = order_gen.get_state()  # what a checkpoint before the next step resumes from
                if bar is not None:
                    bar.close()
                    bar = say.bar = None
                continue
            if not (epoch_end or step == total_steps):
                continue
            sync(device)
            epoch_train_s += time.perf_counter() - epoch_start
            loss_sum, margin_sum, recon_sum, correct_sum, count = all_sum(epoch_sums, world).tolist()
            if not math.isfinite(loss_sum):
                raise _diverged(f"the training loss is {loss_sum / count} in epoch {epoch + 1}", step, saved, args)
            if bar is not None:
                bar.close()
                bar = say.bar = None
            eval_start = time.perf_counter()
            test_stats = data.evaluate(model, args.eval_batch, args.bf16,
                                       progress="evaluating" if main_process else None)
            test_loss, test_margin, test_recon, test_correct, test_n, *extra = all_sum(test_stats, world).tolist()
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
            record |= {name: 100 * value / test_n for name, value in zip(data.extra_metrics, extra)}
            # the train numbers are means over the whole epoch; the progress lines' over their last steps
            latest = (f"; last {last_progress['steps']} steps {last_progress['train_acc']:.2f}%"
                      if last_progress is not None and last_progress["epoch"] == epoch + 1 else "")
            say(f"epoch {epoch + 1}{' (partial)' if not epoch_end else ''} step {step}: "
                f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% (epoch mean{latest}) | "
                f"test loss {record['test_loss']:.4f} acc {test_acc:.2f}% (error {record['test_error']:.2f}%"
                + "".join(f", {name} {record[name]:.2f}%" for name in data.extra_metrics) + ") | "
                f"{record['images_per_s']:.0f} img/s, eval {fmt_time(record['eval_s'])}, "
                f"wall {fmt_time(wall_s)}")
            if epoch_end:
                epoch, epoch_step, epoch_train_s, perm = epoch + 1, 0, 0.0, None
                epoch_sums.zero_()
                epoch_start_state = order_gen.get_state()
            window.zero_()
            window_start = epoch_start = time.perf_counter()
            window_first_step = step + 1
            if main_process:
                log.append(record)
                save_checkpoint()
            last_checkpoint = time.perf_counter()
    except KeyboardInterrupt:  # a second Ctrl-C, or any Ctrl-C under torchrun
        raise TrainingStopped(f"interrupted at step {step}: {_resume_hint(saved)}", EXIT_INTERRUPTED) from None
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()

    say(f"final test accuracy {record['test_acc']:.2f}% (error {record['test_error']:.2f}%"
        + "".join(f", {name} {record[name]:.2f}%" for name in data.extra_metrics) + ") on "
        f"{record['test_images']} test {'pairs' if args.dataset == 'multimnist' else 'images'} after {step} steps"
        f" ({record['epochs_done']:.2f} epochs), "
        f"wall {fmt_time(record['wall_s'])} since the first step")
    reached = [f">= {t}% first at {fmt_time(hit['wall_s'])} (epoch {hit['epoch']}, step {hit['step']})"
               for t in MILESTONES if (hit := milestones.get(str(t)))]
    missed = [f"{t}%" for t in MILESTONES if str(t) not in milestones]
    say("test accuracy " + "; ".join(reached + ([f">= {' or '.join(missed)}: not reached"] if missed else [])))
    say(f"total time {fmt_time(time.perf_counter() - started)}; checkpoint {checkpoint_path}")
    return model


def _checkpoint_due(last: float, every_min: float, world: int, device) -> bool:
    """Whether --checkpoint-every-min has passed; under DDP process 0's clock decides for all."""
    due = time.perf_counter() - last >= 60 * every_min
    if world > 1:
        flag = torch.tensor([float(due)], device=device)
        dist.broadcast(flag, 0)
        due = bool(flag.item())
    return due


def _resume_hint(saved) -> str:
    if saved is None:
        return "no checkpoint was written yet"
    path, step = saved
    return f"the last checkpoint is {path} (step {step}); continue with the same command and --resume"


def _diverged(problem: str, step: int, saved, args) -> TrainingStopped:
    if saved is None:
        kept = "no checkpoint was written"
    else:
        kept = f"the last good checkpoint is {saved[0]} (step {saved[1]}), unchanged"
    hint = "a lower --lr" + (" or no --bf16" if args.bf16 else "")
    return TrainingStopped(f"error: training stopped at step {step}: {problem}; {kept}. "
                           f"Try {hint}", EXIT_FAILED)


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    return run_reporting_errors(prog or "fastcaps train", train, args)


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastcaps.recipes.train"))
