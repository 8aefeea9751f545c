"""Time-conditioned image encoders: the noise-aware classifier p(y|x_t) and
the noise-aware / clean embedding encoders of similarity guidance (eq 15)."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import CondiffError
from .layers import ResBlock, TimeMLP


class EncoderNet(nn.Module):
    """f(x_t, t) -> (B, out_dim): the down half of the UNet, pooled, then linear.

    With ``out_dim = num_classes`` its output are the logits of a noise-aware
    classifier; with ``time=False`` it is a clean-image encoder (t ignored).
    """

    kind = "encoder"

    def __init__(self, in_channels: int = 1, image_size: int = 28, channels=(32, 64), blocks: int = 1,
                 stem: int = 2, out_dim: int = 10, time: bool = True, emb_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        factor = stem * 2 ** (len(channels) - 1)
        if image_size % factor:
            raise CondiffError(f"image size {image_size} must be divisible by {factor} for this encoder")
        self.config = dict(kind=self.kind, in_channels=in_channels, image_size=image_size, channels=list(channels),
                           blocks=blocks, stem=stem, out_dim=out_dim, time=time, emb_dim=emb_dim, dropout=dropout)
        self.in_channels, self.image_size, self.stem, self.use_time = in_channels, image_size, stem, time
        emb_dim = emb_dim or 4 * channels[0]
        self.time = TimeMLP(channels[0], emb_dim)
        self.conv_in = nn.Conv2d(in_channels * stem * stem, channels[0], 3, padding=1)
        self.levels, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = channels[0]
        for i, c in enumerate(channels):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ResBlock(ch, c, emb_dim, dropout))
                ch = c
            self.levels.append(level)
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.head = nn.Linear(ch, out_dim)
        self.out_dim = out_dim

    def features(self, x: torch.Tensor, t=None) -> list[torch.Tensor]:
        """Feature maps after each level (used for Gram-matrix style distances)."""
        B = x.shape[0]
        if t is None or not self.use_time:
            t = torch.zeros(B, dtype=torch.long, device=x.device)
        t = torch.as_tensor(t, device=x.device)
        emb = self.time(t.expand(B) if t.dim() == 0 else t)
        h = F.pixel_unshuffle(x, self.stem) if self.stem > 1 else x
        h = self.conv_in(h)
        feats = []
        for i, level in enumerate(self.levels):
            for block in level:
                h = block(h, emb)
            feats.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        return feats

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        h = self.features(x, t)[-1]
        return self.head(F.silu(h).mean(dim=(2, 3)))
