"""The first routing kernels ("fma" family): u_hat built by outer-product FMAs, one warp per tile
of 4 samples. The default family until a GPU sweep has timed the "tc" family against them; the
math of both is in kernels/routing.py.

Reductions over i (forward and reverse passes) are split over programs: each program of a
batch tile writes a partial sum, and the last program to finish (an atomic counter per batch
tile, integer, used only as a semaphore) adds the partials in a fixed order, so results do not
depend on scheduling. dW is reduced over the batch inside a program, then over a few batch
chunks by one torch.sum that also transposes it: deterministic, no float atomics.

Shape of the work (measured on an H200, see scripts/tune_routing.py): every program is one
warp over a tile of 4 samples. The softmax over j then stays inside the warp (no barriers),
each [4, J, D] tile costs 32 registers per thread, and u_hat is built by K outer-product FMAs
straight into the tile's layout (exact fp32 for every input dtype). The loop over i is
software-pipelined (tl.range num_stages): the next capsule's W and u are copied
asynchronously while this one is computed, which hides the L2 latency the loop is bound by.
The final sweep runs one such loop over (capsule, batch tile) pairs. W's layout (see
_transposed) is fixed, so its strides are compile-time constants.
"""
import torch
import triton
import triton.language as tl

from .common import (MAX_SPLITS, TRITON_VERSION, arrive, bias_grad_of, problem_plan, program_target, round_tf32,
                     squash, squash_backward, state_dtype, sum_partials, tuned)

__all__ = ["routing_forward", "routing_backward"]


# ----------------------------------------------------------------------------- device helpers
# Tiles are [BLOCK_B, BLOCK_J, BLOCK_D] (batch, output capsule, output dim). J, D and K are
# compile-time constants: a model has one shape, and masks on padded j/d fold away when J, D
# are powers of two. u_hat is built by K outer-product FMAs straight into that 3-D layout:
# with K = 8 this is cheaper than a tensor-core product padded to K = 16 plus the layout
# conversions it needs, and it is exact fp32 arithmetic for every input dtype.

