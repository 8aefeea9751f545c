"""Guidance-scale sweeps: sample at each scale, evaluate, write tables, a plot and grids.

The article's claim (eqs 8-10, 24): a larger scale makes samples more relevant to
the condition and less diverse.  :func:`run_sweep` measures it for one guidance
family: the same initial noise at every scale (paired samples), the same real
reference sets (:class:`~condiff.evaluation.Evaluator`), and writes

    results.json, results.csv, results.md   one row per scale plus the real-data floor
    sweep.png                               judge accuracy and FID_fm against scale; precision against recall
    grid-scale-S.png                        up to 10 samples per class, one row per class
    samples-scale-S.npz                     the samples (uint8), labels, settings; reused when the settings
                                            and the weights (their digest) match

Guidance families are entries of :data:`METHODS`: a function
``builder(ctx, scale, labels) -> (guidance, cond)`` that, for the target classes
``labels`` (N,) of every sample, returns a :class:`~condiff.compose.Guidance` and the
batch condition (``{"y": labels, ...}``: per-row targets travel with their rows),
which :func:`condiff.compose.compose` turns into what the solver takes.  A builder
may list the ``--option`` keys it reads in ``builder.option_keys`` (a regular
expression per key); any other key is an error.  Another module adds a family with
``METHODS["text"] = builder`` (or by defining ``SWEEP_METHODS`` in
``condiff.similarity``, which is looked up when a method is not found here).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .captions import SPLITS
from .checkpoints import atomic_write_text
from .data import NPZ_READ_ERRORS
from .errors import CondiffError
from .compose import Guidance, Sampling, compose
from .guidance import ClassifierTerm
from .images import save_grid, save_npz
from .pipeline import generate, load_classifier, warn_if_saturated
from .sweep_family import FAMILY_METHODS
from .plots import Panel, Series, save_panels
from .schedule import Schedule

__all__ = ["SweepContext", "METHODS", "get_method", "check_options", "sweep_labels", "sample_at_scale", "run_sweep",
           "weights_digest", "write_tables", "sweep_checkpoint"]

#: The scales a sweep visits when none are given: those of docs/results.md, around each method's default.
SWEEP_SCALES = {"cfg": [0.0, 1.0, 2.0, 4.0], "classifier": [0.0, 4.0, 16.0, 32.0], "text": [0.0, 100.0, 300.0],
                "image": [0.0, 30.0, 100.0], "text-cfg": [0.0, 1.0, 2.0, 4.0], "cfg-interval": [0.0, 1.0, 2.0, 4.0], "apg": [0.0, 1.0, 2.0, 4.0],
                "autoguide": [0.0, 1.0, 2.0, 4.0], "cfg++": [0.0, 0.2, 0.4, 0.6, 0.8],
                "x0-classifier": [0.0, 4.0, 16.0, 64.0], "x0-image": [0.0, 30.0, 100.0]}

#: Scale meaning per method, for table headers.
SCALE_NAMES = {"classifier": "gamma (eq 8)", "cfg": "w (eq 24; diffusers' guidance_scale = 1 + w)",
               "text-cfg": "w (eq 24) of the caption-conditional model"}


@dataclass
class SweepContext:
    """What a method builder may use: the loaded model and everything around it.

    ``options`` holds method options (e.g. ``classifier``: a checkpoint path;
    from ``condiff sweep --classifier`` and ``--option KEY=VALUE``); ``cache`` is
    where a builder keeps networks it loaded, so they load once per sweep.
    """

    model: Callable
    schedule: Schedule
    shape: tuple[int, int, int]
    class_names: list[str]
    device: torch.device | str = "cpu"
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    prompts: list | None = None  # prompt sweeps: one condiff.captions.Caption per sample (set by run_sweep)
    rule: object = None  # prompt sweeps: the condiff.captions.AttributeRule that scores the samples' attributes

    @property
    def conditional(self) -> bool:
        return bool(getattr(self.model, "conditional", False))


Builder = Callable[[SweepContext, float, torch.Tensor], tuple[Guidance, object]]


def _classifier_method(ctx: SweepContext, scale: float, labels: torch.Tensor):
    """Classifier guidance (eqs 6-8, 19) with scale gamma on the unconditional model (or the null branch);
    each row's class is cond["y"]."""
    if "classifier" not in ctx.cache:
        path = ctx.options.get("classifier")
        if not path:
            raise CondiffError("method classifier needs a noise-aware classifier (--classifier CKPT)")
        clf, cconf = load_classifier(path, ctx.device)
        names = cconf.get("class_names") or []
        if names and ctx.class_names and names != ctx.class_names:
            raise CondiffError(f"{path}: the classifier's classes differ from the model's")
        ctx.cache["classifier"] = clf
    sharpen = str(ctx.options.get("sharpen", "")).lower()
    if sharpen not in ("", "0", "1", "true", "false", "yes", "no"):
        raise CondiffError(f"--option sharpen must be true or false, got {sharpen!r}")
    term = ClassifierTerm(ctx.cache["classifier"], None, scale, sharpen=sharpen in ("1", "true", "yes"))
    return Guidance(unconditional=ctx.conditional, terms=[term]), {"y": labels}


