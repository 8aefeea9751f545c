"""``condiff demo``: every guidance method side by side, on the shipped models.

Writes a folder of grids (one row per class or prompt) plus ``index.html`` and
``report.md`` that label each grid with its method and scale.
"""

from __future__ import annotations

import html
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import atomic_write_text
from .errors import CondiffError
from .compose import (AUTO, AUTO_SAMPLERS, DEFAULT_SAMPLER, DEFAULT_SCALES, DEFAULT_SPACING, DEFAULT_STEPS, Guidance,
                      Sampling, compose,
                      saturation_warning, solver_options)
from .guidance import ClassifierTerm
from .images import save_grid
from .pipeline import generate, load_classifier, load_diffusion

__all__ = ["DemoConfig", "run_demo", "MEASURED"]

#: Judge accuracy measured with the shipped models (docs/results.md: 1000 samples per scale, DDIM-25,
#: eta 0 for cfg / classifier and eta 1 for text / image): (method, scale) -> accuracy.  The demo page
#: shows it next to each grid of the shipped eps-model.
MEASURED = {("cfg", 0.0): 0.874, ("cfg", 0.5): 0.961, ("cfg", 0.75): 0.970, ("cfg", 1.0): 0.978,
            ("cfg", 1.5): 0.990, ("cfg", 2.0): 0.995,
            ("classifier", 0.0): 0.093, ("classifier", 4.0): 0.831, ("classifier", 16.0): 0.917,
            ("classifier", 32.0): 0.926, ("classifier", 64.0): 0.938, ("text", 0.0): 0.093, ("text", 100.0): 0.967,
            ("image", 0.0): 0.093, ("image", 30.0): 0.901, ("image", 100.0): 0.936, ("text-cfg", 2.0): 0.993}
#: Where MEASURED's numbers of a method come from, when not docs/results.md.
MEASURED_SOURCES = {"text-cfg": "eta 1, prompts in training phrasings, docs/text-to-image.md"}
#: What was measured where accuracy does not apply (docs/similarity.md, style guidance; 64 samples).
MEASURED_NOTES = {("style", 10.0): "no visible stripes: Gram distance to the style image in the judge's features "
                                   "3.21 -> 3.02, stripe energy unchanged (docs/similarity.md)"}


@dataclass
class DemoConfig:
    """What the demo samples; the defaults fit in about a minute on 2 CPU cores."""

    diffusion: str | Path
    classifier: str | Path | None = None
    classes: tuple[int, ...] | None = None  # default: T-shirt, trouser, sneaker, bag, ankle boot
    per_class: int = 6
    steps: int = DEFAULT_STEPS
    cfg_ws: tuple[float, ...] = (0.0, DEFAULT_SCALES["cfg"], 2.0)
    classifier_scales: tuple[float, ...] = (0.0, 4.0, DEFAULT_SCALES["classifier"])
    seed: int = 0
    device: str | torch.device = "cpu"
    # similarity guidance (eqs 11-15), on the null branch; sampled with DDIM eta = sim_eta
    text_encoder: str | Path | None = None
    image_encoder: str | Path | None = None
    prompts: tuple[str, ...] = ("something to wear on your feet", "a warm top for winter",
                                "a bag to carry things", "long pants")  # none is a training caption
    references: tuple[str | Path, ...] = ()  # reference images, one grid row each; default: the shipped ones
    style: str | Path | None = None  # style image; default: the shipped striped pullover
    style_classes: tuple[int, ...] = (0, 2, 3)  # CFG rows that the style is applied to
    sim_eta: float = 1.0  # a stochastic sampler steers better with gradient guidance (docs/similarity.md)
    sampler: str = DEFAULT_SAMPLER  # the solver of every grid; the similarity grids add eta = sim_eta when it takes eta
    spacing: str = DEFAULT_SPACING
    threshold: float | None = None
    # text to image by classifier-free guidance (eq 24) on a caption-conditional eps-model (condiff.text_cfg)
    text_diffusion: str | Path | None = None
    text_cfg_prompts: tuple[str, ...] = ("a dark patterned dress", "a light plain dress", "a wide dark coat",
                                         "a slim light coat")  # attributes beyond the class: pairs that differ
    text_cfg_ws: tuple[float, ...] = (0.0, DEFAULT_SCALES["text-cfg"])
    log: Callable[[str], None] | None = None  # warnings (saturated grids) go here
    extra_sections: list[Callable] = field(default_factory=list)


