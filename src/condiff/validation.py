"""Input checks shared by every ``condiff`` command: argument types and output paths.

Each check turns bad input into a one-line message (an ``argparse`` error or a
:class:`~condiff.errors.CondiffError`, both exit code 2) *before* any work is
done, so a failed command leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .errors import CondiffError

MAX_INT = 2**31 - 1  # larger integers overflow torch's index types and are never meant
MAX_SEED = 2**32 - 1
# network sizes a config or a flag may ask for: far above any model this project trains (64-128 wide,
# 2-3 levels, 1-2 blocks), far below what would take minutes just to construct or exhaust memory
MAX_WIDTH = 4096  # channels of one resolution level
MAX_LEVELS = 8  # resolution levels (entries of --channels)
MAX_BLOCKS = 64  # residual blocks per level
MAX_T = 100_000  # diffusion steps of a schedule

__all__ = ["MAX_INT", "MAX_SEED", "MAX_WIDTH", "MAX_LEVELS", "MAX_BLOCKS", "MAX_T", "int_range", "seed",
           "float_range", "finite_float", "nonneg_float", "key_value", "check_output_file", "check_output_dir",
           "describe_unexpected", "one_line"]


def int_range(lo: int, hi: int = MAX_INT, what: str = "an integer"):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected {what} in [{lo}, {hi}], got {text!r}")
        return v

    parse.__name__ = f"int_{lo}_{hi}"
    return parse


seed = int_range(0, MAX_SEED, "a seed (integer)")
seed.__name__ = "seed"


def float_range(lo: float = -math.inf, hi: float = math.inf, what: str = "a finite number", *,
                open_lo: bool = False):
    """An argparse type: a finite number in [lo, hi], or in (lo, hi] with ``open_lo``."""
    if math.isinf(hi):
        bounds = f"{'>' if open_lo else '>='} {lo:g}"
    else:
        bounds = f"in {'(' if open_lo else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if v < lo or v > hi or (open_lo and v == lo):
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return v

    parse.__name__ = f"float_{lo:g}_{hi:g}"
    return parse


def timestep_interval(text: str) -> tuple[int, int]:
    """LO,HI timesteps with 0 <= LO <= HI (argparse type of --cfg-interval and --guidance-interval)."""
    try:
        lo, hi = (int(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI timesteps, got {text!r}") from None
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return lo, hi


def key_value(*, last: bool = False):
    """An argparse type: ``KEY=VALUE`` -> (key, value), split at the first "=" (or the last, with ``last``)."""
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = str(text).rpartition("=") if last else str(text).partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
        return key.strip(), value

    parse.__name__ = "key_value"
    return parse


finite_float = float_range()
finite_float.__name__ = "finite_float"
finite_float.__doc__ = "An argparse type: any finite number (negative allowed)."
nonneg_float = float_range(0.0)
nonneg_float.__name__ = "nonneg_float"


def _writable_ancestor(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can write into."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise CondiffError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CondiffError(f"{flag} {path}: cannot write into {parent}")


def check_output_file(path, flag: str = "--out") -> Path:
    """An output file path that can be written (missing folders are created later)."""
    if path is None or not str(path).strip():
        raise CondiffError(f"{flag} must name a file")
    path = Path(path)
    if path.is_dir():
        raise CondiffError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise CondiffError(f"{flag} {path}: file is not writable")
    _writable_ancestor(path, flag)
    return path


def check_output_dir(path, flag: str = "--out") -> Path:
    """An output folder path: an existing folder, or one that can be created."""
    if path is None or not str(path).strip():
        raise CondiffError(f"{flag} must name a folder")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CondiffError(f"{flag} {path} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise CondiffError(f"{flag} {path}: cannot write into this folder")
        return path
    _writable_ancestor(path, flag)
    return path


def describe_unexpected(e: BaseException) -> str | None:
    """A one-line message for environment failures (disk, memory); None for anything else (a bug)."""
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller --batch-size or --n"
    if isinstance(e, OSError):
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{where}"
    if isinstance(e, RuntimeError):
        msg = str(e)
        if "can't allocate memory" in msg or "out of memory" in msg.lower() or "not enough memory" in msg:
            first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
            return f"out of memory ({first[:160]}); use a smaller --batch-size or --n"
    return None


def one_line(message) -> str:
    """``message`` as a single line (a file name may hold a newline)."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")
