"""The eps-network: a compact UNet with a time embedding and an optional condition.

Sized for sample quality per CPU-minute (DESIGN.md): a pixel-unshuffle stem moves
28x28x1 to 14x14x4 so every convolution runs at 14x14 or 7x7. Optional self-attention
at the lowest resolution (``attention=True``: 7x7 for Fashion-MNIST) sits between the
two middle residual blocks, as in DDPM's UNet.
The condition is a class index (with one extra learned *null* index, phi of eq 24)
or a conditioning vector (with a learned null vector); both enter through the same
embedding that the time embedding is added to.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import CondiffError
from .layers import ResBlock, TimeMLP, norm


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions, added residually (zero-initialised out)."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(h for h in range(1, max(channels // head_dim, 1) + 1) if channels % h == 0)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps(x_t, t, cond) for images (B, C, H, W).

    Args:
        in_channels: 1 (grey) or 3 (RGB).
        image_size: H = W; must be divisible by stem * 2**(len(channels) - 1).
        channels: width at each resolution level.
        blocks: residual blocks per level.
        stem: pixel-unshuffle factor of the input (1 = none).
        num_classes: class conditioning with indices 0..num_classes-1 and the null
            index num_classes; None for unconditional models.
        cond_dim: vector conditioning of this width (mutually exclusive with classes).
        attention: a self-attention block in the middle, at the lowest resolution.
    """

    kind = "unet"

    def __init__(self, in_channels: int = 1, image_size: int = 28, channels=(64, 128), blocks: int = 2,
                 stem: int = 2, num_classes: int | None = None, cond_dim: int | None = None,
                 emb_dim: int | None = None, dropout: float = 0.0, attention: bool = False):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        factor = stem * 2 ** (len(channels) - 1)
        if image_size % factor:
            raise CondiffError(f"image size {image_size} must be divisible by {factor} for this UNet")
        if num_classes is not None and cond_dim is not None:
            raise CondiffError("a UNet takes class labels or a conditioning vector, not both")
        self.config = dict(kind=self.kind, in_channels=in_channels, image_size=image_size, channels=list(channels),
                           blocks=blocks, stem=stem, num_classes=num_classes, cond_dim=cond_dim,
                           emb_dim=emb_dim, dropout=dropout)
        if attention:  # only when on: the configs of earlier models stay as they were
            self.config["attention"] = True
        self.in_channels, self.image_size, self.stem = in_channels, image_size, stem
        self.num_classes, self.cond_dim = num_classes, cond_dim
        emb_dim = emb_dim or 4 * channels[0]
        self.time = TimeMLP(channels[0], emb_dim)
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # index num_classes is phi
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, emb_dim)
            self.null_emb = nn.Parameter(torch.zeros(emb_dim))  # phi for vector conditions
        cin = in_channels * stem * stem
        self.conv_in = nn.Conv2d(cin, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch = [channels[0]], channels[0]
        for i, c in enumerate(channels):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ResBlock(ch, c, emb_dim, dropout))
                ch = c
                skips.append(ch)
            self.down.append(level)
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), ResBlock(ch, ch, emb_dim, dropout)])
        self.mid_attn = SelfAttention(ch) if attention else None
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            level = nn.ModuleList()
            for _ in range(blocks + 1):
                level.append(ResBlock(ch + skips.pop(), c, emb_dim, dropout))
                ch = c
            self.up.append(level)
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, cin, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None or self.cond_dim is not None

    def null_cond(self, batch: int, device=None) -> torch.Tensor:
        """The null condition phi for a batch: the null index, or NaN rows for vectors."""
        if self.num_classes is not None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if self.cond_dim is not None:
            return torch.full((batch, self.cond_dim), float("nan"), device=device)
        raise CondiffError("an unconditional model has no null condition")

    def cond_embedding(self, cond, batch: int, device) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if cond is None:
            cond = self.null_cond(batch, device)
        cond = torch.as_tensor(cond, device=device)
        if self.num_classes is not None:
            cond = cond.long().expand(batch) if cond.dim() == 0 else cond.long()
            if ((cond < 0) | (cond > self.num_classes)).any():
                raise CondiffError(f"class index out of range 0..{self.num_classes - 1}")
            return self.class_emb(cond)
        cond = cond.float()
        if cond.dim() == 1:
            cond = cond.expand(batch, -1)
        null = cond.isnan().any(dim=-1, keepdim=True)
        proj = self.cond_proj(torch.nan_to_num(cond))
        return torch.where(null, self.null_emb.expand_as(proj), proj)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.dim() == 0 else t
        emb = self.time(t)
        c = self.cond_embedding(cond, B, x.device)
        if c is not None:
            emb = emb + c
        h = F.pixel_unshuffle(x, self.stem) if self.stem > 1 else x
        h = self.conv_in(h)
        hs = [h]
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid[0](h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid[1](h, emb)
        for i, level in enumerate(self.up):
            for block in level:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(h, self.stem) if self.stem > 1 else h