def _section(out: Path, rows: list, name: str, title: str, method: str, scale, x: torch.Tensor, row_labels,
             ncol: int, seconds: float, solver: str = "", command: str = "", measured: str = "") -> None:
    path = save_grid(x, out / f"{name}.png", nrow=ncol, upscale=3)
    rows.append({"file": path.name, "title": title, "method": method, "scale": scale, "rows": list(row_labels),
                 "seconds": round(seconds, 1), "solver": solver, "command": command, "measured": measured})


def _solver_text(sampling: Sampling) -> str:
    """e.g. "ddim, 25 steps, eta 1, linspace spacing"."""
    eta = sampling.options.get("eta", solver_options(sampling.sampler).get("eta"))
    name = sampling.sampler if sampling.sampler != AUTO else \
        f"auto ({AUTO_SAMPLERS['plain']}, or {AUTO_SAMPLERS['gradient']} with gradient terms)"
    return (f"{name}, {sampling.steps} steps" + (f", eta {eta:g}" if eta is not None else "")
            + f", {sampling.spacing} spacing" + (f", threshold {sampling.threshold:g}" if sampling.threshold else ""))


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(str(text))


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True) -> Path:
    """Sample every section of the demo into ``out``; returns the index.html path."""
    out = Path(out)
    model, schedule, config = load_diffusion(cfg.diffusion, cfg.device)
    clf = load_classifier(cfg.classifier, cfg.device)[0] if cfg.classifier is not None else None
    shape = tuple(config["image_shape"])
    sampling = Sampling(cfg.sampler, cfg.steps, cfg.spacing, threshold=cfg.threshold).validate(schedule)
    found = _similarity_inputs(cfg, shape, schedule)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a failed demo writes nothing
    names = config.get("class_names") or [str(i) for i in range(model.num_classes or 0)]
    classes = cfg.classes or ((0, 1, 7, 8, 9) if len(names) >= 10 else tuple(range(min(len(names), 5))))
    y = torch.tensor([c for c in classes for _ in range(cfg.per_class)])
    labels = [names[c] for c in classes]
    n, rows = len(y), []

    stochastic = Sampling(cfg.sampler, cfg.steps, cfg.spacing, threshold=cfg.threshold,
                          options={"eta": cfg.sim_eta} if "eta" in solver_options(cfg.sampler) else {})
    shipped_model = _is_shipped(cfg.diffusion)
    total = _count_sections(cfg, clf, found)
    done = [0]

    def run(guidance, cond=None, count=None, stochastic_solver=False, net=None):
        t0 = time.time()
        count = count or n
        use = stochastic if stochastic_solver else sampling
        done[0] += 1
        if progress:  # one line per grid, then the solver's own bar
            print(f"condiff demo: grid {done[0]} of {total}", file=sys.stderr, flush=True)
        eps, shift = compose(net or model, schedule, guidance, use)
        x = generate(eps, schedule, count, shape=shape, cond=cond, seed=cfg.seed, batch_size=count,
                     device=cfg.device, mean_shift=shift, progress=progress, **use.kwargs())
        warning = saturation_warning(x)
        if warning and cfg.log:
            cfg.log(warning)
        return x, time.time() - t0

    def command(*flags, stochastic_solver=False, count=None, ckpt=None) -> str:
        """The ``condiff sample`` command of a grid: same model, guidance, solver and seed (``ckpt``: a grid
        of another model than cfg.diffusion, None when it is the shipped one)."""
        use = stochastic if stochastic_solver else sampling
        ckpt = ckpt if ckpt is not None else (None if shipped_model else cfg.diffusion)
        parts = ["condiff sample"] + ([] if ckpt is None else ["--ckpt", _quote(ckpt)]) + list(flags)
        parts += ["--n", str(count or cfg.per_class), "--sampler", use.sampler, "--steps", str(use.steps)]
        parts += [f"--eta {use.options['eta']:g}"] if "eta" in use.options else []
        parts += ["--spacing", use.spacing] if use.spacing != DEFAULT_SPACING else []
        parts += [f"--threshold {use.threshold:g}"] if use.threshold else []
        return " ".join(parts + ["--seed", str(cfg.seed)])

    def measured(method, scale) -> str:
        if not shipped_model:
            return ""
        if (method, float(scale)) in MEASURED_NOTES:
            return MEASURED_NOTES[method, float(scale)]
        acc = MEASURED.get((method, float(scale)))
        return "" if acc is None else f"judge accuracy {acc:.3f} (DDIM-25, 1000 samples, " \
                                      f"{MEASURED_SOURCES.get(method, 'docs/results.md')})"

    class_flags = [f"--class {_quote(name)}" for name in labels]
    null = Guidance(unconditional=True)
    x, dt = run(null)
    _section(out, rows, "unguided", "Unguided (null branch)", "none", 0, x, ["(any)"] * len(classes),
             cfg.per_class, dt, _solver_text(sampling), command("--unconditional", count=n), measured("classifier", 0))
    for w in cfg.cfg_ws:
        x, dt = run(Guidance(cfg_w=w), cond=y)
        _section(out, rows, f"cfg-w{w:g}", f"Classifier-free guidance, w = {w:g} (s = {1 + w:g})",
                 "classifier-free (eq 24)", w, x, labels, cfg.per_class, dt, _solver_text(sampling),
                 command(*class_flags, f"--cfg-w {w:g}"), measured("cfg", w))
    if clf is not None:
        clf_flag = "--classifier" if shipped_model and _is_shipped(cfg.classifier, "classifier") else \
            f"--classifier {_quote(cfg.classifier)}"
        for gamma in cfg.classifier_scales:  # each row's class travels in cond["y"]
            x, dt = run(Guidance(unconditional=True, terms=[ClassifierTerm(clf, None, gamma)]), cond=y)
            _section(out, rows, f"classifier-g{gamma:g}", f"Classifier guidance, gamma = {gamma:g}",
                     "classifier (eqs 8, 19)", gamma, x, labels, cfg.per_class, dt, _solver_text(sampling),
                     command(clf_flag, *class_flags, f"--scale {gamma:g}"), measured("classifier", gamma))
    if found:
        _similarity_sections(cfg, out, rows, model, schedule, names, run, found, stochastic, command, measured)
    if "text-cfg" in found:
        _text_cfg_sections(cfg, out, rows, run, found["text-cfg"], _solver_text(sampling), command, measured)
    for extra in cfg.extra_sections:  # each: (model, schedule, cfg) -> section dicts
        for sec in extra(model, schedule, cfg):
            _section(out, rows, **sec)
    return _write_index(out, rows)


