"""The paper's MNIST CapsNet and its losses."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Decoder, DigitCaps, FusedDigitCaps, PrimaryCaps

__all__ = ["CapsNet", "CapsNetOutput", "margin_loss", "reconstruction_loss", "capsnet_loss", "AUTHORS_ARCH",
           "LEGACY_ARCH"]


class CapsNetOutput(NamedTuple):
    lengths: torch.Tensor          # [B, classes], |v_j|: the class probabilities
    reconstruction: torch.Tensor   # [B, 1, S, S]; [B, T, 1, S, S] for labels y of shape [B, T]
    caps: torch.Tensor             # [B, classes, 16], the digit capsules v


# The authors' CapsNet (Sarasra/models research/capsules); the keyword arguments of CapsNet that
# make it, stored in checkpoints. Checkpoints without them are LEGACY_ARCH, the model of fastcaps
# 0.1 (no bias on s, unscaled primary capsules), and load as such.
AUTHORS_ARCH = {"bias": True, "primary_scale": 1 / 32}
LEGACY_ARCH = {"bias": False, "primary_scale": 1.0}


def _trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    # tf.truncated_normal_initializer: normal(0, std) redrawn outside 2 std
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


@torch.no_grad()
def authors_init_(weights_and_stds, decoder: Decoder, biases) -> None:
    """The authors' initialisation (variables.weight_variable / bias_variable, decoder stack):
    each weight from a normal truncated at 2 std, the decoder's weights with std 0.1, every
    bias (None: absent) and the decoder's set to 0.1."""
    for weight, std in weights_and_stds:
        _trunc_normal_(weight, std)
    for layer in decoder.net:
        if isinstance(layer, nn.Linear):
            _trunc_normal_(layer.weight, 0.1)
            nn.init.constant_(layer.bias, 0.1)
    for bias in biases:
        if bias is not None:
            nn.init.constant_(bias, 0.1)


