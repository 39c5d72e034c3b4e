"""Convolutional capsule layers: dynamic routing over local windows, eager (ConvCaps2d) or fused (FusedConvCaps2d).

Capsules are [B, T, K, H, W] (batch, capsule types, atoms, height, width), the layout of the
authors' code (Sarasra/models research/capsules, `conv_slim_capsule`): a capsule type is a
group of K channels, so `x.flatten(1, 2)` is an ordinary NCHW feature map and a Conv2d with
T * K output channels viewed as [B, T, K, H, W] is a layer of primary capsules. Output
[B, T_out, D, H', W'] in the same layout, H' = floor((H + 2 padding - kh) / stride) + 1.

Every output position routes its window's input capsules to its T_out output capsules
(softmax over the output types); the transforms are shared by all positions. `transform`:
- "per_offset" (the common convolutional capsule layer): each (window offset, input type)
  is one input capsule with its own K -> D transform per output type: I = kh * kw * T_in
  input capsules of K atoms per position, weight [kh, kw, T_in, T_out, D, K].
- "per_type" (SegCaps-like): each input type is one input capsule made of its whole window,
  K' = kh * kw * K atoms, one transform per (input type, output type): I = T_in,
  weight [T_in, T_out, D, kh, kw, K].
The eager specification is fastcaps.ops.conv_reference (the votes tensor [B, H', W', I,
T_out, D], as public implementations build it); ConvCaps2d runs it. FusedConvCaps2d folds the
positions into the batch, B * H' * W' samples of I input capsules, and calls
fastcaps.dynamic_routing, which never writes the votes; both classes have the same parameters
and state_dict keys, so either loads the other's state_dict.
"""
import torch
from torch import nn

from ..ops import conv_reference
from ..ops.routing import dynamic_routing

__all__ = ["ConvCaps2d", "FusedConvCaps2d", "unfold_capsules", "TRANSFORMS"]

