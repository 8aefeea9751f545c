"""Data loading (issue 2): IDX files, Fashion-MNIST, image folders, .npz; class names."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.data import (FASHION_MNIST_CLASSES, load_dataset, load_fashion_mnist, load_image_folder, load_npz,
                          read_idx, resolve_class)
from condiff.errors import CondiffError
from condiff.images import load_image, make_grid


def write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_round_trip_and_fashion_layout(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 9, 3]))
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    d = load_dataset(tmp_path)
    assert d.images.shape == (3, 1, 28, 28) and d.labels.tolist() == [0, 9, 3]
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert torch.allclose(d.images[0, 0, 0, :3], torch.tensor([-1.0, -1 + 2 / 255, -1 + 4 / 255]))
    assert d.class_names == FASHION_MNIST_CLASSES


def test_truncated_idx_is_an_error(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(CondiffError, match="truncated"):
        read_idx(p)


def test_real_fashion_mnist_from_debian_package():
    """CI installs dataset-fashion-mnist; the standard 60k/10k split with 10 balanced classes."""
    train = load_fashion_mnist(split="train")
    test = load_fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert -1 <= float(train.images.min()) and float(train.images.max()) <= 1


def test_image_folder_resizes_and_converts(tmp_path):
    for cls, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), color).save(tmp_path / cls / "1.png")
        Image.new("RGBA", (13, 17), color + (255,)).save(tmp_path / cls / "2.png")
    d = load_image_folder(tmp_path, size=16, channels=1)
    assert d.images.shape == (4, 1, 16, 16) and d.class_names == ["a", "b"] and d.labels.tolist() == [0, 0, 1, 1]
    rgb = load_image_folder(tmp_path, size=8, channels=3)
    assert rgb.images.shape == (4, 3, 8, 8)
    assert rgb.images[0, 0].mean() > 0.9 and rgb.images[2, 2].mean() > 0.9  # red stays red, blue stays blue


def test_npz_layouts(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((5, 8, 8, 3), np.uint8), labels=np.arange(5))
    assert load_npz(tmp_path / "a.npz").images.shape == (5, 3, 8, 8)
    np.savez(tmp_path / "b.npz", images=np.ones((2, 1, 8, 8), np.float32))
    assert float(load_npz(tmp_path / "b.npz").images.min()) == 1.0
    np.savez(tmp_path / "c.npz", labels=np.arange(3))
    with pytest.raises(CondiffError, match="no 'images'"):
        load_npz(tmp_path / "c.npz")


def test_bad_images(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CondiffError, match="not a readable image"):
        load_image(tmp_path / "bad.png", 28)
    with pytest.raises(CondiffError, match="not found"):
        load_image(tmp_path / "missing.png", 28)


def test_resolve_class_names_and_indices():
    assert resolve_class("ankle boot", FASHION_MNIST_CLASSES) == 9
    assert resolve_class("Sneaker", FASHION_MNIST_CLASSES) == 7
    assert resolve_class("t-shirt", FASHION_MNIST_CLASSES) == 0
    assert resolve_class("3", FASHION_MNIST_CLASSES) == 3
    with pytest.raises(CondiffError, match="unknown class 'hat'"):
        resolve_class("hat", FASHION_MNIST_CLASSES)
    with pytest.raises(CondiffError, match="out of range"):
        resolve_class("10", FASHION_MNIST_CLASSES)


def test_grid_layout():
    g = make_grid(torch.zeros(5, 1, 4, 4), nrow=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 1)
