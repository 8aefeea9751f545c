"""The encoders of similarity guidance (eq 15) in one checkpointable network.

sim(x_t, y) = cos(E1(x_t), E2(y)) needs a noise-aware encoder E1(x_t, t) and an
encoder E2 of the condition y.  :class:`SimilarityEncoder` holds

* ``e1``: E1(x_t, t), an :class:`EncoderNet` with a time input (the article's
  remark under eq 15: E1 must be trained on noisy inputs);
* ``e2``: E2(y) for a clean reference image, an :class:`EncoderNet` without time
  (image encoders only), and ``prototypes``, the class directions of its
  cosine-classifier training objective;
* ``proj``: a linear map from E1's space to a text encoder's space (text encoders
  only), so that sim(x_t, prompt) = cos(proj(E1(x_t, t)), E_text(prompt));
* the caption bank the projection was aligned with (text encoders with ``captions``):
  ``caption_bank`` (M, text_dim), the text encoder's unit embeddings of the training
  captions, and ``caption_labels`` (M,), their classes; the bank's mean is subtracted
  from every text embedding (:func:`condiff.similarity.captions.centre`).
  Kept with the weights, so a prompt can be mapped onto what the image side learned
  (:func:`condiff.similarity.captions.caption_prior`) without the training run.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CondiffError
from .encoder import EncoderNet

BRANCHES = ("e1", "e2", "text")


class SimilarityEncoder(nn.Module):
    """E1(x_t, t) -> (B, dim); optionally E2(y) -> (B, dim) and proj(E1) -> (B, text_dim).

    Args:
        in_channels, image_size, channels, blocks, stem: as for :class:`EncoderNet`
            (E1 and E2 have the same architecture).
        dim: embedding width of E1 and E2.
        clean: build the clean encoder E2 (image guidance).
        num_classes: class prototypes (num_classes, dim) of E2's training objective; 0 for none.
        text_dim: build proj: dim -> text_dim (text guidance); None for none.
        captions: size M of the stored caption bank (text encoders; 0 for none, as in
            encoders trained before it was stored); filled by :meth:`set_captions`.
    """

    kind = "similarity-encoder"

    def __init__(self, in_channels: int = 1, image_size: int = 28, channels=(32, 64), blocks: int = 1,
                 stem: int = 2, dim: int = 64, clean: bool = True, num_classes: int = 0,
                 text_dim: int | None = None, captions: int = 0):
        super().__init__()
        channels = [int(c) for c in channels]
        if dim < 1 or num_classes < 0 or captions < 0 or (text_dim is not None and text_dim < 1):
            raise CondiffError("similarity encoder: dim and text_dim must be >= 1, num_classes and captions >= 0")
        if captions and not text_dim:
            raise CondiffError("similarity encoder: a caption bank needs text_dim")
        self.config = dict(kind=self.kind, in_channels=in_channels, image_size=image_size, channels=channels,
                           blocks=blocks, stem=stem, dim=dim, clean=clean, num_classes=num_classes,
                           text_dim=text_dim)
        if captions:  # only when present, so the configs of earlier encoders load unchanged
            self.config["captions"] = int(captions)
        arch = dict(in_channels=in_channels, image_size=image_size, channels=channels, blocks=blocks, stem=stem,
                    out_dim=dim)
        self.in_channels, self.image_size, self.dim, self.text_dim = in_channels, image_size, dim, text_dim
        self.e1 = EncoderNet(time=True, **arch)
        self.e2 = EncoderNet(time=False, **arch) if clean else None
        self.prototypes = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5) if clean and num_classes else None
        self.proj = nn.Linear(dim, text_dim) if text_dim else None
        self.captions = int(captions)
        if captions:
            self.register_buffer("caption_bank", torch.zeros(captions, text_dim))
            self.register_buffer("caption_labels", torch.zeros(captions, dtype=torch.long))

    def set_captions(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the caption bank (M, text_dim) of unit embeddings and its classes (M,)."""
        embeddings, labels = torch.as_tensor(embeddings).float(), torch.as_tensor(labels).long()
        if embeddings.shape != (self.captions, self.text_dim) or labels.shape != (self.captions,):
            raise CondiffError(f"caption bank of shape {tuple(embeddings.shape)} with {labels.numel()} labels; this "
                               f"encoder stores ({self.captions}, {self.text_dim})")
        dev = self.caption_bank.device
        self.caption_bank.copy_(embeddings.to(dev))
        self.caption_labels.copy_(labels.to(dev))

    @property
    def text_mean(self) -> torch.Tensor | None:
        """The caption bank's mean embedding (None without a bank: text embeddings are used as they are)."""
        return self.caption_bank.mean(0) if self.captions else None

    def forward(self, x: torch.Tensor, t=None, branch: str = "e1") -> torch.Tensor:
        """E1(x_t, t) (``branch="e1"``), E2(x) (``"e2"``, t ignored) or proj(E1(x_t, t)) (``"text"``)."""
        if branch == "e1":
            return self.e1(x, t)
        if branch == "e2":
            if self.e2 is None:
                raise CondiffError("this encoder has no clean image encoder E2 (it was trained for text)")
            return self.e2(x)
        if branch == "text":
            if self.proj is None:
                raise CondiffError("this encoder has no text projection (it was trained for images)")
            return self.proj(self.e1(x, t))
        raise CondiffError(f"unknown encoder branch {branch!r} (choose from {', '.join(BRANCHES)})")

    def features(self, x: torch.Tensor, t=None) -> list[torch.Tensor]:
        """E1's feature maps at each level (for Gram-matrix style distances, eq 15's remark)."""
        return self.e1.features(x, t)
