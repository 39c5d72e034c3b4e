"""The fused routing op against the eager reference.

Kernels run compiled on CUDA when a GPU is present and in Triton's interpreter otherwise
(tests/conftest.py). References are computed in float64 from the same (rounded) inputs and
errors are measured as ||out - ref|| / ||ref||.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

import fastcaps
from fastcaps import reference
from fastcaps.kernels import common
from fastcaps.kernels import routing as kernels
from fastcaps.kernels import routing_tc

# relative-norm tolerance of the fused op against the float64 reference, per input dtype
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
FAMILIES = ("tc", "fma")


@pytest.fixture(params=FAMILIES)
def family(request):
    """Run the test with each kernel family (kernels/routing.py). The tc family runs at matmul
    precision "high" (tf32x3): exact fp32 products ("ieee", PyTorch's default "highest") are the
    fma kernels' job whichever family is chosen."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if request.param == "tc" else "highest")
    try:
        with kernels.tuning(kernels=request.param):
            yield request.param
    finally:
        torch.set_float32_matmul_precision(saved)


def rel_err(x, ref):
    ref = ref.double().to(x.device)
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(shape, dtype, device, bias=False, seed=0, u_scale=1.0):
    batch, in_caps, out_caps, out_dim, in_dim = shape
    gen = torch.Generator().manual_seed(seed)
    u = fastcaps.squash(u_scale * torch.randn(batch, in_caps, in_dim, generator=gen, dtype=torch.float64))
    weight = torch.randn(in_caps, out_caps, out_dim, in_dim, generator=gen, dtype=torch.float64) / in_dim ** 0.5
    b = 0.1 * torch.randn(out_caps, out_dim, generator=gen, dtype=torch.float64) if bias else None
    grad = torch.randn(batch, out_caps, out_dim, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(u), cast(weight), cast(b), cast(grad)


def fused_and_reference(u, weight, bias, grad, iterations, **options):
    """v and every gradient, from the fused op and from the float64 reference."""
    leaves = [t.detach().requires_grad_() for t in (u, weight) + ((bias,) if bias is not None else ())]
    v = fastcaps.dynamic_routing(leaves[0], leaves[1], iterations, bias=leaves[2] if bias is not None else None,
                                 **options)
    grads = torch.autograd.grad(v, leaves, grad)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    options.pop("input_precision", None)
    v_ref = reference.dynamic_routing(ref_leaves[0], ref_leaves[1], iterations,
                                      bias=ref_leaves[2] if bias is not None else None, **options)
    ref_grads = torch.autograd.grad(v_ref, ref_leaves, grad.double().cpu())
    return (v,) + grads, (v_ref,) + ref_grads


SHAPES = [  # B, I, J, D, K
    (1, 1, 1, 1, 1),
    # 25 input capsules (37 before; the time grows with I): at the default launch parameters still
    # a partial last split of i (fma: 7, 7, 7, 4 capsules; tc: 7 chunks of 4, the last holding
    # one capsule, in splits of 2, 2, 2, 1) and odd J, D, K
    (3, 25, 3, 7, 5),
    (3, 9, 10, 16, 8),
    (6, 9, 4, 2, 1),
]


# (shape, iterations): R = 1, 2, 3 at every shape (but R = 2, the one reverse pass that is both
# the top and the bottom one, at the MNIST capsule sizes, the most expensive shape; the other
# three have it), R = 5 (more reverse passes of the same kernels) at the cheap ones: the
# interpreter's time grows with B * I * R
CASES = [(shape, r) for shape in SHAPES for r in (1, 2, 3) if (shape, r) != (SHAPES[2], 2)] + [(SHAPES[0], 5),
                                                                                              (SHAPES[3], 5)]


@pytest.mark.parametrize("shape, iterations", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple)
                         else f"R{c}")
def test_matches_reference_fp32(shape, iterations, kernel_device, family):
    u, weight, _, grad = make_inputs(shape, torch.float32, kernel_device)
    outs, refs = fused_and_reference(u, weight, None, grad, iterations)
    for name, out, ref in zip(("v", "du", "dW"), outs, refs):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) < TOL[torch.float32], name


@pytest.mark.parametrize("options", [dict(leaky=True), dict(detach_routing=True), dict(leaky=True, detach_routing=True),
                                     dict()], ids=["leaky", "detach", "leaky-detach", "plain"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_options_with_bias_fp64(options, iterations, kernel_device, family):
    u, weight, bias, grad = make_inputs((4, 13, 5, 6, 3), torch.float64, kernel_device, bias=True)
    outs, refs = fused_and_reference(u, weight, bias, grad, iterations, **options)
    for name, out, ref in zip(("v", "du", "dW", "dbias"), outs, refs):
        assert rel_err(out, ref) < TOL[torch.float64], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype, kernel_device, family):
    if dtype == torch.bfloat16 and kernel_device == "cpu":
        pytest.skip("Triton's interpreter has no bfloat16")
    u, weight, bias, grad = make_inputs((3, 13, 10, 16, 8), dtype, kernel_device, bias=True)
    outs, refs = fused_and_reference(u, weight, bias, grad, 3)
    for name, out, ref in zip(("v", "du", "dW", "dbias"), outs, refs):
        assert out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], name


# (dtype, input_precision, tolerance): tf32 rounds the operands to 10 mantissa bits (see
# test_precisions_against_float64)
TILING_PRECISIONS = [(torch.float32, "tf32x3", TOL[torch.float32]), (torch.float32, "tf32", 2e-3),
                     (torch.float16, "ieee", TOL[torch.float16])]


