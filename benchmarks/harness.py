"""Shared machinery of the routing benchmarks: providers, inputs, passes, timing, memory (the
timing, memory, compile warm-up and environment functions also serve benchmarks/convcaps.py).

What one measurement times (`measure`): every repetition starts from an idle device (the
host synchronises before the start mark), so a time is the latency of one call including the
host's launch overhead on its critical path, not a pipelined throughput.
- "fwd": the training forward, v = routing(u, W) with u and W requiring grad, so autograd
  records the graph and keeps what the backward needs (freed after the call).
- "bwd": torch.autograd.grad(v, (u, W), grad_v) only. The forward that builds the graph runs
  before the start mark, outside the timed region, once per repetition (no retain_graph).
- "fwd+bwd": both, in one timed region.
All passes return du and dW (both inputs require grad) and never accumulate into .grad.
On CUDA the marks are CUDA events; on the CPU, time.perf_counter (CPU ops are synchronous).
bfloat16 means bf16 inputs and outputs for every provider; inside, the fused op computes in fp32
and the reference (eager and compiled) keeps its intermediates in bf16 (its squash in fp32).
Inputs rotate over enough sets (u, W, grad_v) that together they exceed the L2 cache three
times, so a repetition does not find its inputs cached by the previous one.

Peak memory: torch.cuda.max_memory_allocated during one extra, untimed call minus
torch.cuda.memory_allocated just before it (inputs excluded; for "bwd" the forward's graph is
already allocated, so it is the backward's extra memory). None on the CPU.
"""
import functools
import gc
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import triton
from tqdm import tqdm

import fastcaps
from fastcaps import reference

PROVIDERS = ("eager", "compile", "fused")
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.set_float32_matmul_precision value -> the fused op's input_precision for fp32 inputs
MATMUL_PRECISIONS = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
# MNIST DigitCaps: I input capsules of K dims, J output capsules of D dims
MNIST_SHAPE = {"in_caps": 1152, "in_dim": 8, "out_caps": 10, "out_dim": 16}
MAX_INPUT_SETS = 64
REPO_ROOT = Path(__file__).resolve().parent.parent


