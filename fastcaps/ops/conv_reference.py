"""The eager reference of convolutional capsule layers: the executable specification of routing over local windows.

It builds the votes tensor [B, H', W', I, T_out, D] the way public implementations do (the
authors' `conv_slim_capsule` in Sarasra/models research/capsules builds votes
[B, T_in, T_out, D, H', W'] with one convolution per input type; SegCaps and DeepCaps do the
same with their own layouts), then runs the routing loop on it with logits
[B, H', W', I, T_out]. Loop-simple: one slice of the padded input per window offset, no
unfold, so it shares no code with the fused layer (fastcaps.nn.conv) that it checks.

Capsules are [B, T, K, H, W]: batch, capsule types, atoms of a capsule, height, width, as in
the authors' code. `transform` says what one input capsule of a position's routing is:
- "per_offset": each (window offset dy, dx, input type t) is an input capsule with its own
  K -> D transform per output type, shared across positions. I = kh * kw * T_in;
  weight [kh, kw, T_in, T_out, D, K]; input capsule index i = (dy * kw + dx) * T_in + t.
- "per_type": each input type is one input capsule whose K' = kh * kw * K atoms are its whole
  window, with one transform per (input type, output type). I = T_in;
  weight [T_in, T_out, D, kh, kw, K] (the window's atoms in (dy, dx, k) order).
  The authors' and SegCaps' layers are this variant with the transform also shared by all
  input types (weight[t] the same for every t).
Zero padding adds capsules of zeros: their votes are 0, they take part in the softmax over
output types and add nothing to s (as with the public implementations' padded convolutions).
"""
import torch
import torch.nn.functional as F

from . import reference

__all__ = ["TRANSFORMS", "output_size", "conv_caps_votes", "conv_caps2d"]

TRANSFORMS = ("per_offset", "per_type")


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output positions along one axis: floor((size + 2 padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_caps_votes(x: torch.Tensor, weight: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int], transform: str = "per_offset") -> torch.Tensor:
    """Votes u_hat [B, H', W', I, T_out, D] of the input capsules x [B, T_in, K, H, W] (see the
    module docstring for the weight layouts and the input capsule index I)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    batch, _, _, height, width = x.shape
    out_h, out_w = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    padded = F.pad(x, (pw, pw, ph, ph))
    per_offset = []
    for dy in range(kh):
        for dx in range(kw):
            # the input capsules at offset (dy, dx) of every window: [B, T_in, K, H', W']
            patch = padded[:, :, :, dy:dy + sh * (out_h - 1) + 1:sh, dx:dx + sw * (out_w - 1) + 1:sw]
            if transform == "per_offset":
                per_offset.append(torch.einsum("tjdk,btkyx->byxtjd", weight[dy, dx], patch))
            elif transform == "per_type":
                per_offset.append(torch.einsum("tjdk,btkyx->byxtjd", weight[:, :, :, dy, dx], patch))
            else:
                raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if transform == "per_offset":
        votes = torch.stack(per_offset, dim=3)          # [B, H', W', kh * kw, T_in, T_out, D]
        return votes.flatten(3, 4)                       # i = (dy * kw + dx) * T_in + t
    return torch.stack(per_offset).sum(dim=0)           # the whole window's sum: [B, H', W', T_in, T_out, D]


def _coupling(logits: torch.Tensor, leaky: bool) -> torch.Tensor:
    """Softmax over the output types (last dim); leaky: with an extra zero logit that is dropped."""
    if not leaky:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(torch.cat([torch.zeros_like(logits[..., :1]), logits], dim=-1), dim=-1)[..., 1:]


def conv_caps2d(x: torch.Tensor, weight: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], iterations: int = 3, *, transform: str = "per_offset",
                bias: torch.Tensor | None = None, leaky: bool = False, detach_routing: bool = False) -> torch.Tensor:
    """Dynamic routing at every output position from the input capsules of its window.

    x [B, T_in, K, H, W] -> v [B, T_out, D, H', W']. Per position, iteration r:
    c = softmax over output types of the logits b [.., I, T_out] (b starts at 0);
    s = sum_i c u_hat (+ bias [T_out, D], the same at every position); v = squash(s);
    and, except after the last iteration, b += u_hat . v. detach_routing: the logits of the
    last iteration are constants. The semantics of fastcaps.reference.dynamic_routing, per position.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    votes = conv_caps_votes(x, weight, kernel_size, stride, padding, transform)   # [B, H', W', I, J, D]
    logits = torch.zeros(votes.shape[:-1], dtype=votes.dtype, device=votes.device)
    for r in range(iterations):
        last = r == iterations - 1
        if last and detach_routing:
            logits = logits.detach()
        c = _coupling(logits, leaky)
        s = (c.unsqueeze(-1) * votes).sum(dim=3)                                    # [B, H', W', J, D]
        if bias is not None:
            s = s + bias
        v = reference.squash(s)
        if not last:
            logits = logits + (votes * v.unsqueeze(3)).sum(dim=-1)
    return v.permute(0, 3, 4, 1, 2)                                                   # [B, J, D, H', W']