_classifier_method.option_keys = ("classifier", "sharpen")


def _cfg_method(ctx: SweepContext, scale: float, labels: torch.Tensor):
    """Classifier-free guidance (eq 24) with the article's weight w = scale."""
    if not ctx.conditional:
        raise CondiffError("method cfg needs a conditional model trained with a null condition")
    return Guidance(cfg_w=scale), {"y": labels}


_cfg_method.option_keys = ()


def _text_cfg_method(ctx: SweepContext, scale: float, labels: torch.Tensor):
    """Text to image by CFG (the article's second route): a caption-conditional model (condiff train --cond text)
    at weight w = scale (eq 24), each sample's condition the MiniLM embedding of its prompt."""
    if not getattr(ctx.model, "cond_dim", None):
        raise CondiffError("method text-cfg needs a text-conditional eps-model (condiff train --cond text)")
    from .similarity.sweep_methods import prompt_embeddings

    _, emb = prompt_embeddings(ctx, labels)
    return Guidance(cfg_w=scale), {"y": emb}


_text_cfg_method.option_keys = ("prompts",)

METHODS: dict[str, Builder] = {"classifier": _classifier_method, "cfg": _cfg_method, "text-cfg": _text_cfg_method}
METHODS.update(FAMILY_METHODS)  # issue 16: cfg-interval, apg, cfg++, autoguide, x0-classifier, x0-image
SCALE_NAMES.update({"cfg-interval": "w (eq 24)", "apg": "w (eq 24)", "cfg++": "CFG++ lambda", "autoguide": "w",
                    "x0-classifier": "gamma (x0-guidance)", "x0-image": "gamma (x0-guidance)"})


def check_options(method: str, options: dict) -> None:
    """Every ``--option`` key must be one the method reads (``builder.option_keys``); one line otherwise."""
    keys = getattr(get_method(method), "option_keys", None)
    if keys is None:  # a builder that does not say: anything goes
        return
    unknown = sorted(k for k in options if not any(re.fullmatch(pattern, k) for pattern in keys))
    if unknown:
        known = ", ".join(k.replace(r"\d+", "K") for k in keys) or "none"
        raise CondiffError(f"method {method} has no option {', '.join(unknown)} (its options: {known})")


def get_method(name: str) -> Builder:
    """The builder of a method: from :data:`METHODS`, else ``condiff.similarity.SWEEP_METHODS``."""
    if name in METHODS:
        return METHODS[name]
    try:
        from . import similarity  # noqa: F401  (optional module of the similarity family)

        extra = dict(getattr(similarity, "SWEEP_METHODS", {}))
    except ImportError:
        extra = {}
    if name in extra:
        return extra[name]
    raise CondiffError(f"unknown sweep method {name!r} (known: {', '.join(sorted(set(METHODS) | set(extra)))})")


