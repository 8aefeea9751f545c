"""What the page of ``condiff serve`` asks for, checked, and run through the library.

No web library is imported here: a :class:`Request` is plain data, :func:`validate` turns
bad input into one-line :class:`~condiff.errors.CondiffError` s, and :func:`run` makes the
images with the same library calls as ``condiff sample`` (:func:`command_line` writes that
command).  Every model and guidance call of the server goes through :func:`_sample`.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..compose import DEFAULT_SAMPLER, DEFAULT_SCALES, DEFAULT_STEPS
from ..errors import CondiffError

__all__ = ["METHODS", "LIMITS", "MAX_UPLOAD_BYTES", "MAX_IMAGES", "MAX_STEPS", "MAX_PROMPT", "STRIP_FACTORS",
           "STRIP_IMAGES", "Models", "load_models", "Request", "Result", "validate", "run", "command_line",
           "save_result", "solvers", "scale_labels"]

# method -> its label on the page; none selected is unguided sampling (the null branch of the shipped model)
METHODS = {
    "cfg": "classifier-free guidance (eq 24)",
    "classifier": "classifier guidance (eqs 6-8, 19)",
    "text": "text prompt (eq 15)",
    "image": "reference image (eq 15)",
    "style": "style image (Gram matrices)",
}
# scale field -> (lowest, highest) the page accepts
LIMITS = {"cfg_w": (0.0, 20.0), "classifier_scale": (0.0, 100.0), "text_scale": (0.0, 1000.0),
          "image_scale": (0.0, 1000.0), "style_scale": (0.0, 1000.0), "eta": (0.0, 1.0)}
MAX_IMAGES = 64          # images per request: bounds memory and the time one user holds the queue
MAX_STEPS = 200
MAX_PROMPT = 300         # characters
MAX_SEED = 2**31 - 1
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
STRIP_FACTORS = (0.0, 0.5, 1.0, 2.0)  # the scale strip: every guidance scale times these
STRIP_IMAGES = 4         # images (seeds) per strip column


@dataclass
class Models:
    """The networks a server loads once at start; ``paths`` records where each came from (None = shipped)."""

    diffusion: torch.nn.Module
    schedule: object
    config: dict
    device: torch.device
    classifier: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None   # E1 + projection (condiff train-encoder --kind text)
    text_model: object | None = None             # the sentence embedder of the prompt (condiff[text])
    image_encoder: torch.nn.Module | None = None  # E1/E2 for reference and style images
    paths: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)     # why a method is unavailable

    @property
    def class_names(self) -> list:
        return list(self.config.get("class_names", []))

    @property
    def shape(self) -> tuple:
        m = self.diffusion
        return tuple(self.config.get("image_shape", (m.in_channels, m.image_size, m.image_size)))

    def available(self) -> dict:
        """method -> True when the loaded models serve it."""
        conditional = bool(getattr(self.diffusion, "conditional", False))
        return {"cfg": conditional, "classifier": self.classifier is not None,
                "text": self.text_encoder is not None and self.text_model is not None,
                "image": self.image_encoder is not None, "style": self.image_encoder is not None}


def load_models(ckpt=None, classifier=None, text_encoder=None, image_encoder=None, *, text: bool = True,
                device="cpu") -> Models:
    """Load the eps-model and its companions once.

    With no ``ckpt`` the shipped Fashion-MNIST models are used, and the shipped classifier and
    encoders are the defaults of the others (as in ``condiff sample``); with a ``ckpt`` only the
    companions given are loaded.  ``text=False`` skips the sentence embedder (about 15 s to load).
    """
    from ..pipeline import load_classifier, load_diffusion, resolve_device
    from ..similarity.terms import load_encoder
    from ..zoo import shipped

    device = resolve_device(device)
    shipped_default = ckpt is None
    notes = []

    def companion(given, role):
        if given is not None or not shipped_default:
            return given, str(given) if given is not None else None
        try:
            return shipped(role), None
        except CondiffError as e:
            notes.append(f"{role}: {e}")
            return None, None

    path = shipped("diffusion") if ckpt is None else ckpt
    model, schedule, config = load_diffusion(path, device)
    models = Models(model, schedule, config, device, paths={"ckpt": None if ckpt is None else str(ckpt)},
                    notes=notes)
    clf_path, models.paths["classifier"] = companion(classifier, "classifier")
    if clf_path is not None:
        models.classifier, _ = load_classifier(clf_path, device)
    text_path, models.paths["text_encoder"] = companion(text_encoder, "text-encoder")
    if text_path is not None and text:
        from ..similarity.text import load_text_encoder

        models.text_encoder = _encoder(load_encoder(text_path, "text", device)[0], text_path, models.shape)
        try:
            models.text_model = load_text_encoder(device)
        except CondiffError as e:  # the optional extra condiff[text] is missing
            notes.append(f"text guidance: {e}")
    elif text_path is not None:
        notes.append("text guidance: switched off at start (--no-text)")
    image_path, models.paths["image_encoder"] = companion(image_encoder, "image-encoder")
    if image_path is not None:
        models.image_encoder = _encoder(load_encoder(image_path, "image", device)[0], image_path, models.shape)
    return models


def _encoder(enc, path, shape):
    if (enc.in_channels, enc.image_size) != (shape[0], shape[1]):
        raise CondiffError(f"{path}: encoder for {enc.in_channels}x{enc.image_size}x{enc.image_size} images, "
                           f"the model makes {'x'.join(map(str, shape))}")
    return enc


@dataclass(frozen=True)
class Request:
    """One Generate press: the methods (any combination; none = unguided) and their settings."""

    methods: tuple = ("cfg",)
    class_name: str | None = None
    prompt: str = ""
    reference: str | None = None   # path of the uploaded reference image
    style: str | None = None       # path of the uploaded style image
    cfg_w: float = DEFAULT_SCALES["cfg"]          # the library's defaults (condiff.compose), as in condiff sample
    classifier_scale: float = DEFAULT_SCALES["classifier"]
    text_scale: float = DEFAULT_SCALES["text"]
    image_scale: float = DEFAULT_SCALES["image"]
    style_scale: float = DEFAULT_SCALES["style"]
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    eta: float = 0.0
    seed: int = 0
    n: int = 8
    strip: bool = True


def _number(name: str, value, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CondiffError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise CondiffError(f"{name} must lie in [{lo:g}, {hi:g}], got {value!r}")
    return v


def _integer(name: str, value, lo: int, hi: int) -> int:
    v = _number(name, value, lo, hi)
    if v != int(v):
        raise CondiffError(f"{name} must be a whole number, got {value!r}")
    return int(v)


def _upload(name: str, path) -> str:
    if not path:
        raise CondiffError(f"{name}: upload an image first")
    p = Path(path)
    if not p.is_file():
        raise CondiffError(f"{name}: the upload is gone, upload it again")
    size = p.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise CondiffError(f"{name}: the file is too large ({size / 2**20:.1f} MiB; at most "
                           f"{MAX_UPLOAD_BYTES // 2**20} MiB)")
    return str(p)


def validate(req: Request, models: Models) -> Request:
    """Every field checked against the limits and the loaded models; a one-line error otherwise."""
    from ..data import resolve_class

    methods = tuple(dict.fromkeys(req.methods or ()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CondiffError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    available = models.available()
    for m in methods:
        if not available[m]:
            why = "; ".join(models.notes) or "its model is not loaded"
            raise CondiffError(f"{METHODS[m]} is not available on this server ({why})")
    fields = {k: _number(k.replace("_", " "), getattr(req, k), *LIMITS[k]) for k in LIMITS}
    if req.sampler not in solvers():
        raise CondiffError(f"unknown sampler {req.sampler!r} (choose {', '.join(solvers())})")
    steps = _integer("steps", req.steps, 1, min(MAX_STEPS, models.schedule.T))
    n = _integer("number of images", req.n, 1, MAX_IMAGES)
    seed = _integer("seed", req.seed, 0, MAX_SEED)
    class_name = None
    if "cfg" in methods or "classifier" in methods:
        names = models.class_names
        if not req.class_name and req.class_name != 0:
            raise CondiffError("choose a class for classifier-free or classifier guidance")
        class_name = names[resolve_class(str(req.class_name), names, len(names) or None)] if names \
            else str(req.class_name)
    prompt = ""
    if "text" in methods:
        prompt = " ".join(str(req.prompt or "").split())
        if not prompt:
            raise CondiffError("the text prompt is empty: type what to generate")
        if len(prompt) > MAX_PROMPT:
            raise CondiffError(f"the text prompt is too long ({len(prompt)} characters; at most {MAX_PROMPT})")
    reference = _upload("reference image", req.reference) if "image" in methods else None
    style = _upload("style image", req.style) if "style" in methods else None
    req = replace(req, methods=methods, class_name=class_name, prompt=prompt, reference=reference, style=style,
                  steps=steps, n=n, seed=seed, strip=bool(req.strip), **fields)
    _sampling(req).validate(models.schedule)  # steps against T, the solver's options
    for name, path in (("reference image", reference), ("style image", style)):
        if path is not None:  # a non-image upload fails here, before any sampling
            try:
                _image(path, models)
            except CondiffError as e:  # the upload's own name, not the server's temp path
                raise CondiffError(f"{name} {str(e).replace(path, os.path.basename(path))}") from None
    return req


def _image(path: str, models: Models) -> torch.Tensor:
    from ..images import load_image

    C, H, _ = models.shape
    return load_image(path, H, C)


def _class_index(req: Request, models: Models) -> int:
    from ..data import resolve_class

    names = models.class_names
    return resolve_class(req.class_name, names, len(names) or None)


def solvers() -> list:
    """The samplers the page offers: "auto" (the library's default) and every solver of
    :data:`condiff.samplers.SAMPLERS`."""
    from ..compose import AUTO
    from ..samplers import SAMPLERS

    return [AUTO, *SAMPLERS]


def _sampling(req: Request):
    """The request's :class:`condiff.compose.Sampling`: eta only for solvers that take it."""
    from ..compose import Sampling, solver_options

    takes_eta = "eta" in solver_options(req.sampler)
    return Sampling(req.sampler, req.steps, options={"eta": req.eta} if takes_eta else {})


def _sample(models: Models, req: Request, n: int, factor: float = 1.0, callback=None) -> torch.Tensor:
    """The adapter: ``req`` with every guidance scale times ``factor`` -> n images, as ``condiff sample``.

    The only place where the server composes guidance: a :class:`condiff.compose.Guidance` of
    the request's terms, :func:`condiff.compose.compose`, :func:`condiff.pipeline.generate`.
    """
    from ..compose import Guidance, class_guidance, compose
    from ..guidance import ClassifierTerm
    from ..pipeline import generate
    from ..similarity.terms import ImageSimilarity, StyleSimilarity, TextSimilarity

    methods = set(req.methods)
    classes = "cfg" in methods or "classifier" in methods
    how = class_guidance(models.diffusion, classes=classes, cfg_w=req.cfg_w * factor if "cfg" in methods else None,
                         classifier="classifier" in methods)
    terms = []
    if "classifier" in methods:  # its target class: cond["y"]
        terms.append(ClassifierTerm(models.classifier, None, req.classifier_scale * factor))
    if "text" in methods:
        terms.append(TextSimilarity.from_prompt(models.text_encoder, req.prompt, req.text_scale * factor,
                                                models.text_model))
    if "image" in methods:
        terms.append(ImageSimilarity.from_encoder(models.image_encoder, _image(req.reference, models),
                                                  req.image_scale * factor))
    if "style" in methods:
        terms.append(StyleSimilarity.from_encoder(models.image_encoder, _image(req.style, models),
                                                  req.style_scale * factor, models.schedule))
    sampling = _sampling(req)
    eps, shift = compose(models.diffusion, models.schedule, Guidance(terms=terms, **how), sampling)
    cond = {"y": torch.full((n,), _class_index(req, models), dtype=torch.long)} if classes else None
    return generate(eps, models.schedule, n, shape=models.shape, cond=cond, mean_shift=shift, seed=req.seed,
                    device=models.device, callback=callback, **sampling.kwargs())


SCALE_NAMES = {"cfg": ("cfg_w", "w"), "classifier": ("classifier_scale", "classifier"),
               "text": ("text_scale", "text"), "image": ("image_scale", "image"), "style": ("style_scale", "style")}


def scale_labels(req: Request, factors) -> list:
    """One label per strip column: the scales of the request's methods at that factor ("w 2, image 50")."""
    return [", ".join(f"{SCALE_NAMES[m][1]} {getattr(req, SCALE_NAMES[m][0]) * f:g}" for m in req.methods)
            for f in factors]


@dataclass
class Result:
    """What one request made: the images, the scale strip, the timings and the equivalent command."""

    request: Request
    images: torch.Tensor                 # (n, C, H, W) in [-1, 1]
    labels: torch.Tensor | None          # (n,) class indices, or None
    strip: torch.Tensor | None           # (k * len(factors), C, H, W): row = seed, column = factor
    strip_factors: tuple
    seconds: float
    first_preview_s: float | None
    command: str
    warning: str | None = None           # guidance saturated the images (condiff.compose.saturation_warning)


def run(models: Models, req: Request, progress: Callable[[int, int, torch.Tensor], None] | None = None) -> Result:
    """Validate ``req``, make its images and its scale strip; ``progress(done, total, x0)`` each step.

    The strip holds the first ``STRIP_IMAGES`` seeds of the grid at every scale of
    :data:`STRIP_FACTORS` times the request's scales (factor 1 is the request itself): the
    article's trade-off between relevance (larger scales) and diversity (smaller ones).
    """
    req = validate(req, models)
    guided = bool(req.methods)
    k = min(req.n, STRIP_IMAGES)
    factors = STRIP_FACTORS if req.strip and guided else ()
    total = req.steps * (1 + len(factors))
    done = 0
    t0 = time.perf_counter()
    first = [None]

    def step(info):
        nonlocal done
        done += 1
        if first[0] is None:
            first[0] = time.perf_counter() - t0
        if progress is not None:
            progress(done, total, info["x0"])

    x = _sample(models, req, req.n, callback=step)
    strips = [_sample(models, req, k, f, callback=step) for f in factors]
    strip = torch.stack(strips, 1).flatten(0, 1) if strips else None  # (k, F, ...) -> row per seed
    labels = torch.full((req.n,), _class_index(req, models)) if req.class_name is not None else None
    from ..compose import saturation_warning

    return Result(req, x, labels, strip, tuple(factors), time.perf_counter() - t0, first[0],
                  command_line(req, models), saturation_warning(x))


def command_line(req: Request, models: Models, out: str = "samples.png", npz: str = "samples.npz") -> str:
    """The ``condiff sample`` command that makes the same grid (uploads named by their file names)."""
    from ..compose import solver_options

    q = shlex.quote
    args = ["condiff", "sample"]
    paths = models.paths
    if paths.get("ckpt"):
        args += ["--ckpt", q(paths["ckpt"])]
    m = set(req.methods)
    if req.class_name is not None:
        args += ["--class", q(req.class_name)]
    if "cfg" in m:
        args += ["--cfg-w", f"{req.cfg_w:g}"]
    if "classifier" in m:
        args += ["--classifier"] + ([q(paths["classifier"])] if paths.get("classifier") else [])
        args += ["--scale", f"{req.classifier_scale:g}"]
    if "text" in m:
        args += ["--text", q(req.prompt), "--text-scale", f"{req.text_scale:g}"]
        if paths.get("text_encoder"):
            args += ["--text-encoder", q(paths["text_encoder"])]
    if "image" in m:
        args += ["--image", q(_upload_name(req.reference, "reference.png")), "--image-scale", f"{req.image_scale:g}"]
    if "style" in m:
        args += ["--style", q(_upload_name(req.style, "style.png")), "--style-scale", f"{req.style_scale:g}"]
    if ("image" in m or "style" in m) and paths.get("image_encoder"):
        args += ["--image-encoder", q(paths["image_encoder"])]
    args += ["--sampler", req.sampler, "--steps", str(req.steps)]
    options = _sampling(req).options
    if "eta" in options and options["eta"] != solver_options(req.sampler)["eta"]:
        args += ["--eta", f"{req.eta:g}"]
    args += ["--n", str(req.n), "--seed", str(req.seed), "--out", q(out), "--npz", q(npz)]
    return " ".join(args)


def _upload_name(path, default: str) -> str:
    name = os.path.basename(str(path or "")) or default
    return name


def save_result(result: Result, folder) -> dict:
    """Write the grid PNG (as ``condiff sample --out``), the .npz and the strip PNG; returns their paths."""
    from ..images import save_grid, save_npz

    folder = Path(folder)
    out = {"png": save_grid(result.images, folder / "samples.png", nrow=result.request.n),
           "npz": save_npz(folder / "samples.npz", result.images, result.labels)}
    if result.strip is not None:
        out["strip"] = save_grid(result.strip, folder / "scale-strip.png", nrow=len(result.strip_factors), upscale=3)
    return out