@pytest.mark.parametrize("dtype, precision, tol", TILING_PRECISIONS, ids=["tf32x3", "tf32", "fp16"])
def test_wide_batch_tilings(dtype, precision, tol, kernel_device, family):
    """Batches of more than 64 samples, where the tc forward and reverse passes take their wide
    tilings (routing_tc._Config: 128 samples, 16 columns per chunk; the 16-bit and tf32 forward
    32 columns, the 16-bit reverse 64 samples), which the small batches of the other tests never
    reach. 70 samples: a partial tile; 9 capsules at K = 8: a partial last chunk of either width."""
    u, weight, bias, grad = make_inputs((70, 9, 3, 7, 8), dtype, kernel_device, bias=True)
    if family == "tc":
        cfg = routing_tc._Config(u, weight, precision)
        assert (cfg.fwd.block_b, cfg.fwd.constants["CHUNK"]) == (128, 2 if precision == "tf32x3" else 4)
        assert (cfg.rev.block_b, cfg.rev.constants["CHUNK"]) == (64 if dtype == torch.float16 else 128, 2)
        assert not (cfg.fwd.constants["WHOLE"] or cfg.rev.constants["WHOLE"] or cfg.grad_constants["WHOLE"])
    outs, refs = fused_and_reference(u, weight, bias, grad, 3, input_precision=precision)
    for name, out, ref in zip(("v", "du", "dW", "dbias"), outs, refs):
        assert out.dtype == dtype
        assert rel_err(out, ref) < tol, name


def test_precisions_against_float64(kernel_device, family):
    """Each input_precision's error against float64. The tc kernels round their operands to tf32
    themselves, so a tf32 product of them is exact and the interpreter computes what the GPU
    computes (fp32 accumulation aside). The fma kernels have exact products for tf32x3."""
    # the MNIST capsule sizes; 7 capsules: one full chunk of 4 and a partial one (tc)
    u, weight, _, grad = make_inputs((4, 7, 10, 16, 8), torch.float32, kernel_device, u_scale=3.0)
    errors, outputs = {}, {}
    for precision in ("ieee", "tf32x3", "tf32"):
        outs, refs = fused_and_reference(u, weight, None, grad, 3, input_precision=precision)
        errors[precision] = [rel_err(out, ref) for out, ref in zip(outs, refs)]
        outputs[precision] = outs
    print({precision: [f"{e:.1e}" for e in errs] for precision, errs in errors.items()})
    for ieee, x3 in zip(errors["ieee"], errors["tf32x3"]):
        assert ieee < 1e-6
        assert x3 < max(2 * ieee, 1e-6)  # about fp32's accuracy: the split loses ~2^-22 per product
    for tf32 in errors["tf32"]:
        assert 1e-5 < tf32 < 2e-3  # operands rounded to 10 mantissa bits
    if family == "fma":
        assert all(torch.equal(a, b) for a, b in zip(outputs["ieee"], outputs["tf32x3"]))