def sweep_labels(n: int, classes: list[int]) -> torch.Tensor:
    """Target classes of n samples, cycling through ``classes`` (balanced to within one)."""
    if not classes:
        raise CondiffError("a sweep needs at least one class")
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)


#: ``--option prompts=...`` (``condiff sweep --prompts``): the prompt sets a prompt sweep draws its rows from.
PROMPT_SETS = SPLITS  # the caption splits of condiff.captions: "heldout" and "train" phrasings
#: Methods that sample prompts, and the prompt set they use when none is given.
PROMPT_METHODS = {"text-cfg": "heldout"}


def prompt_rows(class_names: list[str], labels: torch.Tensor, which: str = "heldout") -> list:
    """One prompt per sample: row i of class k gets class k's prompts of set ``which`` in turn
    (:func:`condiff.captions.heldout_prompts`: every combination of its attributes, in the phrasings of
    caption split ``which``: "heldout", never seen in training, or "train")."""
    from .captions import heldout_prompts

    if which not in PROMPT_SETS:
        raise CondiffError(f"unknown prompt set {which!r} (known: {', '.join(PROMPT_SETS)})")
    by_class: dict[int, list] = {}
    for p in heldout_prompts(class_names, which):
        by_class.setdefault(p.label, []).append(p)
    seen: dict[int, int] = {}
    rows = []
    for k in labels.tolist():
        j = seen.get(k, 0)
        seen[k] = j + 1
        rows.append(by_class[k][j % len(by_class[k])])
    return rows


def _guidance_at(ctx: SweepContext, builder: Builder, scale: float, labels: torch.Tensor, form: str):
    guidance, cond = builder(ctx, scale, labels)
    if form != guidance.form:
        if not guidance.terms:
            raise CondiffError("--form applies to gradient guidance (classifier, text, image), not to this method")
        guidance = dataclasses.replace(guidance, form=form)
    return guidance, cond


def sample_at_scale(ctx: SweepContext, builder: Builder, scale: float, labels: torch.Tensor, *,
                    sampling: Sampling | None = None, form: str = "score", seed: int = 0, batch_size: int = 250,
                    progress: bool = False) -> torch.Tensor:
    """Samples (N, C, H, W) for ``labels`` at one scale; batch b uses the noise of seed (seed, b) at every scale."""
    sampling = sampling or Sampling()
    guidance, cond = _guidance_at(ctx, builder, scale, labels, form)
    eps, shift = compose(ctx.model, ctx.schedule, guidance, sampling)
    return generate(eps, ctx.schedule, len(labels), shape=ctx.shape, cond=cond, mean_shift=shift, seed=seed,
                    batch_size=batch_size, device=ctx.device, progress=progress, **sampling.kwargs())


def _tag(scale: float) -> str:
    return f"{scale:g}"


def weights_digest(paths) -> dict:
    """{path: sha256 of its weights file} for each of ``paths`` that is a checkpoint: part of the key of a sweep's
    cached samples, so that new weights at the same path (a re-export, a retrained run) are sampled again."""
    from .checkpoints import resolve_checkpoint
    from .integrity import sha256_file

    out = {}
    for p in paths:
        if not p or not Path(str(p)).exists():
            continue
        try:
            folder = resolve_checkpoint(p)
        except CondiffError:
            continue
        f = folder / "model.safetensors" if folder.is_dir() else folder
        if f.is_file():
            out[str(p)] = sha256_file(f)
    return out


