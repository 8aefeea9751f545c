"""Checkpoints: safetensors weights + a JSON config, written crash-safely.

A checkpoint is a folder::

    config.json           what the network is, its schedule, task and class names
    model.safetensors     inference weights (the EMA weights when training kept one)
    training.safetensors  (training checkpoints only) raw weights, optimizer and RNG state
    training.json         (training checkpoints only) step, optimizer hyperparameters

Folders are written under a temporary name, fsynced, then renamed, so a kill at
any moment leaves the newest *complete* checkpoint loadable.  Nothing is ever
unpickled unless the caller passes ``trust_pickle=True`` explicitly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CondiffError
from .integrity import sniff_format, verify_file, weights_file, write_manifest

FORMAT = "condiff-checkpoint"
VERSION = 1
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
_STEP_DIR = re.compile(r"^step-(\d+)$")

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "resolve_checkpoint", "latest_checkpoint",
           "load_latest_checkpoint", "read_config", "atomic_write_text"]


def _fsync_dir(path: Path) -> None:
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


def _fsync_file(path: Path) -> None:
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


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict, *, ema: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, step: int | None = None,
                    rng: dict | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint folder atomically.

    Args:
        path: destination folder (replaced if it exists).
        model: the network; its raw weights go to training.safetensors when
            ``optimizer`` is given, and to model.safetensors unless ``ema`` is given.
        config: JSON-able dict; must hold ``network`` (the model's config).
        ema: EMA weights (name -> tensor) saved as the inference weights.
        optimizer, step, rng (name -> ByteTensor), extra: resume state.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    raw = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = {k: v.detach().cpu().contiguous() for k, v in ema.items()} if ema is not None else raw
    full = dict(config, format=FORMAT, version=VERSION)
    atomic_write_text(tmp / "config.json", json.dumps(full, indent=2, sort_keys=True))
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    _fsync_file(tmp / "model.safetensors")
    if optimizer is not None:
        tensors = {f"model.{k}": v for k, v in raw.items()}
        opt_t, opt_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_t)
        for name, state in (rng or {}).items():
            tensors[f"rng.{name}"] = state.cpu().contiguous()
        save_file(tensors, str(tmp / "training.safetensors"), metadata={"format": FORMAT})
        _fsync_file(tmp / "training.safetensors")
        atomic_write_text(tmp / "training.json", json.dumps({"step": step, "optimizer": opt_meta,
                                                            "extra": extra or {}}, indent=1))
    write_manifest(tmp)  # SHA256SUMS: loaders detect flipped or missing bytes
    _fsync_dir(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _check_not_pickle(path: Path, trust_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not trust_pickle:
        raise CondiffError(f"{path}: refusing to load a pickle-based file (it can run code); "
                           "convert it to safetensors, or pass --trust-pickle if you trust its source")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete ``step-N`` folder under ``run_dir/checkpoints``, or None."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return None
    found = []
    for p in ckdir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def resolve_checkpoint(path: str | Path, trust_pickle: bool = False) -> Path:
    """A checkpoint folder from a folder, a run folder (its latest checkpoint) or a .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise CondiffError(f"checkpoint not found: {path}")
    _check_not_pickle(path, trust_pickle)
    if path.is_file():
        if path.suffix != ".safetensors" and not (trust_pickle and path.suffix.lower() in PICKLE_SUFFIXES):
            raise CondiffError(f"{path}: not a checkpoint (expected a folder or a .safetensors file)")
        return path.parent
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CondiffError(f"{path}: no checkpoint here (no config.json, no checkpoints/step-N)")
    return latest


def read_config(ckpt: str | Path) -> dict:
    """The parsed config.json of a checkpoint folder, validated."""
    ckpt = Path(ckpt)
    try:
        verify_file(ckpt / "config.json")
        config = json.loads((ckpt / "config.json").read_text())
    except FileNotFoundError:
        raise CondiffError(f"{ckpt}: config.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CondiffError(f"{ckpt}/config.json is corrupt: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("network"), dict):
        raise CondiffError(f"{ckpt}/config.json has no 'network' section")
    return config


def _load_tensors(path: Path) -> dict:
    if not path.is_file():
        raise CondiffError(f"{path} is missing")
    verify_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if sniff_format(path) == "pickle":
            msg += "; it looks like a pickle-based torch.save file, not safetensors"
        raise CondiffError(f"{path} is corrupt or truncated ({msg})") from None


def load_state_strict(model: torch.nn.Module, weights: dict, where: str) -> None:
    """Load weights after checking every name and shape; the error names the mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CondiffError(f"{where}: weights do not match the config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise CondiffError(f"{where}: weight {k} has shape {tuple(weights[k].shape)}, "
                               f"config expects {tuple(v.shape)}")
    model.load_state_dict(weights)


def load_model(path: str | Path, device="cpu", trust_pickle: bool = False):
    """Rebuild a network from a checkpoint; returns (model in eval mode, config)."""
    from .nets import build

    ckpt = resolve_checkpoint(path, trust_pickle)
    config = read_config(ckpt)
    model = build(config["network"])
    wfile = weights_file(path, ckpt, trust_pickle)
    if wfile.suffix.lower() in PICKLE_SUFFIXES:
        from .integrity import load_pickle_weights

        weights = load_pickle_weights(wfile)
    else:
        weights = _load_tensors(wfile)
    load_state_strict(model, weights, str(wfile))
    return model.to(device).eval(), config


def load_checkpoint(ckpt: str | Path) -> dict:
    """Everything needed to resume: config, weights, raw weights, optimizer state, RNG, step."""
    ckpt = Path(ckpt)
    config = read_config(ckpt)
    weights = _load_tensors(ckpt / "model.safetensors")
    out = {"config": config, "weights": weights, "path": ckpt}
    if (ckpt / "training.safetensors").is_file():
        tensors = _load_tensors(ckpt / "training.safetensors")
        try:
            verify_file(ckpt / "training.json")
            meta = json.loads((ckpt / "training.json").read_text())
            out["optimizer"] = _unflatten_optimizer(tensors, meta["optimizer"])
            out["step"] = int(meta["step"])
            out["extra"] = meta.get("extra", {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CondiffError(f"{ckpt}/training.json is missing or corrupt: {e}") from None
        out["raw"] = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        out["rng"] = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return out


def load_latest_checkpoint(run_dir: str | Path) -> tuple[Path | None, dict | None]:
    """The newest *loadable* checkpoint of a run for resuming: (folder, load_checkpoint(folder)).

    A newest checkpoint that fails its checks (a bad disk, bytes changed after the
    write) is skipped with a warning, so at most the steps since the one before
    it are lost; (None, None) when the run has no checkpoint; an error when none loads.
    """
    import warnings

    ckdir = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in (ckdir.iterdir() if ckdir.is_dir() else ())
                   if (m := _STEP_DIR.match(p.name)) and (p / "config.json").is_file()
                   and (p / "model.safetensors").is_file())
    errors = []
    for _, p in reversed(found):
        try:
            return p, load_checkpoint(p)
        except CondiffError as e:
            errors.append(str(e))
            warnings.warn(f"skipping unreadable checkpoint {p.name}: {e}")
    if errors:
        raise CondiffError(f"{run_dir}: no checkpoint can be loaded ({errors[0]}); use another --out "
                           "or --no-resume")
    return None, None
