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
    """Fully connected capsule layer with dynamic routing (eager reference routing).

    weight: [in_caps, out_caps, out_dim, in_dim], one out_dim x in_dim matrix per (i, j),
    initialised N(0, 0.01^2) (the paper is silent; 0.01 is what most PyTorch ports use; CapsNet
    re-initialises it as the authors' code does). bias (only with bias=True): [out_caps, out_dim],
    added to s on every iteration, initialised to 0 here (CapsNet: 0.1, as the authors).
    forward: u [B, in_caps, in_dim] -> v [B, out_caps, out_dim].
    """

    _routing = staticmethod(reference.dynamic_routing)

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int, iterations: int = 3, *,
                 bias: bool = False, leaky: bool = False, detach_routing: bool = False):
        super().__init__()
        # checked here, not at the first forward, where a float would fail deep inside the loop
        sizes = {"in_caps": in_caps, "in_dim": in_dim, "out_caps": out_caps, "out_dim": out_dim,
                 "iterations": iterations}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, flag in (("bias", bias), ("leaky", leaky), ("detach_routing", detach_routing)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.iterations, self.leaky, self.detach_routing = iterations, leaky, detach_routing
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_caps, out_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return type(self)._routing(u, self.weight, self.iterations, bias=self.bias, leaky=self.leaky,
                                   detach_routing=self.detach_routing)

    def extra_repr(self):
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
                f"out_dim={self.out_dim}, iterations={self.iterations}, bias={self.bias is not None}, "
                f"leaky={self.leaky}, detach_routing={self.detach_routing}")


class FusedDigitCaps(DigitCaps):
    """Drop-in for fastcaps.DigitCaps with the fused routing op: same constructor, parameters
    and state_dict keys, so either module loads the other's state_dict."""

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
