"""The fused routing op: functional API, autograd.Function and torch.library custom ops.

`fastcaps.dynamic_routing` has the signature and semantics of
`fastcaps.reference.dynamic_routing` and runs the Triton kernels of `fastcaps.kernels.routing`
(on CUDA tensors, or on CPU tensors under Triton's interpreter, TRITON_INTERPRET=1). Elsewhere
it falls back to the reference and warns once.

What autograd keeps for the backward: the inputs u, W and two fp32 (fp64 for fp64 inputs)
tensors of the per-sample routing state, s^(r) ([R, B, J, D]) and V^(r) = v^(0)+...+v^(r-1)
([R-1, B, J, D]), i.e. O(B R J D) numbers. u_hat, the logits b and the couplings c are never
written to memory; the backward recomputes them (see kernels/routing.py for the math).
"""
import inspect
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference

__all__ = ["dynamic_routing", "kernels_available", "TritonMissingError", "FusedRoutingFunction"]

_PRECISIONS = ("ieee", "tf32x3", "tf32")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_fallback_warned = False
_kernels = None  # fastcaps.kernels.routing, imported on first use: only the fused op needs Triton


class TritonMissingError(ImportError):
    """The fused op was called where Triton is not installed."""


def _load_kernels():
    global _kernels
    if _kernels is None:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise TritonMissingError(
                "fastcaps.dynamic_routing (the fused routing op) needs Triton, which is not installed: "
                "`pip install triton`, or use the eager routing (fastcaps.reference.dynamic_routing, "
                "DigitCaps, CapsNet(routing='eager'), fastcaps train --routing eager)") from exc
        from ..kernels import routing as module
        _kernels = module
    return _kernels


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and of the saved routing state: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- custom ops (opaque to compile)

@torch.library.custom_op("fastcaps::routing_forward", mutates_args=())
def _routing_forward_op(u: Tensor, weight: Tensor, bias: Optional[Tensor], prior: Optional[Tensor], iterations: int,
                        leaky: bool, input_precision: str, kernels: str) -> tuple[Tensor, Tensor, Tensor]:
    return _load_kernels().routing_forward(u, weight, bias, iterations, leaky, input_precision, kernels, prior=prior)


@_routing_forward_op.register_fake
def _(u, weight, bias, prior, iterations, leaky, input_precision, kernels):
    batch, (_, out_caps, out_dim, _) = u.shape[0], weight.shape
    state_dtype = _state_dtype(u.dtype)
    return (u.new_empty(batch, out_caps, out_dim),
            u.new_empty(iterations, batch, out_caps, out_dim, dtype=state_dtype),
            u.new_empty(iterations - 1, batch, out_caps, out_dim, dtype=state_dtype))


