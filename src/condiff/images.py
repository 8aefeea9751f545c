"""Image files: load a reference image (any size/mode), save sample grids."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoints import atomic_path
from .errors import CondiffError

MAX_PIXELS = 64 * 1024 * 1024


def _square(im: Image.Image, size: int) -> Image.Image:
    """Resize ``im`` to fit ``size`` x ``size`` keeping its aspect ratio, padded with its border colour (centred)."""
    if im.width == im.height:
        return im.resize((size, size), Image.BILINEAR)
    scale = size / max(im.width, im.height)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    inner = im.resize((w, h), Image.BILINEAR)
    arr = np.asarray(inner)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]).reshape(-1, 1 if arr.ndim == 2 else arr.shape[2])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    canvas = Image.new(im.mode, (size, size), fill[0] if len(fill) == 1 else fill)
    canvas.paste(inner, ((size - w) // 2, (size - h) // 2))
    return canvas


def load_image(path: str | Path, size: int, channels: int = 1) -> torch.Tensor:
    """Read an image file, convert to L or RGB, fit it into size x size -> (C, H, W) in [-1, 1].

    A non-square image keeps its aspect ratio: it is resized so that its longer side is ``size``
    and padded, centred, with the median colour of its border (not stretched).
    """
    path = Path(path)
    if not path.is_file():
        raise CondiffError(f"image not found: {path}")
    if not 1 <= size <= 4096:
        raise CondiffError(f"image size must lie in [1, 4096], got {size}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # one error line, not a warning
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise CondiffError(f"{path}: image too large ({im.width}x{im.height})")
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit: scale to 8 bits, do not clip
                    im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
                im = _square(im.convert("L" if channels == 1 else "RGB"), size)
                arr = np.asarray(im, dtype=np.uint8)
    except CondiffError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CondiffError(f"{path}: image too large (over {MAX_PIXELS} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise CondiffError(f"{path}: not a readable image ({type(e).__name__})") from None
    x = torch.from_numpy(arr.copy()).float().div(127.5).sub(1.0)
    return x[None] if x.dim() == 2 else x.permute(2, 0, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images into one uint8 (H', W', C) array, ``nrow`` images per row."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = imgs[i]
    return grid


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 2) -> Path:
    """Save a grid PNG atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(x, nrow)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path


def save_npz(path: str | Path, images: torch.Tensor, labels=None, **extra) -> Path:
    """Save samples as uint8 (N, H, W, C) ``images`` (+ ``labels``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": to_uint8(images)}
    if labels is not None:
        arrays["labels"] = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    with atomic_path(path, ".npz") as tmp:  # np.savez adds .npz to a name without it
        np.savez_compressed(tmp, **arrays)
    return path
