"""The baseline CNN of Table 1 of Sabour et al. (2017).

The paper: "three convolutional layers of 256, 256, 128 channels. Each has 5x5 kernels and
stride of 1. The last convolutional layers are followed by two fully connected layers of size
328, 192. The last fully connected layer is connected with dropout to a 10 class softmax layer
with cross entropy loss", 35.4M parameters. That count fixes what the text leaves open: 'same'
padding and no pooling (28 x 28 x 128 features into FC 328: 35,445,522 parameters; any pooling
would give a few million). The authors' code has no such model (its conv_model.py is a
different, CIFAR-style baseline), so the dropout rate (0.5, the common choice) and the
initialisation (PyTorch's defaults) are ours.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BaselineCNN", "baseline_loss"]


class BaselineCNN(nn.Module):
    """forward(x [B, 1, 28, 28]) -> class logits [B, 10]."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 256, 5, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 5, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(256, 128, 5, padding=2), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 28 * 28, 328), nn.ReLU(inplace=True),
            nn.Linear(328, 192), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"BaselineCNN expects images of shape [B, 1, 28, 28], got {tuple(x.shape)}")
        return self.classifier(self.features(x))


def baseline_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross entropy, averaged over the batch (computed in fp32 under autocast)."""
    return F.cross_entropy(logits.float(), labels)