@triton.jit
def _round_tf32_kernel(x_ptr, guarded_ptr, finite_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(guarded_ptr + tl.arange(0, N), common.round_tf32(x))
    tl.store(finite_ptr + tl.arange(0, N), common.round_tf32_finite(x))


def test_tf32_rounding(kernel_device):
    """round_tf32 rounds to nearest tf32, ties away from zero (cvt.rna.tf32.f32), and keeps every
    NaN NaN, the GPU's 0x7FFFFFFF too, which the unguarded round_tf32_finite (used only on the low
    parts of tf32x3, see routing_tc._dot) turns into -0.0."""
    bits = torch.tensor([0x3F800000, 0x3F800FFF, 0x3F801000, 0xBF801000, 0x3F802000, 0x00000001, 0x7F7FFFFF,
                         0x7F800000, 0x7FC00000, 0x7FFFFFFF, 0x7F800001, 0x3F7FF000, 0x80000000, 0xFF800000,
                         0x40490FDB, 0xC0490FDB], dtype=torch.int64)  # 16: arange needs a power of two
    x = bits.to(torch.int32).view(torch.float32).to(kernel_device)
    guarded, finite = torch.empty_like(x), torch.empty_like(x)
    _round_tf32_kernel[(1,)](x, guarded, finite, N=x.numel())
    expected = ((bits + 0x1000) & 0xFFFFE000).to(torch.int32).view(torch.float32)  # as int64: no overflow
    not_nan = ~torch.isnan(x.cpu())
    assert torch.equal(guarded.cpu()[not_nan], expected[not_nan])
    assert torch.equal(finite.cpu()[not_nan], expected[not_nan])
    assert torch.isnan(guarded.cpu()[~not_nan]).all()
    assert expected.tolist()[:7] == [1.0, 1.0, 1 + 2 ** -10, -(1 + 2 ** -10), 1 + 2 ** -10, 0.0, float("inf")]
    assert expected.tolist()[11:14] == [1.0, -0.0, float("-inf")]
    assert finite.cpu()[9].item() == 0.0 and torch.signbit(finite.cpu()[9])  # the case the guard exists for


@pytest.mark.parametrize("matmul_precision, input_precision",
                         [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_default_precision_follows_torch(matmul_precision, input_precision, kernel_device):
    u, weight, _, _ = make_inputs((2, 9, 3, 4, 5), torch.float32, kernel_device)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul_precision)
        with kernels.tuning(kernels="tc"):
            default = fastcaps.dynamic_routing(u, weight)
            explicit = fastcaps.dynamic_routing(u, weight, input_precision=input_precision)
            other = fastcaps.dynamic_routing(u, weight, input_precision="tf32" if input_precision == "ieee" else "ieee")
    finally:
        torch.set_float32_matmul_precision(saved)
    assert torch.equal(default, explicit) and not torch.equal(default, other)


LAUNCH_CONFIGS = {
    "fma": [dict(block_b=2, splits=3, grad_tiles_per_chunk=1, grad_i_per_prog=4),
            # J = 3 in two tiles of 2 + 1 rows, not the default one of 4 (see routing_fma._j_groups)
            dict(block_b=4, splits=1, grad_tiles_per_chunk=2, grad_i_per_prog=37, stages=1, grad_split_j=True),
            dict(block_b=8, splits=37, grad_tiles_per_chunk=9, grad_i_per_prog=1, stages=3)],
    "tc": [dict(tc_block_b=16, tc_splits=3, chunk=2, grad_batch_splits=2),
           dict(tc_block_b=32, tc_splits=1, chunk=8, tc_stages=1, tc_num_warps=2, tc_grad_block_b=32),
           dict(tc_block_b=16, tc_splits=19, chunk=2, grad_batch_splits=3, tc_stages=3, fwd_chunk=4,
                tc_grad_r_stages=1)],
}


# The problem the launch configurations above run on, per family: the smallest B and I at which
# each configuration keeps what the earlier (33, 21) problem exercised: several batch tiles with a
# partial last one (fma: B = 9 in 5, 3 and 2 tiles of 2, 4 and 8, and 3 chunks of 2 tiles, the last
# partial; tc: B = 33 in forward tiles of 16 and 32 and 3 backward tiles of 16, so
# grad_batch_splits = 2 has a split of two tiles), a partial last chunk and split of i (fma: 13
# capsules in splits of 5, 5, 3; tc: 7 chunks of 2, the last with one capsule, in splits of
# 3, 3, 1; the third configuration's forward: 4 chunks of 4, a tiling of its own), and more
# requested splits (37, 19) than capsules or chunks. The interpreter's time
# grows with B * I.
LAUNCH_SHAPES = {"fma": (9, 13, 3, 7, 5), "tc": (33, 13, 3, 7, 5)}

@pytest.mark.parametrize("config", range(3), ids=["many-splits", "one-split", "most-splits"])
def test_launch_configurations_agree(config, kernel_device, family):
    """Every split of the reductions over i and over the batch computes the same function."""
    u, weight, bias, grad = make_inputs(LAUNCH_SHAPES[family], torch.float64, kernel_device, bias=True)
    with kernels.tuning(**LAUNCH_CONFIGS[family][config]):
        outs, refs = fused_and_reference(u, weight, bias, grad, 3, leaky=True)
    for name, out, ref in zip(("v", "du", "dW", "dbias"), outs, refs):
        assert rel_err(out, ref) < TOL[torch.float64], name


def test_gradcheck_fp64(kernel_device, family):
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64).to(kernel_device).requires_grad_()
    weight = torch.randn(3, 3, 3, 2, generator=gen, dtype=torch.float64).to(kernel_device).requires_grad_()
    bias = (0.1 * torch.randn(3, 3, generator=gen, dtype=torch.float64)).to(kernel_device).requires_grad_()
    # detach_routing is left out on purpose: its gradient is not the derivative of v
    for options in (dict(), dict(leaky=True)):
        assert torch.autograd.gradcheck(lambda a, b, c: fastcaps.dynamic_routing(a, b, 3, bias=c, **options),
                                        (u, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_every_output_is_written_and_the_backward_is_deterministic(kernel_device, monkeypatch, family):
    """torch.empty poisoned with NaN: an element a kernel leaves unwritten shows up as NaN; and a
    second call gives bitwise the same v and gradients (fixed-order reductions, no atomics)."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    u, weight, bias, grad = make_inputs(LAUNCH_SHAPES[family], torch.float32, kernel_device, bias=True)
    u, weight, bias = (t.requires_grad_() for t in (u, weight, bias))
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    first = None
    # leaky and detach_routing together: both flags' code paths (the leak logit; the squash
    # backward kernel and the one-term final sweep) in one call
    for options in (dict(), dict(leaky=True, detach_routing=True), dict()):
        with kernels.tuning(**LAUNCH_CONFIGS[family][0]):
            v = fastcaps.dynamic_routing(u, weight, 3, bias=bias, **options)
            grads = torch.autograd.grad(v, (u, weight, bias), grad)
        for t in (v,) + grads:
            assert torch.isfinite(t).all()
        if first is None:
            first = (v,) + grads
    for a, b in zip(first, (v,) + grads):   # the first and the last call: no options
        assert torch.equal(a, b)


def test_zero_input_capsules_are_finite(kernel_device, family):
    """u = 0 gives s = 0 (without bias), where squash and its gradient must stay finite."""
    u = torch.zeros(3, 11, 4, device=kernel_device, requires_grad=True)
    weight = torch.randn(11, 5, 6, 4, device=kernel_device, requires_grad=True)
    v = fastcaps.dynamic_routing(u, weight, 3)
    du, dw = torch.autograd.grad(v.sum(), (u, weight))
    assert torch.equal(v, torch.zeros_like(v))
    assert torch.isfinite(du).all() and torch.isfinite(dw).all()


def test_fp16_large_inputs_do_not_overflow(kernel_device, family):
    """|s|^2 of a float16 s can exceed 65504: it is accumulated in fp32."""
    u = torch.full((2, 8, 4), 0.5, dtype=torch.float16, device=kernel_device)
    weight = torch.full((8, 3, 16, 4), 60.0, dtype=torch.float16, device=kernel_device)
    v = fastcaps.dynamic_routing(u, weight, 3)
    assert torch.isfinite(v).all()
    assert torch.allclose(v.double().norm(dim=-1), torch.ones(2, 3, dtype=torch.float64, device=kernel_device),
                          atol=1e-3)


def test_nan_input_propagates(kernel_device, family):
    u, weight, _, _ = make_inputs((3, 9, 3, 4, 5), torch.float32, kernel_device)
    u[1, 4, 2] = float("nan")
    v = fastcaps.dynamic_routing(u, weight, 3)
    assert torch.isnan(v[1]).all()
    assert torch.isfinite(v[0]).all() and torch.isfinite(v[2]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_strided_weight_matches_contiguous(kernel_device, family, dtype):
    """A strided W gives bit for bit what its contiguous copy gives, forward and backward: the
    fma kernels read W from a copy in their own layout, widened to fp32 for half W."""
    u, weight, _, grad = make_inputs((3, 9, 3, 4, 6), dtype, kernel_device)
    strided = weight.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    assert not strided.is_contiguous() and torch.equal(strided, weight)
    results = []
    for w in (weight, strided):
        leaves = (u.detach().requires_grad_(), w.detach().requires_grad_())
        v = fastcaps.dynamic_routing(*leaves, 3)
        results.append((v, *torch.autograd.grad(v, leaves, grad)))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_non_contiguous_inputs_and_sum_gradient(kernel_device, family):
    """Strided u and W, and the stride-0 gradient that y.sum().backward() sends."""
    u_base, w_base, _, _ = make_inputs((5, 9, 3, 4, 6), torch.float64, kernel_device)
    u = u_base.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # strides of a transposed view
    weight = w_base.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0).requires_grad_()
    assert not u.is_contiguous() and not weight.is_contiguous()
    fastcaps.dynamic_routing(u, weight, 3).sum().backward()
    u_ref, w_ref = u_base.cpu().requires_grad_(), w_base.cpu().requires_grad_()
    reference.dynamic_routing(u_ref, w_ref, 3).sum().backward()
    assert rel_err(u.grad, u_ref.grad) < TOL[torch.float64]
    assert rel_err(weight.grad, w_ref.grad) < TOL[torch.float64]


def test_saved_state_is_small(kernel_device, family):
    """Autograd keeps u, W and O(B R J D) numbers: nothing of size B I J D."""
    batch, in_caps, out_caps, out_dim, in_dim, iterations = 4, 37, 3, 7, 5, 3
    u, weight, _, _ = make_inputs((batch, in_caps, out_caps, out_dim, in_dim), torch.float32, kernel_device)
    u.requires_grad_()
    weight.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastcaps.dynamic_routing(u, weight, iterations)
    extra = sum(t.numel() for t in saved) - u.numel() - weight.numel()
    assert extra <= (2 * iterations - 1) * batch * out_caps * out_dim


def test_fused_path_does_not_fall_back(kernel_device, monkeypatch, family):
    """Count kernel launches; the reference must not run at all."""
    launches = []

    class Counting:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            launches.append(self.fn)
            return self.fn[grid]

    for module, name in ((kernels.routing_fma, "_forward_pass_kernel"), (kernels.routing_fma, "_reverse_pass_kernel"),
                         (kernels.routing_fma, "_input_grad_kernel"), (kernels.routing_tc, "_tc_forward_kernel"),
                         (kernels.routing_tc, "_tc_squash_backward_kernel"), (kernels.routing_tc, "_tc_reverse_kernel"),
                         (kernels.routing_tc, "_tc_input_grad_kernel")):
        monkeypatch.setattr(module, name, Counting(getattr(module, name)))

    def no_reference(*args, **kwargs):
        raise AssertionError("fell back to the eager reference")

    monkeypatch.setattr(reference, "dynamic_routing", no_reference)
    u, weight, _, _ = make_inputs((2, 5, 3, 4, 3), torch.float32, kernel_device)
    u.requires_grad_()
    fastcaps.dynamic_routing(u, weight, 3).sum().backward()
    # R forward passes, R-1 reverse passes, one final sweep; tc: and ds^(R-1) before the reverse passes
    assert len(launches) == 3 + 2 + 1 + (family == "tc")


@pytest.mark.parametrize("bad, error, match", [
    (dict(u=torch.zeros(2, 3)), ValueError, "rank 3"),
    (dict(weight=torch.zeros(3, 2, 2)), ValueError, "rank 4"),
    (dict(u=torch.zeros(2, 4, 5)), ValueError, "disagree"),
    (dict(weight=torch.zeros(3, 2, 2, 4)), ValueError, "disagree"),
    (dict(u=torch.zeros(2, 0, 5), weight=torch.zeros(0, 2, 2, 5)), ValueError, ">= 1"),
    (dict(detach_routing="yes"), TypeError, "detach_routing must be True or False"),
    (dict(leaky=1), TypeError, "leaky must be True or False"),
    (dict(bias=torch.zeros(2, 3)), ValueError, "bias must be"),
    (dict(u=torch.zeros(2, 3, 5, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(u=torch.zeros(2, 3, 5, dtype=torch.int64)), TypeError, "supported"),
    (dict(u=torch.zeros(2, 3, 5, device="meta")), ValueError, "one device"),
    (dict(iterations=0), ValueError, "iterations"),
    (dict(iterations=2.0), ValueError, "iterations"),
    (dict(input_precision="fp8"), ValueError, "input_precision"),
])
def test_bad_inputs_are_rejected(bad, error, match):
    args = dict(u=torch.zeros(2, 3, 5), weight=torch.zeros(3, 2, 2, 5), iterations=3)
    args.update(bad)
    with pytest.raises(error, match=match):
        fastcaps.dynamic_routing(**args)


def test_kernel_family_from_the_environment(monkeypatch, kernel_device):
    u, weight, _, _ = make_inputs((2, 9, 3, 4, 5), torch.float64, kernel_device)
    results = {}
    for name in FAMILIES:
        monkeypatch.setenv("FASTCAPS_KERNELS", name)
        assert kernels.family_name() == name
        results[name] = fastcaps.dynamic_routing(u, weight)
    assert rel_err(results["tc"], results["fma"]) < TOL[torch.float64]
    monkeypatch.setenv("FASTCAPS_KERNELS", "fast")
    with pytest.raises(ValueError, match="FASTCAPS_KERNELS"):
        fastcaps.dynamic_routing(u, weight)


def test_empty_batch_like_the_reference(kernel_device, family):
    """A batch of 0 samples gives v [0, J, D] and zero gradients of the right shapes, as the
    reference and DigitCaps do."""
    u = torch.zeros(0, 9, 5, device=kernel_device, requires_grad=True)
    weight = torch.randn(9, 3, 4, 5, device=kernel_device, requires_grad=True)
    bias = torch.zeros(3, 4, device=kernel_device, requires_grad=True)
    v = fastcaps.dynamic_routing(u, weight, 3, bias=bias)
    assert v.shape == reference.dynamic_routing(u, weight, 3, bias=bias).shape == (0, 3, 4)
    du, dw, db = torch.autograd.grad(v.sum(), (u, weight, bias))
    assert du.shape == u.shape and torch.equal(dw, torch.zeros_like(weight)) and torch.equal(db, torch.zeros_like(bias))
    assert fastcaps.FusedDigitCaps(9, 5, 3, 4).to(kernel_device)(u).shape == (0, 3, 4)


def test_huge_activations_squash_to_unit_vectors(kernel_device, family):
    """|s| around 1e20 in fp32: |s|^2 overflows, but the squash (forward and backward) never
    forms it: v has norm 1 and every gradient is finite."""
    gen = torch.Generator().manual_seed(3)
    u = (1e19 * torch.rand(3, 9, 4, generator=gen)).to(kernel_device).requires_grad_()
    weight = torch.rand(9, 3, 5, 4, generator=gen).to(kernel_device).requires_grad_()
    v = fastcaps.dynamic_routing(u, weight, 3)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3, 3, device=kernel_device), atol=1e-5)
    du, dw = torch.autograd.grad(v.pow(2).sum(), (u, weight))
    assert torch.isfinite(du).all() and torch.isfinite(dw).all()


def test_check_finite_mode_rejects_nan(monkeypatch):
    monkeypatch.setenv("FASTCAPS_CHECK_FINITE", "1")  # read at call time, after import
    u = torch.zeros(2, 3, 5)
    u[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fastcaps.dynamic_routing(u, torch.zeros(3, 2, 2, 5))


def test_autocast_casts_like_a_matmul(kernel_device):
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float16
    u, weight, bias, _ = make_inputs((3, 9, 3, 4, 5), torch.float32, kernel_device, bias=True)
    with torch.autocast(kernel_device, dtype=dtype):
        v = fastcaps.dynamic_routing(u, weight, 3, bias=bias)
        mixed = fastcaps.dynamic_routing(u.to(dtype), weight, 3, bias=bias)  # low-precision activations
    assert v.dtype == mixed.dtype == dtype
    expected = fastcaps.dynamic_routing(u.to(dtype), weight.to(dtype), 3, bias=bias.to(dtype))
    assert torch.equal(v, expected) and torch.equal(mixed, expected)


def test_custom_ops_pass_opcheck(kernel_device, family):
    u, weight, bias, grad = make_inputs((3, 5, 3, 4, 2), torch.float32, kernel_device, bias=True)
    v, s_all, v_sums = torch.ops.fastcaps.routing_forward(u, weight, bias, None, 3, False, "ieee", family)
    torch.library.opcheck(torch.ops.fastcaps.routing_forward.default, (u, weight, bias, None, 3, False, "ieee", family))
    torch.library.opcheck(torch.ops.fastcaps.routing_backward.default,
                          (grad, u, weight, None, s_all, v_sums, 3, False, False, "ieee", family))


def test_compile_fullgraph_sees_one_op(kernel_device):
    """The custom ops are opaque to torch.compile: no graph break (aot_eager keeps it fast on CPU)."""
    layer = fastcaps.FusedDigitCaps(9, 5, 3, 4, bias=True).to(kernel_device)
    u = torch.randn(2, 9, 5, device=kernel_device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(u)
    out.sum().backward()
    assert torch.allclose(out, layer(u), rtol=1e-6, atol=1e-7)


def test_fused_and_eager_modules_interchange(kernel_device, family):
    eager = fastcaps.DigitCaps(11, 5, 3, 4, iterations=3, bias=True, leaky=True).double().to(kernel_device)
    fused = fastcaps.FusedDigitCaps(11, 5, 3, 4, iterations=3, bias=True, leaky=True).double().to(kernel_device)
    assert eager.state_dict().keys() == fused.state_dict().keys()
    with torch.no_grad():
        eager.bias.normal_()
    fused.load_state_dict(eager.state_dict())
    u = torch.randn(4, 11, 5, dtype=torch.float64, device=kernel_device)
    assert rel_err(fused(u), eager(u)) < TOL[torch.float64]
    eager.load_state_dict(fused.state_dict())


def test_capsnet_routing_switch():
    assert isinstance(fastcaps.CapsNet(routing="fused").digit_caps, fastcaps.FusedDigitCaps)
    assert type(fastcaps.CapsNet(routing="eager").digit_caps) is fastcaps.DigitCaps
    with pytest.raises(ValueError, match="routing"):
        fastcaps.CapsNet(routing="fast")


def test_cpu_without_interpreter_falls_back_with_one_warning():
    code = textwrap.dedent("""
        import warnings, torch, fastcaps
        from fastcaps import reference
        u, w = torch.randn(2, 5, 3), torch.randn(5, 3, 4, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            v1 = fastcaps.dynamic_routing(u, w)
            v2 = fastcaps.dynamic_routing(u, w)
        assert torch.equal(v1, reference.dynamic_routing(u, w)) and torch.equal(v1, v2)
        messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(messages) == 1 and "eager reference" in messages[0], messages
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ------------------------------------------------------------------ prior logits (b^(0) = prior)

def make_prior(in_caps, out_caps, dtype, device, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(in_caps, out_caps, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def fused_and_reference_with_prior(u, weight, bias, prior, grad, iterations, **options):
    """v and the gradients of u, W, (bias,) prior from the fused op and the float64 reference;
    a gradient is None where the op gives none (the prior under detach_routing)."""
    def run(routing, leaves, g):
        u_, w_, *rest = leaves
        p_ = rest[-1]
        v = routing(u_, w_, iterations, bias=rest[0] if bias is not None else None, prior=p_, **options)
        return (v,) + torch.autograd.grad(v, leaves, g, allow_unused=True)

    leaves = [t.detach().requires_grad_() for t in (u, weight) + ((bias,) if bias is not None else ()) + (prior,)]
    outs = run(fastcaps.dynamic_routing, leaves, grad)
    options.pop("input_precision", None)
    refs = run(reference.dynamic_routing, [t.detach().double().cpu().requires_grad_() for t in leaves],
               grad.double().cpu())
    return outs, refs


@pytest.mark.parametrize("shape", [SHAPES[1], (3, 9, 10, 16, 8), (1, 1, 1, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("iterations", [1, 3])
def test_prior_matches_reference_fp32(shape, iterations, kernel_device, family):
    u, weight, bias, grad = make_inputs(shape, torch.float32, kernel_device, bias=True)
    prior = make_prior(shape[1], shape[2], torch.float32, kernel_device)
    outs, refs = fused_and_reference_with_prior(u, weight, bias, prior, grad, iterations)
    for name, out, ref in zip(("v", "du", "dW", "dbias", "dprior"), outs, refs):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) < TOL[torch.float32], name


@pytest.mark.parametrize("options", [dict(leaky=True), dict(detach_routing=True), dict(leaky=True, detach_routing=True)],
                         ids=["leaky", "detach", "leaky-detach"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_prior_options_fp64(options, iterations, kernel_device, family):
    u, weight, bias, grad = make_inputs((4, 13, 5, 6, 3), torch.float64, kernel_device, bias=True)
    prior = make_prior(13, 5, torch.float64, kernel_device)
    outs, refs = fused_and_reference_with_prior(u, weight, bias, prior, grad, iterations, **options)
    if options.get("detach_routing"):  # the logits are detached, prior included: no gradient
        assert outs[-1] is None and refs[-1] is None
        outs, refs = outs[:-1], refs[:-1]
    for name, out, ref in zip(("v", "du", "dW", "dbias", "dprior"), outs, refs):
        assert rel_err(out, ref) < TOL[torch.float64], name


@pytest.mark.parametrize("batch", [5, 70], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype, precision, tol", TILING_PRECISIONS, ids=["tf32x3", "tf32", "fp16"])
@pytest.mark.parametrize("with_prior", [False, True], ids=["", "prior"])
def test_whole_chunks(with_prior, dtype, precision, tol, batch, kernel_device):
    """I a multiple of every chunk width, K a power of two and D = 16, as at the MNIST shape: the
    tc kernels load W and the prior without masks (routing_tc._constants: WHOLE), a path that the
    odd shapes of the other tests never take. 16 capsules of K = 4: chunks of 8 and, in the wide
    tilings of 70 samples, 4 capsules (8 in the tf32 and 16-bit forward without a prior)."""
    u, weight, bias, grad = make_inputs((batch, 16, 3, 16, 4), dtype, kernel_device, bias=True)
    prior = make_prior(16, 3, dtype, kernel_device) if with_prior else None
    cfg = routing_tc._Config(u, weight, precision, with_prior)
    assert cfg.fwd.constants["WHOLE"] and cfg.rev.constants["WHOLE"] and cfg.grad_constants["WHOLE"]
    if batch > 64:
        wide_forward = dtype == torch.float16 or (precision == "tf32" and not with_prior)
        assert cfg.fwd.constants["CHUNK"] == (8 if wide_forward else 4)
    with kernels.tuning(kernels="tc"):  # the fma kernels have no such specialisation
        if with_prior:
            outs, refs = fused_and_reference_with_prior(u, weight, bias, prior, grad, 3, input_precision=precision)
        else:
            outs, refs = fused_and_reference(u, weight, bias, grad, 3, input_precision=precision)
    for name, out, ref in zip(("v", "du", "dW", "dbias", "dprior"), outs, refs):
        assert out.dtype == dtype
        assert rel_err(out, ref) < tol, name


def check_form_with_prior(dtype, kernel_device, iterations, leaky, overrides, **options):
    """One form of a kernel (the tuning overrides) against the float64 reference, with a bias and
    a prior, at the (37, 13, 5, 6, 3) problem: v, du, dW, dbias and dprior."""
    u, weight, bias, grad = make_inputs((37, 13, 5, 6, 3), dtype, kernel_device, bias=True)
    prior = make_prior(13, 5, dtype, kernel_device)
    with kernels.tuning(**overrides):
        outs, refs = fused_and_reference_with_prior(u, weight, bias, prior, grad, iterations, leaky=leaky, **options)
    for name, out, ref in zip(("v", "du", "dW", "dbias", "dprior"), outs, refs):
        assert out.dtype == dtype and out.shape == ref.shape
        assert rel_err(out, ref) < TOL[dtype], name


@pytest.mark.parametrize("scaled", [False, True], ids=["per-tile", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("iterations, leaky", [(1, True), (3, False)], ids=["R1-leaky", "R3"])
def test_prior_first_term_forms(scaled, dtype, iterations, leaky, kernel_device):
    """Both forms of the tc final pass's r = 0 term with a prior (tuning key tc_grad_scaled_prior,
    whose default follows the dtype and the Triton version), at either kind of dot: 37 samples in
    three batch tiles of 16, the last partial, split over two programs along the batch."""
    check_form_with_prior(dtype, kernel_device, iterations, leaky, dict(kernels="tc", tc_grad_scaled_prior=scaled,
                                                                        grad_batch_splits=2), input_precision="tf32x3")


@pytest.mark.parametrize("u_first", [False, True], ids=["u-after", "u-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_final_sweep_u_forms(u_first, dtype, kernel_device):
    """Both places of the fma final sweep's u load for dW (tuning key grad_u_first, whose default
    follows the dtype and the Triton version): 37 samples in ten batch tiles of 4, the last
    partial, three per program along the batch, and 13 capsules five per program, so that dW's
    and dprior's register sums run over several tiles and are written once per capsule."""
    check_form_with_prior(dtype, kernel_device, 3, True, dict(kernels="fma", grad_u_first=u_first, block_b=4,
                                                              grad_tiles_per_chunk=3, grad_i_per_prog=5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prior_half_precision(dtype, kernel_device, family):
    if dtype == torch.bfloat16 and kernel_device == "cpu":
        pytest.skip("Triton's interpreter has no bfloat16")
    u, weight, _, grad = make_inputs((3, 13, 10, 16, 8), dtype, kernel_device)
    outs, refs = fused_and_reference_with_prior(u, weight, None, make_prior(13, 10, dtype, kernel_device), grad, 2)
    for name, out, ref in zip(("v", "du", "dW", "dprior"), outs, refs):
        assert out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], name


def test_prior_gradcheck_fp64(kernel_device, family):
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64).to(kernel_device).requires_grad_()
    weight = torch.randn(3, 3, 3, 2, generator=gen, dtype=torch.float64).to(kernel_device).requires_grad_()
    prior = torch.randn(3, 3, generator=gen, dtype=torch.float64).to(kernel_device).requires_grad_()
    for iterations, options in ((3, dict()), (3, dict(leaky=True)), (1, dict())):
        assert torch.autograd.gradcheck(
            lambda a, b, p: fastcaps.dynamic_routing(a, b, iterations, prior=p, **options),
            (u, weight, prior), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("config", [0, 2], ids=["many-splits", "most-splits"])
def test_prior_gradient_is_deterministic_and_written(config, kernel_device, family, monkeypatch):
    """Every split of the batch reduction of dprior is written (torch.empty poisoned with NaN),
    summed in a fixed order (bitwise equal runs) and right."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    shape = LAUNCH_SHAPES[family]
    u, weight, _, grad = make_inputs(shape, torch.float64, kernel_device)
    prior = make_prior(shape[1], shape[2], torch.float64, kernel_device)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    results = []
    for _ in range(2):
        with kernels.tuning(**LAUNCH_CONFIGS[family][config]):
            results.append(fused_and_reference_with_prior(u, weight, None, prior, grad, 3))
    (outs, refs), (again, _) = results
    for name, out, ref, out2 in zip(("v", "du", "dW", "dprior"), outs, refs, again):
        assert torch.equal(out, out2), name
        assert rel_err(out, ref) < TOL[torch.float64], name


def test_prior_sum_gradient_and_strided_prior(kernel_device, family):
    """A transposed-view prior, and the stride-0 gradient of y.sum().backward()."""
    u, weight, _, _ = make_inputs((5, 9, 3, 4, 6), torch.float64, kernel_device)
    base = make_prior(3, 9, torch.float64, kernel_device)
    prior = base.t().requires_grad_()  # [9, 3] with strides (1, 9)
    assert not prior.is_contiguous()
    u.requires_grad_()
    fastcaps.dynamic_routing(u, weight, 3, prior=prior).sum().backward()
    u_ref, p_ref = u.detach().cpu().requires_grad_(), base.t().detach().cpu().requires_grad_()
    reference.dynamic_routing(u_ref, weight.cpu(), 3, prior=p_ref).sum().backward()
    assert rel_err(prior.grad, p_ref.grad) < TOL[torch.float64]
    assert rel_err(u.grad, u_ref.grad) < TOL[torch.float64]


@pytest.mark.parametrize("prior, error, match", [
    (torch.zeros(3, 3), ValueError, r"prior \(the initial routing logits\) must be \[I, J\] = \(3, 2\), got \(3, 3\)"),
    (torch.zeros(2, 3), ValueError, r"must be \[I, J\] = \(3, 2\), got \(2, 3\)"),
    (torch.zeros(1, 3, 2), ValueError, r"\[I, J\] = \(3, 2\)"),
    ([[0.0, 0.0]] * 3, ValueError, r"\[I, J\] = \(3, 2\), got list"),
    (torch.zeros(3, 2, dtype=torch.float64), TypeError, "share one dtype.*prior: torch.float64"),
    (torch.zeros(3, 2, dtype=torch.int64), TypeError, "prior has dtype torch.int64"),
    (torch.zeros(3, 2, device="meta"), ValueError, "one device.*prior: meta"),
])
def test_bad_prior_is_rejected(prior, error, match):
    with pytest.raises(error, match=match):
        fastcaps.dynamic_routing(torch.zeros(2, 3, 5), torch.zeros(3, 2, 2, 5), 3, prior=prior)


def test_prior_custom_ops_pass_opcheck(kernel_device, family):
    u, weight, bias, grad = make_inputs((3, 5, 3, 4, 2), torch.float32, kernel_device, bias=True)
    prior = make_prior(5, 3, torch.float32, kernel_device)
    for detach in (False, True):
        v, s_all, v_sums = torch.ops.fastcaps.routing_forward(u, weight, bias, prior, 2, False, "ieee", family)
        torch.library.opcheck(torch.ops.fastcaps.routing_forward.default,
                              (u, weight, bias, prior, 2, False, "ieee", family))
        torch.library.opcheck(torch.ops.fastcaps.routing_backward.default,
                              (grad, u, weight, prior, s_all, v_sums, 2, False, detach, "ieee", family))


def test_learnable_prior_module(kernel_device, family):
    """DigitCaps(prior=True) / FusedDigitCaps: a zero-initialised `prior` parameter that trains;
    the two load each other's state_dict, and checkpoints without a prior load as before."""
    eager = fastcaps.DigitCaps(11, 5, 3, 4, prior=True).double().to(kernel_device)
    fused = fastcaps.FusedDigitCaps(11, 5, 3, 4, prior=True).double().to(kernel_device)
    assert sorted(fused.state_dict()) == ["prior", "weight"] and not fused.prior.any()
    with torch.no_grad():
        eager.prior.normal_()
    fused.load_state_dict(eager.state_dict())
    u = torch.randn(4, 11, 5, dtype=torch.float64, device=kernel_device)
    fused(u).square().sum().backward()
    eager(u).square().sum().backward()
    assert rel_err(fused.prior.grad, eager.prior.grad) < TOL[torch.float64]
    assert rel_err(fused(u), eager(u)) < TOL[torch.float64]
    plain = fastcaps.FusedDigitCaps(11, 5, 3, 4).double().to(kernel_device)
    plain.load_state_dict(fastcaps.DigitCaps(11, 5, 3, 4).double().state_dict())
    with pytest.raises(RuntimeError, match="prior"):  # a prior checkpoint does not silently lose it
        plain.load_state_dict(eager.state_dict())
    zero_prior = fastcaps.FusedDigitCaps(11, 5, 3, 4, prior=True).double().to(kernel_device)
    zero_prior.load_state_dict(plain.state_dict() | {"prior": torch.zeros(11, 3, dtype=torch.float64)})
    assert rel_err(zero_prior(u), plain(u)) < TOL[torch.float64]  # a zero prior routes as none (the paper)


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_mnist_shape_on_gpu(dtype):
    u, weight, _, grad = make_inputs((128, 1152, 10, 16, 8), dtype, "cuda", u_scale=3.0)
    outs, refs = fused_and_reference(u, weight, None, grad, 3, input_precision="ieee")
    for name, out, ref in zip(("v", "du", "dW"), outs, refs):
        assert rel_err(out, ref.to(out.device)) < TOL[dtype], name


@pytest.mark.gpu
def test_compile_fullgraph_inductor_on_gpu():
    net = fastcaps.CapsNet(routing="fused").cuda()
    x = torch.rand(8, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x, y)
    fastcaps.capsnet_loss(out, x, y)[0].backward()
    expected = net(x, y)
    assert torch.allclose(out.lengths, expected.lengths, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, limit", [(128, 0.2), (2048, 0.05)])
def test_peak_memory_on_gpu(batch, limit):
    """Peak extra memory of forward+backward, fused vs eager, at the MNIST shape. The fused op's
    is mostly fixed-size at small batch (gradients, dW partials, a transposed copy of W) and the
    eager loop's grows with B I J D."""
    u, weight, _, grad = make_inputs((batch, 1152, 10, 16, 8), torch.float32, "cuda")
    peaks = {}
    for name, fn in (("fused", fastcaps.dynamic_routing), ("eager", reference.dynamic_routing)):
        leaves = [u.clone().requires_grad_(), weight.clone().requires_grad_()]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(*leaves, 3), leaves, grad)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    print(f"peak extra memory, fwd+bwd, B={batch}: fused {peaks['fused'] / 2**20:.1f} MiB, "
          f"eager {peaks['eager'] / 2**20:.1f} MiB ({peaks['fused'] / peaks['eager']:.1%})")
    assert peaks["fused"] < limit * peaks["eager"]


@pytest.mark.gpu
@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("dtype, precision, tol", [(torch.float32, "tf32x3", 2e-5), (torch.float32, "tf32", 2e-3),
                                                    (torch.float16, "ieee", 3e-3), (torch.bfloat16, "ieee", 2e-2)],
                         ids=["tf32x3", "tf32", "fp16", "bf16"])
def test_reduced_precisions_on_gpu(family_name, dtype, precision, tol):
    """The tensor-core products on real tensor cores (the interpreter multiplies in fp32 whatever
    input_precision says) at the MNIST shape, against float64."""
    u, weight, _, grad = make_inputs((128, 1152, 10, 16, 8), dtype, "cuda", u_scale=3.0)
    with kernels.tuning(kernels=family_name):
        outs, refs = fused_and_reference(u, weight, None, grad, 3, input_precision=precision)
    errors = [rel_err(out, ref.to(out.device)) for out, ref in zip(outs, refs)]
    print(f"{family_name} {dtype} {precision}: v, du, dW error " + ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < tol


@pytest.mark.gpu
def test_cuda_graphs_reduce_overhead():
    """torch.compile(mode="reduce-overhead") captures the op's launches (forward and backward) in
    CUDA graphs and replays them with the eager op's results."""
    torch.manual_seed(0)
    layer = fastcaps.FusedDigitCaps(1152, 8, 10, 16).cuda()
    u = fastcaps.squash(torch.randn(32, 1152, 8, device="cuda"))
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, replay
        layer.zero_grad()
        out = compiled(u)
        out.square().sum().backward()
    graph_grad = layer.weight.grad.clone()
    layer.zero_grad()
    expected = layer(u)
    expected.square().sum().backward()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(graph_grad, layer.weight.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 8, 128])
def test_small_batches_bound_the_partials(batch, monkeypatch):
    """On a GPU of 132 multiprocessors, the reduction over the 1152 capsules is split at most
    MAX_SPLITS ways per batch tile: the last program of a tile sums the partials serially."""
    from fastcaps.kernels import common, routing_fma, routing_tc
    for module in (routing_fma, routing_tc):
        monkeypatch.setattr(module, "program_target", lambda device, num_warps: 16 * 132 // num_warps)
    u = torch.empty(batch, 1152, 8)
    weight = torch.empty(1152, 10, 16, 8)
    tc = routing_tc._Config(u, weight, "tf32x3")
    for tiling in (routing_fma._Config(u, weight), tc.fwd, tc.rev):
        assert 1 < tiling.n_splits <= common.MAX_SPLITS


@pytest.mark.parametrize("batch, splits", [(128, 1), (256, 2), (8192, 4), (3, 1)])
def test_tc_final_pass_fills_the_gpu(batch, splits, monkeypatch):
    """On a GPU of 132 multiprocessors the tc final pass splits the batch until its programs make
    several waves (the 288 chunks of the MNIST shape alone are about one), never below 8 batch
    tiles per program; every tile is in exactly one split."""
    from fastcaps.kernels import routing_tc
    monkeypatch.setattr(routing_tc, "program_target", lambda device, num_warps: 16 * 132 // num_warps)
    config = routing_tc._Config(torch.empty(batch, 1152, 8), torch.empty(1152, 10, 16, 8), "tf32x3")
    tiles = -(-batch // config.grad_block_b)
    assert config.grad_splits == splits
    assert (config.grad_splits - 1) * config.grad_tiles_per_prog < tiles <= config.grad_splits * config.grad_tiles_per_prog
    if splits > 1:
        assert config.grad_tiles_per_prog >= routing_tc.GRAD_MIN_TILES
    if batch >= 8192:  # enough tiles: the programs reach the target, 4.4 waves at 2 per SM
        assert config.n_chunks * config.grad_splits >= routing_tc.GRAD_WAVES * 16 * 132 // config.grad_num_warps
