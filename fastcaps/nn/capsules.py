"""Capsule layers: PrimaryCaps, DigitCaps (eager routing), FusedDigitCaps (the fused op) and the decoder.

FusedDigitCaps has the same constructor, parameters and state_dict keys as DigitCaps; only the
routing function differs.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import reference
from ..ops.routing import dynamic_routing
from .convert import convert_weight

__all__ = ["PrimaryCaps", "DigitCaps", "FusedDigitCaps", "Decoder"]


class PrimaryCaps(nn.Module):
    """Convolutional capsules: one conv whose channels are `caps_types` capsules of `caps_dim`.

    Output [B, caps_types * H' * W', caps_dim], squashed. Capsule index = (type, y, x) in that
    order, and channel `type * caps_dim + atom` of the conv is atom `atom` of capsule `type`.

    scale: the capsules are squash(scale * conv(x, weight) + bias). The authors' code builds this
    layer as a capsule layer with one routing iteration from 1 input to 32 output types, whose
    couplings are all softmax(0) = 1/32, so CapsNet passes scale=1/32: under Adam this is a 32x
    smaller effective step on the kernel (not on the bias), which no rescaling of the init gives.
    """

    def __init__(self, in_channels=256, caps_types=32, caps_dim=8, kernel_size=9, stride=2, scale: float = 1.0):
        super().__init__()
        self.caps_types, self.caps_dim, self.scale = caps_types, caps_dim, scale
        self.conv = nn.Conv2d(in_channels, caps_types * caps_dim, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            out = self.conv(x)  # [B, types * dim, H', W']
        else:
            out = F.conv2d(x, self.conv.weight, None, self.conv.stride) * self.scale + self.conv.bias[:, None, None]
        batch, _, height, width = out.shape
        out = out.view(batch, self.caps_types, self.caps_dim, height, width)
        out = out.permute(0, 1, 3, 4, 2).reshape(batch, self.caps_types * height * width, self.caps_dim)
        return reference.squash(out)


class DigitCaps(nn.Module):
    """Fully connected capsule layer with dynamic routing, computed by the eager reference.

    u [B, in_caps, in_dim] -> v [B, out_caps, out_dim] (I = in_caps, K = in_dim, J = out_caps,
    D = out_dim). Each input capsule i predicts each output capsule j through its own matrix,
    û_ij = W_ij u_i, and `iterations` steps of routing-by-agreement (Sabour et al. 2017,
    Procedure 1) combine the predictions; see fastcaps.reference.dynamic_routing for the
    algorithm.

    Parameters:
        weight: [I, J, D, K] = [in_caps, out_caps, out_dim, in_dim], one D x K matrix per
            (i, j), applied as û = W u (a port that stores another layout or computes uᵀ W:
            DigitCaps.from_weight / fastcaps.convert_weight, README "Porting a CapsNet to
            fastcaps"). Initialised N(0, 0.01^2) (the paper is silent; 0.01 is what most
            PyTorch ports use); CapsNet re-initialises it (truncated normal, std 0.1, as the
            authors' code).
        bias: [J, D] = [out_caps, out_dim], only with bias=True; added to s in every
            iteration, before the squash. Initialised to 0 (CapsNet: 0.1, as the authors).
        prior: [I, J] = [in_caps, out_caps], only with prior=True; learnable initial routing
            logits b^(0), shared by every sample (what adambielski/CapsNet-pytorch and
            gram-ai/capsule-networks train). Initialised to 0, so a fresh layer routes as the
            paper; its gradient is summed over the batch and the iterations.

    Iterations: fastcaps counts weighted sums. iterations=R runs R times "c = softmax_j(b),
    s = sum_i c_ij û_ij (+ bias), v = squash(s)" and updates the logits b += û . v between
    them, R - 1 times; b starts at the prior (0 without one). A port whose loop counts logit
    updates (its n = 3 runs 4 weighted sums) is iterations=n+1 here.

    DigitCaps always runs the eager reference (any device; autograd keeps û, [B, I, J, D]).
    FusedDigitCaps is the same layer (same constructor, parameters and state_dict keys) with
    the fused Triton op, fastcaps.dynamic_routing.
    """

    _routing = staticmethod(reference.dynamic_routing)

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int, iterations: int = 3, *,
                 bias: bool = False, prior: bool = False, leaky: bool = False, detach_routing: bool = False):
        """A layer from I = in_caps input capsules of K = in_dim to J = out_caps of D = out_dim.

        Args:
            in_caps, in_dim, out_caps, out_dim: I, K, J, D (ints >= 1); weight is [I, J, D, K].
            iterations: R >= 1 weighted sums (R - 1 logit updates; the paper uses 3).
            bias: add a learnable [J, D] bias to s before the squash, as the authors' code does.
            prior: learnable [I, J] initial routing logits (initialised to 0) instead of 0.
            leaky: leaky routing (authors' code): an extra logit fixed at 0 joins the softmax
                over the outputs and is dropped, so the couplings of an input sum to less than 1.
            detach_routing: no gradient through the routing: the couplings of the last
                iteration are constants, so u and W get gradient only through the last
                weighted sum (what ports that route on `u_hat.detach()` do).

        Raises TypeError / ValueError for sizes that are not ints >= 1 and flags that are not bools.
        """
        super().__init__()
        # checked here, not at the first forward, where a float would fail deep inside the loop
        sizes = {"in_caps": in_caps, "in_dim": in_dim, "out_caps": out_caps, "out_dim": out_dim,
                 "iterations": iterations}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, flag in (("bias", bias), ("prior", prior), ("leaky", leaky), ("detach_routing", detach_routing)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.iterations, self.leaky, self.detach_routing = iterations, leaky, detach_routing
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_caps, out_dim)) if bias else None
        self.prior = nn.Parameter(torch.empty(in_caps, out_caps)) if prior else None
        self.reset_parameters()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, pattern: str, product: str, iterations: int = 3, *,
                    in_caps: int | None = None, in_dim: int | None = None, out_caps: int | None = None,
                    out_dim: int | None = None, **options):
        """A layer whose weight is a port's weight, converted by fastcaps.convert_weight.

        Args:
            weight, pattern, product: as fastcaps.convert_weight: the port's tensor, its layout
                in einops notation with axes i, j, d, k (e.g. "j i k d", "i k (j d)") and "Wu" or
                "uW", how the port multiplies it.
            iterations: fastcaps' count of weighted sums (a port counting logit updates: n + 1).
            in_caps, in_dim, out_caps, out_dim: the layer's sizes I, K, J, D; optional (taken
                from the tensor), but each one given is checked against it (an error names the
                axis), and one is needed to split a group such as (j d).
            **options: the constructor's keywords (bias, leaky, detach_routing, ...).

        The layer gets the weight's dtype and device; its other parameters are initialised as
        the constructor does.
        """
        converted = convert_weight(weight, pattern, product, i=in_caps, j=out_caps, d=out_dim, k=in_dim)
        num_in, num_out, dim_out, dim_in = converted.shape
        layer = cls(num_in, dim_in, num_out, dim_out, iterations, **options).to(weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(converted)
        return layer

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.prior is not None:
            nn.init.zeros_(self.prior)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """v [B, J, D] = routing(u [B, I, K], weight, iterations, bias, prior, leaky, detach_routing)."""
        return type(self)._routing(u, self.weight, self.iterations, bias=self.bias, prior=self.prior,
                                   leaky=self.leaky, detach_routing=self.detach_routing)

    def extra_repr(self):
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
                f"out_dim={self.out_dim}, iterations={self.iterations}, bias={self.bias is not None}, "
                f"prior={self.prior is not None}, leaky={self.leaky}, detach_routing={self.detach_routing}")


class FusedDigitCaps(DigitCaps):
    """fastcaps.DigitCaps with the fused Triton routing op (fastcaps.dynamic_routing).

    A drop-in for fastcaps' own DigitCaps: the same constructor, options, parameters and
    state_dict keys, so either module loads the other's state_dict. (For the layer of another
    CapsNet port, convert its weight: FusedDigitCaps.from_weight(weight, pattern, product, ...),
    README "Porting a CapsNet to fastcaps".)

    u [B, I, K] -> v [B, J, D] (I = in_caps, K = in_dim, J = out_caps, D = out_dim).
    weight: [I, J, D, K], û_ij = W_ij u_i, initialised N(0, 0.01^2); bias (bias=True): [J, D],
    added to s before the squash, initialised to 0; prior (prior=True): [I, J] learnable
    initial logits, initialised to 0. Options (iterations, bias, prior, leaky, detach_routing)
    and the iteration convention (iterations=R: R weighted sums, R - 1 logit updates; a port
    counting logit updates with n is iterations=n+1): see DigitCaps.

    Device: the Triton kernels run on CUDA tensors, and on CPU tensors under Triton's
    interpreter (TRITON_INTERPRET=1 set before fastcaps is imported; slow, for tests). On a CPU
    without the interpreter (or any other device) forward falls back to the eager reference,
    fastcaps.reference.dynamic_routing, with one RuntimeWarning: same values, the reference's
    speed and memory. Without Triton installed, forward raises an ImportError that names the fix.
    Inputs float32, float16, bfloat16 or float64; arithmetic in fp32 (fp64 for fp64).
    forward keeps the routing state per sample for the backward, not û (O(B R J D) numbers).
    """

    _routing = staticmethod(dynamic_routing)


class Decoder(nn.Module):
    """Reconstruction network: the masked digit capsules (J * D) -> 512 -> 1024 -> image, sigmoid."""

    def __init__(self, in_features=10 * 16, image_shape=(1, 28, 28)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = nn.Sequential(
            nn.Linear(in_features, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, math.prod(self.image_shape)), nn.Sigmoid(),
        )

    def forward(self, masked_caps: torch.Tensor) -> torch.Tensor:
        return self.net(masked_caps.flatten(1)).view(-1, *self.image_shape)