def shipped_references() -> dict[str, Path]:
    """The reference images shipped with the package: name -> PNG path (:func:`condiff.zoo.references`)."""
    from .zoo import references

    return references()


def _is_shipped(path, role: str = "diffusion") -> bool:
    from .zoo import SHIPPED, models_dir

    try:
        return path is not None and Path(path).resolve() == (models_dir() / SHIPPED[role]).resolve()
    except OSError:
        return False


def _count_sections(cfg: DemoConfig, clf, found: dict) -> int:
    """How many grids the demo samples (for its progress lines)."""
    count = 1 + len(cfg.cfg_ws) + (len(cfg.classifier_scales) if clf is not None else 0)
    count += 2 if "text" in found else 0
    count += len(cfg.text_cfg_ws) if "text-cfg" in found else 0
    if "image" in found:
        count += 2 * bool(found["references"]) + 2 * (found["style"] is not None)
    return count


def _similarity_inputs(cfg: DemoConfig, shape, schedule) -> dict:
    """Load the encoders, the text-conditional model and the reference and style images first, so that a bad one
    fails before any output."""
    from .images import load_image
    from .similarity import load_encoder

    C, H, _ = shape
    found, refs = {}, shipped_references()
    if cfg.text_encoder is not None:
        from .similarity.text import load_text_encoder

        found["text"] = (load_encoder(cfg.text_encoder, "text", cfg.device)[0], load_text_encoder(cfg.device))
    if cfg.text_diffusion is not None:
        from .text_cfg import is_text_conditional, prompt_condition

        net, text_schedule, config = load_diffusion(cfg.text_diffusion, cfg.device)
        if not is_text_conditional(config) or tuple(config["image_shape"]) != tuple(shape):
            raise CondiffError(f"{cfg.text_diffusion}: not a text-conditional eps-model of "
                               f"{'x'.join(map(str, shape))} images (condiff train --cond text)")
        if not text_schedule.same_as(schedule):  # one solver and one seed for every grid
            raise CondiffError(f"{cfg.text_diffusion}: its noise schedule differs from the demo's eps-model")
        found["text-cfg"] = (net, prompt_condition(list(cfg.text_cfg_prompts), config, cfg.device))
    if cfg.image_encoder is not None:
        found["image"] = load_encoder(cfg.image_encoder, "image", cfg.device)[0]
        paths = list(cfg.references) or [refs[r] for r in ("sneaker", "dress") if r in refs]
        style = cfg.style or refs.get("stripes")
        from .zoo import image_path

        found["references"] = [(image_path(p), load_image(image_path(p), H, C)) for p in paths]
        found["style"] = (image_path(style), load_image(image_path(style), H, C)) if style is not None else None
    return found


