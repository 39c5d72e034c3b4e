"""Random integer shifts of images: the training augmentation of MNIST (and the MultiMNIST placement's draws)."""
import torch
import torch.nn.functional as F

__all__ = ["draw_shifts", "shift_images"]


def draw_shifts(n: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 2] integer (dy, dx) shifts, uniform over [-max_shift, max_shift], on the generator's device."""
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator, device=generator.device)


def shift_images(images: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """out[n, :, y, x] = images[n, :, y - dy_n, x - dx_n], zero where that falls outside.

    One gather over the zero-padded batch, no per-image loop and no host sync. Every shift
    must lie in [-max_shift, max_shift] (the padding), which draw_shifts guarantees.
    """
    if images.dim() != 4 or shifts.shape != (images.shape[0], 2):
        raise ValueError(f"expected images [N, C, H, W] and shifts [N, 2], got {tuple(images.shape)} "
                         f"and {tuple(shifts.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    n, c, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p)).flatten(2)                                    # [N, C, (H+2p)(W+2p)]
    rows = torch.arange(h, device=images.device) + p - shifts[:, :1]                    # [N, H]
    cols = torch.arange(w, device=images.device) + p - shifts[:, 1:]                    # [N, W]
    index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, index).view(n, c, h, w)