def _load_cached(path: Path, meta: str, legacy: str | None = None):
    """(images, seconds) of a sample cache written with ``meta``; or with ``legacy`` (the same settings keyed by path
    alone, as sweeps before weights_digest wrote them: trusted once, and pinned to ``meta`` here); else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = str(z["meta"]) if "meta" in z else None
            if stored != meta and (legacy is None or stored != legacy):
                return None
            x, seconds = torch.from_numpy(z["images"]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0), \
                float(z["seconds"])
            labels, names = z["labels"], z["class_names"]
    except NPZ_READ_ERRORS:  # a damaged cache is sampled again
        return None
    if stored != meta:
        save_npz(path, x, labels, meta=np.array(meta), seconds=np.array(seconds), class_names=names)
    return x, seconds


def _grid_indices(labels: torch.Tensor, classes: list[int], per_class: int = 10) -> tuple[torch.Tensor, int]:
    rows = [torch.nonzero(labels == c).flatten()[:per_class] for c in classes]
    k = min(len(r) for r in rows)
    return torch.cat([r[:k] for r in rows]), k


def run_sweep(ctx: SweepContext, method: str, scales: list[float], n: int, out_dir: str | Path, evaluator, *,
              classes: list[int] | None = None, sampling: Sampling | None = None, form: str = "score", seed: int = 0,
              batch_size: int = 250, progress: bool = False, source: str = "",
              log: Callable[[str], None] | None = None) -> dict:
    """Sample ``n`` images at each scale with ``method``, evaluate each set, write every output file.

    Args:
        ctx: the model and its surroundings (:class:`SweepContext`).
        method: a key of :data:`METHODS` (or of ``condiff.similarity.SWEEP_METHODS``).
        scales: the scales to visit (gamma for classifier guidance, w for CFG).
        n: samples per scale, balanced over ``classes`` (default: all of the model's classes).
        evaluator: a :class:`~condiff.evaluation.Evaluator` (judge + real data).
        source: the model's checkpoint folder, recorded in the outputs; with the settings it keys the
            samples reused by a rerun (so give the resolved step-N folder, not a run folder).
    Returns:
        the dict written to results.json (``settings``, ``rows``, ``real``).
    """
    builder = get_method(method)
    check_options(method, ctx.options)
    sampling = sampling or Sampling()
    out = Path(out_dir)
    classes = list(range(len(ctx.class_names))) if classes is None else list(classes)
    labels = sweep_labels(n, classes)
    which = ctx.options.get("prompts") or PROMPT_METHODS.get(method)
    if which:  # each sample has a prompt: its class, and attribute targets scored by the pixel rule
        if ctx.rule is None:
            raise CondiffError("a prompt sweep needs the attribute rule that scores the samples (condiff.captions)")
        ctx.prompts = prompt_rows(ctx.class_names, labels, str(which))
    if n < 2 * len(classes) or n <= max(evaluator.k_pr, evaluator.k_dc):
        raise CondiffError(f"--n {n} is too small: need at least 2 samples per class and more than "
                           f"{max(evaluator.k_pr, evaluator.k_dc)} in all")
    if not scales:
        raise CondiffError("a sweep needs at least one scale")
    for scale in scales:  # every setting checked (networks loaded, solver and form) before the folder exists
        guidance, _ = _guidance_at(ctx, builder, scale, labels[:1], form)
        compose(ctx.model, ctx.schedule, guidance, sampling)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"method": method, "n": n, **({"prompts": str(which)} if which else {}), "classes": [ctx.class_names[c] for c in classes], "steps": sampling.steps,
                "sampler": sampling.sampler, "eta": sampling.options.get("eta", 0.0), "form": form, "seed": seed,
                "model": source, "options": {k: str(v) for k, v in sorted(ctx.options.items())}}
    if sampling.spacing != "linspace" or sampling.threshold is not None or set(sampling.options) - {"eta"}:
        settings["sampling"] = sampling.config()  # keys the cache too; absent for the settings of earlier sweeps
    weights = weights_digest([source, *ctx.options.values()])
    rows = []
    for scale in scales:
        tag = _tag(scale)
        legacy = json.dumps(dict(settings, scale=scale), sort_keys=True)
        meta = json.dumps(dict(settings, scale=scale, weights=weights), sort_keys=True) if weights else legacy
        npz = out / f"samples-scale-{tag}.npz"
        cached = _load_cached(npz, meta, legacy)
        if cached is not None:
            x, seconds = cached
        else:
            t0 = time.perf_counter()
            x = sample_at_scale(ctx, builder, scale, labels, sampling=sampling, form=form, seed=seed,
                                batch_size=batch_size, progress=progress)
            warn_if_saturated(x)
            seconds = time.perf_counter() - t0
            save_npz(npz, x, labels, meta=np.array(meta), seconds=np.array(seconds),
                     class_names=np.array(ctx.class_names))
            x = _load_cached(npz, meta)[0]  # evaluate the stored uint8 images, as a rerun would
        idx, k = _grid_indices(labels, classes)
        save_grid(x[idx], out / f"grid-scale-{tag}.png", nrow=k)
        metrics = evaluator.evaluate(x, labels)
        if ctx.prompts is not None:  # accuracy of each attribute the prompts state, by the same pixel rule
            targets = torch.tensor([p.attrs for p in ctx.prompts])
            for a, acc in ctx.rule.accuracy(x, labels, targets).items():
                metrics[f"attr_{a}"] = acc
        rows.append(dict(scale=scale, seconds=seconds, seconds_per_image=seconds / n, **metrics))
        if log:
            attrs = "".join(f", {k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("attr_") and v is not None)
            log(f"scale {tag}: judge accuracy {metrics['judge_accuracy']:.3f}{attrs}, FID_fm {metrics['fid_fm']:.2f}, "
                f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}, "
                f"diversity {metrics['diversity']:.3f} ({seconds:.0f} s sampling)")
    result = {"settings": settings, "rows": rows}
    write_tables(result, out)
    return result


# ------------------------------------------------------------------------------------------- outputs
CSV_COLUMNS = ["scale", "judge_accuracy", "judge_confidence", "fid_fm", "fid_fm_floor", "precision", "recall",
               "density", "coverage", "diversity", "diversity_real", "diversity_ratio", "seconds_per_image"]


def _real(row: dict) -> dict:
    """The real-data floor of a row (training images with the samples' class counts)."""
    return {"judge_accuracy": row["judge_accuracy_real"], "judge_confidence": row["judge_confidence_real"],
            "fid_fm": row["fid_fm_floor"], "diversity": row["diversity_real"], **row["real"]}


def _f(v, spec=".3f") -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def write_tables(result: dict, out_dir: str | Path) -> list[Path]:
    """results.json, results.csv, results.md and sweep.png from :func:`run_sweep`'s result."""
    from .evaluation import to_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, st = result["rows"], result["settings"]
    classes = st["classes"]
    attr_cols = [k for k in (rows[0] if rows else {}) if k.startswith("attr_")]
    atomic_write_text(out / "results.json", to_json(result))

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS + attr_cols + [f"{k}_real" for k in ("precision", "recall", "density", "coverage")]
               + [f"judge_accuracy[{c}]" for c in classes])
    for r in rows:
        w.writerow([_f(r.get(k), ".6g") for k in CSV_COLUMNS + attr_cols]
                   + [_f(r["real"][k], ".6g") for k in ("precision", "recall", "density", "coverage")]
                   + [_f(r["per_class"].get(c, {}).get("judge_accuracy"), ".6g") for c in classes])
    atomic_write_text(out / "results.csv", buf.getvalue())

    scale_name = SCALE_NAMES.get(st["method"], "scale")
    md = [f"# Guidance sweep: method `{st['method']}`", "",
          f"Scale: {scale_name}. Model: `{st['model']}`. {st['n']} samples per scale, balanced over "
          f"{len(classes)} classes; sampler {st['sampler']}, {st['steps']} steps, eta {st['eta']}, "
          f"guidance form {st['form']}, seed {st['seed']} (the same initial noise at every scale).", "",
          "Judge = an independent clean-image CNN (not the guiding classifier). FID_fm is the Frechet distance "
          "in the judge's feature space against every held-out image of the classes; precision/recall "
          "(k=3), density/coverage (k=5) against as many held-out images per class as samples. "
          "Diversity: mean pairwise feature distance within a class. The *real data* row scores training "
          "images with the same class counts (the judge columns: held-out images, which the judge never saw): "
          "the floor of each column.", "",
          "| scale | judge acc | judge conf | FID_fm | precision | recall | density | coverage | diversity "
          "| div / real | s / image |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if attr_cols:
        md[-2] = md[-2].replace("| judge acc |", "| judge acc | " + " | ".join(k[5:] for k in attr_cols) + " |")
        md[-1] = md[-1].replace("|---:|---:|", "|---:|---:|" + "---:|" * len(attr_cols), 1)
        md[-2:-2] = [f"Prompts: `{st.get('prompts')}` (condiff.captions: one prompt per sample, stating its class "
                     "and attributes; each attribute column is the share of samples whose pixels show the stated "
                     "value, by the rule the captions were made with, over the prompts that state it).", ""]
    for r in rows:
        attrs = "".join(f" {_f(r[k])} |" for k in attr_cols)
        md.append(f"| {r['scale']:g} | {_f(r['judge_accuracy'])} |{attrs} {_f(r['judge_confidence'])} "
                  f"| {_f(r['fid_fm'], '.2f')} | {_f(r['precision'])} | {_f(r['recall'])} | {_f(r['density'])} "
                  f"| {_f(r['coverage'])} | {_f(r['diversity'], '.2f')} | {_f(r['diversity_ratio'], '.2f')} "
                  f"| {_f(r['seconds_per_image'], '.3f')} |")
    if rows:
        f = _real(rows[0])
        md.append(f"| real data | {_f(f['judge_accuracy'])} |{' |' * len(attr_cols)} {_f(f['judge_confidence'])} | {_f(f['fid_fm'], '.2f')} "
                  f"| {_f(f['precision'])} | {_f(f['recall'])} | {_f(f['density'])} | {_f(f['coverage'])} "
                  f"| {_f(f['diversity'], '.2f')} | 1.00 | |")
        md += ["", "Per-class judge accuracy:", "",
               "| scale | " + " | ".join(classes) + " |", "|---:|" + "---:|" * len(classes)]
        for r in rows:
            md.append(f"| {r['scale']:g} | " + " | ".join(_f(r["per_class"].get(c, {}).get("judge_accuracy"), ".2f")
                                                      for c in classes) + " |")
        md.append("| real data | " + " | ".join(_f(rows[0]["per_class"].get(c, {}).get("judge_accuracy_real"), ".2f")
                                                for c in classes) + " |")
    md += ["", "Files: `results.csv`, `results.json`, `sweep.png`, `grid-scale-S.png` (one row per class), "
               "`samples-scale-S.npz`.", ""]
    atomic_write_text(out / "results.md", "\n".join(md))

    scales = [r["scale"] for r in rows]
    real = _real(rows[0]) if rows else {}
    panels = [
        Panel("judge accuracy vs scale", f"scale ({st['method']})", "judge accuracy",
              [Series(scales, [r["judge_accuracy"] for r in rows], "samples"),
               Series(scales, [real.get("judge_accuracy")] * len(rows), "real data", dashed=True)],
              yrange=(0.0, 1.0), xticks=scales),
        Panel("FID_fm vs scale", f"scale ({st['method']})", "FID_fm",
              [Series(scales, [r["fid_fm"] for r in rows], "samples"),
               Series(scales, [real.get("fid_fm")] * len(rows), "real floor", dashed=True)], xticks=scales),
        Panel("precision vs recall", "recall", "precision",
              [Series([r["recall"] for r in rows], [r["precision"] for r in rows], "samples",
                      point_labels=[f"{s:g}" for s in scales]),
               Series([real.get("recall")], [real.get("precision")], "real data", line=False)],
              xrange=(0.0, 1.0), yrange=(0.0, 1.0)),
    ]
    save_panels(panels, out / "sweep.png")
    return [out / n for n in ("results.json", "results.csv", "results.md", "sweep.png")]


# ------------------------------------------------------------------------------------------- from files
def sweep_checkpoint(ckpt, method: str, scales: list[float] | None, n: int, out_dir, *, judge=None, data=None,
                     classes: list | None = None, options: dict | None = None, classifier=None,
                     sampling: Sampling | None = None, form: str = "score", seed: int = 0, batch_size: int = 250,
                     device="cpu", progress: bool = False, log: Callable[[str], None] | None = print) -> dict:
    """:func:`run_sweep` from files: load the model, the judge and the real data, check everything, sweep.

    ``classes`` are names or indices (default: all); ``classifier`` a checkpoint for method
    classifier; ``options`` the method's other settings.  Nothing is written before every
    argument has been checked.  Defaults: ``ckpt`` None is the shipped eps-model (for method text-cfg the
    shipped text-conditional one), ``scales``
    None are :data:`SWEEP_SCALES`' of the method, and a missing classifier (method classifier) or
    encoder (``text_encoder`` / ``image_encoder``) is the shipped one when it takes the model's
    image size (otherwise a one-line error names it).
    """
    from .checkpoints import resolve_checkpoint
    from .data import resolve_class
    from .evaluation import Evaluator, load_judge, load_real_data
    from .pipeline import load_diffusion
    from .zoo import shipped

    options = dict(options or {})
    if classifier:  # the resolved step-N folder: cached samples are keyed by it
        options["classifier"] = str(resolve_checkpoint(classifier))
    check_options(method, options)  # unknown method or option: fail before loading anything
    if scales is None:
        if method not in SWEEP_SCALES:
            raise CondiffError(f"method {method} has no default scales: give them (--scales)")
        scales = SWEEP_SCALES[method]
    sampling = sampling or Sampling()
    if ckpt is None:  # the shipped eps-model; method text-cfg: the shipped text-conditional one
        ckpt = shipped("text-diffusion" if method == "text-cfg" else "diffusion")
    model, schedule, config = load_diffusion(ckpt, device)
    sampling.validate(schedule)
    shape = tuple(config.get("image_shape", (model.in_channels, model.image_size, model.image_size)))
    companions = {"classifier": ("classifier", "classifier", "a noise-aware classifier (--classifier CKPT)",
                                 "condiff train-classifier"),
                  "text": ("text_encoder", "text-encoder", "--option text_encoder=CKPT",
                           "condiff train-encoder --kind text"),
                  "image": ("image_encoder", "image-encoder", "--option image_encoder=CKPT",
                            "condiff train-encoder --kind image")}
    if method in companions and not options.get(companions[method][0]):
        from .similarity.terms import shipped_encoder

        key, role, flag, train = companions[method]
        options[key] = str(resolve_checkpoint(shipped_encoder(role, shape, f"method {method}", flag, train)))
    names = config.get("class_names") or []
    judge_net, jconf = load_judge(judge, device)
    jshape = tuple(jconf.get("image_shape") or (judge_net.in_channels, judge_net.image_size, judge_net.image_size))
    if jshape != shape:
        raise CondiffError(f"the model makes {'x'.join(map(str, shape))} images, the judge takes "
                           f"{'x'.join(map(str, jshape))}")
    jnames = jconf.get("class_names") or []
    if names and jnames and names != jnames:
        raise CondiffError("the judge's classes differ from the model's")
    names = names or jnames
    classes = [resolve_class(c, names) for c in classes] if classes else None
    train_data, test_data = load_real_data(data if data is not None else jconf.get("data"), shape)
    evaluator = Evaluator(judge_net, train_data, test_data, jnames or names, device=device, seed=seed)
    ctx = SweepContext(model, schedule, shape, names, device, options)
    if options.get("prompts") or method in PROMPT_METHODS:  # the rule the model's captions were made with
        from .captions import AttributeRule, heldout_prompts
        from .text_cfg import attribute_rule, is_text_conditional

        if method == "text-cfg" and not is_text_conditional(config):
            raise CondiffError("method text-cfg needs a text-conditional eps-model (condiff train --cond text)")
        heldout_prompts(names)  # classes without caption nouns: one line, before any work

        ctx.rule = attribute_rule(config) if is_text_conditional(config) else \
            AttributeRule.fit(train_data.images, train_data.labels, names)
    return run_sweep(ctx, method, scales, n, out_dir, evaluator, classes=classes, sampling=sampling, form=form,
                     seed=seed, batch_size=batch_size, progress=progress,
                     source=str(resolve_checkpoint(ckpt)),
                     log=log)