class CapsNet(nn.Module):
    """Sabour et al. (2017) MNIST CapsNet: 8,215,728 parameters with the decoder.

    Conv1 256 x 9x9 stride 1 + ReLU -> PrimaryCaps 32 types of 8-D, 9x9 stride 2 (1152 capsules,
    squashed, no ReLU) -> DigitCaps 10 x 16-D with `iterations` of dynamic routing -> decoder.

    As the authors' code (see AUTHORS_ARCH and reset_parameters): a [10, 16] bias on s of the
    digit capsules (bias=True), primary capsules squash(conv(x) / 32 + b) (primary_scale=1/32),
    weights drawn from a normal truncated at 2 std (std 0.05 for conv1, 0.1 for the primary
    caps kernel, the digit caps W and the decoder) and every bias set to 0.1.
    bias=False, primary_scale=1 is the model of fastcaps 0.1 (LEGACY_ARCH).

    input_size: the side S of the square input images; the conv and PrimaryCaps sizes follow
    from it (28: 6x6x32 = 1152 input capsules; 36, MultiMNIST: 10x10x32 = 3200), and the
    decoder reconstructs S x S images.

    prior: learnable initial routing logits of the digit capsules (DigitCaps(prior=True), zeros
    after reset_parameters: the authors' routing starts at b = 0).

    routing: "fused" (FusedDigitCaps, the Triton op; on a CPU without the interpreter it falls
    back to the reference with a warning) or "eager" (DigitCaps, the reference loop). Both have
    the same parameters and state_dict keys, so checkpoints move freely between them.

    iterations: R weighted sums of the digit capsules' routing (R - 1 logit updates; the paper
    uses 3). num_classes: J, the digit capsules (10 of 16-D).

    forward(x [B, 1, S, S], y=None) -> CapsNetOutput(lengths [B, J], reconstruction [B, 1, S, S]
    ([B, T, 1, S, S] for labels [B, T]), capsules [B, J, 16]). The decoder is fed the capsule of
    class y when labels are given (training) and of the predicted class otherwise (test); all
    other capsules are masked to 0. Labels of shape [B, T] (T digits per image, MultiMNIST) run
    the decoder once per label. The digit capsules' weight is [1152, 10, 16, 8] ([I, J, D, K],
    û = W u); fastcaps.convert_weight loads another port's.
    """

    def __init__(self, routing: str = "fused", iterations: int = 3, num_classes: int = 10, *,
                 bias: bool = True, primary_scale: float = 1 / 32, leaky: bool = False,
                 detach_routing: bool = False, input_size: int = 28, prior: bool = False):
        super().__init__()
        if input_size < 17:
            raise ValueError(f"input_size must be >= 17 (two 9x9 convolutions), got {input_size}")
        grid = (input_size - 8 - 9) // 2 + 1  # conv1 9x9 stride 1, then PrimaryCaps 9x9 stride 2
        if routing == "fused":
            digit_caps_cls = FusedDigitCaps
        elif routing == "eager":
            digit_caps_cls = DigitCaps
        else:
            raise ValueError(f"routing must be 'fused' or 'eager', got {routing!r}")
        self.routing, self.input_size = routing, input_size
        self.conv1 = nn.Conv2d(1, 256, kernel_size=9, stride=1)
        self.primary_caps = PrimaryCaps(256, caps_types=32, caps_dim=8, kernel_size=9, stride=2,
                                        scale=primary_scale)
        self.digit_caps = digit_caps_cls(32 * grid * grid, 8, num_classes, 16, iterations, bias=bias, prior=prior,
                                         leaky=leaky, detach_routing=detach_routing)
        self.decoder = Decoder(num_classes * 16, (1, input_size, input_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The authors' initialisation (authors_init_); a learnable prior starts at 0 (the paper's logits)."""
        authors_init_(((self.conv1.weight, 0.05), (self.primary_caps.conv.weight, 0.1), (self.digit_caps.weight, 0.1)),
                      self.decoder, (self.conv1.bias, self.primary_caps.conv.bias, self.digit_caps.bias))
        if self.digit_caps.prior is not None:
            nn.init.zeros_(self.digit_caps.prior)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> CapsNetOutput:
        size = self.input_size
        if x.dim() != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"CapsNet expects images of shape [B, 1, {size}, {size}], got {tuple(x.shape)}")
        u = self.primary_caps(F.relu(self.conv1(x)))
        caps = self.digit_caps(u)
        lengths = torch.linalg.vector_norm(caps.float(), dim=-1)
        target = y if y is not None else lengths.argmax(dim=1)
        mask = F.one_hot(target, caps.shape[1]).to(caps.dtype)
        if mask.dim() == 3:  # [B, T, classes]: one decoding per label, in one decoder batch
            masked = caps.unsqueeze(1) * mask.unsqueeze(-1)                       # [B, T, classes, 16]
            reconstruction = self.decoder(masked.flatten(0, 1)).unflatten(0, mask.shape[:2])
        else:
            reconstruction = self.decoder(caps * mask.unsqueeze(-1))
        return CapsNetOutput(lengths, reconstruction, caps)


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lam: float = 0.5) -> torch.Tensor:
    """Margin loss, summed over classes, averaged over the batch:
    L = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2.
    labels: [B] classes, or [B, T] for T digits per image (T_k = 1 for every class present)."""
    target = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)
    if target.dim() == 3:
        target = target.amax(dim=1)
    present = target * F.relu(m_plus - lengths) ** 2
    absent = lam * (1 - target) * F.relu(lengths - m_minus) ** 2
    return (present + absent).sum(dim=1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, scale: float = 0.0005) -> torch.Tensor:
    """scale x the summed squared error over the pixels of an image, averaged over the batch."""
    sse = (reconstruction.float() - images.float()).pow(2).flatten(1).sum(dim=1)
    return scale * sse.mean()


def capsnet_loss(output: CapsNetOutput, images: torch.Tensor, labels: torch.Tensor, *,
                 margin_weight: float | None = None, recon_weight: float = 0.0005):
    """The authors' total loss, margin_weight x margin_loss + recon_weight x SSE; returns
    (total, weighted margin, weighted reconstruction).

    margin_weight defaults to 0.5 / classes (1/20 for MNIST): the authors' code halves the
    paper's per-class cost and averages it over the classes instead of summing. With
    reconstruction at 0.0005 x SSE that makes the reconstruction 20x stronger, relative to the
    margin loss, than the paper's formula (margin_weight=1). recon_weight=0: no reconstruction
    term (the decoder then gets no gradient).
    """
    if margin_weight is None:
        margin_weight = 0.5 / output.lengths.shape[1]
    margin = margin_weight * margin_loss(output.lengths, labels)
    recon = reconstruction_loss(output.reconstruction, images, recon_weight)
    return margin + recon, margin, recon
