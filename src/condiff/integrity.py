"""Checkpoint integrity and the one opt-in path for pickle-format weights.

* Every checkpoint folder written by :func:`condiff.checkpoints.save_checkpoint`
  carries ``SHA256SUMS`` (the format of coreutils' ``sha256sum``, so
  ``sha256sum -c SHA256SUMS`` checks a folder by hand).  A loader verifies a file
  against it before use, so flipped bytes or a truncated file anywhere, header
  or tensor data, give a one-line error instead of silently wrong weights.
  The manifest lists the files that are loaded (config, weights, training state),
  not the model card ``README.md``, which stays editable.  A folder without the
  manifest (made by hand, converted from another tool, or written by an older
  condiff) still loads, with an :class:`UnverifiedWarning` that names it and says
  how to write one; its config, weight names, shapes and dtypes are still checked.
* ``--trust-pickle`` (``trust_pickle=True``) lets a ``.pt``/``.pth``/``.bin``/``.ckpt``
  *state dict* stand in for ``model.safetensors``, next to a ``config.json``.  It is
  read with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which
  rebuilds tensors and plain containers only and refuses any other object, so no
  code from the file runs.  Full unpickling is never done, flag or not.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import torch

from .atomic import atomic_write_text
from .errors import CondiffError

MANIFEST = "SHA256SUMS"
UNLISTED = {"README.md"}  # model cards: documentation, edited freely, never loaded
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](\S.*)$")

__all__ = ["MANIFEST", "UnverifiedWarning", "write_manifest", "verify_file", "verify_folder", "sha256_file",
           "weights_file", "load_pickle_weights", "sniff_format"]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class UnverifiedWarning(UserWarning, CondiffError):
    """A model folder without SHA256SUMS was loaded: nothing could check its bytes.

    Its message starts "unverified weights:".  It is also a :class:`CondiffError`, so a
    warnings filter that turns it into an error (``python -W "error:unverified weights" -m condiff ...``,
    or ``warnings.simplefilter("error", UnverifiedWarning)``) gives the CLI's one-line error.
    """


def _listable(folder: Path) -> list[Path]:
    """The files a manifest of ``folder`` lists: regular, not hidden, not the manifest, not a model card."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and p.name not in UNLISTED
                  and not p.name.startswith("."))


def write_manifest(folder: str | Path) -> Path:
    """Write ``folder/SHA256SUMS`` for every regular file in ``folder`` but README.md (fsynced)."""
    folder = Path(folder)
    files = _listable(folder)
    atomic_write_text(folder / MANIFEST, "".join(f"{sha256_file(p)}  {p.name}\n" for p in files))
    return folder / MANIFEST


def _read_manifest(folder: Path) -> dict[str, str] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise CondiffError(f"{path} is unreadable or corrupt ({type(e).__name__})") from None
    if not text.endswith("\n"):
        raise CondiffError(f"{path} is corrupt or truncated (no final newline)")
    sums = {}
    for line in text[:-1].split("\n"):
        m = _LINE.match(line)
        if not m or m.group(2) in sums:
            raise CondiffError(f"{path} is corrupt (bad line {line[:40]!r})")
        sums[m.group(2)] = m.group(1)
    return sums


_VERIFIED: dict[tuple, bool] = {}  # folders already checked, keyed by the stat of their files


def _signature(folder: Path) -> tuple:
    try:
        return tuple(sorted((p.name, st.st_size, st.st_mtime_ns, st.st_ino) for p in folder.iterdir()
                            if p.is_file() and (st := p.stat())))
    except OSError:
        return ()


def verify_folder(folder: str | Path) -> bool:
    """Check every file listed in ``folder/SHA256SUMS``: True when verified, False (with a warning) without one.

    The whole folder is checked at once so that damage anywhere (the manifest
    included) is found, whichever file a command reads; a folder whose files are
    unchanged since its last check is not hashed again (nor warned about twice).
    """
    folder = Path(folder)
    sig = _signature(folder)
    key = (folder.resolve(), sig)
    if key in _VERIFIED:
        return _VERIFIED[key]
    sums = _read_manifest(folder)
    if sums is None:
        warnings.warn(f"unverified weights: {folder} has no {MANIFEST}, so nothing checks its bytes (a damaged "
                      f"copy would go unnoticed); if its files are as intended, write one: cd {folder} && sha256sum "
                      f"{' '.join(p.name for p in _listable(folder))} > {MANIFEST}", UnverifiedWarning, stacklevel=2)
        _VERIFIED[key] = False
        return False
    for name, digest in sums.items():
        path = folder / name
        if "/" in name or not path.is_file():
            raise CondiffError(f"{path} is missing (listed in {MANIFEST}): the checkpoint is corrupt or incomplete")
        if sha256_file(path) != digest:
            raise CondiffError(f"{path} is corrupt or truncated: its SHA-256 does not match {MANIFEST} "
                               f"({path.stat().st_size} bytes; if you edited it on purpose, write {MANIFEST} again)")
    _VERIFIED[key] = True
    return True


def verify_file(path: str | Path) -> None:
    """Check ``path`` and the rest of its folder against the folder's SHA256SUMS (if any)."""
    path = Path(path)
    verify_folder(path.parent)
    sums = _read_manifest(path.parent)
    if sums is not None and path.name not in sums:
        raise CondiffError(f"{path.parent / MANIFEST} is corrupt or stale: it does not list {path.name}")


def sniff_format(path: str | Path) -> str | None:
    """'pickle' when a file looks like torch.save / pickle output, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
                                           and head[2:3] in (b"\x8a", b"\x95", b"}", b"c", b"]", b"q")):
        return "pickle"
    return None


def _refuse(path: Path) -> CondiffError:
    return CondiffError(f"{path}: refusing to load a pickle-based file (it can run code); convert it to "
                        "safetensors, or pass --trust-pickle to read it as a plain state dict "
                        "(torch.load weights_only, never full unpickling)")


def weights_file(given: str | Path, ckpt: Path, trust_pickle: bool = False) -> Path:
    """The weights file to load for ``given`` (what the user passed) resolved to folder ``ckpt``."""
    given = Path(given)
    if given.is_file():
        if given.suffix.lower() in PICKLE_SUFFIXES and not trust_pickle:
            raise _refuse(given)
        return given
    st = ckpt / "model.safetensors"
    if st.is_file():
        return st
    pickles = sorted(p for p in ckpt.glob("model.*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        if not trust_pickle:
            raise _refuse(pickles[0])
        return pickles[0]
    raise CondiffError(f"{st} is missing")


def load_pickle_weights(path: str | Path) -> dict:
    """A state dict (name -> tensor) from a torch.save file, via the weights-only unpickler.

    Accepts a flat ``{name: tensor}`` dict or one nested under ``"state_dict"``;
    anything needing another class (a pickled module, an optimizer, arbitrary
    objects) is refused with a one-line error and nothing from it runs.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zip errors, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CondiffError(f"{path}: not a plain state dict of tensors, refused ({type(e).__name__}: {first})") \
            from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise CondiffError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj
