"""What both routing kernel families share: the interpreter switch, the launch-parameter
overrides, and the device functions of the per-sample math (squash and its backward, tf32
rounding, the semaphore that ends a split reduction)."""
import contextlib
import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is interpreted, so read the switch once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the compiling Triton's (major, minor): some launch defaults follow its code generation
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

__all__ = ["INTERPRET", "state_dtype", "tuning", "tuned", "tuning_key", "cached_plan", "program_target"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and of the saved routing state: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- launch overrides

_TUNING = {}
_TUNING_KEY = ()  # the active overrides as a hashable, sorted tuple: part of every cached launch plan's key
TUNING_KEYS = {
    "kernels": "kernel family: 'tc' (tensor-core dots) or 'fma' (the first kernels: outer-product "
               "FMAs, one warp per 4 samples); see kernels/routing.py",
    # tc family
    "tc_block_b": "samples per program (>= 16); the fwd_* keys override the forward passes alone",
    "tc_num_warps": "warps per program",
    "tc_grad_num_warps": "warps per program of the final backward pass",
    "tc_grad_block_b": "samples per batch tile of the final backward pass (>= 16)",
    "chunk": "input capsules per step of the loop over i (chunk * next_pow2(K) >= 16)",
    "tc_splits": "programs per batch tile in the forward and reverse passes",
    "fwd_tc_block_b": "forward passes only: samples per program (>= 16)",
    "fwd_chunk": "forward passes only: input capsules per step of the loop over i",
    "fwd_tc_stages": "forward passes only: software-pipelining depth",
    "fwd_tc_num_warps": "forward passes only: warps per program",
    "tc_stages": "software-pipelining depth of the loads over chunks",
    "tc_grad_r_stages": "final backward pass: software-pipelining depth of its loop over the routing "
                        "iterations (shared memory: the ds and V tiles of each stage)",
    "tc_grad_scaled_prior": "final backward pass with a prior: its first iteration's du term as one chain "
                            "of dots on W scaled by softmax(prior) (True) or per output capsule (False)",
    "grad_batch_splits": "final backward pass: programs along the batch per chunk of capsules "
                         "(each > 1 adds one partial copy of dW, summed in a fixed order)",
    # fma family
    "block_b": "fma: samples per program",
    "splits": "fma: programs per batch tile",
    "grad_i_per_prog": "fma: capsules per program of the final sweep",
    "grad_tiles_per_chunk": "fma: batch tiles per program of the final sweep",
    "num_warps": "fma: warps per program",
    "grad_num_warps": "fma: warps per program of the final sweep",
    "grad_split_j": "fma: whether the final sweep splits the output capsules into two tiles "
                    "(J1 a power of two, then the rest) instead of one padded tile",
    "stages": "fma: software-pipelining depth",
    "grad_u_first": "fma: whether the final sweep loads its samples' u tile for dW at the start of each "
                    "step (True) or after the routing iterations (False)",
}


@contextlib.contextmanager
def tuning(**overrides):
    """Override launch parameters inside the block (tests, tuning sweeps, A/B timing). Keys
    and meanings: TUNING_KEYS."""
    unknown = set(overrides) - set(TUNING_KEYS)
    if unknown:
        raise ValueError(f"unknown tuning keys: {sorted(unknown)}; known: {sorted(TUNING_KEYS)}")
    if overrides.get("kernels", "tc") not in ("tc", "fma"):
        raise ValueError(f"kernels must be 'tc' or 'fma', got {overrides['kernels']!r}")
    global _TUNING_KEY
    saved = dict(_TUNING), _TUNING_KEY
    _TUNING.update(overrides)
    _TUNING_KEY = tuple(sorted(_TUNING.items()))
    try:
        yield
    finally:
        _TUNING.clear()
        _TUNING.update(saved[0])
        _TUNING_KEY = saved[1]


def tuned(key: str, default):
    """The override of `key` if one is active, else `default`."""
    return _TUNING.get(key, default)


def tuning_key() -> tuple:
    """The active overrides, hashable: launch plans cached under it never outlive a tuning block."""
    return _TUNING_KEY


# Launch plans: what the launchers derive from the shapes, dtypes, device, options and overrides
# alone (launch parameters, grids, the kernels' constants), built once per key, not per call.
_PLANS = {}
MAX_PLANS = 256  # a bound, for processes that see many shapes (then rebuilt as needed)


def cached_plan(key, build):
    """_PLANS[key], built by build() on first use."""
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def problem_plan(plan_cls, target, u: torch.Tensor, weight: torch.Tensor, *options):
    """plan_cls(u, weight, *options), cached under everything a plan reads: its class (one per
    family), the shapes, the dtype and the device, the options, the active tuning overrides and
    the family's program_target function `target` (which tests and scripts replace)."""
    key = (plan_cls, u.shape, weight.shape, u.dtype, u.device, options, tuning_key(), target)
    return cached_plan(key, lambda: plan_cls(u, weight, *options))


def bias_grad_of(ds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dbias = ds summed over its rows r and the batch (ds [rows, B, J, D]), in `dtype`."""
    grad_bias = ds.sum(dim=(0, 1))
    return grad_bias if grad_bias.dtype == dtype else grad_bias.to(dtype)


def program_target(device: torch.device, num_warps: int) -> int:
    """Programs worth launching: about 16 warps per multiprocessor, enough independent warps to
    hide the latency of each program's serial loop."""
    if device.type == "cuda":
        return 16 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
            // num_warps
    return 4  # the interpreter runs one program at a time: few, larger programs


# Most programs a reduction over i is split into per batch tile. The last program of a tile sums
# the partials of every split serially (J x D numbers each, a round trip to L2 apiece): at batch 1
# the FMA kernels split the 1152 capsules 1152 ways, and that serial sum is most of a pass.
MAX_SPLITS = 64

_SM_COUNT = {}


def _multiprocessors(index: int) -> int:
    if index not in _SM_COUNT:  # a cached host lookup: no driver call per launch
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# ----------------------------------------------------------------------------- device functions

@triton.jit
def round_tf32(x):
    """Round fp32 to the 10-bit mantissa of tf32, ties away from zero (like cvt.rna.tf32.f32)."""
    return tl.where(x == x, round_tf32_finite(x), x)  # NaN (the GPU's 0x7FFFFFFF would give -0.0) stays NaN


@triton.jit
def round_tf32_finite(x):
    """round_tf32 where x is not NaN (a NaN may come out as any value): one integer add and one
    mask (sm_90 SASS: IADD3 and LOP3; the NaN guard adds an FSETP)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _squash_factors(s, AXIS: tl.constexpr):
    """For squash along AXIS: t = s / m with m = max |s_d| (so |t| is in [1, sqrt(D)]), the norm
    n = m |t|, and h = n / (1 + n^2) written as 1 / (n + 1/n). Neither |s|^2 nor 1 + n^2 is ever
    formed, so no finite s overflows; at s = 0 everything is 0 (no 0/0). Returns t (shaped like
    s), and m, |t|, n and h reduced over AXIS."""
    m = tl.max(tl.abs(s), axis=AXIS)
    t = s / tl.expand_dims(tl.where(m > 0, m, 1.0), AXIS)
    t_norm = tl.sqrt(tl.sum(t * t, axis=AXIS))
    n = m * t_norm
    h = tl.where(n > 0, 1 / (n + 1 / tl.where(n > 0, n, 1.0)), 0.0)
    return t, m, t_norm, n, h


@triton.jit
def squash(s, AXIS: tl.constexpr):
    """v = s |s| / (1 + |s|^2) along AXIS, finite and correct for every finite s (a unit vector
    for huge |s|, 0 at s = 0): v = s_hat n h(n) = t (m h)."""
    t, m, _, _, h = _squash_factors(s, AXIS)
    return t * tl.expand_dims(m * h, AXIS)


@triton.jit
def squash_backward(s, dv, AXIS: tl.constexpr):
    """ds for v = h(n) s with n = |s|, h(n) = n / (1 + n^2):
        ds = h dv + n h'(n) (s_hat . dv) s_hat,   n h'(n) = h^2 (1/n - n)
    (n h' = n (1 - n^2) / (1 + n^2)^2 = h (1/n - n) / (1/n + n) and 1 / (1/n + n) = h), with
    s_hat = t / |t|: no overflow for any finite s, and 0 at s = 0, where the term vanishes."""
    t, _, t_norm, n, h = _squash_factors(s, AXIS)
    s_hat = t / tl.expand_dims(tl.where(t_norm > 0, t_norm, 1.0), AXIS)
    inv_n = 1 / tl.where(n > 0, n, 1.0)
    coef = tl.where(n > 0, h * h * (inv_n - n), 0.0) * tl.sum(s_hat * dv, axis=AXIS)
    return tl.expand_dims(h, AXIS) * dv + tl.expand_dims(coef, AXIS) * s_hat


@triton.jit
def arrive(counter_ptr, tile, expected):
    """Count this program in its batch tile's semaphore; True for the last one to arrive.
    The barrier orders every thread's partial stores before the release of the atomic."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    return arrived == expected


@triton.jit
def sum_partials(ptr, n_splits, state_size, offs, mask):
    """Sum over the splits, in split order (deterministic), of one tile of the partials at ptr
    (split 0; split k lies k * state_size further). Loads bypass L1 (.cg): other programs wrote them."""
    total = tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for split in range(1, n_splits):
        total += tl.load(ptr + split * state_size + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total
