"""The evaluation network: a plain CNN on clean images, independent of every guidance net.

It is both the *judge* classifier (condition accuracy of generated samples) and
the *feature network* of FID_fm (its penultimate layer).  It deliberately shares
nothing with the networks that guide sampling: no time input, no residual
blocks, no GroupNorm, no pixel-unshuffle stem, max pooling, BatchNorm, and its
own seed.  Guidance is a gradient attack on the classifier that guides
(eqs 6-8), so samples must never be scored by that classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CondiffError


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class JudgeNet(nn.Module):
    """Clean-image classifier x (B, C, H, W) -> logits (B, num_classes); ``features`` -> (B, feature_dim).

    Layout: conv(c0) @H, pool, conv(c1) @H/2, pool, conv(c2) @H/4, adaptive average
    pool to 3x3, linear to ``feature_dim`` (ReLU; the FID_fm features), dropout,
    linear to the logits.

    Args:
        in_channels: 1 (grey) or 3 (RGB).
        image_size: H = W, divisible by 4.
        channels: widths of the three convolutions.
        feature_dim: width of the penultimate layer.
        num_classes: number of classes.
        dropout: dropout before the last layer (training only).
    """

    kind = "judge"

    def __init__(self, in_channels: int = 1, image_size: int = 28, channels=(32, 64, 128), feature_dim: int = 128,
                 num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 3:
            raise CondiffError(f"the judge has three convolutions; got channels {list(channels)}")
        if image_size % 4:
            raise CondiffError(f"image size {image_size} must be divisible by 4 for the judge")
        self.config = dict(kind=self.kind, in_channels=in_channels, image_size=image_size, channels=list(channels),
                           feature_dim=feature_dim, num_classes=num_classes, dropout=dropout)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.body = nn.Sequential(_conv(in_channels, channels[0]), nn.MaxPool2d(2),
                                  _conv(channels[0], channels[1]), nn.MaxPool2d(2),
                                  _conv(channels[1], channels[2]), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
                                  nn.Linear(9 * channels[2], feature_dim), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim): the feature space of FID_fm."""
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise CondiffError(f"the judge takes images of shape (B, {self.in_channels}, {self.image_size}, "
                               f"{self.image_size}), got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """Logits (B, num_classes); ``t`` is accepted and ignored (the judge sees clean images)."""
        return self.head(self.drop(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass (eval mode: dropout is the identity)."""
        f = self.features(x)
        return f, self.head(self.drop(f))
