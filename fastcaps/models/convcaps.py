"""A small CapsNet with a convolutional capsule layer between its primary and digit capsules (`--model convcaps`)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ConvCaps2d, Decoder, DigitCaps, FusedConvCaps2d, FusedDigitCaps
from ..ops import reference
from .capsnet import CapsNetOutput, authors_init_

__all__ = ["ConvCapsNet"]


class ConvCapsNet(nn.Module):
    """conv1 -> primary capsules -> a convolutional capsule layer -> digit capsules -> decoder.

    For 28x28 inputs: conv1 128 x 9x9 + ReLU (20x20) -> primary capsules, 16 types of 8-D from a
    9x9 stride 2 conv (6x6, squashed; [B, 16, 8, 6, 6]) -> ConvCaps2d 16 -> 16 types of 8-D, 3x3
    windows, stride 1, "per_offset" transforms, bias, `iterations` of routing (4x4; 144 input
    capsules per position) -> DigitCaps 256 x 8-D -> 10 x 16-D with bias -> the CapsNet decoder.
    3,224,496 parameters with the decoder (CapsNet: 8.2M); about 56M multiply-adds per image in the
    convolutions and transforms against CapsNet's 202M (the 9x9 primary convolution dominates both).
    Initialised as CapsNet (truncated normal, std 0.05 for conv1 and 0.1 elsewhere, biases 0.1).

    routing: "fused" (FusedConvCaps2d and FusedDigitCaps, the Triton op) or "eager" (ConvCaps2d
    and DigitCaps, the reference); same state_dict either way. forward(x, y=None) and its
    output are CapsNet's (CapsNetOutput: lengths, reconstruction, caps), so CapsNet's losses,
    training and evaluation apply unchanged.
    """

    def __init__(self, routing: str = "fused", iterations: int = 3, num_classes: int = 10, *, input_size: int = 28,
                 conv_channels: int = 128, primary_types: int = 16, caps_dim: int = 8, conv_caps_types: int = 16):
        super().__init__()
        if input_size < 21:
            raise ValueError(f"input_size must be >= 21 (two 9x9 convolutions and a 3x3 window), got {input_size}")
        if routing == "fused":
            digit_caps_cls, conv_caps_cls = FusedDigitCaps, FusedConvCaps2d
        elif routing == "eager":
            digit_caps_cls, conv_caps_cls = DigitCaps, ConvCaps2d
        else:
            raise ValueError(f"routing must be 'fused' or 'eager', got {routing!r}")
        self.routing, self.input_size = routing, input_size
        self.primary_types, self.caps_dim = primary_types, caps_dim
        grid = (input_size - 8 - 9) // 2 + 1 - 2  # conv1 9x9, primary 9x9 stride 2, conv caps 3x3
        self.conv1 = nn.Conv2d(1, conv_channels, kernel_size=9)
        self.primary = nn.Conv2d(conv_channels, primary_types * caps_dim, kernel_size=9, stride=2)
        self.conv_caps = conv_caps_cls(primary_types, caps_dim, conv_caps_types, caps_dim, kernel_size=3,
                                       iterations=iterations, bias=True)
        self.digit_caps = digit_caps_cls(conv_caps_types * grid * grid, caps_dim, num_classes, 16, iterations,
                                         bias=True)
        self.decoder = Decoder(num_classes * 16, (1, input_size, input_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """CapsNet's (the authors') initialisation, the convolutional capsules' W like the digit capsules'."""
        authors_init_(((self.conv1.weight, 0.05), (self.primary.weight, 0.1), (self.conv_caps.weight, 0.1),
                       (self.digit_caps.weight, 0.1)),
                      self.decoder, (self.conv1.bias, self.primary.bias, self.conv_caps.bias, self.digit_caps.bias))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> CapsNetOutput:
        size = self.input_size
        if x.dim() != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"ConvCapsNet expects images of shape [B, 1, {size}, {size}], got {tuple(x.shape)}")
        features = self.primary(F.relu(self.conv1(x)))                                  # [B, T * K, 6, 6]
        primary = features.unflatten(1, (self.primary_types, self.caps_dim))           # [B, T, K, 6, 6]
        primary = reference.squash(primary, dim=2)
        conv_caps = self.conv_caps(primary)                                             # [B, T', K, 4, 4]
        u = conv_caps.permute(0, 1, 3, 4, 2).flatten(1, 3)                              # [B, T' * 16, K]
        caps = self.digit_caps(u)
        lengths = torch.linalg.vector_norm(caps.float(), dim=-1)
        target = y if y is not None else lengths.argmax(dim=1)
        mask = F.one_hot(target, caps.shape[1]).to(caps.dtype)
        if mask.dim() == 3:  # [B, T, classes]: one decoding per label, as CapsNet
            masked = caps.unsqueeze(1) * mask.unsqueeze(-1)
            reconstruction = self.decoder(masked.flatten(0, 1)).unflatten(0, mask.shape[:2])
        else:
            reconstruction = self.decoder(caps * mask.unsqueeze(-1))
        return CapsNetOutput(lengths, reconstruction, caps)
