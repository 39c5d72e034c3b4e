"""Triton kernels for fused dynamic routing, and their host launchers.

Notation (../shared/design/routing-math.md): u [B, I, K], W [I, J, D, K],
u_hat_bij = W_ij u_bi in R^D, R routing iterations, optional bias [J, D], leaky routing.

Forward. b_bij = u_hat_bij . V^(r)_bj with V^(r) = v^(0) + ... + v^(r-1), so the whole routing
state of a sample is V ([J, D]). Pass r is one sweep over i: recompute u_hat from W and u,
a = u_hat . V^(r), c = softmax_j(a) (plus a zero logit when leaky), s^(r) += c u_hat; then
s^(r) += bias, v^(r) = squash(s^(r)), V^(r+1) = V^(r) + v^(r). u_hat, b and c never touch memory.

Backward, exact. v = h(n) s with n = |s|, h(n) = n / (1 + n^2), h'(n) = (1 - n^2) / (1 + n^2)^2:
    ds = h(n) dv + h'(n) (s . dv / n) s        (the second term -> 0 as n -> 0)
dv^(R-1) is the incoming gradient; V^(r) feeds every v^(q), q < r, so
dv^(q) = sum_{r > q} dV^(r) for q < R-1. Reverse passes r = R-1 .. 1, one sweep over i each:
    dc_bij = ds^(r)_bj . u_hat_bij ;  da_bij = c_bij (dc_bij - sum_j' c_bij' dc_bij')
    dV^(r)_bj = sum_i da_bij u_hat_bij
A final sweep rebuilds the gradient of u_hat from the small vectors alone,
    du_hat_bij = sum_r c^(r)_bij ds^(r)_bj + da^(r)_bij V^(r)_bj,
and contracts it at once: du_bi = sum_j W_ij^T du_hat_bij, dW_ij = sum_b du_hat_bij u_bi^T.
With detach_routing only the r = R-1 term of the first sum remains (c^(R-1) is a constant).

Saved for backward: u, W, s^(r) for every r and V^(r) for r >= 1: O(B R J D) numbers.

Reductions over i (forward and reverse passes) are split over programs: each program of a
batch tile writes a partial sum, and the last program to finish (an atomic counter per batch
tile, integer, used only as a semaphore) adds the partials in a fixed order, so results do not
depend on scheduling. dW is reduced over the batch inside a program, then over a few batch
chunks by torch.sum: deterministic, no float atomics.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is interpreted, so read the switch once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["routing_forward", "routing_backward", "state_dtype", "tuning", "INTERPRET"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and of the saved routing state: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _load_w(w_ptr, i, J, D, K, stride_wi, stride_wj, stride_wd, stride_wk,
            BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """W_i as a [BLOCK_K, BLOCK_J * BLOCK_D] tile (column j * BLOCK_D + d), zero outside."""
    cols = tl.arange(0, BLOCK_J * BLOCK_D)
    col_j = cols // BLOCK_D
    col_d = cols % BLOCK_D
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = (w_ptr + i * stride_wi + col_j[None, :] * stride_wj + col_d[None, :] * stride_wd
            + offs_k[:, None] * stride_wk)
    mask = (col_j[None, :] < J) & (col_d[None, :] < D) & (offs_k[:, None] < K)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_u(u_ptr, offs_b, i, B, K, stride_ub, stride_ui, stride_uk, BLOCK_K: tl.constexpr):
    """u[b, i, :] for the batch tile as [BLOCK_B, BLOCK_K], zero outside."""
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = u_ptr + offs_b[:, None] * stride_ub + i * stride_ui + offs_k[None, :] * stride_uk
    return tl.load(ptrs, mask=(offs_b[:, None] < B) & (offs_k[None, :] < K), other=0.0)


@triton.jit
def _predict(u_tile, w_tile, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
             PRECISION: tl.constexpr, ACC: tl.constexpr):
    """u_hat for the batch tile, [BLOCK_B, BLOCK_J, BLOCK_D] in the accumulation dtype."""
    u_hat = tl.dot(u_tile, w_tile, input_precision=PRECISION, out_dtype=ACC)
    return tl.reshape(u_hat, (BLOCK_B, BLOCK_J, BLOCK_D))


@triton.jit
def _coupling(logits, valid_j, LEAKY: tl.constexpr):
    """softmax over j (axis 1) of [BLOCK_B, BLOCK_J] logits; padded j get 0; with LEAKY an extra
    logit 0 joins the normaliser and is dropped."""
    logits = tl.where(valid_j[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    if LEAKY:
        row_max = tl.maximum(row_max, 0.0)
    e = tl.exp(logits - row_max[:, None])
    denom = tl.sum(e, axis=1)
    if LEAKY:
        denom += tl.exp(-row_max)
    return e / denom[:, None]


@triton.jit
def _uniform_coupling(valid_j, J, LEAKY: tl.constexpr, ACC: tl.constexpr):
    """c at the first iteration (all logits 0): 1 / (J + leaky) on real j, [1, BLOCK_J], computed
    in the accumulation dtype (a Python-float reciprocal would be rounded to fp32)."""
    return (tl.where(valid_j, 1.0, 0.0).to(ACC) / (J + LEAKY))[None, :]


@triton.jit
def _squash(s):
    """v = s |s| / (1 + |s|^2) over the last axis of [BLOCK_B, BLOCK_J, BLOCK_D]."""
    n2 = tl.sum(s * s, axis=2)
    return s * (tl.sqrt(n2) / (1 + n2))[:, :, None]


@triton.jit
def _squash_backward(s, dv):
    """ds = h(n) dv + h'(n) (s . dv / n) s for v = h(n) s; finite (0) at s = 0."""
    n2 = tl.sum(s * s, axis=2)
    n = tl.sqrt(n2)
    h = n / (1 + n2)
    dh = (1 - n2) / ((1 + n2) * (1 + n2))
    s_dot_dv = tl.sum(s * dv, axis=2)
    coef = dh * s_dot_dv / tl.where(n > 0, n, 1.0)  # s . dv = 0 where n = 0
    return h[:, :, None] * dv + coef[:, :, None] * s


