"""``condiff demo``: every guidance method side by side, on the shipped models.

Writes a folder of grids (one row per class or prompt) plus ``index.html`` and
``report.md`` that label each grid with its method and scale.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import atomic_write_text
from .guidance import ClassifierTerm
from .images import save_grid
from .pipeline import generate, guided_model, load_classifier, load_diffusion

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """What the demo samples; the defaults fit in about a minute on 2 CPU cores."""

    diffusion: str | Path
    classifier: str | Path | None = None
    classes: tuple[int, ...] | None = None  # default: T-shirt, trouser, sneaker, bag, ankle boot
    per_class: int = 6
    steps: int = 25
    cfg_ws: tuple[float, ...] = (0.0, 1.0, 3.0)
    classifier_scales: tuple[float, ...] = (0.0, 2.0, 5.0, 10.0)
    seed: int = 0
    device: str | torch.device = "cpu"
    extra_sections: list[Callable] = field(default_factory=list)


def _section(out: Path, rows: list, name: str, title: str, method: str, scale, x: torch.Tensor, row_labels,
             ncol: int, seconds: float) -> None:
    path = save_grid(x, out / f"{name}.png", nrow=ncol, upscale=3)
    rows.append({"file": path.name, "title": title, "method": method, "scale": scale, "rows": list(row_labels),
                 "seconds": round(seconds, 1)})


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True) -> Path:
    """Sample every section of the demo into ``out``; returns the index.html path."""
    out = Path(out)
    model, schedule, config = load_diffusion(cfg.diffusion, cfg.device)
    clf = load_classifier(cfg.classifier, cfg.device)[0] if cfg.classifier is not None else None
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a failed demo writes nothing
    names = config.get("class_names") or [str(i) for i in range(model.num_classes or 0)]
    shape = tuple(config["image_shape"])
    classes = cfg.classes or ((0, 1, 7, 8, 9) if len(names) >= 10 else tuple(range(min(len(names), 5))))
    y = torch.tensor([c for c in classes for _ in range(cfg.per_class)])
    labels = [names[c] for c in classes]
    n, rows = len(y), []

    def run(eps, cond=None, shift=None):
        t0 = time.time()
        x = generate(eps, schedule, n, shape=shape, cond=cond, steps=cfg.steps, seed=cfg.seed, batch_size=n,
                     device=cfg.device, mean_shift=shift)
        return x, time.time() - t0

    eps, _ = guided_model(model, schedule, unconditional=True)
    x, dt = run(eps)
    _section(out, rows, "unguided", "Unguided (null branch)", "none", 0, x, ["(any)"] * len(classes),
             cfg.per_class, dt)
    for w in cfg.cfg_ws:
        eps, _ = guided_model(model, schedule, cfg_w=w)
        x, dt = run(eps, cond=y)
        _section(out, rows, f"cfg-w{w:g}", f"Classifier-free guidance, w = {w:g} (s = {1 + w:g})",
                 "classifier-free (eq 24)", w, x, labels, cfg.per_class, dt)
    if clf is not None:
        for gamma in cfg.classifier_scales:
            eps, _ = guided_model(model, schedule, unconditional=True, terms=[ClassifierTerm(clf, y, gamma)])
            x, dt = run(eps)
            _section(out, rows, f"classifier-g{gamma:g}", f"Classifier guidance, gamma = {gamma:g}",
                     "classifier (eqs 8, 19)", gamma, x, labels, cfg.per_class, dt)
    for extra in cfg.extra_sections:
        for sec in extra(model, schedule, cfg):
            _section(out, rows, **sec)
    return _write_index(out, rows)


def _write_index(out: Path, rows: list) -> Path:
    md = ["# condiff demo", "", "| grid | method | scale | rows | seconds |", "|---|---|---|---|---|"]
    body = []
    for r in rows:
        md.append(f"| ![{r['title']}]({r['file']}) | {r['method']} | {r['scale']} | {', '.join(r['rows'])} | "
                  f"{r['seconds']} |")
        body.append(f"<figure><img src='{html.escape(r['file'])}' alt='{html.escape(r['title'])}'>"
                    f"<figcaption><b>{html.escape(r['title'])}</b><br>method: {html.escape(r['method'])}, "
                    f"scale: {html.escape(str(r['scale']))}<br>rows: {html.escape(', '.join(r['rows']))}"
                    f"</figcaption></figure>")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>condiff demo</title><style>"
            "body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;vertical-align:top}"
            "img{image-rendering:pixelated;border:1px solid #ccc}</style></head><body>"
            "<h1>condiff demo</h1><p>Each grid has one row per class or prompt; the same seed in every grid.</p>"
            + "".join(body) + "</body></html>\n")
    atomic_write_text(out / "index.html", page)
    return out / "index.html"
