"""Routing kernels on tensor-core dots (the "tc" family), and their host launchers.

Notation as in kernels/routing.py: u [B, I, K], W [I, J, D, K], state V^(r) = v^(0) + ... +
v^(r-1) ([B, J, D]), R iterations. Write W_j for the [D, I*K] matrix W_j[d, (i, k)] =
W[i, j, d, k] and V_j = V[:, j, :]. No u_hat is ever formed, in registers either:

    a_bij  = u_bi . (W_ij^T V_bj):  P_j = V_j @ W_j ([B, D] x [D, I*K]), then a summed over k
    s_bj   = sum_i c_bij W_ij u_bi: X_j = c_j u (c broadcast over k), s_j = X_j @ W_j^T

Each program owns a tile of BLOCK_B samples and walks a slice of the input capsules in chunks of
CHUNK capsules (CHUNK * K columns); per chunk and output capsule j, the forward is one dot of
[BLOCK_B, D] x [D, CHUNK*K] and one of [BLOCK_B, CHUNK*K] x [CHUNK*K, D]. The softmax over j is
element-wise across the J logit tiles, which live in a tuple (J is not padded to a power of two).

Backward (exact; the derivation is in kernels/routing.py). A reverse pass r adds Q_j = ds_j @ W_j:
dc = u . Q summed over k, da = c (dc - sum_j c dc), dV_j += (da_j u) @ W_j^T. The final pass owns a
chunk of capsules and walks a run of batch tiles, so dW is a dot that contracts over the batch,
accumulated in registers and written once per batch split (no atomics; the batch is split only
where the chunks alone would not fill the GPU, and the splits' partial dW are summed in order):

    du     = sum_r sum_j c^(r)_j Q^(r)_j + da^(r)_j P^(r)_j       (element-wise on the dot products)
    dW_j^T = sum_r (c^(r)_j u)^T @ ds^(r)_j + (da^(r)_j u)^T @ V^(r)_j

with c^(0) = 1 / (J + leaky) and no da^(0) without a prior. A prior [I, J] joins every logit
(logits = prior + u . P; c^(0) = softmax(prior), computed on [1, CHUNK] tiles and broadcast), and
its gradient dprior = sum_r sum_b da^(r) (da^(0) too) is summed over the batch tiles of a program
in registers and over the batch splits in a fixed order. Per r, one sweep over j forms P_j and
Q_j once, and with them the logits, dc and du, the softmax's normaliser kept online (as in flash
attention; see the kernel): neither J tiles of P and Q held until the softmax (they spill) nor
recomputed (MLIR merges the recomputed dot with the first). A second sweep adds the dW dots.

Precision of the fp32 dots (PREC): "ieee" exact fp32 products (FMA units); "tf32" operands
rounded to nearest tf32, then one tensor-core product (Triton's own tf32 truncates, 5x the
error); "tf32x3" a = a_hi + a_lo with both parts rounded to tf32, a b ~ a_hi b_hi + a_hi b_lo +
a_lo b_hi: three tf32 products with fp32 accumulation, about fp32's accuracy. The operands are
rounded explicitly, so a tf32 product of them is exact and Triton's interpreter (which ignores
input_precision and multiplies in fp32) computes what the GPU computes. fp16/bf16 inputs use
their own tensor-core products (V, ds and c u rounded to the input dtype) with fp32
accumulation; fp64 inputs use fp64 dots. ds, an A operand that the reverse and final passes
re-read per chunk or r, is rounded once where it is formed: its tf32 parts go to a split copy
beside it (one plane for tf32, two for tf32x3, transient within the backward), bit for bit what
rounding it per read gives (sm_90, MNIST shape, tf32x3 reverse 102.6 -> 89.1 warp instructions per
(b, i), final pass 722.5 -> 578.4).

Reductions over i (forward and reverse passes) end as in the fma family: partials per split,
summed in split order by the last program of the batch tile to arrive (an integer semaphore).
"""
import torch
import triton
import triton.language as tl

from .common import (MAX_SPLITS, TRITON_VERSION, arrive, bias_grad_of, problem_plan, program_target, round_tf32,
                     round_tf32_finite, squash, squash_backward, state_dtype, sum_partials, tuned)

__all__ = ["routing_forward", "routing_backward", "PRECISIONS"]

# input_precision -> the PREC constant of the kernels; half inputs always use HALF
PRECISIONS = {"ieee": 0, "tf32": 1, "tf32x3": 2}
_HALF = 3
# PREC -> the planes of ds's split copy (_store_split): round_tf32(ds) for tf32 dots, and the
# rounded low part for tf32x3; the other precisions' dots take ds as it is
_SPLIT_PLANES = {1: 1, 2: 2}


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, OP: tl.constexpr):
    """acc + a @ b at precision PREC (see the module docstring); OP is the operand dtype of HALF."""
    if PREC == 1:
        return tl.dot(round_tf32(a), round_tf32(b), acc, input_precision="tf32", out_dtype=acc.dtype)
    elif PREC == 2:
        a_hi, a_lo = _tf32_parts(a)
        return _dot_split(a_hi, a_lo, b, acc, PREC, OP)
    else:
        return _dot_unrounded(a, b, acc, PREC, OP)


@triton.jit
def _tf32_parts(x):
    """(x_hi, x_lo) of tf32x3: x_hi = round_tf32(x), x_lo = x - x_hi rounded too. x - x_hi is NaN
    only where x_hi is NaN or infinite, and the x_hi product then makes the result NaN or infinite
    whatever the low part's rounding gives: it needs no NaN guard."""
    hi = round_tf32(x)
    return hi, round_tf32_finite(x - hi)