@torch.library.custom_op("fastcaps::routing_backward", mutates_args=())
def _routing_backward_op(grad_v: Tensor, u: Tensor, weight: Tensor, prior: Optional[Tensor], s_all: Tensor,
                         v_sums: Tensor, iterations: int, leaky: bool, detach_routing: bool,
                         input_precision: str, kernels: str,
                         bias_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(du, dW, dbias, dprior); dbias is [J, D] with bias_grad (the forward had a bias), else an
    empty [0], not computed; dprior is [I, J] with a prior (zeros under detach_routing, which
    detaches it), else an empty [0] (a custom op returns tensors, never None)."""
    grad_u, grad_weight, grad_bias, grad_prior = _load_kernels().routing_backward(
        grad_v, u, weight, s_all, v_sums, iterations, leaky, detach_routing, input_precision, kernels, prior=prior,
        bias_grad=bias_grad)
    return (grad_u, grad_weight, (grad_bias if bias_grad else u.new_empty(0)),
            (grad_prior if prior is not None else u.new_empty(0)))


@_routing_backward_op.register_fake
def _(grad_v, u, weight, prior, s_all, v_sums, iterations, leaky, detach_routing, input_precision, kernels,
      bias_grad=True):
    _, out_caps, out_dim, _ = weight.shape
    return (u.new_empty(u.shape), weight.new_empty(weight.shape),  # contiguous
            u.new_empty((out_caps, out_dim) if bias_grad else (0,)),
            u.new_empty(prior.shape if prior is not None else (0,)))


# ---------------------------------------------------------------- autograd

class FusedRoutingFunction(torch.autograd.Function):
    """Forward: R streaming passes over the input capsules (one launch each).
    Backward: R-1 reverse passes for the gradient of the routing state, then one pass that
    recomputes u_hat, c and the softmax gradient per input capsule and contracts the gradient of
    u_hat at once into du and dW (deterministic: dW is reduced in a fixed order, no atomics)."""

    @staticmethod
    def forward(u, weight, bias, prior, iterations, leaky, detach_routing, input_precision, kernels):
        return torch.ops.fastcaps.routing_forward(u, weight, bias, prior, iterations, leaky, input_precision,
                                                  kernels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, weight, bias, prior, iterations, leaky, detach_routing, input_precision, kernels = inputs
        _, s_all, v_sums = output
        ctx.save_for_backward(u, weight, prior, s_all, v_sums)
        ctx.mark_non_differentiable(s_all, v_sums)
        # no zero-filled [R, B, J, D] gradients for s_all and v_sums (never used): None instead
        # (the attribute, not set_materialize_grads(), which torch.compile cannot trace)
        ctx.materialize_grads = False
        ctx.has_bias = bias is not None
        # detach_routing detaches the prior with the logits (as the reference does): no gradient
        ctx.prior_grad = prior is not None and not detach_routing
        ctx.options = (iterations, leaky, detach_routing, input_precision, kernels)  # the backward's family too

    @staticmethod
    def backward(ctx, grad_v, _grad_s, _grad_v_sums):
        if grad_v is None:  # only s_all or v_sums were used: nothing flows back (they are constants)
            return (None,) * 9
        u, weight, prior, s_all, v_sums = ctx.saved_tensors
        grad_u, grad_weight, grad_bias, grad_prior = torch.ops.fastcaps.routing_backward(
            grad_v, u, weight, prior, s_all, v_sums, *ctx.options, ctx.has_bias)
        return (grad_u, grad_weight, (grad_bias if ctx.has_bias else None), (grad_prior if ctx.prior_grad else None),
                None, None, None, None, None)


# Function.apply binds its arguments to forward's signature at every call; inspect.signature
# then reads this attribute instead of rebuilding the signature from the function each time
FusedRoutingFunction.forward.__signature__ = inspect.signature(FusedRoutingFunction.forward)


# ---------------------------------------------------------------- functional API

def kernels_available(device: torch.device) -> bool:
    """True where the Triton kernels run: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1,
    with Triton installed."""
    try:
        kernels = _load_kernels()
    except TritonMissingError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRET)


@torch.compiler.assume_constant_result  # read once when torch.compile traces, not guarded
def _default_precision() -> str:
    # follow PyTorch's own switch for float32 matmuls: "highest" -> exact fp32 products,
    # "high" -> three tf32 products (about fp32's accuracy), "medium" -> one tf32 product
    return _MATMUL_PRECISION[torch.get_float32_matmul_precision()]


_MATMUL_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


@torch.compiler.assume_constant_result  # read once when torch.compile traces, not guarded
def _default_kernels() -> str:
    return _load_kernels().family_name()


def _check_inputs(u, weight, bias, prior, iterations, leaky, detach_routing, input_precision, kernels):
    if not isinstance(u, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("u and weight must be tensors")
    if u.dim() != 3:
        raise ValueError(f"u must be [B, I, K] (rank 3), got shape {tuple(u.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be [I, J, D, K] (rank 4), got shape {tuple(weight.shape)}")
    batch, in_caps, in_dim = u.shape
    w_in_caps, out_caps, out_dim, w_in_dim = weight.shape
    if (w_in_caps, w_in_dim) != (in_caps, in_dim):
        raise ValueError(f"u [B, I, K] = {tuple(u.shape)} and weight [I, J, D, K] = {tuple(weight.shape)} "
                         f"disagree on I or K")
    if min(in_caps, in_dim, out_caps, out_dim) < 1:  # a batch of 0 samples is fine: v is [0, J, D]
        raise ValueError(f"I, K, J and D must be >= 1, got u {tuple(u.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (out_caps, out_dim):
            raise ValueError(f"bias must be [J, D] = {(out_caps, out_dim)}, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    if prior is not None:
        if not isinstance(prior, Tensor) or prior.shape != (in_caps, out_caps):
            raise ValueError(f"prior (the initial routing logits) must be [I, J] = {(in_caps, out_caps)}, got "
                             f"{tuple(prior.shape) if isinstance(prior, Tensor) else type(prior).__name__}")
    tensors = ({"u": u, "weight": weight} | ({"bias": bias} if bias is not None else {})
               | ({"prior": prior} if prior is not None else {}))
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if len({t.dtype for t in tensors.values()}) > 1:
        raise TypeError("u, weight, bias and prior must share one dtype, got "
                        + ", ".join(f"{n}: {t.dtype}" for n, t in tensors.items()))
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError("u, weight, bias and prior must be on one device, got "
                         + ", ".join(f"{n}: {t.device}" for n, t in tensors.items()))
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    for name, flag in (("leaky", leaky), ("detach_routing", detach_routing)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if kernels not in (None, "tc", "fma"):
        raise ValueError(f"kernels must be 'tc', 'fma' or None, got {kernels!r}")
    if input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS} or None, got {input_precision!r}")
    # opt-in, read at every call: costs a reduction and a device sync
    if os.environ.get("FASTCAPS_CHECK_FINITE", "0") == "1":
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or Inf (FASTCAPS_CHECK_FINITE=1)")


def dynamic_routing(u: Tensor, weight: Tensor, iterations: int = 3, *, bias: Tensor | None = None,
                    prior: Tensor | None = None, leaky: bool = False, detach_routing: bool = False,
                    input_precision: str | None = None, kernels: str | None = None) -> Tensor:
    """Fused dynamic routing; same signature and semantics as fastcaps.reference.dynamic_routing.

    Args:
        u: [B, I, K] input capsules (for CapsNet, the squashed primary capsules).
        weight: [I, J, D, K], one D x K matrix per (input i, output j): û_ij = W_ij u_i (other
            layouts, or ports that compute uᵀ W: fastcaps.convert_weight).
        iterations: R >= 1 weighted sums, with R - 1 logit updates between them (the paper
            uses 3; a port that counts logit updates with n is iterations=n+1).
        bias: optional [J, D], added to s before the squash (the authors' code has one).
        prior: optional [I, J], the initial routing logits b^(0) of every sample (0 without
            one); its gradient is summed over the batch and the iterations in a fixed order.
        leaky: an extra logit fixed at 0 joins the softmax over the outputs and is dropped.
        detach_routing: the couplings of the last iteration are constants (u and W get
            gradient only through the last weighted sum; the prior gets none).
        input_precision: how float32 inputs enter the products with W: "ieee" (exact fp32
            products), "tf32x3" (three tf32 tensor-core products per product, about fp32's
            accuracy) or "tf32" (one tf32 product with operands rounded to nearest, ~1e-4
            relative error). Default: follow torch.get_float32_matmul_precision(): "highest"
            (PyTorch's default) -> "ieee", "high" -> "tf32x3", "medium" -> "tf32".
            Half-precision inputs use their own tensor-core products with fp32 accumulation.
        kernels: "tc" or "fma", the kernel family (kernels/routing.py); None takes
            fastcaps.kernels.routing.tuning(kernels=...), else FASTCAPS_KERNELS, else "fma".
            The backward runs the family of its forward.

    Returns:
        v: [B, J, D] in the input dtype (float16, bfloat16, float32 or float64; arithmetic in
        fp32, fp64 for fp64 inputs).

    Per iteration: c = softmax_j(b), s_j = sum_i c_ij û_ij (+ bias_j), v_j = squash(s_j), then
    b_ij += û_ij . v_j except after the last; gradients flow through every iteration. û is never
    stored: the forward keeps O(B R J D) routing state per call and the backward recomputes û.

    Device: the Triton kernels run on CUDA tensors, and on CPU tensors under Triton's
    interpreter (TRITON_INTERPRET=1 set before fastcaps is imported; slow, for tests). Anywhere
    else the call falls back to the eager reference with one RuntimeWarning (same values, the
    reference's memory). Without Triton installed it raises an ImportError that names the fix.
    Registered as the custom ops fastcaps::routing_forward / routing_backward, so
    torch.compile and torch.export see one opaque node.

    Under torch.autocast the op casts u, weight, bias and prior to the autocast dtype, like a
    matmul. Set FASTCAPS_CHECK_FINITE=1 to reject NaN/Inf inputs with an error (costs a device
    sync). Bad shapes, dtypes, devices or options raise a TypeError/ValueError naming them.
    """
    if input_precision is None:
        input_precision = _default_precision()
    device_type = u.device.type if isinstance(u, Tensor) else None
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        # like a matmul under autocast: floating inputs go to the autocast dtype (before the checks,
        # since autocast is what makes u and weight agree, e.g. bf16 activations and fp32 weights)
        dtype = torch.get_autocast_dtype(device_type)
        cast = lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
        u, weight, bias, prior = cast(u), cast(weight), cast(bias), cast(prior)
    _check_inputs(u, weight, bias, prior, iterations, leaky, detach_routing, input_precision, kernels)
    _load_kernels()  # the one clear error where Triton is missing
    if not kernels_available(u.device):
        global _fallback_warned
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(f"fastcaps.dynamic_routing: no Triton kernels for {u.device} tensors (they run on "
                          "CUDA, or on the CPU with TRITON_INTERPRET=1); using the eager reference.",
                          RuntimeWarning, stacklevel=2)
        return reference.dynamic_routing(u, weight, iterations, bias=bias, prior=prior, leaky=leaky,
                                         detach_routing=detach_routing)
    v, _, _ = FusedRoutingFunction.apply(u, weight, bias, prior, iterations, leaky, detach_routing, input_precision,
                                         kernels or _default_kernels())
    return v