TRANSFORMS = conv_reference.TRANSFORMS


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def unfold_capsules(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int], transform: str = "per_offset") -> torch.Tensor:
    """The windows of x [B, T_in, K, H, W] as the fused op's input capsules, materialised:
    [B * H' * W', kh * kw * T_in, K] for "per_offset" (capsule (dy * kw + dx) * T_in + t),
    [B * H' * W', T_in, kh * kw * K] for "per_type" (atoms in (dy, dx, k) order); sample
    (b * H' + y) * W' + x. Its backward (autograd's, of unfold) sums over overlapping windows."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    batch, types, atoms = x.shape[:3]
    windows = torch.nn.functional.pad(x, (pw, pw, ph, ph)).unfold(3, kh, sh).unfold(4, kw, sw)
    out_h, out_w = windows.shape[3:5]                                       # [B, T, K, H', W', kh, kw]
    if transform == "per_offset":
        return windows.permute(0, 3, 4, 5, 6, 1, 2).reshape(batch * out_h * out_w, kh * kw * types, atoms)
    return windows.permute(0, 3, 4, 1, 5, 6, 2).reshape(batch * out_h * out_w, types, kh * kw * atoms)


class ConvCaps2d(nn.Module):
    """Convolutional capsule layer with dynamic routing at every output position (eager: the
    reference's votes tensor; see the module docstring for the layout and `transform`).

    in_types, in_dim: T_in capsule types of K atoms in the input; out_types, out_dim: T_out
    types of D atoms in the output. kernel_size, stride, padding (zeros): ints or pairs, as
    for nn.Conv2d. iterations: routing iterations. bias: a [T_out, D] bias added to s at
    every position (the authors' conv capsules have one), initialised to 0. leaky,
    detach_routing: as for fastcaps.dynamic_routing. weight ~ N(0, 0.01^2), as DigitCaps.
    forward: x [B, T_in, K, H, W] -> v [B, T_out, D, H', W'] (contiguous).
    """

    def __init__(self, in_types: int, in_dim: int, out_types: int, out_dim: int, kernel_size, stride=1, padding=0,
                 iterations: int = 3, *, transform: str = "per_offset", bias: bool = False, leaky: bool = False,
                 detach_routing: bool = False):
        super().__init__()
        sizes = {"in_types": in_types, "in_dim": in_dim, "out_types": out_types, "out_dim": out_dim,
                 "iterations": iterations}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, flag in (("bias", bias), ("leaky", leaky), ("detach_routing", detach_routing)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        self.in_types, self.in_dim, self.out_types, self.out_dim = in_types, in_dim, out_types, out_dim
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.iterations, self.transform, self.leaky, self.detach_routing = iterations, transform, leaky, detach_routing
        kh, kw = self.kernel_size
        if transform == "per_offset":
            shape = (kh, kw, in_types, out_types, out_dim, in_dim)
        else:
            shape = (in_types, out_types, out_dim, kh, kw, in_dim)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_types, out_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def routing_shape(self) -> tuple[int, int, int, int]:
        """(I, J, D, K') of the routing at one position: input capsules, output types and their atoms."""
        kh, kw = self.kernel_size
        if self.transform == "per_offset":
            return kh * kw * self.in_types, self.out_types, self.out_dim, self.in_dim
        return self.in_types, self.out_types, self.out_dim, kh * kw * self.in_dim

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') for an input of height x width positions."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return conv_reference.output_size(height, kh, sh, ph), conv_reference.output_size(width, kw, sw, pw)

    def _check_input(self, x):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} expects input capsules [B, T_in, K, H, W] (rank 5), got {got}")
        _, types, atoms, height, width = x.shape
        if (types, atoms) != (self.in_types, self.in_dim):
            raise ValueError(f"{name} was built for {self.in_types} input types of {self.in_dim} atoms "
                             f"(x [B, T_in, K, H, W]), got T_in={types}, K={atoms}: x {tuple(x.shape)}")
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if kh > height + 2 * ph or kw > width + 2 * pw:
            raise ValueError(f"{name}: the {kh}x{kw} window is larger than the padded input "
                             f"{height + 2 * ph}x{width + 2 * pw} (H, W = {height}, {width}, padding {self.padding})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        v = conv_reference.conv_caps2d(x, self.weight, self.kernel_size, self.stride, self.padding, self.iterations,
                                       transform=self.transform, bias=self.bias, leaky=self.leaky,
                                       detach_routing=self.detach_routing)
        return v.contiguous()

    def extra_repr(self):
        return (f"{self.in_types}x{self.in_dim} -> {self.out_types}x{self.out_dim}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, iterations={self.iterations}, "
                f"transform={self.transform!r}, bias={self.bias is not None}, leaky={self.leaky}, "
                f"detach_routing={self.detach_routing}")


class FusedConvCaps2d(ConvCaps2d):
    """ConvCaps2d on the fused routing op: same constructor, parameters and state_dict keys.

    The B * H' * W' output positions are the op's samples, the windows' capsules its input
    capsules (unfold_capsules), and the shared transforms its weight [I, T_out, D, K'] (a view
    of the parameter, so the op's dW is already the sum over positions).

    The unfolded input is materialised (kh * kw times the input, saved by the op for its
    backward) rather than read through strides: the kernels address u with one stride per
    sample and one per input capsule, and a window needs two (rows, and offsets within a row)
    plus a third for the position, so reading windows in place would mean new kernels. The
    copy is small against what the eager layer keeps: per position it is I * K' numbers, the
    votes are I * T_out * D (T_out * D / K times more, 16x for 16 types of 16-D from 16-D)
    and autograd keeps several tensors of that size. What autograd keeps here: the unfolded
    input, the weight (a parameter) and the op's routing state, (2R - 1) * B * H' * W' *
    T_out * D fp32 numbers.

    Where the Triton kernels cannot run (a CPU without TRITON_INTERPRET=1) fastcaps.dynamic_routing
    falls back to the eager routing of the folded batch and warns once.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        batch, height, width = x.shape[0], x.shape[3], x.shape[4]
        out_h, out_w = self.output_shape(height, width)
        u = unfold_capsules(x, self.kernel_size, self.stride, self.padding, self.transform)
        v = dynamic_routing(u, self.weight.reshape(self.routing_shape), self.iterations, bias=self.bias,
                            leaky=self.leaky, detach_routing=self.detach_routing)
        return v.view(batch, out_h, out_w, self.out_types, self.out_dim).permute(0, 3, 4, 1, 2).contiguous()