@triton.jit
def _dot_unrounded(a, b, acc, PREC: tl.constexpr, OP: tl.constexpr):
    """_dot at the precisions that round no operand themselves: fp16/bf16 and exact products."""
    if PREC == 3:
        return tl.dot(a.to(OP), b.to(OP), acc, out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _dot_split(a_hi, a_lo, b, acc, PREC: tl.constexpr, OP: tl.constexpr):
    """_dot with the A operand already split (PREC 1: a_hi = round_tf32(a), a_lo unused; PREC 2:
    a_lo = the rounded low part too; else a_hi = a): as _dot(a, b, acc) to the bit."""
    if PREC == 1:
        return tl.dot(a_hi, round_tf32(b), acc, input_precision="tf32", out_dtype=acc.dtype)
    elif PREC == 2:
        # b's low part formed at its dot: formed with b_hi (_tf32_parts), before the first dot,
        # the odd-shape final pass with a prior and the leak spilled 40 B instead of 0 (Triton 3.9)
        b_hi = round_tf32(b)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32", out_dtype=acc.dtype)
        acc = tl.dot(a_hi, round_tf32_finite(b - b_hi), acc, input_precision="tf32", out_dtype=acc.dtype)
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32", out_dtype=acc.dtype)
    else:
        return _dot_unrounded(a_hi, b, acc, PREC, OP)


@triton.jit
def _store_split(split_ptr, plane, offs, x, mask, PREC: tl.constexpr):
    """x's tf32 parts, as _dot would form them, into the planes of split_ptr (plane elements apart)."""
    if PREC == 1:
        tl.store(split_ptr + offs, round_tf32(x), mask=mask)
    elif PREC == 2:
        hi, lo = _tf32_parts(x)
        tl.store(split_ptr + offs, hi, mask=mask)
        tl.store(split_ptr + plane + offs, lo, mask=mask)


@triton.jit
def _load_split(ptr, split_ptr, plane, offs, mask, PREC: tl.constexpr):
    """(a_hi, a_lo) of _dot_split for a tile at ptr + offs: from its split copy (_store_split) where
    PREC has one, else the tile itself twice."""
    if PREC == 2:
        return (tl.load(split_ptr + offs, mask=mask, other=0.0),
                tl.load(split_ptr + plane + offs, mask=mask, other=0.0))
    elif PREC == 1:
        hi = tl.load(split_ptr + offs, mask=mask, other=0.0)
        return hi, hi
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
        return x, x


@triton.jit
def _set(items, j: tl.constexpr, value):
    """items with element j replaced (tuples are immutable)."""
    return items[:j] + (value,) + items[j + 1:]


@triton.jit
def _zeros(J: tl.constexpr, SHAPE0: tl.constexpr, SHAPE1: tl.constexpr, ACC: tl.constexpr):
    items = ()
    for j in tl.static_range(J):
        items = items + (tl.zeros((SHAPE0, SHAPE1), dtype=ACC),)
    return items


@triton.jit
def _columns(CHUNK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, KMAJOR: tl.constexpr):
    """(capsule c within the chunk, component k) of each column of a chunk's tiles.

    Default order: column n = (a * CHUNK + c) * KB + b holds k = a * KB + b. With KB = 2 and
    CHUNK = 4 this matches the tensor-core accumulator layout, where thread q holds columns
    8 a + 2 q + b: all components of capsule q sit in one thread, so the sums over k and their
    broadcasts back need no shuffles. KMAJOR: n = k * CHUNK + c, the order _to_kmajor produces."""
    n = tl.arange(0, KA * CHUNK * KB)
    if KMAJOR:
        return n % CHUNK, n // CHUNK
    return (n // KB) % CHUNK, (n // (CHUNK * KB)) * KB + n % KB


@triton.jit
def _to_kmajor(x, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """[BLOCK_B, columns] from the default column order to the k-major one. For tf32 dots with
    KB = 2 this only renames registers: the accumulator layout holds columns 8a + 2q + b in
    thread q, the A-operand layout columns 8a + q + 4b, and both hold capsule q's components
    k = 2a + b. A convert_layout would cost shuffles in every chunk."""
    x = tl.permute(tl.reshape(x, (BLOCK_B, KA, CHUNK, KB)), (0, 1, 3, 2))
    return tl.reshape(x, (BLOCK_B, KA * KB * CHUNK))


# Addresses: a 64-bit scalar base per tile (which chunk, which j, which batch tile) plus 32-bit
# offsets within the tile computed once per program. Offsets per (j, tile) would be loop
# invariants that the compiler hoists, J of them at a time, and they alone would fill the
# registers.

@triton.jit
def _w_strides(J: tl.constexpr, D: tl.constexpr, K: tl.constexpr):
    """The strides (i, j, d, k) of W, which the launchers make contiguous: compile-time constants,
    so that the offset of each W_j is an immediate of the load, not a register per j held across
    the loop over chunks (the 16-bit forward spilled six of them)."""
    return J * D * K, D * K, K, 1


@triton.jit
def _w_offsets(c, k, stride_wi, stride_wd, stride_wk, DP: tl.constexpr):
    """Offsets of a [DP, columns] tile of W_j: element (d, (c, k)) at d * s_d + c * s_i + k * s_k."""
    d = tl.arange(0, DP)
    return d[:, None] * stride_wd + (c * stride_wi + k * stride_wk)[None, :]


@triton.jit
def _load_w(w_ptr, chunk, j: tl.constexpr, offs, c, k, I, stride_wi, stride_wj,
            K: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, CHUNK: tl.constexpr, WHOLE: tl.constexpr):
    """W_j restricted to a chunk, [DP, columns]: element (d, (c, k)) = W[chunk * CHUNK + c, j, d, k],
    zero outside the problem. WHOLE (_constants): every chunk lies inside W, and the load needs no
    mask."""
    base = w_ptr + tl.cast(chunk, tl.int64) * (CHUNK * stride_wi) + j * stride_wj
    if WHOLE:
        return tl.load(base + offs)
    col_ok = (c < I - chunk * CHUNK) & (k < K)
    return tl.load(base + offs, mask=(tl.arange(0, DP) < D)[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _u_offsets(BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
               stride_ub, stride_ui, stride_uk):
    """Offsets of a chunk's [BLOCK_B, columns] slice of u in memory order, column m = (c, k) =
    (m // (KA KB), m % (KA KB)), and those (c, k): each capsule's k form a contiguous run (with
    stride_uk = 1, specialised by Triton), which loads as vectors with one offset per vector.
    In the default order (_columns) the runs are interleaved, and every element needs an offset
    register of its own, held across the loop over chunks."""
    m = tl.arange(0, CHUNK * KA * KB)
    c = m // (KA * KB)
    k = m % (KA * KB)
    return tl.arange(0, BLOCK_B)[:, None] * stride_ub + (c * stride_ui + k * stride_uk)[None, :], c, k


@triton.jit
def _load_u(u_ptr, row0, chunk, offs, row_ok, c, k, I, stride_ub, stride_ui, K: tl.constexpr, CHUNK: tl.constexpr,
            KA: tl.constexpr, KB: tl.constexpr, BLOCK_B: tl.constexpr):
    """[BLOCK_B, columns] slice of u for the samples row0 + (0 .. BLOCK_B-1) and a chunk, in the
    default column order (_columns), zero outside the problem; offs, c, k from _u_offsets (memory
    order), permuted after the load."""
    base = u_ptr + row0 * stride_ub + tl.cast(chunk, tl.int64) * (CHUNK * stride_ui)
    col_ok = (c < I - chunk * CHUNK) & (k < K)
    x = tl.load(base + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    x = tl.permute(tl.reshape(x, (BLOCK_B, CHUNK, KA, KB)), (0, 2, 1, 3))
    return tl.reshape(x, (BLOCK_B, KA * CHUNK * KB))


@triton.jit
def _load_prior(prior_ptr, chunk, j: tl.constexpr, I, J: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr,
                WHOLE: tl.constexpr):
    """[1, CHUNK] prior logits of output capsule j for the capsules of a chunk (0 outside), from a
    contiguous [I, J] prior (_prior_arg). Its strides are then constants: with runtime strides the
    J loads' addresses took registers, and the tf32x3 reverse pass with a prior spilled 48 B
    instead of its 40 without (sm_90, MNIST shape, Triton 3.9)."""
    c = tl.arange(0, CHUNK)
    ptrs = prior_ptr + (tl.cast(chunk, tl.int64) * CHUNK + c) * J + j
    if WHOLE:
        return tl.load(ptrs).to(ACC)[None, :]
    return tl.load(ptrs, mask=c < I - chunk * CHUNK, other=0.0).to(ACC)[None, :]


@triton.jit
def _prior_couplings(prior_ptr, chunk, I, J: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr,
                     WHOLE: tl.constexpr, LEAKY: tl.constexpr):
    """c^(0) = softmax(prior) of the chunk's capsules: J [1, CHUNK] tiles, the same for every sample."""
    prior_logits = ()
    for j in tl.static_range(J):
        prior_logits = prior_logits + (_load_prior(prior_ptr, chunk, j, I, J, CHUNK, ACC, WHOLE),)
    return _softmax(prior_logits, J, LEAKY)


@triton.jit
def _segment_sum(x, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """[BLOCK_B, columns] -> [BLOCK_B, CHUNK]: the sum over k of each capsule's columns."""
    return tl.sum(tl.sum(tl.reshape(x, (BLOCK_B, KA, CHUNK, KB)), axis=3), axis=1)


@triton.jit
def _spread(c, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """[BLOCK_B, CHUNK] -> [BLOCK_B, columns]: each capsule's value on each of its columns."""
    wide = tl.broadcast_to(c[:, None, :, None], (BLOCK_B, KA, CHUNK, KB))
    return tl.reshape(wide, (BLOCK_B, KA * CHUNK * KB))


@triton.jit
def _softmax(logits, J: tl.constexpr, LEAKY: tl.constexpr):
    """Couplings c_j = softmax over the tuple of J logit tiles (with LEAKY an extra logit 0 joins
    the normaliser and is dropped). Element-wise: each (sample, capsule) is its own softmax."""
    top = logits[0]
    for j in tl.static_range(1, J):
        top = tl.maximum(top, logits[j])
    if LEAKY:
        top = tl.maximum(top, 0.0)
    exps = ()
    total = tl.exp(-top) if LEAKY else tl.zeros_like(top)
    for j in tl.static_range(J):
        e = tl.exp(logits[j] - top)
        total += e
        exps = exps + (e,)
    inv = 1 / total
    couplings = ()
    for j in tl.static_range(J):
        couplings = couplings + (exps[j] * inv,)
    return couplings


@triton.jit
def _softmax_backward(c, dc, J: tl.constexpr):
    """da_j = c_j (dc_j - sum_j' c_j' dc_j') over the tuples (a leak logit has dc = 0)."""
    mean = c[0] * dc[0]
    for j in tl.static_range(1, J):
        mean += c[j] * dc[j]
    da = ()
    for j in tl.static_range(J):
        da = da + (c[j] * (dc[j] - mean),)
    return da


@triton.jit
def _state_tile(row0, B, BLOCK_B: tl.constexpr, J: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Offsets within a [BLOCK_B, DP] tile of a contiguous [B, J, D] state tensor whose base is
    row0 * J * D + j * D, and its mask."""
    rows = tl.arange(0, BLOCK_B)
    d = tl.arange(0, DP)
    return rows[:, None] * (J * D) + d[None, :], (rows < B - row0)[:, None] & (d < D)[None, :]


@triton.jit
def _load_strided_tiles(ptr, row0, mask, stride_b, stride_j, stride_d, J: tl.constexpr, BLOCK_B: tl.constexpr,
                        DP: tl.constexpr):
    """The J [BLOCK_B, DP] tiles of a [B, J, D] tensor with any strides (stride 0 too)."""
    offs = tl.arange(0, BLOCK_B)[:, None] * stride_b + tl.arange(0, DP)[None, :] * stride_d
    tiles = ()
    for j in tl.static_range(J):
        tiles = tiles + (tl.load(ptr + row0 * stride_b + j * stride_j + offs, mask=mask, other=0.0),)
    return tiles


# ----------------------------------------------------------------------------- forward

@triton.jit
def _tc_forward_kernel(
    u_ptr, w_ptr, bias_ptr, prior_ptr, v_ptr, s_all_ptr, v_sums_ptr, partial_ptr, counter_ptr,
    B, I, state_size, r, chunks_per_split, n_splits,
    stride_ub, stride_ui, stride_uk, stride_bj, stride_bd,
    J: tl.constexpr, D: tl.constexpr, K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, DP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, KMAJOR: tl.constexpr,
    WHOLE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PRIOR: tl.constexpr,
    LEAKY: tl.constexpr, STAGES: tl.constexpr,
):
    """Routing pass r for one batch tile (axis 0) and one slice of the chunks of capsules (axis 1)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1
    row0 = tl.cast(pid_b, tl.int64) * BLOCK_B
    offs, mask = _state_tile(row0, B, BLOCK_B, J, D, DP)
    state = row0 * (J * D)
    row_ok = tl.arange(0, BLOCK_B) < B - row0
    OP: tl.constexpr = u_ptr.dtype.element_ty
    stride_wi, stride_wj, stride_wd, stride_wk = _w_strides(J, D, K)
    c1, k1 = _columns(CHUNK, KA, KB, False)
    c2, k2 = _columns(CHUNK, KA, KB, KMAJOR)
    u_offs, cu, ku = _u_offsets(BLOCK_B, CHUNK, KA, KB, stride_ub, stride_ui, stride_uk)
    w1_offs = _w_offsets(c1, k1, stride_wi, stride_wd, stride_wk, DP)
    w2_offs = _w_offsets(c2, k2, stride_wi, stride_wd, stride_wk, DP)
    v_sum_ptr = v_sums_ptr + (r - 1) * state_size + state  # V^(r) of this tile, read per chunk (see below)
    acc = _zeros(J, BLOCK_B, DP, ACC)

    chunk_start = pid_s * chunks_per_split
    chunk_end = tl.minimum(chunk_start + chunks_per_split, tl.cdiv(I, CHUNK))
    for chunk in tl.range(chunk_start, chunk_end, num_stages=STAGES):
        u = _load_u(u_ptr, row0, chunk, u_offs, row_ok, cu, ku, I, stride_ub, stride_ui, K, CHUNK, KA, KB, BLOCK_B).to(ACC)
        if FIRST and not HAS_PRIOR:  # c = 1 / (J + leaky) for every capsule: applied once, after the loop
            for j in tl.static_range(J):
                w = _load_w(w_ptr, chunk, j, w1_offs, c1, k1, I, stride_wi, stride_wj, K, D, DP, CHUNK, WHOLE)
                acc = _set(acc, j, _dot(u, tl.trans(w), acc[j], PREC, OP))
        else:
            # the J tiles of V^(r) are re-read (from L1) in every chunk rather than held: in
            # registers, next to the J accumulators, they would spill
            logits = ()
            for j in tl.static_range(J):
                if FIRST:  # b^(0) = prior, the same for every sample: [1, CHUNK] tiles
                    logits = logits + (_load_prior(prior_ptr, chunk, j, I, J, CHUNK, ACC, WHOLE),)
                else:
                    w = _load_w(w_ptr, chunk, j, w1_offs, c1, k1, I, stride_wi, stride_wj, K, D, DP, CHUNK, WHOLE)
                    v_sum = tl.load(v_sum_ptr + j * D + offs, mask=mask, other=0.0)
                    p = _dot(v_sum, w, tl.zeros((BLOCK_B, KA * CHUNK * KB), dtype=ACC), PREC, OP)
                    logit = _segment_sum(u * p, BLOCK_B, CHUNK, KA, KB)
                    if HAS_PRIOR:
                        logit += _load_prior(prior_ptr, chunk, j, I, J, CHUNK, ACC, WHOLE)
                    logits = logits + (logit,)
            c = _softmax(logits, J, LEAKY)
            for j in tl.static_range(J):
                w = _load_w(w_ptr, chunk, j, w2_offs, c2, k2, I, stride_wi, stride_wj, K, D, DP, CHUNK, WHOLE)
                x = _spread(c[j], BLOCK_B, CHUNK, KA, KB) * u
                if KMAJOR:
                    x = _to_kmajor(x, BLOCK_B, CHUNK, KA, KB)
                acc = _set(acc, j, _dot(x, tl.trans(w), acc[j], PREC, OP))
    for j in tl.static_range(J):
        tl.store(partial_ptr + pid_s * state_size + state + j * D + offs, acc[j], mask=mask)

    if arrive(counter_ptr, pid_b, (r + 1) * n_splits - 1):
        d = tl.arange(0, DP)
        for j in tl.static_range(J):
            s = sum_partials(partial_ptr + state + j * D, n_splits, state_size, offs, mask)
            if FIRST and not HAS_PRIOR:
                s = s / (J + LEAKY)
            if HAS_BIAS:
                s += tl.load(bias_ptr + j * stride_bj + d * stride_bd, mask=d < D, other=0.0).to(ACC)[None, :]
            tl.store(s_all_ptr + r * state_size + state + j * D + offs, s, mask=mask)
            v = squash(s, 1)
            if LAST:
                tl.store(v_ptr + state + j * D + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
            elif FIRST:
                tl.store(v_sums_ptr + state + j * D + offs, v, mask=mask)
            else:
                # V^(r) addressed from V^(r+1)'s row, not as in the loop's (hoisted) V^(r) loads,
                # whose pointers would then stay live across the loop (bf16, 32 columns, Triton
                # 3.6: 16 -> 8 spilled bytes; 3.9 unchanged)
                v_sum_next = v_sums_ptr + r * state_size + state + j * D + offs
                v_sum = tl.load(v_sum_next - state_size, mask=mask, other=0.0)
                tl.store(v_sum_next, v_sum + v, mask=mask)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _tc_squash_backward_kernel(s_all_ptr, grad_v_ptr, ds_ptr, ds_split_ptr, B, state_size, split_plane, r, ds_row,
                               stride_gb, stride_gj, stride_gd,
                               J: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_B: tl.constexpr,
                               ACC: tl.constexpr, PREC: tl.constexpr):
    """ds^(r) = squash_backward(s^(r), grad_v) into ds row ds_row, and its split copy
    (_store_split), for r = R-1. grad_v may have any strides (stride 0 from the gradient of a sum)."""
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1
    row0 = tl.cast(tl.program_id(0), tl.int64) * BLOCK_B
    offs, mask = _state_tile(row0, B, BLOCK_B, J, D, DP)
    state = row0 * (J * D)
    dv = _load_strided_tiles(grad_v_ptr, row0, mask, stride_gb, stride_gj, stride_gd, J, BLOCK_B, DP)
    for j in tl.static_range(J):
        s = tl.load(s_all_ptr + r * state_size + state + j * D + offs, mask=mask, other=0.0)
        ds = squash_backward(s, dv[j].to(ACC), 1)
        tile = ds_row * state_size + state + j * D
        tl.store(ds_ptr + tile + offs, ds, mask=mask)
        _store_split(ds_split_ptr + tile, split_plane, offs, ds, mask, PREC)


@triton.jit
def _tc_reverse_kernel(
    u_ptr, w_ptr, prior_ptr, s_all_ptr, v_sums_ptr, dv_ptr, ds_ptr, ds_split_ptr, partial_ptr, counter_ptr,
    B, I, state_size, split_plane, r, pass_index, chunks_per_split, n_splits,
    stride_ub, stride_ui, stride_uk,
    J: tl.constexpr, D: tl.constexpr, K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, DP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, KMAJOR: tl.constexpr,
    WHOLE: tl.constexpr, TOP: tl.constexpr, HAS_PRIOR: tl.constexpr, LEAKY: tl.constexpr, STAGES: tl.constexpr,
):
    """Reverse pass r (R-1 >= r >= 1): dV^(r) = sum_i da^(r)_bij u_hat_bij for one batch tile and
    one slice of chunks, from ds^(r) (ds buffer row r, written before this pass). The last program
    of the tile writes dv^(r-1) = dV^(r) + dv^(r) (dv^(R-2) = dV^(R-1) when TOP, since v^(R-1) is no
    part of V) to dv buffer row r-1, and ds^(r-1) = squash_backward(s^(r-1), dv^(r-1)) to ds row r-1
    (and its split copy: the tf32 dots read ds's parts from there, rounded once, not per chunk)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1
    row0 = tl.cast(pid_b, tl.int64) * BLOCK_B
    offs, mask = _state_tile(row0, B, BLOCK_B, J, D, DP)
    state = row0 * (J * D)
    row_ok = tl.arange(0, BLOCK_B) < B - row0
    OP: tl.constexpr = u_ptr.dtype.element_ty
    stride_wi, stride_wj, stride_wd, stride_wk = _w_strides(J, D, K)
    c1, k1 = _columns(CHUNK, KA, KB, False)
    c2, k2 = _columns(CHUNK, KA, KB, KMAJOR)
    u_offs, cu, ku = _u_offsets(BLOCK_B, CHUNK, KA, KB, stride_ub, stride_ui, stride_uk)
    w1_offs = _w_offsets(c1, k1, stride_wi, stride_wd, stride_wk, DP)
    w2_offs = _w_offsets(c2, k2, stride_wi, stride_wd, stride_wk, DP)
    v_sum_ptr = v_sums_ptr + (r - 1) * state_size + state  # V^(r)
    ds_r_ptr = ds_ptr + r * state_size + state
    ds_split_r_ptr = ds_split_ptr + r * state_size + state

    acc = _zeros(J, BLOCK_B, DP, ACC)
    chunk_start = pid_s * chunks_per_split
    chunk_end = tl.minimum(chunk_start + chunks_per_split, tl.cdiv(I, CHUNK))
    for chunk in tl.range(chunk_start, chunk_end, num_stages=STAGES):
        u = _load_u(u_ptr, row0, chunk, u_offs, row_ok, cu, ku, I, stride_ub, stride_ui, K, CHUNK, KA, KB, BLOCK_B).to(ACC)
        zero = tl.zeros((BLOCK_B, KA * CHUNK * KB), dtype=ACC)
        logits = ()
        dc = ()
        for j in tl.static_range(J):  # V and ds tiles re-read per chunk (L1), as in the forward
            w = _load_w(w_ptr, chunk, j, w1_offs, c1, k1, I, stride_wi, stride_wj, K, D, DP, CHUNK, WHOLE)
            v_sum = tl.load(v_sum_ptr + j * D + offs, mask=mask, other=0.0)
            ds_mask = mask
            if BLOCK_B >= 128:
                # a mask that depends on the chunk keeps the ds tiles in the loop: hoisted, they
                # would join the V tiles in shared memory (hi and lo at tf32x3: 320 KB at 128
                # samples). Smaller tiles fit, and re-rounding them per chunk would cost more.
                # (tl.where: Triton's interpreter rejects a tile mask & a scalar condition)
                ds_mask = tl.where(chunk < chunk_end, mask, False)
            ds_hi, ds_lo = _load_split(ds_r_ptr + j * D, ds_split_r_ptr + j * D, split_plane, offs, ds_mask, PREC)
            logit = _segment_sum(u * _dot(v_sum, w, zero, PREC, OP), BLOCK_B, CHUNK, KA, KB)
            if HAS_PRIOR:
                logit += _load_prior(prior_ptr, chunk, j, I, J, CHUNK, ACC, WHOLE)
            logits = logits + (logit,)
            dc = dc + (_segment_sum(u * _dot_split(ds_hi, ds_lo, w, zero, PREC, OP), BLOCK_B, CHUNK, KA, KB),)
        da = _softmax_backward(_softmax(logits, J, LEAKY), dc, J)
        for j in tl.static_range(J):
            w = _load_w(w_ptr, chunk, j, w2_offs, c2, k2, I, stride_wi, stride_wj, K, D, DP, CHUNK, WHOLE)
            y = _spread(da[j], BLOCK_B, CHUNK, KA, KB) * u
            if KMAJOR:
                y = _to_kmajor(y, BLOCK_B, CHUNK, KA, KB)
            acc = _set(acc, j, _dot(y, tl.trans(w), acc[j], PREC, OP))
    for j in tl.static_range(J):
        tl.store(partial_ptr + pid_s * state_size + state + j * D + offs, acc[j], mask=mask)

    if arrive(counter_ptr, pid_b, (pass_index + 1) * n_splits - 1):
        for j in tl.static_range(J):
            dv_prev = sum_partials(partial_ptr + state + j * D, n_splits, state_size, offs, mask)
            if not TOP:
                dv_prev += tl.load(dv_ptr + r * state_size + state + j * D + offs, mask=mask, other=0.0)
            tl.store(dv_ptr + (r - 1) * state_size + state + j * D + offs, dv_prev, mask=mask)
            s_prev = tl.load(s_all_ptr + (r - 1) * state_size + state + j * D + offs, mask=mask, other=0.0)
            ds_prev = squash_backward(s_prev, dv_prev, 1)
            tile = (r - 1) * state_size + state + j * D
            tl.store(ds_ptr + tile + offs, ds_prev, mask=mask)
            _store_split(ds_split_ptr + tile, split_plane, offs, ds_prev, mask, PREC)


@triton.jit
def _tc_input_grad_kernel(
    u_ptr, w_ptr, prior_ptr, v_sums_ptr, ds_ptr, ds_split_ptr, du_ptr, dw_ptr, dprior_ptr,
    B, I, state_size, split_plane, w_numel, tiles_per_prog,
    stride_ub, stride_ui, stride_uk,
    J: tl.constexpr, D: tl.constexpr, K: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, DP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, KMAJOR: tl.constexpr,
    WHOLE: tl.constexpr, R: tl.constexpr, FIRST_TERM: tl.constexpr, HAS_PRIOR: tl.constexpr, PRIOR_GRAD: tl.constexpr,
    LEAKY: tl.constexpr, STAGES: tl.constexpr, R_STAGES: tl.constexpr, SCALED_PRIOR: tl.constexpr,
):
    """Final backward pass for one chunk of capsules (axis 0) and one run of batch tiles (axis 1):
    du of every (sample, capsule) of the chunk, written once, and this run's dW of the chunk,
    accumulated over its batch tiles and written once to row pid_g of dw_ptr ([G, I, J, D, K],
    contiguous). Terms r = FIRST_TERM .. R-1; ds row t holds ds^(FIRST_TERM + t), and the same row
    of ds_split its split copy (_store_split), which the dots read. FULL (no
    detach_routing): the gradient goes through the couplings too. PRIOR_GRAD: this run's
    dprior = sum_r sum_b da^(r) of the chunk's capsules into row pid_g of dprior_ptr ([G, I, J])."""
    chunk = tl.program_id(0)
    pid_g = tl.program_id(1)
    state_size = tl.cast(state_size, tl.int64)  # tl.cast: also when specialised to the constant 1
    OP: tl.constexpr = u_ptr.dtype.element_ty
    stride_wi, stride_wj, stride_wd, stride_wk = _w_strides(J, D, K)
    FULL: tl.constexpr = FIRST_TERM == 0
    c1, k1 = _columns(CHUNK, KA, KB, False)
    u_offs, cu, ku = _u_offsets(BLOCK_B, CHUNK, KA, KB, stride_ub, stride_ui, stride_uk)
    w1_offs = _w_offsets(c1, k1, stride_wi, stride_wd, stride_wk, DP)
    du_offs = tl.arange(0, BLOCK_B)[:, None] * (I * K) + (c1 * K + k1)[None, :]
    col_ok = (c1 < I - chunk * CHUNK) & (k1 < K)
    # dW_j as [DP, columns] = ds_j^T @ (c u): M = DP keeps the accumulators unreplicated across warps
    # (as [columns, DP] with M = 32 the warps along M would hold copies: twice the registers)
    dw = _zeros(J, DP, KA * CHUNK * KB, ACC)
    if PRIOR_GRAD:  # sum_b sum_r da^(r) per capsule: each da^(r) tile is summed over its rows at once
        dprior = ()
        for j in tl.static_range(J):
            dprior = dprior + (tl.zeros((CHUNK,), dtype=ACC),)

    # W_j of the chunk, the same for every batch tile and r: loaded once
    w_tiles = ()
    for j in tl.static_range(J):
        w_tiles = w_tiles + (_load_w(w_ptr, chunk, j, w1_offs, c1, k1, I, stride_wi, stride_wj, K, D, DP, CHUNK, WHOLE),)
    # The r = 0 term with a prior, where SCALED_PRIOR (_Config.grad_scaled_prior; only with a
    # prior and FIRST_TERM = 0): c^(0) = softmax(prior) is the same for every sample, formed once,
    # and du's term sum_j c^(0)_j (ds^(0)_j W_j) = sum_j ds^(0)_j (c^(0)_j W_j) is one chain of dots
    # on W scaled once, as without a prior; else c^(0) is formed per batch tile, and so is each j's
    # product
    if SCALED_PRIOR:
        c0 = _prior_couplings(prior_ptr, chunk, I, J, CHUNK, ACC, WHOLE, LEAKY)
        w0_tiles = ()
        for j in tl.static_range(J):
            w0_tiles = w0_tiles + (w_tiles[j] * _spread(c0[j], 1, CHUNK, KA, KB),)
    first_tile = pid_g * tiles_per_prog
    last_tile = tl.minimum(first_tile + tiles_per_prog, tl.cdiv(B, BLOCK_B))
    for tile in tl.range(first_tile, last_tile, num_stages=STAGES):
        row0 = tl.cast(tile, tl.int64) * BLOCK_B
        offs, mask = _state_tile(row0, B, BLOCK_B, J, D, DP)
        state = row0 * (J * D)
        row_ok = tl.arange(0, BLOCK_B) < B - row0
        offs_t = tl.arange(0, DP)[:, None] + tl.arange(0, BLOCK_B)[None, :] * (J * D)  # [DP, BLOCK_B]
        mask_t = (tl.arange(0, DP) < D)[:, None] & row_ok[None, :]
        u = _load_u(u_ptr, row0, chunk, u_offs, row_ok, cu, ku, I, stride_ub, stride_ui, K, CHUNK, KA, KB, BLOCK_B).to(ACC)
        zero = tl.zeros((BLOCK_B, KA * CHUNK * KB), dtype=ACC)
        du = zero
        if FIRST_TERM == 0 and HAS_PRIOR:  # r = 0: c^(0) = softmax(prior), nothing through V^(0) = 0
            if not SCALED_PRIOR:
                # names of their own: c, dc, da of the r loop below have [BLOCK_B, CHUNK] tiles, and
                # a name bound before a loop would become a loop-carried value of another shape
                c0 = _prior_couplings(prior_ptr, chunk, I, J, CHUNK, ACC, WHOLE, LEAKY)
            dc0 = ()
            for j in tl.static_range(J):
                w = w_tiles[j]
                ds0_hi, ds0_lo = _load_split(ds_ptr + state + j * D, ds_split_ptr + state + j * D, split_plane,
                                             offs, mask, PREC)
                c0_cols = _spread(c0[j], BLOCK_B, CHUNK, KA, KB)
                if SCALED_PRIOR:
                    du = _dot_split(ds0_hi, ds0_lo, w0_tiles[j], du, PREC, OP)
                else:
                    q0 = _dot_split(ds0_hi, ds0_lo, w, zero, PREC, OP)
                    du += c0_cols * q0
                ds0_t_hi, ds0_t_lo = _load_split(ds_ptr + state + j * D, ds_split_ptr + state + j * D, split_plane,
                                                 offs_t, mask_t, PREC)  # transposed, as in the r loop
                dw = _set(dw, j, _dot_split(ds0_t_hi, ds0_t_lo, c0_cols * u, dw[j], PREC, OP))
                if PRIOR_GRAD:
                    if SCALED_PRIOR:
                        # da^(0) = c^(0) (dc^(0) - sum_j c^(0)_j dc^(0)_j) is linear in dc^(0): the
                        # tile's sum of da^(0) is that map of the tile's sum of dc^(0)
                        q0 = _dot_split(ds0_hi, ds0_lo, w, zero, PREC, OP)
                        dc0 = dc0 + (tl.sum(_segment_sum(u * q0, BLOCK_B, CHUNK, KA, KB), axis=0)[None, :],)
                    else:
                        dc0 = dc0 + (_segment_sum(u * q0, BLOCK_B, CHUNK, KA, KB),)
            if PRIOR_GRAD:
                da0 = _softmax_backward(c0, dc0, J)
                for j in tl.static_range(J):
                    dprior = _set(dprior, j, dprior[j] + tl.sum(da0[j], axis=0))
        elif FIRST_TERM == 0:  # r = 0: uniform couplings 1 / (J + leaky), nothing through the softmax
            u0 = u / (J + LEAKY)  # a division: exact in fp64 too, where a Python-float 1/J would not be
            q_sum = zero
            for j in tl.static_range(J):
                w = w_tiles[j]
                ds0_hi, ds0_lo = _load_split(ds_ptr + state + j * D, ds_split_ptr + state + j * D, split_plane,
                                             offs, mask, PREC)
                q_sum = _dot_split(ds0_hi, ds0_lo, w, q_sum, PREC, OP)
                dw = _set(dw, j, _dot_split(tl.trans(ds0_hi), tl.trans(ds0_lo), u0, dw[j], PREC, OP))
            du = q_sum / (J + LEAKY)
        # from 1 when FULL; not unrolled: code size. Triton pipelines this loop (the innermost;
        # the loop over batch tiles around it is not) in R_STAGES stages (_Config)
        for r in tl.range(FIRST_TERM + (FIRST_TERM == 0), R, num_stages=R_STAGES):
            v_sum_ptr = v_sums_ptr + (r - 1) * state_size + state
            ds_r_ptr = ds_ptr + (r - FIRST_TERM) * state_size + state
            ds_split_r_ptr = ds_split_ptr + (r - FIRST_TERM) * state_size + state
            # One sweep over j forms the logits, dc and du's sums of the P and Q tiles, weighted by
            # e_j = exp(logit_j - top) with the softmax's running max `top` and normaliser kept
            # online (the sums are rescaled when top grows, as in flash attention): c_j = e_j / Z
            # is known only after the last j, and holding the J tiles of P and Q until then
            # spills (MLIR merges a recomputed dot with the first). With c_j = e_j / Z and
            # mean = sum_j c_j dc_j:
            #   du = sum_j c_j Q_j + c_j (dc_j - mean) P_j
            #      = (sum_j e_j (Q_j + dc_j P_j) - mean sum_j e_j P_j) / Z
            if LEAKY:  # the leak logit 0 joins the max and the normaliser
                top = tl.zeros((BLOCK_B, CHUNK), dtype=ACC)
                total = tl.full((BLOCK_B, CHUNK), 1.0, dtype=ACC)
            else:
                top = tl.full((BLOCK_B, CHUNK), float("-inf"), dtype=ACC)
                total = tl.zeros((BLOCK_B, CHUNK), dtype=ACC)
            e_qp = zero  # sum_j e_j (Q_j + dc_j P_j); sum_j e_j Q_j without FULL
            if FULL:
                e_dc = tl.zeros((BLOCK_B, CHUNK), dtype=ACC)
                e_p = zero
            logits = ()
            dc = ()
            for j in tl.static_range(J):
                w = w_tiles[j]
                v_sum = tl.load(v_sum_ptr + j * D + offs, mask=mask, other=0.0)
                ds_hi, ds_lo = _load_split(ds_r_ptr + j * D, ds_split_r_ptr + j * D, split_plane, offs, mask, PREC)
                p = _dot(v_sum, w, zero, PREC, OP)
                q = _dot_split(ds_hi, ds_lo, w, zero, PREC, OP)
                logit = _segment_sum(u * p, BLOCK_B, CHUNK, KA, KB)
                if HAS_PRIOR:
                    logit += _load_prior(prior_ptr, chunk, j, I, J, CHUNK, ACC, WHOLE)
                logits = logits + (logit,)
                new_top = tl.maximum(top, logit)
                rescale = tl.exp(top - new_top)
                e = tl.exp(logit - new_top)
                top = new_top
                total = total * rescale + e
                rescale_cols = _spread(rescale, BLOCK_B, CHUNK, KA, KB)
                e_cols = _spread(e, BLOCK_B, CHUNK, KA, KB)
                if FULL:
                    dc_j = _segment_sum(u * q, BLOCK_B, CHUNK, KA, KB)
                    dc = dc + (dc_j,)
                    e_dc = e_dc * rescale + e * dc_j
                    e_p = e_p * rescale_cols + e_cols * p
                    q += _spread(dc_j, BLOCK_B, CHUNK, KA, KB) * p
                e_qp = e_qp * rescale_cols + e_cols * q
            inv = 1 / total
            c = ()
            for j in tl.static_range(J):
                c = c + (tl.exp(logits[j] - top) * inv,)
            if FULL:
                mean = e_dc * inv
                du += (e_qp - _spread(mean, BLOCK_B, CHUNK, KA, KB) * e_p) * _spread(inv, BLOCK_B, CHUNK, KA, KB)
                da = ()
                for j in tl.static_range(J):
                    da = da + (c[j] * (dc[j] - mean),)
                if PRIOR_GRAD:
                    for j in tl.static_range(J):
                        dprior = _set(dprior, j, dprior[j] + tl.sum(da[j], axis=0))
            else:
                du += e_qp * _spread(inv, BLOCK_B, CHUNK, KA, KB)
            # the dW dots' tiles of ds and V loaded again, transposed: a reuse of the tiles loaded
            # above would keep J of each live (in the A-operand layout) through the sweep
            for j in tl.static_range(J):
                ds_t_hi, ds_t_lo = _load_split(ds_r_ptr + j * D, ds_split_r_ptr + j * D, split_plane, offs_t, mask_t,
                                               PREC)
                dw = _set(dw, j, _dot_split(ds_t_hi, ds_t_lo, _spread(c[j], BLOCK_B, CHUNK, KA, KB) * u, dw[j],
                                            PREC, OP))
                if FULL:
                    v_sum_t = tl.load(v_sum_ptr + j * D + offs_t, mask=mask_t, other=0.0)
                    da_cols = _spread(da[j], BLOCK_B, CHUNK, KA, KB)
                    dw = _set(dw, j, _dot(v_sum_t, da_cols * u, dw[j], PREC, OP))
        du_base = du_ptr + row0 * (I * K) + tl.cast(chunk, tl.int64) * (CHUNK * K)
        tl.store(du_base + du_offs, du.to(du_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # dW[i, j, d, k] from the [DP, columns] tile of dW_j
    d = tl.arange(0, DP)
    dw_offs = (d * K)[:, None] + (c1 * (J * D * K) + k1)[None, :]
    dw_base = dw_ptr + tl.cast(pid_g, tl.int64) * w_numel + tl.cast(chunk, tl.int64) * (CHUNK * J * D * K)
    for j in tl.static_range(J):
        tl.store(dw_base + j * (D * K) + dw_offs, dw[j].to(dw_ptr.dtype.element_ty),
                 mask=(d < D)[:, None] & col_ok[None, :])
    if PRIOR_GRAD:  # padded rows and capsules have da = 0 (their ds or u is 0)
        cap = tl.arange(0, CHUNK)
        dprior_base = dprior_ptr + (tl.cast(pid_g, tl.int64) * I + tl.cast(chunk, tl.int64) * CHUNK) * J
        for j in tl.static_range(J):
            tl.store(dprior_base + cap * J + j, dprior[j].to(dprior_ptr.dtype.element_ty),
                     mask=cap < I - chunk * CHUNK)


# ----------------------------------------------------------------------------- host side

# The final pass's batch splits (see _Config): programs = GRAD_WAVES x program_target at most,
# each over at least GRAD_MIN_TILES batch tiles
GRAD_WAVES = 2
GRAD_MIN_TILES = 8


def _constants(u: torch.Tensor, weight: torch.Tensor, input_precision: str, block_b: int, chunk: int,
               stages: int) -> dict:
    """The compile-time constants of a kernel over tiles of block_b samples and chunks of chunk capsules."""
    in_caps, out_caps, out_dim, in_dim = weight.shape
    kp = triton.next_power_of_2(in_dim)
    if chunk * kp < 16:
        raise ValueError(f"chunk * next_pow2(K) must be >= 16 (a dot's minimum), got {chunk} * {kp}")
    if block_b < 16:
        raise ValueError(f"tc_block_b must be >= 16 (a dot's minimum), got {block_b}")
    # the accumulator-layout order of the columns where it applies (see _columns)
    kb = 2 if (chunk == 4 and kp >= 2) else kp
    half = u.dtype in (torch.float16, torch.bfloat16)
    dp = max(16, triton.next_power_of_2(out_dim))  # tensor-core dots need K, N >= 16
    return dict(
        J=out_caps, D=out_dim, K=in_dim, KA=kp // kb, KB=kb, DP=dp, CHUNK=chunk, BLOCK_B=block_b,
        PREC=_HALF if half else (0 if u.dtype == torch.float64 else PRECISIONS[input_precision]),
        ACC=tl.float64 if u.dtype == torch.float64 else tl.float32, STAGES=stages,
        # the k-major order of the second dot's operands renames registers for tf32 dots
        # (kWidth 1); fp16/bf16 operands (kWidth 2) already match the accumulator layout
        KMAJOR=not half and u.dtype != torch.float64,
        # every chunk lies inside W (I a multiple of chunk, K a power of two, D = DP): the W and
        # prior loads need no mask. Masked, the W_j loads are predicated branches between the J
        # first dots, around which ptxas holds their results (sm_90, MNIST shape, Triton 3.9,
        # bf16 forward: 255 -> 173 registers, 80 -> 0 spilled bytes, 16.8 -> 15.9 warp
        # instructions per (b, i)). u keeps its column mask, under the row mask anyway: dropped
        # too, the tf32x3 reverse spilled 40 B instead of 24.
        WHOLE=in_caps % chunk == 0 and kp == in_dim and dp == out_dim)


class _Tiling:
    """The tiling of the forward or the reverse passes over i: BLOCK_B samples per program on
    num_warps warps, CHUNK capsules per step, the software-pipelining depth, the split of the
    chunks per batch tile, and the kernels' compile-time constants."""

    def __init__(self, u: torch.Tensor, weight: torch.Tensor, input_precision: str, block_b: int, chunk: int,
                 stages: int, num_warps: int):
        self.block_b, self.num_warps = block_b, num_warps
        self.constants = _constants(u, weight, input_precision, block_b, chunk, stages)
        self.n_tiles = triton.cdiv(u.shape[0], block_b)
        n_chunks = triton.cdiv(u.shape[1], chunk)
        splits = tuned("tc_splits", min(MAX_SPLITS, triton.cdiv(program_target(u.device, num_warps), self.n_tiles)))
        self.chunks_per_split = triton.cdiv(n_chunks, max(1, min(splits, n_chunks)))
        self.n_splits = triton.cdiv(n_chunks, self.chunks_per_split)


class _Config:
    """Launch parameters and compile-time constants of one problem; tuning() overrides. The
    forward passes, the reverse passes and the final pass have tilings of their own: the fwd_*
    keys override the forward's alone, the other keys all three."""

    def __init__(self, u: torch.Tensor, weight: torch.Tensor, input_precision: str, has_prior: bool = False):
        batch, in_caps, in_dim = u.shape
        kp = triton.next_power_of_2(in_dim)
        # 32 columns per chunk (4 capsules of 8): the shared memory of the W tiles and the
        # registers of the J logit tiles stay within an H100's budget (scripts/inspect_kernels.py)
        chunk = tuned("chunk", max(1, 32 // kp))
        block_b = tuned("tc_block_b", 64 if batch > 16 else 16)
        # 8 warps on 64 samples: half the accumulator registers per thread of 4 warps, which
        # spill (scripts/inspect_kernels.py, sm_90)
        num_warps = tuned("tc_num_warps", 8 if block_b >= 64 else 1)
        stages = tuned("tc_stages", 2)
        # Forward and (fp32) reverse passes: 128 samples on 8 warps where the batch has them, so
        # that each warpgroup owns 64 rows of the first dots (with 64, both warpgroups compute all
        # of P = V_j W_j and the element-wise work after it); then 16 columns per chunk and no
        # software pipelining keep the accumulators (twice the registers of 64 samples) from
        # spilling, and the V^(r) tiles that Triton hoists into shared memory (hi and lo at
        # tf32x3: 160 KB) within it. sm_90, MNIST shape, tf32x3: forward 125.8 -> 68.8 warp
        # instructions per (b, i) and 568 -> 0 spilled bytes, reverse 150.6 -> 111.9 and 592 -> 40.
        # fp64 is a correctness path.
        wide = batch > 64 and u.dtype != torch.float64
        wide_block_b = tuned("tc_block_b", 128)

        def pipeline_stages(wide: bool, prefix: str, wide_stages: int = 1) -> int:
            """The software-pipelining depth: wide_stages in the wide tiling, else stages,
            overridden by the keys prefix + tc_stages, then tc_stages."""
            return tuned(prefix + "tc_stages", tuned("tc_stages", wide_stages) if wide else stages)

        def tiling(wide: bool, prefix: str, wide_samples: int | None = None, wide_columns: int = 16,
                   wide_stages: int = 1) -> _Tiling:
            """The wide tiling (one warpgroup per 64 samples of wide_samples, by default
            wide_block_b, wide_columns columns per chunk and wide_stages pipelining stages) or the
            default one, overridden by the keys prefix + key."""
            tile_b = tuned(prefix + "tc_block_b", (wide_samples or wide_block_b) if wide else block_b)
            warps_default = max(1, 4 * tile_b // 64) if wide else (8 if tile_b >= 64 else 1)
            warps = tuned(prefix + "tc_num_warps", tuned("tc_num_warps", warps_default))
            return _Tiling(u, weight, input_precision, tile_b,
                           tuned(prefix + "chunk", tuned("chunk", max(1, wide_columns // kp)) if wide else chunk),
                           pipeline_stages(wide, prefix, wide_stages), warps)

        half = u.dtype in (torch.float16, torch.bfloat16)
        # The 16-bit forward passes r >= 1 and reverse passes pipeline their loop over chunks in
        # two stages where Triton's code generation is 3.6's: in one they spill, in two not.
        # sm_90, MNIST shape, Triton 3.6, bf16 (fp16 alike), warp instructions per (b, i) and
        # spilled bytes, one stage -> two: forward 14.8 and 8 B -> 15.3 and 0, reverse 42.7 and
        # 8 B -> 42.7 and 0 (shared memory 50 -> 68 KB and 45 -> 52 KB, programs per SM
        # unchanged). Under 3.9 one stage spills nothing and two issue more (forward 15.9 ->
        # 17.9, reverse 42.7 -> 45.2); the first forward pass (no V, no softmax without a prior)
        # spills in neither and keeps one (two: 3.3 -> 4.6, and 8 -> 28 KB of shared memory).
        half_stages = 2 if half and TRITON_VERSION < (3, 9) else 1
        # The 16-bit and tf32 forward passes: 32 columns per chunk (4 capsules of 8), where each
        # thread holds all of a capsule's k (see _columns) and the sums over k need no shuffles.
        # sm_90, MNIST shape, Triton 3.9 | 3.6, warp instructions per (b, i) against 16 columns:
        # bf16 30.7 -> 15.9 | 14.8 (8 spilled bytes on 3.6), tf32 40.9 | 41.1 -> 25.5 | 24.0 with
        # no spills, both with unmasked W loads (WHOLE in _constants; masked, tf32 spilled 328 B).
        # tf32x3, whose split operands take twice the registers, spills 488 B at 32 columns, and
        # tf32 with a prior 24 B (Triton 3.9).
        tf32 = u.dtype == torch.float32 and input_precision == "tf32" and not has_prior
        wide_forward_columns = 32 if half or tf32 else 16
        self.fwd = tiling(wide, "fwd_", wide_columns=wide_forward_columns, wide_stages=half_stages)
        self.fwd_first_stages = pipeline_stages(wide, "fwd_")  # the first pass's
        # The 16-bit reverse pass: 64 samples on one warpgroup and 16 columns per chunk. sm_90,
        # MNIST shape, bf16, Triton 3.9 | 3.6: 43.0 | 43.1 warp instructions per (b, i) and no
        # spills; the default tiling (64 samples on 8 warps, where both warpgroups
        # compute the same P and Q) issued 48.7 and spilled 96 B, 128 samples on 8 warps 51.2
        # and 16 B (before u was loaded in memory order), 32 columns 25-27 but 328-464 B.
        self.rev = tiling(batch > 16 if half else wide, "", wide_samples=64 if half else None, wide_stages=half_stages)
        # final pass. Its dW dots are [columns, BLOCK_B] x [BLOCK_B, D], too small for 8 warps:
        # more warps only replicate them (and their registers)
        self.grad_num_warps = tuned("tc_grad_num_warps", min(num_warps, 4))
        # the final pass holds J dW tiles across its batch tiles: small batch tiles keep the J
        # logit, coupling and gradient tiles beside them within the registers. (64 samples on one
        # warpgroup, where P and Q become 64-row wgmma dots, issue half the instructions, but
        # spill. sm_90, MNIST shape, Triton 3.9, with the r loop unpipelined (pipelined, it took
        # 324 KB of shared memory) and the logits' sweep over j apart from dc's: bf16 150 per
        # (b, i) and 224 B (u reloaded per sweep), tf32 300 and 1.2 KB, tf32x3 597 and 2 KB.)
        self.grad_block_b = tuned("tc_grad_block_b", 16)
        # the final pass's loop over r in two stages: at Triton's default of three, the ds and V
        # tiles' buffers took 161 KB of shared memory at tf32x3 (one program per SM); two take
        # 101 KB (two programs per SM) and issue fewer instructions (sm_90, MNIST shape, Triton
        # 3.9: 559.6 -> 552.0 per (b, i)); one, 43 KB, but 562.6 and a 16 B spill
        self.grad_r_stages = tuned("tc_grad_r_stages", 2)
        # the final pass's r = 0 term with a prior on W scaled once by c^(0) (_tc_input_grad_kernel)
        # where that spills nothing more: sm_90, MNIST shape, warp instructions per (b, i) and
        # spilled bytes, per-tile -> scaled form. Triton 3.9: fp16 334.2 and 8 B -> 320.4 and 0,
        # bf16 341.6 and 0 -> 321.0 and 0; 3.6: fp16 338.2 and 0 -> 326.6 and 8 B, bf16 338.4 and
        # 0 -> 326.8 and 8 B. The tf32 dots spilled more (tf32 0 -> 16 B, 3.9; tf32x3 8 -> 32 B, 3.6)
        self.grad_scaled_prior = has_prior and tuned("tc_grad_scaled_prior", half and TRITON_VERSION >= (3, 9))
        self.grad_constants = _constants(u, weight, input_precision, self.grad_block_b, chunk, stages)
        self.n_chunks = triton.cdiv(in_caps, chunk)
        # One program per chunk of capsules and run of batch tiles. The chunks alone
        # (288 at the MNIST shape) are about one wave of an H100 (2 programs per SM at 255
        # registers), each walking the whole batch in series: split the batch until there are
        # GRAD_WAVES x program_target programs, keeping at least GRAD_MIN_TILES tiles per program
        # to amortise its dW write. Each split beyond one writes a partial dW, summed in split
        # order (deterministic).
        grad_tiles = triton.cdiv(batch, self.grad_block_b)
        grad_splits = tuned("grad_batch_splits", min(
            triton.cdiv(GRAD_WAVES * program_target(u.device, self.grad_num_warps), self.n_chunks),
            max(1, grad_tiles // GRAD_MIN_TILES)))
        self.grad_tiles_per_prog = triton.cdiv(grad_tiles, max(1, min(grad_splits, grad_tiles)))
        self.grad_splits = triton.cdiv(grad_tiles, self.grad_tiles_per_prog)


class _Plan:
    """What the launches of one problem share and derive from its shapes, dtypes, device, options
    and overrides alone, built once (common.cached_plan): the launch parameters, the buffers'
    shapes, and per launch its grid and keyword arguments."""

    def __init__(self, u: torch.Tensor, weight: torch.Tensor, input_precision: str, iterations: int, leaky: bool,
                 has_bias: bool, has_prior: bool, detach_routing: bool):
        batch, in_caps, _ = u.shape
        _, out_caps, out_dim, _ = weight.shape
        cfg = self.cfg = _Config(u, weight, input_precision, has_prior)
        self.state_dtype = state_dtype(u.dtype)
        self.state_size = batch * out_caps * out_dim
        self.state_shape = (batch, out_caps, out_dim)
        fwd, rev = cfg.fwd, cfg.rev
        self.forward_grid = (fwd.n_tiles, fwd.n_splits)
        self.forward_kwargs = [dict(FIRST=r == 0, LAST=r == iterations - 1, HAS_BIAS=has_bias, HAS_PRIOR=has_prior,
                                    LEAKY=leaky, **dict(fwd.constants, STAGES=fwd.constants["STAGES"] if r else
                                                        cfg.fwd_first_stages), num_warps=fwd.num_warps)
                               for r in range(iterations)]
        self.first_term = iterations - 1 if (detach_routing or iterations == 1) else 0
        self.prior_grad = has_prior and not detach_routing
        self.squash_grid = (rev.n_tiles,)
        self.squash_kwargs = dict(J=out_caps, D=out_dim, DP=rev.constants["DP"], BLOCK_B=rev.block_b,
                                  ACC=rev.constants["ACC"], PREC=rev.constants["PREC"], num_warps=rev.num_warps)
        self.split_planes = _SPLIT_PLANES.get(rev.constants["PREC"], 0)
        self.reverse_grid = (rev.n_tiles, rev.n_splits)
        # reverse passes r = R-1 .. 1 (none under detach_routing or for R = 1), as (pass_index, r, kwargs)
        self.reverse_passes = ([(pass_index, r, dict(TOP=r == iterations - 1, HAS_PRIOR=has_prior, LEAKY=leaky,
                                                     **rev.constants, num_warps=rev.num_warps))
                                for pass_index, r in enumerate(range(iterations - 1, 0, -1))]
                               if self.first_term == 0 else [])
        self.grad_grid = (cfg.n_chunks, cfg.grad_splits)
        self.grad_kwargs = dict(R=iterations, FIRST_TERM=self.first_term, HAS_PRIOR=has_prior,
                                PRIOR_GRAD=self.prior_grad, LEAKY=leaky,
                                R_STAGES=cfg.grad_r_stages,
                                SCALED_PRIOR=cfg.grad_scaled_prior and self.first_term == 0,
                                **cfg.grad_constants, num_warps=cfg.grad_num_warps,
                                # left to itself ptxas caps this kernel at 168 registers (three
                                # programs per SM) and spills: bf16 16 B on Triton 3.9, tf32x3
                                # 16 B on 3.6 (sm_90, MNIST shape)
                                maxnreg=255)


def _plan(u: torch.Tensor, weight: torch.Tensor, input_precision: str, iterations: int, leaky: bool,
          has_bias: bool = False, has_prior: bool = False, detach_routing: bool = False) -> _Plan:
    """The cached _Plan of this problem (common.problem_plan)."""
    return problem_plan(_Plan, program_target, u, weight, input_precision, iterations, leaky, has_bias, has_prior,
                        detach_routing)


def _prior_arg(prior: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The prior a launch takes, contiguous (the kernels' prior strides are constants, see
    _load_prior); a placeholder, never read, without one."""
    return prior.contiguous() if prior is not None else placeholder


def routing_forward(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, iterations: int,
                    leaky: bool, input_precision: str, prior: torch.Tensor | None = None):
    """Launch the R forward passes. Returns v [B, J, D] (input dtype), s_all [R, B, J, D] and
    v_sums [R-1, B, J, D] (V^(1) .. V^(R-1)), both in the state dtype."""
    batch, in_caps, _ = u.shape
    weight = weight.contiguous()  # the kernels' W strides are constants (_w_strides)
    plan = _plan(u, weight, input_precision, iterations, leaky, bias is not None, prior is not None)
    cfg, device, state_dtype_ = plan.cfg, u.device, plan.state_dtype
    v = torch.empty(plan.state_shape, dtype=u.dtype, device=device)
    s_all = torch.empty((iterations,) + plan.state_shape, dtype=state_dtype_, device=device)
    v_sums = torch.empty((iterations - 1,) + plan.state_shape, dtype=state_dtype_, device=device)
    partial = torch.empty((cfg.fwd.n_splits,) + plan.state_shape, dtype=state_dtype_, device=device)
    counter = torch.zeros(cfg.fwd.n_tiles, dtype=torch.int32, device=device)
    bias_arg = bias if bias is not None else s_all  # never read without HAS_BIAS
    bias_strides = bias.stride() if bias is not None else (0, 0)
    prior_arg = _prior_arg(prior, s_all)
    strides = (*u.stride(), *bias_strides)
    for r, kwargs in enumerate(plan.forward_kwargs):
        _tc_forward_kernel[plan.forward_grid](
            u, weight, bias_arg, prior_arg, v, s_all, v_sums, partial, counter,
            batch, in_caps, plan.state_size, r, cfg.fwd.chunks_per_split, cfg.fwd.n_splits, *strides, **kwargs)
    return v, s_all, v_sums


def routing_backward(grad_v: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, s_all: torch.Tensor,
                     v_sums: torch.Tensor, iterations: int, leaky: bool, detach_routing: bool,
                     input_precision: str, prior: torch.Tensor | None = None, bias_grad: bool = True):
    """Gradients (du, dW, dbias, dprior) of v = routing(u, W, bias, prior) for the incoming grad_v
    (any strides); dbias only with bias_grad, else None; dprior is None without a prior and zeros
    under detach_routing."""
    batch, in_caps, _ = u.shape
    weight = weight.contiguous()  # the kernels' W strides are constants (_w_strides)
    plan = _plan(u, weight, input_precision, iterations, leaky, False, prior is not None, detach_routing)
    cfg, device, state_dtype_, state_size = plan.cfg, u.device, plan.state_dtype, plan.state_size
    ds = torch.empty((iterations - plan.first_term,) + plan.state_shape, dtype=state_dtype_, device=device)
    # the tf32 dots' parts of ds, rounded once where ds is written; ds itself is summed for dbias
    ds_split = (torch.empty((plan.split_planes,) + tuple(ds.shape), dtype=state_dtype_, device=device)
                if plan.split_planes else ds)  # never read without planes
    prior_arg = _prior_arg(prior, ds)

    # ds^(R-1) from the incoming gradient; each reverse pass r then leaves ds^(r-1) behind
    _tc_squash_backward_kernel[plan.squash_grid](
        s_all, grad_v, ds, ds_split, batch, state_size, ds.numel(), iterations - 1, iterations - 1 - plan.first_term,
        *grad_v.stride(), **plan.squash_kwargs)
    if plan.reverse_passes:
        dv = torch.empty((iterations - 1,) + plan.state_shape, dtype=state_dtype_, device=device)
        partial = torch.empty((cfg.rev.n_splits,) + plan.state_shape, dtype=state_dtype_, device=device)
        counter = torch.zeros(cfg.rev.n_tiles, dtype=torch.int32, device=device)
        strides = u.stride()
        for pass_index, r, kwargs in plan.reverse_passes:
            _tc_reverse_kernel[plan.reverse_grid](
                u, weight, prior_arg, s_all, v_sums, dv, ds, ds_split, partial, counter,
                batch, in_caps, state_size, ds.numel(), r, pass_index, cfg.rev.chunks_per_split, cfg.rev.n_splits,
                *strides, **kwargs)

    grad_u = torch.empty(u.shape, dtype=u.dtype, device=device)
    if cfg.grad_splits == 1:  # written once, in the weight's dtype: no partials to sum
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=device)
    else:
        grad_w = torch.empty((cfg.grad_splits,) + tuple(weight.shape), dtype=state_dtype_, device=device)
    grad_prior = grad_w  # a placeholder, never written without prior_grad
    if plan.prior_grad:  # as dW: written once in the prior's dtype, or partials summed in a fixed order
        grad_prior = (torch.empty(prior.shape, dtype=prior.dtype, device=device) if cfg.grad_splits == 1
                      else torch.empty((cfg.grad_splits,) + tuple(prior.shape), dtype=state_dtype_, device=device))
    _tc_input_grad_kernel[plan.grad_grid](
        u, weight, prior_arg, v_sums, ds, ds_split, grad_u, grad_w, grad_prior,
        batch, in_caps, state_size, ds.numel(), weight.numel(), cfg.grad_tiles_per_prog,
        *u.stride(), **plan.grad_kwargs)
    if cfg.grad_splits > 1:
        grad_w = grad_w.sum(dim=0).to(weight.dtype)  # a fixed order: deterministic
        if plan.prior_grad:
            grad_prior = grad_prior.sum(dim=0).to(prior.dtype)
    grad_bias = bias_grad_of(ds, u.dtype) if bias_grad else None
    if prior is None:
        return grad_u, grad_w, grad_bias, None
    return grad_u, grad_w, grad_bias, (grad_prior if plan.prior_grad else torch.zeros_like(prior))
