"""Write a Fashion-MNIST subset as an image folder: OUT/<class name>/<index>.png, one subfolder per class.

This is the layout ``condiff train --data OUT`` reads for your own images (any size and mode; they
are converted and fitted into --image-size). The class names become the folder names ("/" -> "-").

    python scripts/write_image_folder.py --out my-images --per-class 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from condiff.data import load_dataset
from condiff.images import to_uint8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    ap.add_argument("--per-class", type=int, default=300, help="images per class (default 300)")
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: Debian's copy)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"write_image_folder: {out} is not empty")
    data = load_dataset(args.data, args.split)
    for k, name in enumerate(data.class_names):
        folder = out / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        idx = (data.labels == k).nonzero()[:, 0][: args.per_class]
        for i, image in zip(idx.tolist(), to_uint8(data.images[idx])):
            Image.fromarray(np.ascontiguousarray(image[..., 0])).save(folder / f"{i:05d}.png")
    print(f"wrote {len(data.class_names)} class folders of up to {args.per_class} images under {out}")


if __name__ == "__main__":
    main()
