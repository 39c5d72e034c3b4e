"""Throughput options of the training commands: bf16 autocast, channels_last, torch.compile of
the whole model, CUDA graphs, and how often the test set is evaluated.

None of them changes the recipe (what is trained); bf16 changes the arithmetic, the others only
how it is scheduled. Defaults depend on the device (resolve()):

- channels_last: on for CUDA. cuDNN's tensor-core convolutions (TF32 or bf16) run on NHWC
  data; NCHW tensors get transposed around every convolution, and the two convolutions set
  the pace of CapsNet training. Off on the CPU (the reason is cuDNN's; oneDNN not measured).
- bf16: off. The routing op then runs on bf16 capsules (fp32 accumulation), which can cost
  accuracy at the 0.25% level; it stays opt-in until measured (scripts/gpu_training.sh).
- compile: off. The compilation (forward and backward of the whole model; its time on a GPU is
  not measured yet) counts against the time to 99.5% / 99.7%; opt-in until measured.
- cuda_graphs: off; CUDA only; implies compile (mode "reduce-overhead": the compiled forward
  and backward are replayed as CUDA graphs, which removes the launch overhead of the many
  small kernels; the optimizer step stays outside).
- eval_every: 1 (every epoch). The evaluation of the 10k test images (a forward pass, against
  the forward and backward of 60k images in an epoch: an estimated 5-10% of the epoch's time;
  metrics.jsonl records it as eval_s) stalls training; --eval-every N evaluates every N epochs
  and at the end of the run.
"""
import argparse

import torch

from .errors import ConfigError

__all__ = ["add_arguments", "check_arguments", "resolve", "apply_memory_format", "match_optimizer_state",
           "compile_model", "to_memory_format", "mark_step", "describe"]


def add_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("throughput (see fastcaps/recipes/speed.py; none changes the recipe)")
    group.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default off)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="NHWC convolutions (default: on with CUDA, off on the CPU)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the whole model, fullgraph (default off)")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="CUDA only: compile with mode reduce-overhead, replaying forward and backward "
                            "as CUDA graphs (implies --compile)")
    group.add_argument("--eval-every", type=int, default=1,
                       help="evaluate on the test set (and write a record and the checkpoint) every N "
                            "epochs and at the end; the training figures of a record cover its N epochs "
                            "(default 1)")


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Usage errors that need no device (parser.error: exit 2)."""
    if args.eval_every < 1:
        parser.error(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.cuda_graphs and args.compile is False:
        parser.error("--cuda-graphs needs torch.compile: drop --no-compile")


def resolve(args: argparse.Namespace, device: torch.device, error=ValueError):
    """Fill the device-dependent defaults in args; raise `error` for options the device lacks."""
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.cuda_graphs:
        if device.type != "cuda":
            raise error(f"--cuda-graphs needs a CUDA device, not {device.type}")
    args.compile = bool(args.compile or args.cuda_graphs)
    if args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise error("--bf16: this GPU does not support bfloat16")


def apply_memory_format(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """channels_last on the model's 4-D weights, in place; call it before the optimizer's first
    step, so that Adam's moments are created in the same layout (see match_optimizer_state)."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def match_optimizer_state(optimizer: torch.optim.Optimizer):
    """After optimizer.load_state_dict: give every state tensor the strides of its parameter
    (a checkpoint's moments come back contiguous; a fused multi-tensor update indexes its
    tensors by position in memory, so the layouts must agree)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


def compile_model(net: torch.nn.Module, args: argparse.Namespace, backend: str = "inductor") -> torch.nn.Module:
    """What the training step calls: net (the model or its DDP wrapper), compiled when asked,
    whole and fullgraph (the fused routing is a custom op, opaque to the compiler). State dicts
    stay those of the uncompiled model."""
    if not args.compile:
        return net
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        # DDP's bucketed all-reduce splits the compiled graph: fullgraph cannot hold (and is untested)
        raise ConfigError("--compile and --cuda-graphs are not supported under torchrun yet")
    return torch.compile(net, fullgraph=True, backend=backend, mode="reduce-overhead" if args.cuda_graphs else None)


def to_memory_format(images: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The input batch in the memory format of the convolutions."""
    return images.contiguous(memory_format=torch.channels_last) if args.channels_last else images


def mark_step(args: argparse.Namespace):
    """Before each training step: under CUDA graphs, the outputs of the previous replay may be
    overwritten from here on (they are all consumed by then)."""
    if args.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def describe(args: argparse.Namespace) -> str:
    on = [name for name, flag in (("bf16 autocast", args.bf16), ("channels_last", args.channels_last),
                                  ("torch.compile", args.compile), ("CUDA graphs", args.cuda_graphs)) if flag]
    every = f", test every {args.eval_every} epochs" if args.eval_every > 1 else ""
    return (", ".join(on) if on else "no throughput options") + every
