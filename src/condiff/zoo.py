"""Models that ship inside the package, and exporting a trained run as one.

A shipped model is a folder ``condiff/models/NAME`` holding ``config.json``,
``model.safetensors`` (inference weights) and ``README.md`` (its model card).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from safetensors.torch import load_file

from .checkpoints import atomic_write_text, read_config, resolve_checkpoint
from .errors import CondiffError

# role -> folder name under condiff/models
SHIPPED = {
    "diffusion": "fashion-cfg",
    "classifier": "fashion-classifier",
    "image-encoder": "fashion-image-encoder",
    "text-encoder": "fashion-text-encoder",
    "judge": "fashion-judge",
}

__all__ = ["SHIPPED", "models_dir", "shipped", "export_model"]


def models_dir() -> Path:
    return Path(str(resources.files("condiff"))) / "models"


def shipped(role: str) -> Path:
    """Folder of the shipped model for ``role`` (see SHIPPED); one-line error if absent."""
    if role not in SHIPPED:
        raise CondiffError(f"unknown shipped model {role!r} (known: {', '.join(SHIPPED)})")
    path = models_dir() / SHIPPED[role]
    if not (path / "model.safetensors").is_file():
        raise CondiffError(f"the shipped {role} model is not installed ({path}); "
                           "pass a checkpoint explicitly or train it with scripts/train_shipped.sh")
    return path


def _last_log(run: Path) -> dict:
    log = run / "metrics.jsonl"
    if not log.is_file():
        return {}
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def export_model(run: str | Path, dest: str | Path, *, command: str = "", metrics: dict | None = None,
                 data: str = "Fashion-MNIST train split (60,000 images)") -> Path:
    """Copy a run's newest inference weights + config to ``dest`` and write its model card."""
    run = Path(run)
    ckpt = resolve_checkpoint(run)
    config = read_config(ckpt)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copyfile(ckpt / "model.safetensors", tmp / "model.safetensors")
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
    params = sum(v.numel() for v in load_file(str(tmp / "model.safetensors")).values())
    lines = [f"# {dest.name}", "",
             f"Task: **{config.get('task')}**. Network: `{json.dumps(config['network'])}` ({params / 1e6:.2f}M parameters).",
             "", f"Data: {data}.", "",
             "## Training", "",
             f"- steps: {last.get('step', train.get('steps'))}, batch size {train.get('batch_size')}, "
             f"lr {train.get('lr')} (warm-up {train.get('warmup')}), EMA decay {train.get('ema_decay')}, "
             f"seed {train.get('seed')}",
             f"- wall time: {metrics.pop('wall time', wall)} on the machine that trained it",
             f"- final training loss: {last.get('loss', 'unknown')}"]
    if config.get("p_uncond") is not None:
        lines.append(f"- condition dropout p_uncond: {config['p_uncond']}")
    if config.get("schedule"):
        lines.append(f"- schedule: {config['schedule']}")
    if command:
        lines += ["", "Command:", "", "```bash", command, "```"]
    if metrics:
        lines += ["", "## Measured", ""] + [f"- {k}: {v}" for k, v in metrics.items()]
    atomic_write_text(tmp / "README.md", "\n".join(lines) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest

