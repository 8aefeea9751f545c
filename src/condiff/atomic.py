"""Crash-safe writes: a file or a folder appears complete under its final name, or not at all.

The one place for the temp-file / fsync / rename pattern; :mod:`condiff.checkpoints`,
:mod:`condiff.integrity` and :mod:`condiff.zoo` build on it (and import nothing
from each other in the other direction).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "fsync_dir", "fsync_file", "replace_dir"]


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries), ignoring filesystems that refuse it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temp file path beside ``path``; renamed onto ``path`` when the block succeeds.

    A failed write (or rename) removes the temp file, so no partial file is left behind.
    ``suffix`` is for writers that append their own extension (``np.savez`` adds ``.npz``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via temp file + fsync + rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: str | Path, dest: str | Path) -> None:
    """Put the complete folder ``tmp`` at ``dest``, replacing any folder there.

    Where the kernel can swap two paths (Linux), ``dest`` is at every moment either the
    whole old folder or the whole new one.  Elsewhere the old folder is renamed aside
    first, so a crash between the two renames leaves it under ``.NAME.old<pid>``.
    """
    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists():
        os.replace(tmp, dest)
    elif _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
    else:
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dest.parent)
