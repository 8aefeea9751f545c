"""Where the models that ship inside the package live, and their folder names by role.

Kept apart from :mod:`condiff.zoo` (which loads and exports them) and free of other condiff imports, so
that :func:`condiff.checkpoints.resolve_checkpoint` can accept a shipped model's folder name wherever a
checkpoint path is asked for (``--text-encoder fashion-text-attr-encoder``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["SHIPPED", "models_dir", "shipped_folder"]

# role -> folder name under condiff/models
SHIPPED = {
    "diffusion": "fashion-cfg",
    "classifier": "fashion-classifier",
    "clean-classifier": "fashion-clean-classifier",
    "weak-diffusion": "fashion-cfg-weak",
    "image-encoder": "fashion-image-encoder",
    "text-encoder": "fashion-text-encoder",
    "judge": "fashion-judge",
    "text-diffusion": "fashion-text-cfg",  # text to image by CFG (condiff sample --prompt)
    "text-attr-encoder": "fashion-text-attr-encoder",  # text guidance that steers attributes too
}


def models_dir() -> Path:
    """The package's ``condiff/models`` folder."""
    return Path(str(resources.files("condiff"))) / "models"


def shipped_folder(name: str) -> Path | None:
    """The installed shipped model whose folder name is ``name`` (a value of :data:`SHIPPED`), else None."""
    if name not in SHIPPED.values():
        return None
    path = models_dir() / name
    return path if (path / "config.json").is_file() else None