def _similarity_sections(cfg: DemoConfig, out: Path, rows: list, model, schedule, names, run, found: dict,
                         sampling: Sampling, command, measured) -> None:
    """Text, image-reference and style grids (eqs 11-15), each against its unguided twin (same seed)."""
    from .similarity import ImageSimilarity, StyleSimilarity, TextSimilarity
    from .similarity.terms import text_target

    k = cfg.per_class
    solver = _solver_text(sampling)
    if "text" in found:  # one prompt per row: the targets travel in cond["text"]
        enc, te = found["text"]
        prompts = [p for p in cfg.prompts for _ in range(k)]
        term = TextSimilarity(lambda x, t: enc(x, t, "text"), None, DEFAULT_SCALES["text"])
        cond = {"text": text_target(enc, te.encode(prompts))}
        for scale, terms in ((0, []), (DEFAULT_SCALES["text"], [term])):
            x, dt = run(Guidance(unconditional=True, terms=terms), cond=cond if terms else None, count=len(prompts),
                        stochastic_solver=True)
            flags = ["--unconditional"] + ([f"--text {_quote(cfg.prompts[0])}", f"--text-scale {scale:g}"] if terms else [])
            _section(out, rows, f"text-s{scale:g}", f"Text guidance, gamma = {scale:g} (one prompt per row)",
                     "text similarity (eqs 14-15)", scale, x, [f'"{p}"' for p in cfg.prompts], k, dt, solver,
                     command(*flags, stochastic_solver=True, count=None if terms else len(prompts))
                     + ("  (first row; one command per prompt)" if terms else ""), measured("text", scale))
    if "image" not in found:
        return
    enc, refs, style = found["image"], found["references"], found["style"]
    inputs = refs + ([style] if style is not None else [])
    if inputs:  # the inputs themselves, first: what the guided grids are steered toward
        _section(out, rows, "references", "Reference images (inputs of the image and style grids)", "input", "-",
                 torch.stack([img for _, img in inputs]), [p.name for p, _ in inputs], len(inputs), 0.0)
    if refs:
        ref = torch.stack([img for _, img in refs]).to(cfg.device)
        term = ImageSimilarity.from_encoder(enc, None, DEFAULT_SCALES["image"])  # one reference per row: cond["image"]
        cond = {"image": term.targets(ref).repeat_interleave(k, 0)}
        for scale, terms in ((0, []), (DEFAULT_SCALES["image"], [term])):
            x, dt = run(Guidance(unconditional=True, terms=terms), cond=cond if terms else None,
                        count=len(refs) * k, stochastic_solver=True)
            flags = ["--unconditional"] + ([f"--image {_quote(refs[0][0].stem)}", f"--image-scale {scale:g}"]
                                           if terms else [])
            _section(out, rows, f"image-s{scale:g}", f"Image guidance, gamma = {scale:g} (one reference per row)",
                     "image similarity (eqs 14-15)", scale, x, [p.stem for p, _ in refs], k, dt, solver,
                     command(*flags, stochastic_solver=True, count=None if terms else len(refs) * k)
                     + ("  (first row; one command per reference)" if terms else ""), measured("image", scale))
    if style is not None:  # composed with classifier-free guidance (w = 1) when the model is conditional
        conditional = bool(getattr(model, "num_classes", 0))
        classes = [c for c in cfg.style_classes if c < len(names)] or [0]
        y = torch.tensor([c for c in classes for _ in range(k)]) if conditional else None
        term = StyleSimilarity.from_encoder(enc, style[1], DEFAULT_SCALES["style"], schedule)
        for scale, terms in ((0, []), (DEFAULT_SCALES["style"], [term])):
            x, dt = run(Guidance(cfg_w=1.0 if conditional else None, terms=terms), cond=y, count=len(classes) * k,
                        stochastic_solver=True)
            flags = ([f"--class {_quote(names[c])}" for c in classes] + ["--cfg-w 1"] if conditional
                     else ["--unconditional"]) + ([f"--style {_quote(style[0].stem)}", f"--style-scale {scale:g}"]
                                                  if terms else [])
            _section(out, rows, f"style-s{scale:g}", f"Style guidance toward {style[0].name}, gamma = {scale:g}"
                     + (", on classifier-free guidance w = 1" if conditional else ""),
                     "style (Gram)" + (" + classifier-free" if conditional else ""), scale, x,
                     [names[c] for c in classes] if conditional else ["(any)"] * len(classes), k, dt, solver,
                     command(*flags, stochastic_solver=True), measured("style", scale) if terms else "")


