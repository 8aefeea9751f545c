"""Datasets: Fashion-MNIST from IDX files, image folders, .npz; all scaled to [-1, 1].

Nothing is downloaded: Fashion-MNIST is read from Debian's ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``) or any folder holding the four standard
``*-idx?-ubyte(.gz)`` files.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CondiffError

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

__all__ = ["ImageDataset", "FASHION_MNIST_CLASSES", "load_fashion_mnist", "load_image_folder", "load_npz",
           "load_dataset", "resolve_class", "read_idx"]

# what np.load raises on a damaged, truncated or foreign .npz (BadZipFile is not an OSError)
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


@dataclass
class ImageDataset:
    """Images (N, C, H, W) float32 in [-1, 1], labels (N,) long, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names)



def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) or (N, C, H, W) -> float (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images, copy=True))
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    elif x.dim() != 4:
        raise CondiffError(f"images must have shape (N, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1.0).contiguous()
    x = x.float()
    if not torch.isfinite(x).all():
        raise CondiffError("images contain NaN or infinite values")
    if x.min() >= 0 and x.max() <= 1:
        x = x * 2 - 1
    return x.clamp(-1, 1).contiguous()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise CondiffError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise CondiffError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CondiffError(f"{path}: truncated IDX file ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise CondiffError(f"{root}: {stem}(.gz) not found; install Debian's dataset-fashion-mnist "
                       "or pass --data with a folder holding the four Fashion-MNIST files")


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> ImageDataset:
    """Fashion-MNIST (60k train / 10k test, 1x28x28, 10 classes) from IDX files."""
    if split not in _FILES:
        raise CondiffError(f"split must be train or test, got {split!r}")
    root = Path(root) if root is not None else DEFAULT_FASHION_MNIST
    if not root.is_dir():
        raise CondiffError(f"Fashion-MNIST folder not found: {root} "
                           "(apt-get install dataset-fashion-mnist, or pass --data PATH)")
    imgs = read_idx(_find(root, _FILES[split][0]))
    labels = read_idx(_find(root, _FILES[split][1]))
    if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
        raise CondiffError(f"{root}: images and labels do not match ({imgs.shape} vs {labels.shape})")
    return ImageDataset(to_unit(imgs), torch.from_numpy(labels.astype(np.int64)), list(FASHION_MNIST_CLASSES))


def load_image_folder(root: str | Path, size: int = 28, channels: int = 1) -> ImageDataset:
    """A folder with one subfolder per class; images of any size are converted and resized."""
    from .images import load_image

    root = Path(root)
    if not root.is_dir():
        raise CondiffError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise CondiffError(f"{root}: no class subfolders")
    images, labels = [], []
    for i, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                images.append(load_image(p, size, channels))
                labels.append(i)
    if not images:
        raise CondiffError(f"{root}: no images found in its class subfolders")
    return ImageDataset(torch.stack(images), torch.tensor(labels), classes)


def load_npz(path: str | Path) -> ImageDataset:
    """An .npz with ``images`` (N, H, W[, C]) or (N, C, H, W) and optional ``labels``, ``class_names``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise CondiffError(f"{path}: no 'images' array")
            images = z["images"]
            labels = z["labels"] if "labels" in z else np.zeros(len(images), dtype=np.int64)
            names = [str(s) for s in z["class_names"]] if "class_names" in z else []
    except CondiffError:
        raise
    except NPZ_READ_ERRORS as e:
        raise CondiffError(f"{path}: cannot read .npz ({e})") from None
    if len(labels) != len(images):
        raise CondiffError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise CondiffError(f"{path}: no images")
    labels = np.asarray(labels)
    integral = np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_) or (
        np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if labels.ndim != 1 or not integral:
        raise CondiffError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or (names and labels.max() >= len(names)):
        raise CondiffError(f"{path}: labels must lie in [0, {len(names) - 1 if names else 'N'}], "
                           f"got {labels.min()}..{labels.max()}")
    return ImageDataset(to_unit(images), torch.from_numpy(np.asarray(labels, dtype=np.int64)), names)


def load_dataset(spec: str | Path | None = None, split: str = "train", size: int = 28,
                 channels: int = 1) -> ImageDataset:
    """Load by spec: None or 'fashion-mnist' (Debian's copy), a folder of IDX files,
    a folder of class subfolders, or an .npz file."""
    if spec is None or str(spec) == "fashion-mnist":
        return load_fashion_mnist(None, split)
    path = Path(spec)
    if not path.exists():
        raise CondiffError(f"data not found: {path}")
    if path.is_file():
        if path.suffix == ".npz":
            return load_npz(path)
        raise CondiffError(f"{path}: unsupported data file (use a folder or an .npz)")
    if any(path.glob("*-idx3-ubyte*")):
        return load_fashion_mnist(path, split)
    return load_image_folder(path, size, channels)


def resolve_class(value, class_names: list[str], num_classes: int | None = None) -> int:
    """A class given by name (case-insensitive) or index -> its index."""
    n = num_classes if num_classes is not None else len(class_names)
    s = str(value).strip()
    if s.lstrip("-").isdigit():
        i = int(s)
        if 0 <= i < n:
            return i
        raise CondiffError(f"class index {i} out of range 0..{n - 1}")
    norm = lambda v: v.lower().replace("-", "").replace(" ", "").replace("/", "")  # noqa: E731
    for i, name in enumerate(class_names):
        if norm(name) == norm(s) or norm(name.split("/")[0]) == norm(s):
            return i
    known = ", ".join(repr(c) for c in class_names) if class_names else f"indices 0..{n - 1}"
    raise CondiffError(f"unknown class {s!r} (known: {known})")