@triton.jit
def _w_slices(w_ptr, i, j0: tl.constexpr, JG: tl.constexpr, J: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
              BLOCK_JG: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to the [BLOCK_JG, BLOCK_D] slice W_i[j0 : j0 + JG, :, 0] of W transposed (contiguous
    [I, K, J, D], see _transposed; slice k lies k * J * D further) and its mask: all J output
    capsules with j0 = 0, JG = J, or a group of them (the final sweep's). Its strides are
    compile-time constants: every slice then shares one base address, with constant offsets."""
    offs_j = tl.arange(0, BLOCK_JG)
    offs_d = tl.arange(0, BLOCK_D)
    w_row = w_ptr + i * (K * J * D) + (j0 + offs_j)[:, None] * D + offs_d[None, :]
    return w_row, (offs_j[:, None] < JG) & (offs_d[None, :] < D)


@triton.jit
def _predict(u_ptr, w_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, j0: tl.constexpr, JG: tl.constexpr,
             J: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_JG: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
             TF32: tl.constexpr, FOLD_J: tl.constexpr):
    """u_hat[b, j, d] = sum_k W[i, j, d, k] u[b, i, k] for the batch tile and the output capsules
    j0 .. j0 + JG - 1 (_w_slices), zero outside. With TF32 the fp32 operands are first rounded to
    tf32, as a tf32 tensor-core product would. FOLD_J selects W's padded j to 0 once more after
    the load: the pipelined load comes from shared memory, where the compiler cannot see the
    zeros, and with a layout that keeps padded j in whole registers (see _load_state) the select
    is constant and those rows' products fold away."""
    w_row, w_mask = _w_slices(w_ptr, i, j0, JG, J, D, K, BLOCK_JG, BLOCK_D)
    u_row = u_ptr + offs_b * stride_ub + i * stride_ui
    b_mask = offs_b < B
    u_hat = tl.zeros((BLOCK_B, BLOCK_JG, BLOCK_D), dtype=ACC)
    for k in tl.static_range(K):
        u_k = tl.load(u_row + k * stride_uk, mask=b_mask, other=0.0).to(ACC)
        w_k = tl.load(w_row + k * (J * D), mask=w_mask, other=0.0).to(ACC)
        if FOLD_J and BLOCK_JG != JG:
            w_k = tl.where(w_mask, w_k, 0.0)
        if TF32:
            u_k = round_tf32(u_k)
            w_k = round_tf32(w_k)
        u_hat += u_k[:, None, None] * w_k[None, :, :]
    return u_hat


@triton.jit
def _coupling(logits, J: tl.constexpr, BLOCK_J: tl.constexpr, LEAKY: tl.constexpr):
    """softmax over j (axis 1) of [BLOCK_B, BLOCK_J] logits; padded j get 0; with LEAKY an extra
    logit 0 joins the normaliser and is dropped.

    Padded j are kept out of the max by -inf and set to -0.0 after the exponential: -0.0 is the
    exact additive identity (+0.0 is not: -0.0 + 0.0 = +0.0), so the compiler drops them from the
    sum over j. The row is scaled by one reciprocal of its normaliser instead of a division per j.
    sm_90, MNIST shape: forward 114.2 -> 110.0 warp instructions per (b, i), reverse 130.0 -> 125.8."""
    real_j = (tl.arange(0, BLOCK_J) < J)[None, :]
    if BLOCK_J != J:
        row_max = tl.max(tl.where(real_j, logits, float("-inf")), axis=1)
    else:
        row_max = tl.max(logits, axis=1)
    if LEAKY:
        row_max = tl.maximum(row_max, 0.0)
    e = tl.exp(logits - row_max[:, None])
    if BLOCK_J != J:
        e = tl.where(real_j, e, -0.0)
    denom = tl.sum(e, axis=1)
    if LEAKY:
        denom += tl.exp(-row_max)
    return e * (1.0 / denom)[:, None]


@triton.jit
def _uniform_coupling(JG: tl.constexpr, BLOCK_JG: tl.constexpr, J: tl.constexpr, LEAKY: tl.constexpr,
                      ACC: tl.constexpr):
    """c at the first iteration (all logits 0): 1 / (J + leaky) on the JG real rows of a group of
    the J output capsules (all of them: JG = J), [1, BLOCK_JG, 1], computed in the accumulation
    dtype (a Python-float reciprocal would be rounded to fp32), one reciprocal per row."""
    ones = tl.where(tl.arange(0, BLOCK_JG) < JG, 1.0, 0.0).to(ACC)
    return (ones / (J + LEAKY))[None, :, None]


@triton.jit
def _load_prior(prior_ptr, i, stride_pi, stride_pj, j0: tl.constexpr, JG: tl.constexpr, BLOCK_JG: tl.constexpr,
                ACC: tl.constexpr):
    """Row i of the prior logits of output capsules j0 .. j0 + JG - 1 (all J: j0 = 0, JG = J) as
    [1, BLOCK_JG] (0 on padded j, which _coupling masks)."""
    offs_j = tl.arange(0, BLOCK_JG)
    ptrs = prior_ptr + i * stride_pi + (j0 + offs_j) * stride_pj
    return tl.load(ptrs, mask=offs_j < JG, other=0.0).to(ACC)[None, :]


@triton.jit
def _softmax_backward(c, dc):
    """da = c (dc - sum_j c dc) over axis 1 of [BLOCK_B, BLOCK_J] (a leak logit has dc = 0)."""
    return c * (dc - tl.sum(c * dc, axis=1)[:, None])


@triton.jit
def _group_offsets(offs_b, B, j0: tl.constexpr, JG: tl.constexpr, J: tl.constexpr, D: tl.constexpr,
                   BLOCK_JG: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of the output capsules j0 .. j0 + JG - 1 of samples offs_b in a contiguous
    [B, J, D] state tensor, as a [BLOCK_B, BLOCK_JG, BLOCK_D] tile."""
    offs_j = tl.arange(0, BLOCK_JG)
    offs_d = tl.arange(0, BLOCK_D)
    offs = offs_b[:, None, None] * (J * D) + (j0 + offs_j)[None, :, None] * D + offs_d[None, None, :]
    mask = (offs_b < B)[:, None, None] & (offs_j < JG)[None, :, None] & (offs_d < D)[None, None, :]
    return offs, mask


@triton.jit
def _state_offsets(tile, B, J: tl.constexpr, D: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of batch tile `tile` (an int64 index) in a contiguous [B, J, D] state tensor."""
    offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    offs, mask = _group_offsets(offs_b, B, 0, J, J, D, BLOCK_J, BLOCK_D)
    return offs_b, offs, mask


@triton.jit
def _load_state(ptr, tile, B, stride_b, stride_j, stride_d, J: tl.constexpr, D: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Batch tile `tile` (an int64 index) of a [B, J, D] tensor with any strides, as a
    [BLOCK_B, BLOCK_J, BLOCK_D] tile, 0 outside. Loaded as a 2-D [BLOCK_J, BLOCK_B x BLOCK_D] block
    and then reshaped: the load's layout then has no two axes of equal contiguity, whose order
    Triton 3.9 and 3.6 break differently, and both give the loop the layout with few lanes over j
    (softmax over j mostly inside a thread) and padded j in whole registers (folded away)."""
    offs_j = tl.arange(0, BLOCK_J)
    offs_m = tl.arange(0, BLOCK_B * BLOCK_D)
    offs_b = tile * BLOCK_B + offs_m // BLOCK_D
    offs_d = offs_m % BLOCK_D
    ptrs = ptr + offs_b[None, :] * stride_b + offs_j[:, None] * stride_j + offs_d[None, :] * stride_d
    mask = (offs_b < B)[None, :] & (offs_j < J)[:, None] & (offs_d < D)[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    return tl.permute(tl.reshape(x, (BLOCK_J, BLOCK_B, BLOCK_D)), (1, 0, 2))


# ----------------------------------------------------------------------------- forward

@triton.jit
def _forward_pass_kernel(
    u_ptr, w_ptr, bias_ptr, prior_ptr, v_ptr, s_all_ptr, v_sums_ptr, partial_ptr, counter_ptr,
    B, I, state_size, r, i_per_split, n_splits,
    stride_ub, stride_ui, stride_uk, stride_bj, stride_bd,
    stride_pi, stride_pj,
    J: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRIOR: tl.constexpr, LEAKY: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    ACC: tl.constexpr, TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    """Routing pass r for one batch tile (axis 0) and one slice of the input capsules (axis 1)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_b, offs, mask = _state_offsets(pid_b, B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1
    if not FIRST:
        v_sum = _load_state(v_sums_ptr + (r - 1) * state_size, pid_b, B, J * D, D, 1, J, D,
                            BLOCK_B, BLOCK_J, BLOCK_D)  # V^(r)

    acc = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
    i_start = pid_s * i_per_split
    i_end = tl.minimum(i_start + i_per_split, I)
    for i in tl.range(i_start, i_end, num_stages=STAGES):
        u_hat = _predict(u_ptr, w_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, 0, J, J, D, K, BLOCK_B, BLOCK_J,
                         BLOCK_D, ACC, TF32, True)
        if FIRST and not HAS_PRIOR:
            acc += u_hat
        else:
            if FIRST:  # b^(0) = prior
                logits = _load_prior(prior_ptr, i, stride_pi, stride_pj, 0, J, BLOCK_J, ACC)
            else:
                logits = tl.sum(u_hat * v_sum, axis=2)
                if HAS_PRIOR:
                    logits += _load_prior(prior_ptr, i, stride_pi, stride_pj, 0, J, BLOCK_J, ACC)
            c = _coupling(logits, J, BLOCK_J, LEAKY)
            acc += c[:, :, None] * u_hat
    if FIRST and not HAS_PRIOR:
        acc = acc * _uniform_coupling(J, BLOCK_J, J, LEAKY, ACC)
    tl.store(partial_ptr + pid_s * state_size + offs, acc, mask=mask)

    if arrive(counter_ptr, pid_b, (r + 1) * n_splits - 1):
        s = sum_partials(partial_ptr, n_splits, state_size, offs, mask)
        if HAS_BIAS:
            offs_j = tl.arange(0, BLOCK_J)
            offs_d = tl.arange(0, BLOCK_D)
            bias = tl.load(bias_ptr + offs_j[:, None] * stride_bj + offs_d[None, :] * stride_bd,
                           mask=(offs_j[:, None] < J) & (offs_d[None, :] < D), other=0.0)
            s += bias.to(ACC)[None, :, :]
        tl.store(s_all_ptr + r * state_size + offs, s, mask=mask)
        v = squash(s, 2)
        if LAST:
            tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        elif FIRST:
            tl.store(v_sums_ptr + r * state_size + offs, v, mask=mask)
        else:
            tl.store(v_sums_ptr + r * state_size + offs, v_sum + v, mask=mask)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _squash_backward_kernel(s_all_ptr, grad_v_ptr, ds_ptr, B, state_size, r, stride_gb, stride_gj, stride_gd,
                            J: tl.constexpr, D: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """ds^(r) = squash_backward(s^(r), grad_v), when no reverse pass produces it (R = 1 or
    detach_routing). grad_v may have any strides (e.g. stride 0 from the gradient of a sum)."""
    pid_b = tl.program_id(0).to(tl.int64)
    _, offs, mask = _state_offsets(pid_b, B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1
    s = tl.load(s_all_ptr + r * state_size + offs, mask=mask, other=0.0)
    dv = _load_state(grad_v_ptr, pid_b, B, stride_gb, stride_gj, stride_gd, J, D, BLOCK_B, BLOCK_J,
                     BLOCK_D).to(s.dtype)
    tl.store(ds_ptr + offs, squash_backward(s, dv, 2), mask=mask)


@triton.jit
def _reverse_pass_kernel(
    u_ptr, w_ptr, prior_ptr, s_all_ptr, v_sums_ptr, grad_v_ptr, dv_ptr, ds_ptr, partial_ptr, counter_ptr,
    B, I, state_size, r, pass_index, i_per_split, n_splits,
    stride_ub, stride_ui, stride_uk, stride_gb, stride_gj, stride_gd,
    stride_pi, stride_pj,
    J: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
    TOP: tl.constexpr, BOTTOM: tl.constexpr, HAS_PRIOR: tl.constexpr, LEAKY: tl.constexpr, ACC: tl.constexpr, TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    """Reverse pass r (R-1 >= r >= 1): dV^(r) = sum_i da^(r)_bij u_hat_bij for one batch tile and
    one slice of i. The last program of the tile writes ds^(r) (and ds^(0) when BOTTOM) and
    dv^(r-1) = dV^(r) + dv^(r) (dv^(R-2) = dV^(R-1) when TOP, since v^(R-1) is no part of V).
    dv buffer row q holds dv^(q); ds buffer row r holds ds^(r)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_b, offs, mask = _state_offsets(pid_b, B, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1

    v_sum = _load_state(v_sums_ptr + (r - 1) * state_size, pid_b, B, J * D, D, 1, J, D,
                        BLOCK_B, BLOCK_J, BLOCK_D)  # V^(r)
    s = _load_state(s_all_ptr + r * state_size, pid_b, B, J * D, D, 1, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    if TOP:
        dv = _load_state(grad_v_ptr, pid_b, B, stride_gb, stride_gj, stride_gd, J, D,
                         BLOCK_B, BLOCK_J, BLOCK_D).to(ACC)
    else:
        dv = _load_state(dv_ptr + r * state_size, pid_b, B, J * D, D, 1, J, D, BLOCK_B, BLOCK_J, BLOCK_D)
    ds = squash_backward(s, dv, 2)  # dv is loaded again after the loop: not live across it

    acc = tl.zeros((BLOCK_B, BLOCK_J, BLOCK_D), dtype=ACC)
    i_start = pid_s * i_per_split
    i_end = tl.minimum(i_start + i_per_split, I)
    for i in tl.range(i_start, i_end, num_stages=STAGES):
        u_hat = _predict(u_ptr, w_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, 0, J, J, D, K, BLOCK_B, BLOCK_J,
                         BLOCK_D, ACC, TF32, True)
        logits = tl.sum(u_hat * v_sum, axis=2)
        if HAS_PRIOR:
            logits += _load_prior(prior_ptr, i, stride_pi, stride_pj, 0, J, BLOCK_J, ACC)
        c = _coupling(logits, J, BLOCK_J, LEAKY)
        da = _softmax_backward(c, tl.sum(u_hat * ds, axis=2))
        acc += da[:, :, None] * u_hat
    tl.store(partial_ptr + pid_s * state_size + offs, acc, mask=mask)

    if arrive(counter_ptr, pid_b, (pass_index + 1) * n_splits - 1):
        dv_prev = sum_partials(partial_ptr, n_splits, state_size, offs, mask)
        if not TOP:
            dv_prev += tl.load(dv_ptr + r * state_size + offs, mask=mask, other=0.0)
        tl.store(dv_ptr + (r - 1) * state_size + offs, dv_prev, mask=mask)
        tl.store(ds_ptr + r * state_size + offs, ds, mask=mask)
        if BOTTOM:
            s0 = tl.load(s_all_ptr + offs, mask=mask, other=0.0)
            tl.store(ds_ptr + offs, squash_backward(s0, dv_prev, 2), mask=mask)


@triton.jit
def _split_coupling(logits1, logits2, J1: tl.constexpr, J2: tl.constexpr, BLOCK_J2: tl.constexpr,
                    LEAKY: tl.constexpr):
    """_coupling of the logits of both groups of output capsules ([BLOCK_B, J1] and
    [BLOCK_B, BLOCK_J2], J2 of them real): one softmax over the J1 + J2 of them, returned per group."""
    real2 = (tl.arange(0, BLOCK_J2) < J2)[None, :]
    top = tl.maximum(tl.max(logits1, axis=1), tl.max(tl.where(real2, logits2, float("-inf")), axis=1))
    if LEAKY:
        top = tl.maximum(top, 0.0)
    e1 = tl.exp(logits1 - top[:, None])
    e2 = tl.exp(logits2 - top[:, None])
    if BLOCK_J2 != J2:
        e2 = tl.where(real2, e2, -0.0)
    denom = tl.sum(e1, axis=1) + tl.sum(e2, axis=1)
    if LEAKY:
        denom += tl.exp(-top)
    inv = (1.0 / denom)[:, None]
    return e1 * inv, e2 * inv


@triton.jit
def _load_u_tile(u_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, K: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACC: tl.constexpr):
    """u[offs_b, i, :] as a [BLOCK_K, BLOCK_B] tile (0 outside)."""
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = u_ptr + offs_b[None, :] * stride_ub + i * stride_ui + offs_k[:, None] * stride_uk
    return tl.load(ptrs, mask=(offs_b < B)[None, :] & (offs_k < K)[:, None], other=0.0).to(ACC)


@triton.jit
def _dw_update(acc, x, u, NB: tl.constexpr):
    """acc[k, j, d] + sum_b u[k, b] x[j, d, b] over the NB (a power of two) samples of x
    ([BLOCK_JG, BLOCK_D, NB]) and u ([BLOCK_K, NB]), one sample at a time: tl.split takes the
    samples apart, halving the last axis (b's lowest bit) at each level, so every product is
    accumulated into acc's own layout, with no reduction over b across threads."""
    if NB == 1:
        acc += tl.reshape(u, (u.shape[0],))[:, None, None] * tl.reshape(x, (x.shape[0], x.shape[1]))[None, :, :]
    else:
        x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], NB // 2, 2)))
        u_even, u_odd = tl.split(tl.reshape(u, (u.shape[0], NB // 2, 2)))
        acc = _dw_update(acc, x_even, u_even, NB // 2)
        acc = _dw_update(acc, x_odd, u_odd, NB // 2)
    return acc


@triton.jit
def _input_grad_kernel(
    u_ptr, w_ptr, prior_ptr, v_sums_ptr, ds_ptr, du_ptr, dw_ptr, dprior_ptr,
    B, I, state_size, w_numel, i_per_prog, tiles_per_chunk,
    stride_ub, stride_ui, stride_uk, stride_pi, stride_pj,
    J: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
    R: tl.constexpr, FIRST_TERM: tl.constexpr, HAS_PRIOR: tl.constexpr, PRIOR_GRAD: tl.constexpr, LEAKY: tl.constexpr, ACC: tl.constexpr, TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, U_FIRST: tl.constexpr, STAGES: tl.constexpr,
    J1: tl.constexpr, BLOCK_J1: tl.constexpr, J2: tl.constexpr, BLOCK_J2: tl.constexpr,
):
    """Final backward sweep for a slice of i (axis 0) and a chunk of batch tiles (axis 1):
    du_hat from the small vectors (terms r = FIRST_TERM .. R-1), then du (each (b, i) written
    once) and this chunk's dW_i = sum_b du_hat_b u_b^T, summed over its batch tiles in a fixed
    order and written once into its row of dw_ptr, laid out [n_chunks, K, I, J, D] so that each
    k-slice is a contiguous [J, D] block. With PRIOR_GRAD also this chunk's dprior_i = sum_b
    sum_r da^(r), the same way, into its row of dprior_ptr ([n_chunks, I, J]). ds row t holds
    ds^(FIRST_TERM + t).

    One pipelined loop over the (capsule, batch tile) pairs, tiles innermost: a capsule's dW and
    dprior sums over the chunk's tiles stay in registers ([BLOCK_K, J, D] per group of output
    capsules) and are written at its last tile. _dw_update adds each sample's products in the
    accumulator's own layout, so no step reduces over b across threads, and no step reads back
    a partial sum (sm_90, MNIST shape, fp32, Triton 3.9 | 3.6: 608.5 | 647.0 -> 414.2 | 447.5
    warp instructions per (b, i); the capsules-innermost loop summed each step's dW over the
    tile's 4 samples with 80 shuffles per (b, i) and added it to the partial in memory).
    U_FIRST loads the u tile that dW needs at the start of a step and adds the step's dW before
    du, not both after du: the form in which 16-bit inputs under Triton 3.9 spill nothing (16 B
    in the other), and fp32, or Triton 3.6, spill 8-16 B (0 in the other).

    The output capsules come in two groups, tiles of their own: j < J1 ([BLOCK_B, BLOCK_J1,
    BLOCK_D]) and, where J2 > 0, the J2 after them ([BLOCK_B, BLOCK_J2, BLOCK_D]); the softmax
    and the sums over j span both. With J = 10 as 8 + 2 no tile row is padding, where one tile
    pads 10 to 16 rows and this loop's layout (samples inside a thread, for dW's sum over b)
    computes every padded row (sm_90, MNIST shape, fp32, Triton 3.9 | 3.6: 678.5 | 789.2 -> 608.5
    | 647.0 warp instructions per (b, i)). J2 = 0: one tile, J1 = J padded to BLOCK_J1."""
    SPLIT: tl.constexpr = J2 > 0
    pid_i = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1
    offs_j1 = tl.arange(0, BLOCK_J1)
    offs_j2 = tl.arange(0, BLOCK_J2)
    offs_d = tl.arange(0, BLOCK_D)
    jd_offs1 = offs_j1[:, None] * D + offs_d[None, :]
    jd_mask1 = (offs_j1[:, None] < J1) & (offs_d[None, :] < D)
    jd_offs2 = (J1 + offs_j2)[:, None] * D + offs_d[None, :]
    jd_mask2 = (offs_j2[:, None] < J2) & (offs_d[None, :] < D)
    dw_chunk = dw_ptr + pid_c * w_numel  # pid_c is int64

    i_start = pid_i * i_per_prog
    i_end = tl.minimum(i_start + i_per_prog, I)
    first_tile = pid_c * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(B, BLOCK_B))
    # one flat loop over (capsule, batch tile) pairs, tiles innermost: the pipeline then runs
    # across capsules (no prologue per capsule). int32 counters (at most tiles_per_chunk x
    # i_per_prog steps): a 32-bit division per step
    n_t = (last_tile - first_tile).to(tl.int32)
    n_steps = (i_end - i_start).to(tl.int32) * n_t
    offs_k = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_K, BLOCK_J1, BLOCK_D), dtype=ACC)
    if SPLIT:
        acc2 = tl.zeros((BLOCK_K, BLOCK_J2, BLOCK_D), dtype=ACC)
    if PRIOR_GRAD:  # sum_b sum_r da^(r): the prior is in every b^(r)
        da_acc1 = tl.zeros((BLOCK_B, BLOCK_J1), dtype=ACC)
        if SPLIT:
            da_acc2 = tl.zeros((BLOCK_B, BLOCK_J2), dtype=ACC)
    for step in tl.range(0, n_steps, num_stages=STAGES):
        t = step % n_t
        tile = first_tile + t
        i = i_start + step // n_t
        offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        offs1, mask1 = _group_offsets(offs_b, B, 0, J1, J, D, BLOCK_J1, BLOCK_D)
        if U_FIRST:
            u_t = _load_u_tile(u_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, K, BLOCK_K, ACC)
        # FOLD_J off: this loop's layout keeps padded rows, where there are any, in registers with
        # real ones: the select would cost
        u_hat1 = _predict(u_ptr, w_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, 0, J1, J, D, K,
                          BLOCK_B, BLOCK_J1, BLOCK_D, ACC, TF32, False)
        du_hat1 = tl.zeros((BLOCK_B, BLOCK_J1, BLOCK_D), dtype=ACC)
        if SPLIT:
            offs2, mask2 = _group_offsets(offs_b, B, J1, J2, J, D, BLOCK_J2, BLOCK_D)
            u_hat2 = _predict(u_ptr, w_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, J1, J2, J, D, K,
                              BLOCK_B, BLOCK_J2, BLOCK_D, ACC, TF32, False)
            du_hat2 = tl.zeros((BLOCK_B, BLOCK_J2, BLOCK_D), dtype=ACC)
        if HAS_PRIOR:
            prior1 = _load_prior(prior_ptr, i, stride_pi, stride_pj, 0, J1, BLOCK_J1, ACC)
            if SPLIT:
                prior2 = _load_prior(prior_ptr, i, stride_pi, stride_pj, J1, J2, BLOCK_J2, ACC)
        for r in tl.static_range(FIRST_TERM, R):
            ds_r = ds_ptr + (r - FIRST_TERM) * state_size
            ds1 = tl.load(ds_r + offs1, mask=mask1, other=0.0)
            if SPLIT:
                ds2 = tl.load(ds_r + offs2, mask=mask2, other=0.0)
            if r == 0 and not HAS_PRIOR:
                du_hat1 += _uniform_coupling(J1, BLOCK_J1, J, LEAKY, ACC) * ds1
                if SPLIT:
                    du_hat2 += _uniform_coupling(J2, BLOCK_J2, J, LEAKY, ACC) * ds2
            else:
                if r == 0:  # b^(0) = prior: no term through V^(0) = 0
                    logits1 = prior1
                    if SPLIT:
                        logits2 = prior2
                else:
                    v_r = v_sums_ptr + (r - 1) * state_size
                    v1 = tl.load(v_r + offs1, mask=mask1, other=0.0)
                    logits1 = tl.sum(u_hat1 * v1, axis=2)
                    if HAS_PRIOR:
                        logits1 += prior1
                    if SPLIT:
                        v2 = tl.load(v_r + offs2, mask=mask2, other=0.0)
                        logits2 = tl.sum(u_hat2 * v2, axis=2)
                        if HAS_PRIOR:
                            logits2 += prior2
                if SPLIT:
                    c1, c2 = _split_coupling(logits1, logits2, J1, J2, BLOCK_J2, LEAKY)
                    du_hat2 += c2[:, :, None] * ds2
                else:
                    c1 = _coupling(logits1, J1, BLOCK_J1, LEAKY)
                du_hat1 += c1[:, :, None] * ds1
                # through the softmax too: the full gradient (FIRST_TERM = 0); at r = 0 only dprior
                if FIRST_TERM == 0 and (r > 0 or PRIOR_GRAD):
                    # da = c (dc - sum_j c dc) over both groups (_softmax_backward)
                    dc1 = tl.sum(u_hat1 * ds1, axis=2)
                    mean = tl.sum(c1 * dc1, axis=1)
                    if SPLIT:
                        dc2 = tl.sum(u_hat2 * ds2, axis=2)
                        mean += tl.sum(c2 * dc2, axis=1)
                    da1 = c1 * (dc1 - mean[:, None])
                    if r > 0:
                        du_hat1 += da1[:, :, None] * v1
                    if PRIOR_GRAD:
                        da_acc1 += da1
                    if SPLIT:
                        da2 = c2 * (dc2 - mean[:, None])
                        if r > 0:
                            du_hat2 += da2[:, :, None] * v2
                        if PRIOR_GRAD:
                            da_acc2 += da2
        # dW_ijdk += sum_b du_hat_bijd u_bik ; du_bik = sum_jd W_ijdk du_hat_bijd
        w_row1, _ = _w_slices(w_ptr, i, 0, J1, J, D, K, BLOCK_J1, BLOCK_D)
        if SPLIT:
            w_row2, _ = _w_slices(w_ptr, i, J1, J2, J, D, K, BLOCK_J2, BLOCK_D)
        if U_FIRST:
            acc1 = _dw_update(acc1, tl.permute(du_hat1, (1, 2, 0)), u_t, BLOCK_B)
            if SPLIT:
                acc2 = _dw_update(acc2, tl.permute(du_hat2, (1, 2, 0)), u_t, BLOCK_B)
        for k in tl.static_range(K):
            w1_k = tl.load(w_row1 + k * (J * D), mask=jd_mask1, other=0.0).to(ACC)
            # one reduction over (j, d) flattened per group: one butterfly over the warp, not one per axis
            du_k = tl.sum(tl.reshape(du_hat1 * w1_k[None, :, :], (BLOCK_B, BLOCK_J1 * BLOCK_D)), axis=1)
            if SPLIT:
                w2_k = tl.load(w_row2 + k * (J * D), mask=jd_mask2, other=0.0).to(ACC)
                du_k += tl.sum(tl.reshape(du_hat2 * w2_k[None, :, :], (BLOCK_B, BLOCK_J2 * BLOCK_D)), axis=1)
            tl.store(du_ptr + offs_b * (I * K) + i * K + k, du_k.to(du_ptr.dtype.element_ty), mask=b_mask)
        if not U_FIRST:
            u_t = _load_u_tile(u_ptr, offs_b, i, B, stride_ub, stride_ui, stride_uk, K, BLOCK_K, ACC)
            acc1 = _dw_update(acc1, tl.permute(du_hat1, (1, 2, 0)), u_t, BLOCK_B)
            if SPLIT:
                acc2 = _dw_update(acc2, tl.permute(du_hat2, (1, 2, 0)), u_t, BLOCK_B)
        if t == n_t - 1:
            dw_ptrs = dw_chunk + (offs_k[:, None, None] * I + i) * (J * D)
            kmask = (offs_k < K)[:, None, None]
            tl.store(dw_ptrs + jd_offs1[None, :, :], acc1, mask=kmask & jd_mask1[None, :, :])
            acc1 = tl.zeros((BLOCK_K, BLOCK_J1, BLOCK_D), dtype=ACC)
            if SPLIT:
                tl.store(dw_ptrs + jd_offs2[None, :, :], acc2, mask=kmask & jd_mask2[None, :, :])
                acc2 = tl.zeros((BLOCK_K, BLOCK_J2, BLOCK_D), dtype=ACC)
            if PRIOR_GRAD:  # padded samples have ds = 0, hence da = 0
                dprior_row = dprior_ptr + (pid_c * I + i) * J
                tl.store(dprior_row + offs_j1, tl.sum(da_acc1, axis=0), mask=offs_j1 < J1)
                da_acc1 = tl.zeros((BLOCK_B, BLOCK_J1), dtype=ACC)
                if SPLIT:
                    tl.store(dprior_row + J1 + offs_j2, tl.sum(da_acc2, axis=0), mask=offs_j2 < J2)
                    da_acc2 = tl.zeros((BLOCK_B, BLOCK_J2), dtype=ACC)


# ----------------------------------------------------------------------------- host side

class _Config:
    """Launch parameters for one problem size; _TUNING overrides the heuristics."""

    def __init__(self, u: torch.Tensor, weight: torch.Tensor):
        batch, in_caps, _ = u.shape
        # one warp per program: the softmax over j then stays inside a warp (no barriers), and
        # a small batch tile keeps every [BLOCK_B, J, D] tile at 32 registers per thread
        self.block_b = tuned("block_b", 4)
        self.num_warps = tuned("num_warps", 1)
        self.grad_num_warps = tuned("grad_num_warps", 1)
        # prefetch the next input capsule's W and u (async copies) while computing this one
        self.stages = tuned("stages", 2)
        self.n_tiles = triton.cdiv(batch, self.block_b)
        splits = tuned("splits", min(MAX_SPLITS, triton.cdiv(program_target(u.device, self.num_warps),
                                                          self.n_tiles)))
        self.i_per_split = triton.cdiv(in_caps, max(1, min(splits, in_caps)))
        self.n_splits = triton.cdiv(in_caps, self.i_per_split)
        # final sweep: slices of i x chunks of batch tiles; at most 8 chunks bound dW's partials
        tiles_per_chunk = tuned("grad_tiles_per_chunk", triton.cdiv(self.n_tiles, 8))
        self.grad_tiles_per_chunk = max(1, min(tiles_per_chunk, self.n_tiles))
        self.grad_chunks = triton.cdiv(self.n_tiles, self.grad_tiles_per_chunk)
        grad_target = program_target(u.device, self.grad_num_warps)
        i_per_prog = tuned("grad_i_per_prog", triton.cdiv(in_caps * self.grad_chunks, grad_target))
        self.grad_i_per_prog = max(1, min(i_per_prog, in_caps))
        self.grad_i_progs = triton.cdiv(in_caps, self.grad_i_per_prog)


def _j_groups(out_caps: int) -> dict:
    """The final sweep's two groups of output capsules (see _input_grad_kernel): J1, the largest
    power of two up to J, and the J2 = J - J1 after it, where the two tiles (J1 + J2 rounded up to
    a power of two rows) have at least 3/8 fewer rows than one tile of J rounded up (J = 10: 8 + 2
    rows, not 16). Else J1 = J and no second group: where the tiles save fewer rows, their own
    reductions can cost more than the padded rows (sm_90, fp32, D = 16, K = 8, Triton 3.6, per
    (b, i), two tiles against one: J = 3 226.8 against 179.0, J = 6 339.0 against 270.8), though
    not always (J = 12: 426.2 against 478.8; under Triton 3.9 two tiles issue fewer at each of
    these J, J = 11 spilling 8 B). The tuning key grad_split_j overrides the choice."""
    whole = triton.next_power_of_2(out_caps)
    j1 = 1 << (out_caps.bit_length() - 1)
    j2 = out_caps - j1
    split_rows = j1 + (triton.next_power_of_2(j2) if j2 else 0)
    if j2 and tuned("grad_split_j", 8 * (whole - split_rows) >= 3 * whole):
        return dict(J1=j1, BLOCK_J1=j1, J2=j2, BLOCK_J2=triton.next_power_of_2(j2))
    return dict(J1=out_caps, BLOCK_J1=whole, J2=0, BLOCK_J2=1)


def _transposed(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W copied to [I, K, J, D] in `dtype` (the state dtype), contiguous: every W_i[:, :, k] slice
    the kernels load is then a contiguous [J, D] block (16-byte vector loads), at offsets the
    kernels know at compile time. Half W is widened here, exactly, in the same copy: loaded as
    16-bit, its 16-byte vectors hold 8 values along d where the tiles hold 4 per thread, and the
    layout conversion cost the bf16 kernels 30-50% more instructions than fp32's (sm_90, MNIST
    shape, Triton 3.9: forward 161.5, reverse 180.8, final sweep 898.2 per (b, i) against 110.0,
    126.0 and 678.5). The W bytes read are then fp32's."""
    w_t = weight.permute(0, 3, 1, 2)
    if weight.dtype == dtype:  # Tensor.to keeps a non-contiguous tensor of the same dtype as it is
        return w_t.contiguous()
    return w_t.to(dtype=dtype, memory_format=torch.contiguous_format)


class _Plan:
    """What the launches of one problem share and derive from its shapes, dtypes, device, options
    and overrides alone, built once (common.cached_plan): the launch parameters, the buffers'
    shapes, and per launch its grid and keyword arguments."""

    def __init__(self, u: torch.Tensor, weight: torch.Tensor, input_precision: str, iterations: int, leaky: bool,
                 has_bias: bool, has_prior: bool, detach_routing: bool):
        batch, in_caps, in_dim = u.shape
        _, out_caps, out_dim, _ = weight.shape
        cfg = self.cfg = _Config(u, weight)
        self.state_dtype = state_dtype(u.dtype)
        self.state_size = batch * out_caps * out_dim
        self.state_shape = (batch, out_caps, out_dim)
        constants = dict(J=out_caps, D=out_dim, K=in_dim, BLOCK_B=cfg.block_b,
                         BLOCK_J=triton.next_power_of_2(out_caps), BLOCK_D=triton.next_power_of_2(out_dim),
                         ACC=tl.float64 if u.dtype == torch.float64 else tl.float32,
                         TF32=input_precision == "tf32" and u.dtype == torch.float32, STAGES=cfg.stages)
        self.pass_grid = (cfg.n_tiles, cfg.n_splits)
        # forward: pass r
        self.forward_kwargs = [dict(HAS_BIAS=has_bias, HAS_PRIOR=has_prior, LEAKY=leaky, FIRST=r == 0,
                                    LAST=r == iterations - 1, **constants, num_warps=cfg.num_warps)
                               for r in range(iterations)]
        # backward
        self.first_term = iterations - 1 if (detach_routing or iterations == 1) else 0
        self.prior_grad = has_prior and not detach_routing
        self.squash_grid = (cfg.n_tiles,)
        self.squash_kwargs = dict(J=out_caps, D=out_dim, BLOCK_B=cfg.block_b, BLOCK_J=constants["BLOCK_J"],
                                  BLOCK_D=constants["BLOCK_D"], num_warps=cfg.num_warps)
        # reverse passes r = R-1 .. 1, as (pass_index, r, keyword arguments)
        self.reverse_passes = [(pass_index, r, dict(TOP=r == iterations - 1, BOTTOM=r == 1, HAS_PRIOR=has_prior,
                                                    LEAKY=leaky, **constants, num_warps=cfg.num_warps))
                               for pass_index, r in enumerate(range(iterations - 1, 0, -1))]
        self.grad_grid = (cfg.grad_i_progs, cfg.grad_chunks)
        grad_constants = {key: value for key, value in constants.items() if key != "BLOCK_J"}
        # where the final sweep reads u for dW: chosen per operand type and Triton version, the form
        # that spills nothing (sm_90, MNIST shape; _input_grad_kernel)
        half = u.dtype in (torch.float16, torch.bfloat16)
        u_first = tuned("grad_u_first", half and TRITON_VERSION >= (3, 9))
        self.grad_kwargs = dict(R=iterations, BLOCK_K=triton.next_power_of_2(in_dim), U_FIRST=u_first,
                                FIRST_TERM=self.first_term, HAS_PRIOR=has_prior,
                                PRIOR_GRAD=self.prior_grad, LEAKY=leaky, **grad_constants, **_j_groups(out_caps),
                                num_warps=cfg.grad_num_warps)
        # per chunk of batch tiles, dW laid out [K, I, J, D]: each k-slice a contiguous [J, D] block
        self.grad_w_partial_shape = (cfg.grad_chunks, in_dim, in_caps, out_caps, out_dim)
        self.grad_prior_partial_shape = (cfg.grad_chunks, in_caps, out_caps)


def _plan(u: torch.Tensor, weight: torch.Tensor, input_precision: str, iterations: int, leaky: bool,
          has_bias: bool = False, has_prior: bool = False, detach_routing: bool = False) -> _Plan:
    """The cached _Plan of this problem (common.problem_plan)."""
    return problem_plan(_Plan, program_target, u, weight, input_precision, iterations, leaky, has_bias, has_prior,
                        detach_routing)


def _prior_args(prior: torch.Tensor | None, placeholder: torch.Tensor):
    """The prior pointer and strides a launch takes; a placeholder, never read, without one."""
    return (prior, prior.stride()) if prior is not None else (placeholder, (0, 0))


def routing_forward(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, iterations: int,
                    leaky: bool, input_precision: str, prior: torch.Tensor | None = None):
    """Launch the R forward passes. Returns v [B, J, D] (input dtype), s_all [R, B, J, D] and
    v_sums [R-1, B, J, D] (V^(1) .. V^(R-1)), both in the state dtype."""
    batch, in_caps, _ = u.shape
    plan = _plan(u, weight, input_precision, iterations, leaky, bias is not None, prior is not None)
    cfg, device, state_dtype_ = plan.cfg, u.device, plan.state_dtype
    w_t = _transposed(weight, state_dtype_)
    v = torch.empty(plan.state_shape, dtype=u.dtype, device=device)
    s_all = torch.empty((iterations,) + plan.state_shape, dtype=state_dtype_, device=device)
    v_sums = torch.empty((iterations - 1,) + plan.state_shape, dtype=state_dtype_, device=device)
    partial = torch.empty((cfg.n_splits,) + plan.state_shape, dtype=state_dtype_, device=device)
    counter = torch.zeros(cfg.n_tiles, dtype=torch.int32, device=device)
    bias_arg = bias if bias is not None else s_all  # never read without HAS_BIAS
    bias_strides = bias.stride() if bias is not None else (0, 0)
    prior_arg, prior_strides = _prior_args(prior, s_all)
    strides = (*u.stride(), *bias_strides, *prior_strides)
    for r, kwargs in enumerate(plan.forward_kwargs):
        _forward_pass_kernel[plan.pass_grid](
            u, w_t, bias_arg, prior_arg, v, s_all, v_sums, partial, counter,
            batch, in_caps, plan.state_size, r, cfg.i_per_split, cfg.n_splits, *strides, **kwargs)
    return v, s_all, v_sums


def routing_backward(grad_v: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, s_all: torch.Tensor,
                     v_sums: torch.Tensor, iterations: int, leaky: bool, detach_routing: bool,
                     input_precision: str, prior: torch.Tensor | None = None, bias_grad: bool = True):
    """Gradients (du, dW, dbias, dprior) of v = routing(u, W, bias, prior) for the incoming grad_v
    (any strides). dbias is computed with bias_grad, whether or not the forward had a bias (it is
    then simply unused), else None; dprior is None without a prior and zeros under detach_routing."""
    batch, in_caps, in_dim = u.shape
    plan = _plan(u, weight, input_precision, iterations, leaky, False, prior is not None, detach_routing)
    cfg, device, state_dtype_, state_size = plan.cfg, u.device, plan.state_dtype, plan.state_size
    w_t = _transposed(weight, state_dtype_)
    ds = torch.empty((iterations - plan.first_term,) + plan.state_shape, dtype=state_dtype_, device=device)
    prior_arg, prior_strides = _prior_args(prior, ds)

    if plan.first_term == iterations - 1:
        _squash_backward_kernel[plan.squash_grid](
            s_all, grad_v, ds, batch, state_size, iterations - 1, *grad_v.stride(), **plan.squash_kwargs)
    else:
        dv = torch.empty((iterations - 1,) + plan.state_shape, dtype=state_dtype_, device=device)
        partial = torch.empty((cfg.n_splits,) + plan.state_shape, dtype=state_dtype_, device=device)
        counter = torch.zeros(cfg.n_tiles, dtype=torch.int32, device=device)
        strides = (*u.stride(), *grad_v.stride(), *prior_strides)
        for pass_index, r, kwargs in plan.reverse_passes:
            _reverse_pass_kernel[plan.pass_grid](
                u, w_t, prior_arg, s_all, v_sums, grad_v, dv, ds, partial, counter,
                batch, in_caps, state_size, r, pass_index, cfg.i_per_split, cfg.n_splits, *strides, **kwargs)

    grad_u = torch.empty(u.shape, dtype=u.dtype, device=device)
    grad_w_partial = torch.empty(plan.grad_w_partial_shape, dtype=state_dtype_, device=device)
    # per chunk of batch tiles too, summed over the chunks in a fixed order like dW
    grad_prior_partial = (torch.empty(plan.grad_prior_partial_shape, dtype=state_dtype_, device=device)
                          if plan.prior_grad else grad_w_partial)
    _input_grad_kernel[plan.grad_grid](
        u, w_t, prior_arg, v_sums, ds, grad_u, grad_w_partial, grad_prior_partial,
        batch, in_caps, state_size, weight.numel(), cfg.grad_i_per_prog, cfg.grad_tiles_per_chunk,
        *u.stride(), *prior_strides, **plan.grad_kwargs)
    # dW [I, J, D, K] from the partials [chunks, K, I, J, D]: one kernel that sums (in a fixed
    # order) and transposes at once, or copies (and casts) the only chunk
    grad_w_partial = grad_w_partial.permute(0, 2, 3, 4, 1)
    if cfg.grad_chunks == 1:
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=device).copy_(grad_w_partial[0])
    else:
        grad_w = torch.sum(grad_w_partial, dim=0, out=torch.empty(weight.shape, dtype=state_dtype_, device=device))
        if weight.dtype != state_dtype_:  # half inputs: dW summed in fp32, rounded once
            grad_w = grad_w.to(weight.dtype)
    grad_bias = bias_grad_of(ds, u.dtype) if bias_grad else None
    if prior is None:
        return grad_u, grad_w, grad_bias, None
    if not plan.prior_grad:
        return grad_u, grad_w, grad_bias, torch.zeros_like(prior)
    return grad_u, grad_w, grad_bias, grad_prior_partial.sum(dim=0).to(prior.dtype)