def _text_cfg_sections(cfg: DemoConfig, out: Path, rows: list, run, found: tuple, solver: str, command,
                       measured) -> None:
    """Text to image by classifier-free guidance (eq 24): one prompt per row, the caption embedding as y."""
    net, emb = found
    k = cfg.per_class
    cond = {"y": emb.to(cfg.device).repeat_interleave(k, 0)}
    ckpt = None if _is_shipped(cfg.text_diffusion, "text-diffusion") else cfg.text_diffusion
    for w in cfg.text_cfg_ws:
        x, dt = run(Guidance(cfg_w=w), cond=cond, count=len(emb) * k, net=net)
        flags = [f"--prompt {_quote(p)}" for p in cfg.text_cfg_prompts] + [f"--cfg-w {w:g}"]
        _section(out, rows, f"text-cfg-w{w:g}", f"Text to image by classifier-free guidance, w = {w:g} "
                 "(one prompt per row)", "text-conditional classifier-free (eqs 22-24)", w, x,
                 [f'"{p}"' for p in cfg.text_cfg_prompts], k, dt, solver, command(*flags, ckpt=ckpt),
                 measured("text-cfg", w))


def _write_index(out: Path, rows: list) -> Path:
    md = ["# condiff demo", "", "| grid | method | scale | rows | solver | measured | seconds |",
          "|---|---|---|---|---|---|---|"]
    body, commands = [], ["", "Commands (`condiff sample` with the same model, guidance, solver and seed):", ""]
    for r in rows:
        md.append(f"| ![{r['title']}]({r['file']}) | {r['method']} | {r['scale']} | {', '.join(r['rows'])} | "
                  f"{r['solver']} | {r['measured']} | {r['seconds']} |")
        if r["command"]:
            commands.append(f"- `{r['file']}`: `{r['command']}`")
        extra = "".join(f"<br>{label}: {html.escape(str(r[key]))}" for key, label in
                        (("solver", "solver"), ("measured", "measured"), ("command", "command")) if r[key])
        body.append(f"<figure><img src='{html.escape(r['file'])}' alt='{html.escape(r['title'])}'>"
                    f"<figcaption><b>{html.escape(r['title'])}</b><br>method: {html.escape(r['method'])}, "
                    f"scale: {html.escape(str(r['scale']))}<br>rows: {html.escape(', '.join(r['rows']))}"
                    f"{extra}</figcaption></figure>")
    md += commands
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>condiff demo</title><style>"
            "body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;vertical-align:top}"
            "img{image-rendering:pixelated;border:1px solid #ccc}</style></head><body>"
            "<h1>condiff demo</h1><p>Each grid has one row per class or prompt; the same seed in every grid.</p>"
            + "".join(body) + "</body></html>\n")
    atomic_write_text(out / "index.html", page)
    return out / "index.html"
