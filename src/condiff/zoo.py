"""Models that ship inside the package, and exporting a trained run as one.

A shipped model is a folder ``condiff/models/NAME`` holding ``config.json``,
``model.safetensors`` (inference weights), ``README.md`` (its model card) and
``SHA256SUMS`` (checked on every load).  :func:`export_model` writes such a folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .atomic import atomic_write_text, fsync_dir, replace_dir
from .checkpoints import load_tensors, check_weights, read_config, resolve_checkpoint
from .errors import CondiffError
from .integrity import MANIFEST, sha256_file, write_manifest
from .packaged import SHIPPED, models_dir  # noqa: F401 (part of this module's interface)
from .prediction import prediction_of

EXPORT_FILES = ("config.json", "model.safetensors", "README.md", MANIFEST)  # all an export folder holds

__all__ = ["SHIPPED", "EXPORT_FILES", "models_dir", "shipped", "references", "reference", "image_path",
           "export_model", "check_export_dest"]


def shipped(role: str) -> Path:
    """Folder of the shipped model for ``role`` (see SHIPPED); one-line error if absent."""
    if role not in SHIPPED:
        raise CondiffError(f"unknown shipped model {role!r} (known: {', '.join(SHIPPED)})")
    path = models_dir() / SHIPPED[role]
    if not (path / "model.safetensors").is_file():
        raise CondiffError(f"the shipped {role} model is not installed ({path}); "
                           "pass a checkpoint explicitly or train it with scripts/train_shipped.sh")
    return path


def references() -> dict[str, Path]:
    """The reference images shipped with the package (Fashion-MNIST-like 28x28 PNGs): name -> path."""
    return {p.stem: p for p in sorted((models_dir() / "references").glob("*.png"))}


def reference(name: str) -> Path:
    """The path of the shipped reference image ``name`` (e.g. "stripes", "sneaker", "dress").

    Load it with :func:`condiff.images.load_image`; one-line error naming the shipped ones otherwise.
    """
    found = references()
    if name not in found:
        raise CondiffError(f"no shipped reference image {name!r} (shipped: {', '.join(found) or 'none'})")
    return found[name]


def image_path(spec: str | Path) -> Path:
    """An image file path, or the name of a shipped reference (``--style stripes``): the file to read.

    A file that exists wins over a shipped name; neither is a one-line error naming the shipped ones.
    """
    path = Path(spec)
    if path.is_file():
        return path
    found = references()
    if str(spec) in found:
        return found[str(spec)]
    raise CondiffError(f"image not found: {spec} (a file, or a shipped reference: {', '.join(found) or 'none'})")


def _last_log(run: Path) -> dict:
    log = run / "metrics.jsonl"
    if not log.is_file():
        return {}
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_dest(dest: str | Path, sources=()) -> Path:
    """``dest`` if an export may be written there: new, empty, or an earlier export; never in a source.

    Replacing ``dest`` must destroy nothing but an earlier export, so a folder that
    holds anything an export does not (see EXPORT_FILES) is refused, and so is a
    destination that is, lies inside, or contains one of ``sources`` (the run and
    checkpoint folders being exported).  One-line :class:`CondiffError` otherwise.
    """
    dest = Path(dest)
    where = dest.resolve()
    sources = sorted({Path(src).resolve() for src in sources}, key=lambda p: len(p.parts))  # the run first
    for src in sources:
        if _inside(where, src):
            raise CondiffError(f"export destination {dest} is inside the source {src}; export to a folder "
                               "outside the run (nothing was written)")
    for src in sources:
        if _inside(src, where):
            raise CondiffError(f"export destination {dest} contains the source {src}; export to a folder "
                               "outside the run (nothing was written)")
    if dest.exists() and not dest.is_dir():
        raise CondiffError(f"export destination {dest} is a file, not a folder")
    if dest.is_dir():
        entries = sorted(dest.iterdir())
        foreign = [p.name for p in entries if p.name not in EXPORT_FILES or not p.is_file()]
        earlier = (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()
        if entries and (foreign or not earlier):
            held = ", ".join(foreign[:3] or [p.name for p in entries[:3]]) + (", ..." if len(entries) > 3 else "")
            raise CondiffError(f"export destination {dest} is not empty and is not an earlier export (it holds "
                               f"{held}); export into a new or empty folder")
    return dest


def export_model(run: str | Path, dest: str | Path, *, command: str = "", metrics: dict | None = None,
                 data: str = "Fashion-MNIST train split (60,000 images)") -> Path:
    """Copy a run's newest inference weights + config to ``dest`` with a model card and SHA256SUMS.

    ``run`` is a run folder, a checkpoint folder or its ``.safetensors`` file; it is
    only read.  ``dest`` must be new, empty or an earlier export (:func:`check_export_dest`);
    the new folder is assembled beside it and swapped in whole, so ``dest`` is at every
    moment the complete old export or the complete new one.
    """
    run = Path(run)
    ckpt = resolve_checkpoint(run)
    sources = {run if run.is_dir() else run.parent, ckpt}
    if ckpt.parent.name == "checkpoints":  # a step-N folder: protect its whole run
        sources.add(ckpt.parent.parent)
    dest = check_export_dest(dest, sources)
    config = read_config(ckpt)  # verified against its SHA256SUMS, values checked
    from .nets import build

    weights = load_tensors(ckpt / "model.safetensors")
    check_weights(build(config["network"], "meta"), weights, str(ckpt / "model.safetensors"))
    params = sum(v.numel() for v in weights.values())
    del weights
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_export(tmp, ckpt, run, config, params, dest.name, command, metrics, data)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when the export failed
    return dest


def _write_export(tmp: Path, ckpt: Path, run: Path, config: dict, params: int, name: str, command: str,
                  metrics: dict | None, data: str) -> None:
    """Fill ``tmp`` with the weights, config, model card and SHA256SUMS of an export."""
    shutil.copyfile(ckpt / "model.safetensors", tmp / "model.safetensors")
    if sha256_file(tmp / "model.safetensors") != sha256_file(ckpt / "model.safetensors"):
        raise CondiffError(f"copying {ckpt / 'model.safetensors'} gave different bytes (a failing disk?)")
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True))
    run = run if (run / "metrics.jsonl").is_file() else ckpt.parent.parent
    last = _last_log(run)
    metrics = dict(metrics or {})
    if (run / "judge.json").is_file():  # condiff train-judge's held-out evaluation
        judge = json.loads((run / "judge.json").read_text())
        if "test_accuracy" in judge:
            metrics.setdefault("test accuracy (held-out split)", round(float(judge["test_accuracy"]), 4))
    wall = f"{last.get('wall_s', 'unknown')} s"
    clean = _last_log(run / "clean")  # an image encoder's first stage (E2 on clean images)
    if clean.get("wall_s") is not None:
        wall += f" (E1 stage) + {clean['wall_s']} s (E2 stage, {clean.get('step')} steps)"
    train = config.get("train", {})
    lines = [f"# {name}", "",
             f"Task: **{config.get('task')}**. Network: `{json.dumps(config['network'])}` ({params / 1e6:.2f}M parameters).",
             "", f"Data: {data}.", "",
             "## Training", "",
             f"- steps: {last.get('step', train.get('steps'))}, batch size {train.get('batch_size')}, "
             f"lr {train.get('lr')} (warm-up {train.get('warmup')}), EMA decay {train.get('ema_decay')}, "
             f"seed {train.get('seed')}",
             f"- wall time: {metrics.pop('wall time', wall)} on the machine that trained it",
             f"- final training loss: {last.get('loss', 'unknown')}"]
    if prediction_of(config) != "eps":
        lines.append(f"- prediction target: {prediction_of(config)} (converted to eps when loaded: condiff.prediction)")
    if config.get("p_uncond") is not None:
        lines.append(f"- condition dropout p_uncond: {config['p_uncond']}")
    if config.get("schedule"):
        lines.append(f"- schedule: {config['schedule']}")
    if command:
        lines += ["", "Command:", "", "```bash", command, "```"]
    if metrics:
        lines += ["", "## Measured", ""] + [f"- {k}: {v}" for k, v in metrics.items()]
    atomic_write_text(tmp / "README.md", "\n".join(lines) + "\n")
    write_manifest(tmp)  # config.json and model.safetensors; the model card stays editable
    fsync_dir(tmp)