def log(message: str):
    # tqdm.write: above the sweep's progress bar when one is shown (a plain print otherwise)
    tqdm.write(message)
    sys.stdout.flush()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unavailable_reason(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device`, or None. Decided by the device type alone: on the
    CPU fastcaps.dynamic_routing runs the eager reference or Triton's interpreter, and timing
    either as "fused" would be a lie."""
    if provider == "fused" and device.type != "cuda":
        return "fused Triton kernels need a CUDA device (on the CPU the op is the reference or the interpreter)"
    return None


def set_precision(matmul_precision: str) -> dict:
    """Apply one fp32 matmul precision to every provider and return what was set. cuDNN's TF32
    switch (used by CapsNet's convolutions) follows it, so "highest" means no TF32 anywhere.
    Only the legacy switches are used, as fastcaps and inductor read them: mixing them with the
    per-backend fp32_precision API makes torch >= 2.9 raise on the next read."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision must be one of {sorted(MATMUL_PRECISIONS)}, got {matmul_precision!r}")
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.allow_tf32 = matmul_precision != "highest"
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "fused_input_precision": MATMUL_PRECISIONS[matmul_precision],
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """Device description and software versions for the result files."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "multi_processor_count": props.multi_processor_count,
                "total_memory_gib": round(props.total_memory / 2**30, 2),
                "l2_cache_mib": round(l2_cache_bytes(device) / 2**20, 2)}
    else:
        info = {"type": "cpu", "name": "cpu", "processor": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda, "fastcaps": fastcaps.__version__, "git": _git_commit()}
    from fastcaps.kernels.routing import family_name  # imports Triton: only here, where it is installed
    return {"device": info, "versions": versions, "fused_kernels": family_name()}


def device_slug(env: dict) -> str:
    """File name stem for a device: 'NVIDIA H200' -> 'nvidia-h200'."""
    name = env["device"]["name"].lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-") or "device"


def l2_cache_bytes(device: torch.device) -> int:
    # L2_cache_size is missing from old torch builds; 64 MiB covers every current data-centre GPU
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device):
    """Drop what a failed measurement left behind (after an OOM the allocator cache is full)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- providers

def _reference_routing(iterations: int):
    def routing(u, weight):
        return reference.dynamic_routing(u, weight, iterations)
    return routing


def make_routing(provider: str, iterations: int, input_precision: str):
    """v = f(u, W) for one provider. "compile" returns torch.compile of the eager reference
    (inductor, default mode, one graph); its compilation happens at the first calls, which
    `compile_warmup` makes and times."""
    if provider == "eager":
        return _reference_routing(iterations)
    if provider == "compile":
        return torch.compile(_reference_routing(iterations), fullgraph=True)
    if provider == "fused":
        return functools.partial(fastcaps.dynamic_routing, iterations=iterations, input_precision=input_precision)
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def _first_calls(compiled, dtype: torch.dtype, device: torch.device, shape: dict, batch: int) -> dict:
    (inputs,) = make_inputs(batch, dtype, device, shape, n_sets=1, seed=1)
    synchronize(device)
    start = time.perf_counter()
    v = compiled(inputs["u"], inputs["weight"])
    synchronize(device)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    torch.autograd.grad(v, (inputs["u"], inputs["weight"]), inputs["grad_v"])
    synchronize(device)
    return {"first_forward_s": forward_s, "first_backward_s": time.perf_counter() - start}


def compile_warmup(compiled, dtype: torch.dtype, device: torch.device, shape: dict, batches) -> list[dict]:
    """Trigger (and time) the compilations the sweep needs, outside any timed region: one graph
    with a dynamic batch dimension (u marked dynamic), and, when batch 1 is swept, the graph
    dynamo specialises for size 1. Each record has the wall time of the first forward and the
    first backward call, which is when compilation happens (AOTAutograd may compile the
    backward graph already during the first forward), and a status as from `guarded`.

    The dynamic graph is compiled at the largest batch (smaller ones after an OOM): inductor
    picks its kernels' launch configurations from the sizes it compiles at, and a graph tuned
    for a tiny batch would handicap torch.compile where it matters most."""
    return warm_up_graphs(lambda batch: _first_calls(compiled, dtype, device, shape, batch), device, batches)


def warm_up_graphs(first_calls, device: torch.device, batches) -> list[dict]:
    """compile_warmup's policy for any compiled function: first_calls(batch) makes (and times)
    the first forward and backward calls at one batch size and returns their record."""
    records = []
    dynamic = sorted((b for b in batches if b >= 2), reverse=True)
    for batch in dynamic:
        record = {"graph": "dynamic batch (B >= 2)", "batch": batch, **guarded(lambda: first_calls(batch), device)}
        records.append(record)
        if record["status"] != "oom":
            break
    if 1 in batches:
        records.append({"graph": "B = 1 (specialised)", "batch": 1, **guarded(lambda: first_calls(1), device)})
    return records


# ----------------------------------------------------------------------------- inputs and passes

def input_set_bytes(batch: int, dtype: torch.dtype, shape: dict) -> int:
    """Bytes of one input set: u [B, I, K], W [I, J, D, K] and grad_v [B, J, D]."""
    i, k, j, d = shape["in_caps"], shape["in_dim"], shape["out_caps"], shape["out_dim"]
    return (batch * i * k + i * j * d * k + batch * j * d) * torch.finfo(dtype).bits // 8


def input_sets_needed(batch: int, dtype: torch.dtype, device: torch.device, shape: dict) -> int:
    """Sets to rotate so that consecutive uses of one set are 3x the L2 size apart; 1 on the
    CPU, where the timings are a smoke test of the harness, not results."""
    return input_sets_for(input_set_bytes(batch, dtype, shape), device)


def input_sets_for(set_bytes: int, device: torch.device) -> int:
    """Sets of `set_bytes` each to rotate so that consecutive uses of one set are 3x the L2 size
    apart (at most MAX_INPUT_SETS); 1 on the CPU."""
    if device.type != "cuda":
        return 1
    needed = math.ceil(3 * l2_cache_bytes(device) / set_bytes)
    return max(1, min(MAX_INPUT_SETS, needed))


def make_inputs(batch: int, dtype: torch.dtype, device: torch.device, shape: dict, n_sets: int,
                seed: int = 0) -> list[dict]:
    """`n_sets` independent inputs like CapsNet's: u squashed (|u| < 1), W ~ N(0, 0.01^2) (the
    layer's init), grad_v ~ N(0, 1). u and W require grad; u's batch dimension is marked
    dynamic (for torch.compile; a no-op for the other providers) when batch >= 2."""
    i, k, j, d = shape["in_caps"], shape["in_dim"], shape["out_caps"], shape["out_dim"]
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        u = reference.squash(torch.randn(batch, i, k, device=device, generator=gen)).to(dtype).requires_grad_()
        weight = (0.01 * torch.randn(i, j, d, k, device=device, generator=gen)).to(dtype).requires_grad_()
        grad_v = torch.randn(batch, j, d, device=device, generator=gen).to(dtype)
        if batch >= 2:
            torch._dynamo.mark_dynamic(u, 0)
        sets.append({"u": u, "weight": weight, "grad_v": grad_v})
    return sets


def make_pass(pass_: str, routing, sets: list[dict]):
    """(prepare, timed) for one pass: prepare(k) runs untimed and returns the state that
    timed(state) consumes; see the module docstring for what each pass times."""
    def inputs(s):
        return s["u"], s["weight"]

    if pass_ == "fwd":
        def prepare(k):
            return sets[k]

        def timed(s):
            routing(*inputs(s))
    elif pass_ == "bwd":
        def prepare(k):
            return routing(*inputs(sets[k])), sets[k]

        def timed(state):
            v, s = state
            torch.autograd.grad(v, inputs(s), s["grad_v"])
    elif pass_ == "fwd+bwd":
        def prepare(k):
            return sets[k]

        def timed(s):
            torch.autograd.grad(routing(*inputs(s)), inputs(s), s["grad_v"])
    else:
        raise ValueError(f"unknown pass {pass_!r}; known: {PASSES}")
    return prepare, timed


# ----------------------------------------------------------------------------- timing

def _timed_call(prepare, timed, k: int, device: torch.device):
    """One repetition: prepare (untimed), synchronise, time `timed`. Returns the elapsed time in
    ms, or on CUDA the (start, end) event pair to read after the next synchronisation."""
    state = prepare(k)
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        timed(state)
        end.record()
        return start, end
    start = time.perf_counter()
    timed(state)
    return (time.perf_counter() - start) * 1e3


def time_reps(prepare, timed, device: torch.device, reps: int, n_sets: int = 1) -> list[float]:
    """Times in ms of `reps` repetitions (see _timed_call), rotating over n_sets input sets."""
    marks = [_timed_call(prepare, timed, k % n_sets, device) for k in range(reps)]
    if device.type == "cuda":
        synchronize(device)
        return [start.elapsed_time(end) for start, end in marks]
    return marks


def first_call_ms(prepare, timed, device: torch.device) -> float:
    """Wall time of one whole repetition, preparation included: where compilation and JIT
    happen, so it is reported and never counted as a timing."""
    start = time.perf_counter()
    timed(prepare(0))
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def peak_memory_bytes(prepare, timed, device: torch.device) -> int | None:
    """Peak allocated memory of one untimed call above what was allocated just before it."""
    if device.type != "cuda":
        return None
    state = prepare(0)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    timed(state)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def reps_for(target_s: float, estimate_ms: float, min_reps: int, max_reps: int) -> int:
    return max(min_reps, min(max_reps, math.ceil(target_s * 1e3 / max(estimate_ms, 1e-3))))


def measure(prepare, timed, device: torch.device, *, n_sets: int = 1, target_s: float = 0.3,
            min_reps: int = 10, max_reps: int = 1000, warmup_s: float = 0.05) -> dict:
    """A first call (first_call_ms), one repetition to estimate the cost, warm-up repetitions
    for `warmup_s`, one untimed call for peak memory, then clamp(target_s / estimate, min_reps,
    max_reps) timed repetitions rotating over n_sets input sets. Returns median / p20 / p80 /
    min in ms and the counts."""
    first_ms = first_call_ms(prepare, timed, device)
    estimate_ms = time_reps(prepare, timed, device, 1, n_sets)[0]
    time_reps(prepare, timed, device, min(100, math.ceil(warmup_s * 1e3 / max(estimate_ms, 1e-3))), n_sets)
    peak = peak_memory_bytes(prepare, timed, device)
    reps = reps_for(target_s, estimate_ms, min_reps, max_reps)
    times = time_reps(prepare, timed, device, reps, n_sets)
    p20, median, p80 = np.percentile(times, [20, 50, 80])
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80), "min_ms": float(min(times)),
            "reps": reps, "input_sets": n_sets, "first_call_ms": first_ms,
            "peak_mb": None if peak is None else peak / 2**20}


def guarded(run, device: torch.device) -> dict:
    """Run one measurement; an out-of-memory becomes status "oom", any other failure status
    "error" (printed with its traceback), and the sweep goes on."""
    failure = None
    try:
        return {"status": "ok", **run()}
    except torch.cuda.OutOfMemoryError as exc:
        failure = {"status": "oom", "reason": str(exc).splitlines()[0]}
    except Exception as exc:  # noqa: BLE001 - a failed row must not end a sweep on a lent GPU
        text = str(exc)
        if "out of memory" in text.lower():  # cuBLAS / Triton report OOM as RuntimeError
            failure = {"status": "oom", "reason": text.splitlines()[0]}
        else:
            traceback.print_exc(file=sys.stderr)
            failure = {"status": "error", "reason": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"}
    free_memory(device)  # outside the except blocks: the exception's frames are released by now
    return failure
