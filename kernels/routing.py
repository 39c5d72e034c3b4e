"""Host entry points of the fused routing op: dispatch to a kernel family.

Two families compute the same function and save the same state (s^(r) and V^(r), see below),
so a forward of one and a backward of the other agree:
- "tc" (kernels/routing_tc.py), for fp32 at "tf32x3" and "tf32", fp16, bf16 (and fp64, a
  correctness path): each pass factored into tensor-core dots over
  chunks of input capsules and tiles of 16-64 samples; W is read once per batch tile; dW is a dot
  that contracts over the batch.
- "fma" (kernels/routing_fma.py, the first kernels, the default): u_hat built by outer-product
  FMAs, one warp per 4 samples; measured on an H200. Its products are exact fp32 for "ieee" and
  "tf32x3" alike. Exact fp32 ("ieee") always runs here, whichever family is chosen.
The default stays "fma" until a GPU sweep (scripts/gpu_session.sh times both) shows "tc" faster;
FASTCAPS_KERNELS=tc|fma or `tuning(kernels=...)` choose per process or per block.

The math, shared by both. Notation: u [B, I, K], W [I, J, D, K], u_hat_bij = W_ij u_bi in R^D,
R routing iterations, optional bias [J, D], optional prior [I, J] (the initial logits b^(0),
0 without one), leaky routing.

Forward. b^(r)_bij = prior_ij + u_hat_bij . V^(r)_bj with V^(r) = v^(0) + ... + v^(r-1), so the
whole routing state of a sample is V ([J, D]). Pass r is one sweep over i: a = prior + u_hat . V^(r)
(a = prior at r = 0: c^(0) = softmax(prior), uniform without a prior), c = softmax_j(a) (plus a
zero logit when leaky), s^(r) += c u_hat; then s^(r) += bias, v^(r) = squash(s^(r)),
V^(r+1) = V^(r) + v^(r). u_hat, b and c never touch memory.

Backward, exact. v = h(n) s with n = |s|, h(n) = n / (1 + n^2), h'(n) = (1 - n^2) / (1 + n^2)^2:
    ds = h(n) dv + h'(n) (s . dv / n) s        (the second term -> 0 as n -> 0)
dv^(R-1) is the incoming gradient; V^(r) feeds every v^(q), q < r, so
dv^(q) = sum_{r > q} dV^(r) for q < R-1. Reverse passes r = R-1 .. 1, one sweep over i each:
    dc_bij = ds^(r)_bj . u_hat_bij ;  da_bij = c_bij (dc_bij - sum_j' c_bij' dc_bij')
    dV^(r)_bj = sum_i da_bij u_hat_bij
A final sweep rebuilds the gradient of u_hat from the small vectors alone,
    du_hat_bij = sum_r c^(r)_bij ds^(r)_bj + da^(r)_bij V^(r)_bj,
and contracts it at once: du_bi = sum_j W_ij^T du_hat_bij, dW_ij = sum_b du_hat_bij u_bi^T
(the r = 0 term of the second sum vanishes: V^(0) = 0). Every b^(r) holds the prior once, so
    dprior_ij = sum_b sum_r da^(r)_bij,    da^(0) = c^(0) (dc^(0) - sum_j' c^(0) dc^(0)),
reduced over the batch in the final sweep's fixed order, like dW (no atomics).
With detach_routing only the r = R-1 term of the first sum remains (c^(R-1) is a constant) and
the prior gets no gradient (the reference detaches the logits, prior included).

Saved for backward: u, W, s^(r) for every r and V^(r) for r >= 1: O(B R J D) numbers.
"""
import os

import torch

from . import routing_fma, routing_tc
from .common import INTERPRET, TUNING_KEYS, state_dtype, tuned, tuning

__all__ = ["routing_forward", "routing_backward", "state_dtype", "tuning", "TUNING_KEYS", "INTERPRET",
           "PRECISIONS", "DEFAULT_FAMILY", "family_name"]

PRECISIONS = tuple(routing_tc.PRECISIONS)


DEFAULT_FAMILY = "fma"  # until a GPU sweep (scripts/gpu_session.sh) has timed "tc" against it


def family_name() -> str:
    """The kernel family the next call runs: tuning(kernels=...), else FASTCAPS_KERNELS, else
    DEFAULT_FAMILY."""
    name = tuned("kernels", None) or os.environ.get("FASTCAPS_KERNELS", DEFAULT_FAMILY)
    if name not in ("tc", "fma"):
        raise ValueError(f"FASTCAPS_KERNELS must be 'tc' or 'fma', got {name!r}")
    return name


def _family(u: torch.Tensor, input_precision: str, name: str):
    # exact fp32 products are the fma kernels' job: the tc kernels' "ieee" dots would run on the
    # FMA units too, with twice the FMAs of the fma kernels (and heavy register spills)
    if name == "fma" or (input_precision == "ieee" and u.dtype == torch.float32):
        # the fma kernels know "ieee" and "tf32"; their exact products serve "tf32x3" too
        return routing_fma, ("ieee" if input_precision == "tf32x3" else input_precision)
    return routing_tc, input_precision


def routing_forward(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, iterations: int,
                    leaky: bool, input_precision: str, kernels: str, prior: torch.Tensor | None = None):
    """v [B, J, D] (input dtype), s_all [R, B, J, D] and v_sums [R-1, B, J, D] (state dtype)."""
    if u.shape[0] == 0:  # nothing to launch; the shapes a drop-in for the reference returns
        _, out_caps, out_dim, _ = weight.shape
        state = dict(dtype=state_dtype(u.dtype), device=u.device)
        return (u.new_empty(0, out_caps, out_dim), torch.empty(iterations, 0, out_caps, out_dim, **state),
                torch.empty(iterations - 1, 0, out_caps, out_dim, **state))
    family, precision = _family(u, input_precision, kernels)
    return family.routing_forward(u, weight, bias, iterations, leaky, precision, prior)


def routing_backward(grad_v: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, s_all: torch.Tensor,
                     v_sums: torch.Tensor, iterations: int, leaky: bool, detach_routing: bool,
                     input_precision: str, kernels: str, prior: torch.Tensor | None = None, bias_grad: bool = True):
    """(du, dW, dbias, dprior) for the incoming grad_v (any strides); dbias is None unless
    bias_grad (the forward had a bias: ds summed over the batch, else a reduction for nothing);
    dprior is None without a prior and zeros under detach_routing (which detaches the prior)."""
    if u.shape[0] == 0:
        _, out_caps, out_dim, _ = weight.shape
        return (torch.zeros_like(u), torch.zeros_like(weight), u.new_zeros(out_caps, out_dim) if bias_grad else None,
                None if prior is None else torch.zeros_like(prior))
    family, precision = _family(u, input_precision, kernels)
    return family.routing_backward(grad_v, u, weight, s_all, v_sums, iterations, leaky, detach_routing, precision,
                                   prior, bias_grad)
