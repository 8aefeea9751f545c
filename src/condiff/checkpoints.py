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
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_text, fsync_dir, fsync_file, replace_dir
from .errors import CondiffError
from .integrity import PICKLE_SUFFIXES, sniff_format, verify_file, weights_file, write_manifest
from .packaged import SHIPPED, shipped_folder

FORMAT = "condiff-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "resolve_checkpoint", "latest_checkpoint",
           "load_latest_checkpoint", "read_config", "check_config", "check_weights", "load_state_strict",
           "load_tensors", "atomic_path", "atomic_write_text"]  # the last two live in condiff.atomic


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
    fsync_file(tmp / "model.safetensors")
    if optimizer is not None:
        tensors = {f"model.{k}": v for k, v in raw.items()}
        opt_t, opt_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_t)
        for name, state in (rng or {}).items():
            tensors[f"rng.{name}"] = state.cpu().contiguous()
        save_file(tensors, str(tmp / "training.safetensors"), metadata={"format": FORMAT})
        fsync_file(tmp / "training.safetensors")
        atomic_write_text(tmp / "training.json", json.dumps({"step": step, "optimizer": opt_meta,
                                                            "extra": extra or {}}, indent=1))
    write_manifest(tmp)  # SHA256SUMS: loaders detect flipped or missing bytes
    fsync_dir(tmp)
    replace_dir(tmp, path)
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
    """A checkpoint folder from a folder, a run folder (its latest checkpoint) or a .safetensors file; a name
    that is no path but a shipped model's folder name (``fashion-text-cfg``, :data:`condiff.zoo.SHIPPED`) is
    that shipped model."""
    path = Path(path)
    if not path.exists():
        found = shipped_folder(str(path))
        if found is not None:
            return found
        raise CondiffError(f"checkpoint not found: {path} (a folder, a run folder, a .safetensors file or a "
                           f"shipped model's name: {', '.join(SHIPPED.values())})")
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
    check_config(config, f"{ckpt}/config.json")
    return config


def check_config(config: dict, where: str = "config") -> None:
    """Check a checkpoint config's values and their consistency before anything is built.

    The network's sizes are bounded (:func:`condiff.nets.check_config`); ``image_shape``
    must be the [C, H, W] the network takes; the schedule must have a known name and
    1 to MAX_T steps.  Each problem is a one-line :class:`CondiffError` naming ``where``.
    """
    from .nets import check_config as check_network
    from .validation import MAX_T

    try:
        check_network(config.get("network"))
    except CondiffError as e:
        raise CondiffError(f"{where}: {e}") from None
    net = config["network"]
    shape = config.get("image_shape")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) != 3 or any(type(v) is not int or v < 1 for v in shape):
            raise CondiffError(f"{where}: image_shape must be [C, H, W] (positive integers), got {shape!r}"[:300])
        size = net.get("image_size", 28)  # 1 channel, 28 pixels: every network kind's defaults
        want = [net.get("in_channels", 1), size, size]
        if shape != want:
            raise CondiffError(f"{where}: image_shape {shape} does not match the network, which takes "
                               f"{want} (in_channels {want[0]}, image_size {want[1]})")
    sc = config.get("schedule")
    if sc is not None:
        T = sc.get("T", 1000) if isinstance(sc, dict) else None
        if not isinstance(sc, dict) or sc.get("name", "cosine") not in ("cosine", "linear") \
                or type(T) is not int or not 1 <= T <= MAX_T:
            raise CondiffError(f"{where}: schedule must name cosine or linear with T in [1, {MAX_T}], "
                               f"got {sc!r}"[:300])


def load_tensors(path: str | Path) -> dict:
    """A safetensors file's tensors, after checking its folder's SHA256SUMS; one-line error if corrupt."""
    path = Path(path)
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


def check_weights(model: torch.nn.Module, weights: dict, where: str) -> None:
    """Every name, shape and kind of dtype of ``weights`` must be the model's; the error names the mismatch.

    ``model`` may live on the meta device (``nets.build(config, "meta")``): the check then
    costs no memory, so weights are matched to a config before the network is built.
    A float tensor given as an integer (or bool) one, or the reverse, is refused:
    copying it would silently change its values.
    """
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
        got = weights[k].dtype
        if (got.is_floating_point != v.dtype.is_floating_point or got.is_complex
                or (got == torch.bool) != (v.dtype == torch.bool)):
            raise CondiffError(f"{where}: weight {k} is {str(got).replace('torch.', '')}, the network expects "
                               f"{str(v.dtype).replace('torch.', '')}")


def load_state_strict(model: torch.nn.Module, weights: dict, where: str) -> None:
    """Load weights after :func:`check_weights`; the error names the mismatch."""
    check_weights(model, weights, where)
    model.load_state_dict(weights)


def load_model(path: str | Path, device="cpu", trust_pickle: bool = False):
    """Rebuild a network from a checkpoint; returns (model in eval mode, config).

    Order: checksums and config values first, then the weights against a meta-device
    layout of the config (names, shapes, dtypes), and only then the network is built.
    """
    from .nets import build

    ckpt = resolve_checkpoint(path, trust_pickle)
    config = read_config(ckpt)  # verified against SHA256SUMS, values checked
    wfile = weights_file(path, ckpt, trust_pickle)
    if wfile.suffix.lower() in PICKLE_SUFFIXES:
        from .integrity import load_pickle_weights

        weights = load_pickle_weights(wfile)
    else:
        weights = load_tensors(wfile)
    check_weights(build(config["network"], "meta"), weights, str(wfile))
    model = build(config["network"])
    model.load_state_dict(weights)
    return model.to(device).eval(), config


def load_checkpoint(ckpt: str | Path) -> dict:
    """Everything needed to resume: config, weights, raw weights, optimizer state, RNG, step."""
    ckpt = Path(ckpt)
    config = read_config(ckpt)
    weights = load_tensors(ckpt / "model.safetensors")
    out = {"config": config, "weights": weights, "path": ckpt}
    if (ckpt / "training.safetensors").is_file():
        tensors = load_tensors(ckpt / "training.safetensors")
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