@triton.jit
def _state_offsets(tile, B, J, D, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of batch tile `tile` (an int64 index) in a contiguous [B, J, D] state tensor."""
    offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    offs = offs_b[:, None, None] * (J * D) + offs_j[None, :, None] * D + offs_d[None, None, :]
    mask = (offs_b < B)[:, None, None] & (offs_j < J)[None, :, None] & (offs_d < D)[None, None, :]
    return offs_b, offs, mask


@triton.jit
def _sum_partials(partial_ptr, n_splits, state_size, offs, mask,
                  BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Sum of the per-split partials of a batch tile, in split order (deterministic). Loads
    bypass L1 (.cg): the partials were written by other programs."""
    total = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
    for split in range(0, n_splits):
        total += tl.load(partial_ptr + split * state_size + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _arrive(counter_ptr, pid_b, expected):
    """Count this program in its batch tile's semaphore; True for the last one to arrive.
    The barrier orders every thread's partial stores before the release of the atomic."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + pid_b, 1, sem="acq_rel")
    return arrived == expected


# ----------------------------------------------------------------------------- forward

@triton.jit(do_not_specialize=["state_size"])
def _forward_pass_kernel(
    u_ptr, w_ptr, bias_ptr, v_ptr, s_all_ptr, v_sums_ptr, partial_ptr, counter_ptr,
    B, I, J, D, K, state_size, r, i_per_split, n_splits,
    stride_ub, stride_ui, stride_uk, stride_wi, stride_wj, stride_wd, stride_wk, stride_bj, stride_bd,
    HAS_BIAS: tl.constexpr, LEAKY: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Routing pass r for one batch tile (axis 0) and one slice of the input capsules (axis 1)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_b, offs, mask = _state_offsets(pid_b, B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    state_size = state_size.to(tl.int64)
    valid_j = tl.arange(0, BLOCK_J) < J
    if not FIRST:
        v_sum = tl.load(v_sums_ptr + (r - 1) * state_size + offs, mask=mask, other=0.0)  # V^(r)

    acc = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
    i_start = pid_s * i_per_split
    i_end = tl.minimum(i_start + i_per_split, I)
    for i in range(i_start, i_end):
        u_tile = _load_u(u_ptr, offs_b, i, B, K, stride_ub, stride_ui, stride_uk, BLOCK_K)
        w_tile = _load_w(w_ptr, i, J, D, K, stride_wi, stride_wj, stride_wd, stride_wk, BLOCK_J, BLOCK_D, BLOCK_K)
        u_hat = _predict(u_tile, w_tile, BLOCK_B, BLOCK_J, BLOCK_D, PRECISION, ACC)
        if FIRST:
            acc += u_hat
        else:
            c = _coupling(tl.sum(u_hat * v_sum, axis=2), valid_j, LEAKY)
            acc += c[:, :, None] * u_hat
    if FIRST:
        acc = acc * _uniform_coupling(valid_j, J, LEAKY, ACC)[:, :, None]
    tl.store(partial_ptr + pid_s * state_size + offs, acc, mask=mask)

    if _arrive(counter_ptr, pid_b, (r + 1) * n_splits - 1):
        s = _sum_partials(partial_ptr, n_splits, state_size, offs, mask, BLOCK_B, BLOCK_J, BLOCK_D, ACC)
        if HAS_BIAS:
            offs_j = tl.arange(0, BLOCK_J)
            offs_d = tl.arange(0, BLOCK_D)
            bias = tl.load(bias_ptr + offs_j[:, None] * stride_bj + offs_d[None, :] * stride_bd,
                           mask=(offs_j[:, None] < J) & (offs_d[None, :] < D), other=0.0)
            s += bias.to(ACC)[None, :, :]
        tl.store(s_all_ptr + r * state_size + offs, s, mask=mask)
        v = _squash(s)
        if LAST:
            tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        elif FIRST:
            tl.store(v_sums_ptr + r * state_size + offs, v, mask=mask)
        else:
            tl.store(v_sums_ptr + r * state_size + offs, v_sum + v, mask=mask)


# ----------------------------------------------------------------------------- backward

@triton.jit(do_not_specialize=["state_size"])
def _squash_backward_kernel(s_all_ptr, grad_v_ptr, ds_ptr, B, J, D, state_size, r,
                            stride_gb, stride_gj, stride_gd,
                            BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """ds^(r) = squash_backward(s^(r), grad_v), when no reverse pass produces it (R = 1 or
    detach_routing). grad_v may have any strides (e.g. stride 0 from the gradient of a sum)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_b, offs, mask = _state_offsets(pid_b, B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    state_size = state_size.to(tl.int64)
    s = tl.load(s_all_ptr + r * state_size + offs, mask=mask, other=0.0)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    g_ptrs = (grad_v_ptr + offs_b[:, None, None] * stride_gb + offs_j[None, :, None] * stride_gj
              + offs_d[None, None, :] * stride_gd)
    dv = tl.load(g_ptrs, mask=mask, other=0.0).to(s.dtype)
    tl.store(ds_ptr + offs, _squash_backward(s, dv), mask=mask)


@triton.jit(do_not_specialize=["state_size"])
def _reverse_pass_kernel(
    u_ptr, w_ptr, s_all_ptr, v_sums_ptr, grad_v_ptr, dv_ptr, ds_ptr, partial_ptr, counter_ptr,
    B, I, J, D, K, state_size, r, pass_index, i_per_split, n_splits,
    stride_ub, stride_ui, stride_uk, stride_wi, stride_wj, stride_wd, stride_wk,
    stride_gb, stride_gj, stride_gd,
    TOP: tl.constexpr, BOTTOM: tl.constexpr, LEAKY: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Reverse pass r (R-1 >= r >= 1): dV^(r) = sum_i da^(r)_bij u_hat_bij for one batch tile and
    one slice of i. The last program of the tile writes ds^(r) (and ds^(0) when BOTTOM) and
    dv^(r-1) = dV^(r) + dv^(r) (dv^(R-2) = dV^(R-1) when TOP, since v^(R-1) is no part of V).
    dv buffer row q holds dv^(q); ds buffer row r holds ds^(r)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_b, offs, mask = _state_offsets(pid_b, B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    state_size = state_size.to(tl.int64)
    valid_j = tl.arange(0, BLOCK_J) < J
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)

    v_sum = tl.load(v_sums_ptr + (r - 1) * state_size + offs, mask=mask, other=0.0)  # V^(r)
    s = tl.load(s_all_ptr + r * state_size + offs, mask=mask, other=0.0)
    if TOP:
        g_ptrs = (grad_v_ptr + offs_b[:, None, None] * stride_gb + offs_j[None, :, None] * stride_gj
                  + offs_d[None, None, :] * stride_gd)
        dv = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC)
    else:
        dv = tl.load(dv_ptr + r * state_size + offs, mask=mask, other=0.0)
    ds = _squash_backward(s, dv)

    acc = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
    i_start = pid_s * i_per_split
    i_end = tl.minimum(i_start + i_per_split, I)
    for i in range(i_start, i_end):
        u_tile = _load_u(u_ptr, offs_b, i, B, K, stride_ub, stride_ui, stride_uk, BLOCK_K)
        w_tile = _load_w(w_ptr, i, J, D, K, stride_wi, stride_wj, stride_wd, stride_wk, BLOCK_J, BLOCK_D, BLOCK_K)
        u_hat = _predict(u_tile, w_tile, BLOCK_B, BLOCK_J, BLOCK_D, PRECISION, ACC)
        c = _coupling(tl.sum(u_hat * v_sum, axis=2), valid_j, LEAKY)
        dc = tl.sum(u_hat * ds, axis=2)
        da = c * (dc - tl.sum(c * dc, axis=1)[:, None])
        acc += da[:, :, None] * u_hat
    tl.store(partial_ptr + pid_s * state_size + offs, acc, mask=mask)

    if _arrive(counter_ptr, pid_b, (pass_index + 1) * n_splits - 1):
        dv_prev = _sum_partials(partial_ptr, n_splits, state_size, offs, mask, BLOCK_B, BLOCK_J, BLOCK_D, ACC)
        if not TOP:
            dv_prev += dv
        tl.store(dv_ptr + (r - 1) * state_size + offs, dv_prev, mask=mask)
        tl.store(ds_ptr + r * state_size + offs, ds, mask=mask)
        if BOTTOM:
            s0 = tl.load(s_all_ptr + offs, mask=mask, other=0.0)
            tl.store(ds_ptr + offs, _squash_backward(s0, dv_prev), mask=mask)


@triton.jit(do_not_specialize=["state_size", "w_numel"])
def _input_grad_kernel(
    u_ptr, w_ptr, v_sums_ptr, ds_ptr, du_ptr, dw_ptr,
    B, I, J, D, K, state_size, w_numel, i_per_prog, tiles_per_chunk,
    stride_ub, stride_ui, stride_uk, stride_wi, stride_wj, stride_wd, stride_wk,
    R: tl.constexpr, FIRST_TERM: tl.constexpr, LEAKY: tl.constexpr,
    PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Final backward sweep for a slice of i (axis 0) and a chunk of batch tiles (axis 1):
    du_hat from the small vectors (terms r = FIRST_TERM .. R-1), then du (each (b, i) written
    once) and this chunk's dW (accumulated over its batch tiles in a fixed order; rows of dw_ptr
    are [n_chunks, I, J, D, K]). ds row t holds ds^(FIRST_TERM + t)."""
    pid_i = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    state_size = state_size.to(tl.int64)
    valid_j = tl.arange(0, BLOCK_J) < J
    cols = tl.arange(0, BLOCK_J * BLOCK_D)
    col_j = cols // BLOCK_D
    col_d = cols % BLOCK_D
    offs_k = tl.arange(0, BLOCK_K)
    dw_mask = (col_j[:, None] < J) & (col_d[:, None] < D) & (offs_k[None, :] < K)
    dw_chunk = dw_ptr + pid_c * w_numel
    dw_tile_offs = col_j[:, None] * (D * K) + col_d[:, None] * K + offs_k[None, :]

    i_start = pid_i * i_per_prog
    i_end = tl.minimum(i_start + i_per_prog, I)
    first_tile = pid_c * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(B, BLOCK_B))
    for tile in range(first_tile, last_tile):
        offs_b, offs, mask = _state_offsets(tile, B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
        for i in range(i_start, i_end):
            u_tile = _load_u(u_ptr, offs_b, i, B, K, stride_ub, stride_ui, stride_uk, BLOCK_K)
            w_tile = _load_w(w_ptr, i, J, D, K, stride_wi, stride_wj, stride_wd, stride_wk, BLOCK_J, BLOCK_D, BLOCK_K)
            u_hat = _predict(u_tile, w_tile, BLOCK_B, BLOCK_J, BLOCK_D, PRECISION, ACC)
            du_hat = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
            for r in tl.static_range(FIRST_TERM, R):
                ds = tl.load(ds_ptr + (r - FIRST_TERM) * state_size + offs, mask=mask, other=0.0)
                if r == 0:
                    du_hat += _uniform_coupling(valid_j, J, LEAKY, ACC)[:, :, None] * ds
                else:
                    v_sum = tl.load(v_sums_ptr + (r - 1) * state_size + offs, mask=mask, other=0.0)
                    c = _coupling(tl.sum(u_hat * v_sum, axis=2), valid_j, LEAKY)
                    du_hat += c[:, :, None] * ds
                    if FIRST_TERM == 0:  # full gradient: the softmax term too
                        dc = tl.sum(u_hat * ds, axis=2)
                        da = c * (dc - tl.sum(c * dc, axis=1)[:, None])
                        du_hat += da[:, :, None] * v_sum
            du_hat_2d = tl.reshape(du_hat, (BLOCK_B, BLOCK_J * BLOCK_D))
            # du_bi = sum_j W_ij^T du_hat_bij
            du = tl.dot(du_hat_2d, tl.trans(w_tile.to(ACC)), input_precision=GRAD_PRECISION, out_dtype=ACC)
            du_ptrs = du_ptr + offs_b[:, None] * (I * K) + i * K + offs_k[None, :]
            tl.store(du_ptrs, du.to(du_ptr.dtype.element_ty), mask=(offs_b[:, None] < B) & (offs_k[None, :] < K))
            # dW_ij += sum_b du_hat_bij u_bi^T, accumulated in this chunk's row of dw_ptr
            dw = tl.dot(tl.trans(du_hat_2d), u_tile.to(ACC), input_precision=GRAD_PRECISION, out_dtype=ACC)
            dw_ptrs = dw_chunk + i * (J * D * K) + dw_tile_offs
            if tile > first_tile:
                dw += tl.load(dw_ptrs, mask=dw_mask, other=0.0)
            tl.store(dw_ptrs, dw.to(dw_ptr.dtype.element_ty), mask=dw_mask)


# ----------------------------------------------------------------------------- host side

_TUNING = {}


@contextlib.contextmanager
def tuning(**overrides):
    """Override launch parameters inside the block (tests, tuning sweeps). Keys: block_b,
    splits (programs per batch tile in forward and reverse passes), grad_i_per_prog,
    grad_tiles_per_chunk, num_warps, grad_num_warps."""
    unknown = set(overrides) - {"block_b", "splits", "grad_i_per_prog", "grad_tiles_per_chunk",
                                "num_warps", "grad_num_warps"}
    if unknown:
        raise ValueError(f"unknown tuning keys: {sorted(unknown)}")
    saved = dict(_TUNING)
    _TUNING.update(overrides)
    try:
        yield
    finally:
        _TUNING.clear()
        _TUNING.update(saved)


def _program_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs one program at a time: few, larger programs


def _min_block_k(dtype: torch.dtype) -> int:
    # tensor-core products need K >= 16 for 16-bit inputs, 8 for fp32 (4 for fp64)
    return {torch.float16: 16, torch.bfloat16: 16, torch.float32: 8, torch.float64: 4}[dtype]


class _Config:
    def __init__(self, u: torch.Tensor, weight: torch.Tensor):
        batch, in_caps, in_dim = u.shape
        _, out_caps, out_dim, _ = weight.shape
        self.block_j = triton.next_power_of_2(out_caps)
        self.block_d = triton.next_power_of_2(out_dim)
        self.block_k = max(triton.next_power_of_2(in_dim), _min_block_k(u.dtype))
        self.block_b = _TUNING.get("block_b", 16)
        self.n_tiles = triton.cdiv(batch, self.block_b)
        target = _program_target(u.device)
        splits = _TUNING.get("splits", triton.cdiv(target, self.n_tiles))
        self.i_per_split = triton.cdiv(in_caps, max(1, min(splits, in_caps)))
        self.n_splits = triton.cdiv(in_caps, self.i_per_split)
        self.num_warps = _TUNING.get("num_warps", 4)
        # final sweep: slices of i x chunks of batch tiles; few chunks bound dW's partials
        tiles_per_chunk = _TUNING.get("grad_tiles_per_chunk", max(1, triton.cdiv(self.n_tiles, 8)))
        self.grad_tiles_per_chunk = min(tiles_per_chunk, self.n_tiles)
        self.grad_chunks = triton.cdiv(self.n_tiles, self.grad_tiles_per_chunk)
        i_per_prog = _TUNING.get("grad_i_per_prog", triton.cdiv(in_caps * self.grad_chunks, target))
        self.grad_i_per_prog = max(1, min(i_per_prog, in_caps))
        self.grad_i_progs = triton.cdiv(in_caps, self.grad_i_per_prog)
        self.grad_num_warps = _TUNING.get("grad_num_warps", 4)


def _precision(dtype: torch.dtype, input_precision: str) -> str:
    # the choice only matters for fp32 operands; fp64 products are always exact
    return "ieee" if dtype == torch.float64 else input_precision


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def routing_forward(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, iterations: int,
                    leaky: bool, input_precision: str):
    """Launch the R forward passes. Returns v [B, J, D] (input dtype), s_all [R, B, J, D] and
    v_sums [R-1, B, J, D] (V^(1) .. V^(R-1)), both in the state dtype."""
    batch, in_caps, in_dim = u.shape
    _, out_caps, out_dim, _ = weight.shape
    cfg = _Config(u, weight)
    acc_dtype = state_dtype(u.dtype)
    state_size = batch * out_caps * out_dim  # stride of one [B, J, D] row of the state buffers
    v = torch.empty(batch, out_caps, out_dim, dtype=u.dtype, device=u.device)
    s_all = torch.empty(iterations, batch, out_caps, out_dim, dtype=acc_dtype, device=u.device)
    v_sums = torch.empty(iterations - 1, batch, out_caps, out_dim, dtype=acc_dtype, device=u.device)
    partial = torch.empty(cfg.n_splits, batch, out_caps, out_dim, dtype=acc_dtype, device=u.device)
    counter = torch.zeros(cfg.n_tiles, dtype=torch.int32, device=u.device)
    bias_arg = bias if bias is not None else s_all  # never read without HAS_BIAS
    bias_strides = bias.stride() if bias is not None else (0, 0)
    for r in range(iterations):
        _forward_pass_kernel[(cfg.n_tiles, cfg.n_splits)](
            u, weight, bias_arg, v, s_all, v_sums, partial, counter,
            batch, in_caps, out_caps, out_dim, in_dim, state_size, r, cfg.i_per_split, cfg.n_splits,
            *u.stride(), *weight.stride(), *bias_strides,
            HAS_BIAS=bias is not None, LEAKY=leaky, FIRST=r == 0, LAST=r == iterations - 1,
            PRECISION=_precision(u.dtype, input_precision), ACC=_acc(u.dtype),
            BLOCK_B=cfg.block_b, BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps)
    return v, s_all, v_sums


def routing_backward(grad_v: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, s_all: torch.Tensor,
                     v_sums: torch.Tensor, iterations: int, leaky: bool, detach_routing: bool,
                     input_precision: str):
    """Gradients (du, dW, dbias) of v = routing(u, W, bias) for the incoming grad_v (any strides).
    dbias is returned whether or not the forward had a bias (it is then simply unused)."""
    batch, in_caps, in_dim = u.shape
    _, out_caps, out_dim, _ = weight.shape
    cfg = _Config(u, weight)
    acc_dtype = state_dtype(u.dtype)
    state_size = batch * out_caps * out_dim  # stride of one [B, J, D] row of the state buffers
    precision = _precision(u.dtype, input_precision)
    # the du/dW products take fp32 operands; for 16-bit inputs tf32 is far more than their precision
    grad_precision = precision if u.dtype in (torch.float32, torch.float64) else "tf32"
    first_term = iterations - 1 if (detach_routing or iterations == 1) else 0
    state = dict(dtype=acc_dtype, device=u.device)
    ds = torch.empty(iterations - first_term, batch, out_caps, out_dim, **state)
    blocks = dict(BLOCK_B=cfg.block_b, BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d)

    if first_term == iterations - 1:
        _squash_backward_kernel[(cfg.n_tiles,)](
            s_all, grad_v, ds, batch, out_caps, out_dim, state_size, iterations - 1, *grad_v.stride(), **blocks,
            num_warps=cfg.num_warps)
    else:
        dv = torch.empty(iterations - 1, batch, out_caps, out_dim, **state)
        partial = torch.empty(cfg.n_splits, batch, out_caps, out_dim, **state)
        counter = torch.zeros(cfg.n_tiles, dtype=torch.int32, device=u.device)
        for pass_index, r in enumerate(range(iterations - 1, 0, -1)):
            _reverse_pass_kernel[(cfg.n_tiles, cfg.n_splits)](
                u, weight, s_all, v_sums, grad_v, dv, ds, partial, counter,
                batch, in_caps, out_caps, out_dim, in_dim, state_size, r, pass_index, cfg.i_per_split, cfg.n_splits,
                *u.stride(), *weight.stride(), *grad_v.stride(),
                TOP=r == iterations - 1, BOTTOM=r == 1, LEAKY=leaky, PRECISION=precision, ACC=_acc(u.dtype),
                BLOCK_K=cfg.block_k, **blocks, num_warps=cfg.num_warps)

    grad_u = torch.empty(batch, in_caps, in_dim, dtype=u.dtype, device=u.device)
    direct = cfg.grad_chunks == 1 and weight.dtype == acc_dtype
    if direct:
        grad_w_partial = torch.empty(1, *weight.shape, dtype=weight.dtype, device=u.device)
    else:
        grad_w_partial = torch.empty(cfg.grad_chunks, *weight.shape, **state)
    _input_grad_kernel[(cfg.grad_i_progs, cfg.grad_chunks)](
        u, weight, v_sums, ds, grad_u, grad_w_partial,
        batch, in_caps, out_caps, out_dim, in_dim, state_size, weight.numel(), cfg.grad_i_per_prog,
        cfg.grad_tiles_per_chunk,
        *u.stride(), *weight.stride(),
        R=iterations, FIRST_TERM=first_term, LEAKY=leaky, PRECISION=precision, GRAD_PRECISION=grad_precision,
        ACC=_acc(u.dtype), BLOCK_K=cfg.block_k, **blocks, num_warps=cfg.grad_num_warps)
    grad_w = grad_w_partial[0] if direct else grad_w_partial.sum(dim=0).to(weight.dtype)
    grad_bias = ds.sum(dim=(0, 1)).to(u.dtype)
    return grad_u, grad_w, grad_bias
