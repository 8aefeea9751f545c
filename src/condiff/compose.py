"""One composition path: a guidance description and sampler settings in, what a solver takes out.

Every front end (``condiff sample``, ``demo``, ``sweep``, the benchmarks) describes what it
wants with two small dataclasses and calls :func:`compose`; nothing else decides how a model
and its guidance are put together::

    from condiff.compose import Guidance, Sampling, compose
    from condiff.guidance import ClassifierTerm
    from condiff.pipeline import generate, load_classifier, load_diffusion

    model, schedule, config = load_diffusion("runs/cfg")
    clf, _ = load_classifier("runs/clf")
    guidance = Guidance(cfg_w=1.0, terms=[ClassifierTerm(clf, scale=4.0)])  # target class from cond["y"]
    sampling = Sampling("ddpm", steps=50)
    eps, shift = compose(model, schedule, guidance, sampling)
    y = torch.arange(10).repeat_interleave(8)                      # one class per row, any batch size
    x = generate(eps, schedule, 80, shape=(1, 28, 28), cond={"y": y}, mean_shift=shift,
                 seed=0, batch_size=32, **sampling.kwargs())

* :class:`Guidance`: CFG weight w / interval / rescale (eq 24), the null branch, gradient terms
  with their scales (eqs 8, 11-15), form "score" (eq 19) or "mean" (eqs 6-7) and where the
  gradient is taken; :meth:`Guidance.config` / :meth:`Guidance.from_config` round-trip everything
  that is not a network through JSON.
* :class:`Sampling`: the solver (a key of :data:`condiff.samplers.SAMPLERS`), steps, step spacing
  (:data:`condiff.schedule.SPACINGS`), x0 clipping / thresholding and the solver's own options
  (``eta``, ``variance``, ... read from the solver's signature).
* :func:`compose`: (model, schedule, guidance[, sampling]) -> (eps-model, mean_shift or None),
  validating the combination with one-line :class:`~condiff.errors.CondiffError` s.

The batch condition ``cond`` is described in :mod:`condiff.guidance` (``cond["y"]`` for the
network, per-row targets of the terms under their keys).  Every default lives here once.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from .errors import CondiffError
from .cfg_family import APG, CFGPP_SAMPLERS, AutoGuided, CFGPlusPlus, ProjectedGuidance
from .guidance import (FORMS, GRAD_AT, ClassifierFree, Conditioned, GradientTerm, MeanShift, NullBranch, ScoreGuided,
                       check_interval, check_scale)
from .samplers import MEAN_SHIFT_SAMPLERS, SAMPLERS, STOCHASTIC
from .schedule import SPACINGS, Schedule, respace
from .x0guidance import X0Term

__all__ = ["AUTO", "AUTO_SAMPLERS", "auto_sampler", "DEFAULT_SCALES", "SCALE_RANGES", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_SPACING", "DEFAULT_CLIP_X0",
           "MAX_ETA", "Guidance", "Sampling", "Composed", "Recurrent", "compose", "solver_options", "is_stochastic",
           "class_guidance",
           "saturated_images", "saturation_warning"]

#: The default solver: "auto" picks one of the measured best for the guidance at hand (:func:`auto_sampler`).
AUTO = "auto"
DEFAULT_SAMPLER = AUTO
#: 15 steps: UniPC at 15 network calls beats DDIM-50 with CFG w = 2 on the shipped model (FID_fm 9.24 against
#: 10.23, judge accuracy 0.980 against 0.984, 1000 samples each; docs/solvers.md), at 0.3x its calls.
DEFAULT_STEPS = 15
#: What "auto" stands for (docs/solvers.md, shipped models, 500-1000 samples per point): without gradient
#: terms (unguided, CFG) the deterministic UniPC has the lowest FID_fm at 10-25 network calls; with gradient
#: terms (classifier, similarity, x0) the stochastic DPM-Solver++(2M) SDE steers far better (classifier
#: gamma 16 at 15 calls: judge accuracy 0.978, FID_fm 20.2; DDIM-25: 0.888, 34.6), since fresh noise each step
#: corrects the guidance's errors; the mean form needs an ancestral mean (ddpm); CFG++ lives in DDIM's step.
AUTO_SAMPLERS = {"plain": "unipc", "gradient": "dpm++2m-sde", "mean": "ddpm", "cfg++": "ddim"}
DEFAULT_SPACING = "linspace"
DEFAULT_CLIP_X0 = 1.0  # the data range: a tiny abar_{T-1} (cosine: 5e-5) otherwise saturates the first steps
#: The guidance scale each method gets when none is given (``condiff sample``, ``demo``), chosen from
#: the measured sweeps of the shipped Fashion-MNIST models (docs/results.md, 1000 samples per scale,
#: judge accuracy and FID_fm; docs/which-method.md explains each choice). "cfg" is the article's w
#: (eq 24; diffusers' guidance_scale is 1 + w), the others are gamma (eqs 8, 14).
DEFAULT_SCALES = {"cfg": 0.5, "classifier": 16.0, "text": 100.0, "image": 100.0, "style": 10.0, "text-cfg": 2.0}
#: The useful range of each scale in words, as measured (docs/results.md): shown by ``--help``.
SCALE_RANGES = {
    "cfg": "typical 0.5-1: judge accuracy 0.87 at w=0, 0.96 at 0.5, 0.97 at 0.75, 0.98 at 1, 0.995 at 2, but "
           "FID_fm is lowest at 0.5 (5.4 with DDIM-25, 2.9 with the default solver) and more than triples by 2 "
           "as diversity falls",
    "classifier": "typical 16-64: judge accuracy 0.09 at 0, 0.83 at 4, 0.92 at 16, 0.93 at 32, 0.94 at 64 (DDIM "
                  "eta 0; 0.96 at 16 and 0.97 at 32 with the default solver), while recall keeps falling",
    "text": "typical 100: judge accuracy 0.97 at 100 on class prompts, 0.86 on paraphrases never seen in "
            "training; 300 was no better with an earlier release (worse FID_fm and recall)",
    "image": "typical 30-100: judge accuracy 0.90 at 30, 0.94 at 100; 30 keeps more diversity (FID_fm 19.7 vs 21.1)",
    "style": "with the shipped encoder no visible stripes at any scale measured, 0-100 (docs/similarity.md); "
             "at 100 it adds noisy texture",
    "text-cfg": "judge accuracy 0.99 at 2 on prompts in training phrasings (brightness followed 0.82 of the time, "
                "texture 0.62, shape 0.57); new words are not followed (docs/text-to-image.md)",
}
MAX_ETA = 1.0  # DDIM's sigma_t = eta * posterior std exceeds bbar_s beyond eta = 1 (eq 17 has no real solution)

# keyword arguments every solver takes (the sampling-core contract); the rest of a solver's
# keyword-only parameters are its own options
_CONTRACT = {"cond", "generator", "spacing", "clip_x0", "threshold", "callback", "progress", "mean_shift"}


def auto_sampler(model, mean_shift=None) -> str:
    """The solver that ``sampler="auto"`` stands for, from the composed model (:data:`AUTO_SAMPLERS`).

    Reads what :func:`compose` built: a mean shift, a CFG++ wrapper (it has ``eps_pair``), or
    gradient terms with a non-zero scale somewhere in the wrapper chain (``ScoreGuided``).
    """
    if mean_shift is not None:
        return AUTO_SAMPLERS["mean"]
    if hasattr(model, "eps_pair"):
        return AUTO_SAMPLERS["cfg++"]
    m = model
    for _ in range(32):  # wrappers keep the model they wrap as .model
        if isinstance(m, ScoreGuided) and any(term.scale for term in m.terms):
            return AUTO_SAMPLERS["gradient"]
        m = getattr(m, "model", None)
        if m is None or isinstance(m, torch.nn.Module):
            break
    return AUTO_SAMPLERS["plain"]


def solver_options(name: str) -> dict:
    """The options of solver ``name`` with their defaults (e.g. ddim: {"eta": 0.0}), read from its signature;
    "auto" takes none (choose the solver to set its options)."""
    if name == AUTO:
        return {}
    if name not in SAMPLERS:
        raise CondiffError(f"unknown sampler {name!r} (choose {', '.join(SAMPLERS)})")
    params = inspect.signature(SAMPLERS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _CONTRACT}


def is_stochastic(name: str, options: dict | None = None) -> bool:
    """Whether solver ``name`` adds fresh noise each step (DDIM only with eta > 0)."""
    return name in STOCHASTIC or float((options or {}).get("eta", 0) or 0) > 0


@dataclass
class Sampling:
    """How to sample: solver, steps, step spacing, x0 clipping / thresholding, solver options.

    Args:
        sampler: a key of :data:`condiff.samplers.SAMPLERS`.
        steps: number of steps after respacing, or an explicit list of timesteps.
        spacing: one of :data:`condiff.schedule.SPACINGS`.
        clip_x0: clamp the predicted x_0 to [-c, c] each step; None or 0 is off.
        threshold: dynamic thresholding of x_0 (Imagen): the percentile, in (0, 1]; None is off.
        options: the solver's own options, e.g. ``{"eta": 1.0}`` for ddim, ``{"variance": "ddpm-beta"}``
            for ddpm (:func:`solver_options` lists them); anything else is an error.
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int | Sequence[int] | None = DEFAULT_STEPS
    spacing: str = DEFAULT_SPACING
    clip_x0: float | None = DEFAULT_CLIP_X0
    threshold: float | None = None
    options: dict = field(default_factory=dict)

    def validate(self, schedule: Schedule | None = None, mean_shift: bool = False) -> "Sampling":
        """One-line errors for an unknown solver, option or spacing, bad steps, mean shift without a mean."""
        known = solver_options(self.sampler)
        unknown = sorted(set(self.options) - set(known))
        if unknown and self.sampler == AUTO:
            raise CondiffError(f"the solver options {', '.join(unknown)} need a solver that takes them: choose it "
                               "(e.g. --sampler ddim for --eta, --sampler ddpm for --variance)")
        if unknown:
            has = f"its options are {', '.join(known)}" if known else "it has no options"
            raise CondiffError(f"sampler {self.sampler} does not take {', '.join(unknown)} ({has})")
        if self.spacing not in SPACINGS:
            raise CondiffError(f"unknown step spacing {self.spacing!r} (choose {', '.join(SPACINGS)})")
        eta = self.options.get("eta")
        if eta is not None and (not math.isfinite(float(eta)) or not 0 <= float(eta) <= MAX_ETA):
            raise CondiffError(f"eta must lie in [0, {MAX_ETA:g}] (sigma_t = eta * posterior std), got {eta}")
        if self.clip_x0 is not None and (not math.isfinite(self.clip_x0) or self.clip_x0 < 0):
            raise CondiffError(f"clip_x0 must be a finite number >= 0, got {self.clip_x0}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise CondiffError(f"threshold is a percentile in (0, 1], got {self.threshold}")
        if schedule is not None:
            respace(schedule, self.steps, self.spacing)  # steps against T, and the spacing
        if mean_shift and self.sampler != AUTO:  # "auto" is ddpm under a mean shift
            if self.sampler not in MEAN_SHIFT_SAMPLERS:
                raise CondiffError(f"mean-shift guidance (eqs 6-7) needs an ancestral sampler "
                                   f"({', '.join(sorted(MEAN_SHIFT_SAMPLERS))}); sampler {self.sampler} has no "
                                   "reverse mean: use form score (eq 19)")
            if not is_stochastic(self.sampler, self.options):
                raise CondiffError(f"mean-shift guidance needs sigma_t > 0: sampler {self.sampler} is deterministic "
                                   "here (use ddpm, eta > 0, or form score)")
        return self

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`condiff.pipeline.generate`."""
        return dict(sampler=self.sampler, steps=self.steps, spacing=self.spacing, clip_x0=self.clip_x0,
                    threshold=self.threshold, **self.options)

    def config(self) -> dict:
        steps = self.steps if self.steps is None or isinstance(self.steps, int) else list(self.steps)
        return {"sampler": self.sampler, "steps": steps, "spacing": self.spacing, "clip_x0": self.clip_x0,
                "threshold": self.threshold, "options": dict(self.options)}

    @classmethod
    def from_config(cls, config: dict) -> "Sampling":
        unknown = set(config) - {"sampler", "steps", "spacing", "clip_x0", "threshold", "options"}
        if unknown:
            raise CondiffError(f"unknown sampling settings: {', '.join(sorted(unknown))}")
        return cls(**{k: (dict(v) if k == "options" else v) for k, v in config.items()})


@dataclass
class Guidance:
    """What steers the model: classifier-free guidance, the null branch, gradient terms, their form.

    Args:
        cfg_w: classifier-free weight w of eq 24 (diffusers' guidance_scale is 1 + w); None is no
            CFG, 0 plain conditional sampling.  The network's condition is ``cond["y"]``.
        cfg_interval: (lo, hi): CFG only for lo <= t <= hi, inside [0, T) (Kynkaanniemi et al. 2024).
        cfg_rescale: guidance rescale phi in [0, 1] (Lin et al. 2023); 0 is off.
        unconditional: sample the null branch phi of a conditional model (for gradient guidance of
            a model trained with condition dropout).
        terms: gradient terms (:class:`~condiff.guidance.GradientTerm`), each with its own scale.
        form: "score" (eq 19: eps - bbar_t g, any sampler) or "mean" (eqs 6-7: mu + sigma_t^2 g,
            ancestral samplers only).
        grad_at: the mean form's gradient location, "x_t" (eq 6) or "mu" (eq 7).

    Beyond the article (issue 16; each off by default):
        apg: :class:`~condiff.cfg_family.APG` settings: CFG with weight ``cfg_w`` as adaptive projected
            guidance (Sadat et al. 2024).
        weak_model: autoguidance (Karras et al. 2024): eq 24 with weight ``cfg_w`` against this weaker
            eps-model instead of the null branch (not stored by :meth:`config`; give it to
            :meth:`from_config`).
        weak_w: autoguidance *and* CFG in one call: autoguidance gets this weight and ``cfg_w`` is classifier-free
            guidance's, eps~ = eps_c + cfg_w (eps_c - eps_u) + weak_w (eps_c - eps_weak)
            (:class:`~condiff.cfg_family.AutoGuided`); None (default): ``cfg_w`` is autoguidance's, no CFG.
        cfg_pp: CFG++'s lambda (Chung et al. 2024), instead of ``cfg_w``; the ddim sampler only.
        grad_interval: (lo, hi): the gradient terms act only for lo <= t <= hi.
        recurrence: Universal Guidance's self-recurrence k: every step re-noised and repeated k - 1 times
            (k network calls per step; :func:`condiff.samplers._predict_step`); 1 is off.
    Terms may be :class:`~condiff.x0guidance.X0Term` s (x0-guidance on clean networks): :func:`compose`
    gives them the eps-model it builds.
    """

    cfg_w: float | None = None
    cfg_interval: tuple[int, int] | None = None
    cfg_rescale: float = 0.0
    unconditional: bool = False
    terms: list = field(default_factory=list)
    form: str = "score"
    grad_at: str = "x_t"
    apg: APG | None = None
    weak_model: object = None
    weak_w: float | None = None
    cfg_pp: float | None = None
    grad_interval: tuple[int, int] | None = None
    recurrence: int = 1

    def validate(self, schedule: Schedule | None = None, model=None) -> "Guidance":
        """One-line errors for every combination that would be silently ignored or meaningless."""
        if self.form not in FORMS:
            raise CondiffError(f"guidance form must be score or mean, got {self.form!r}")
        if self.grad_at not in GRAD_AT:
            raise CondiffError(f"gradient location must be x_t or mu, got {self.grad_at!r}")
        if self.grad_at != "x_t" and (self.form != "mean" or not self.terms):
            raise CondiffError("the gradient location mu (eq 7) applies to the mean form with gradient terms "
                               "(use form mean)")
        if self.form == "mean" and not self.terms:
            raise CondiffError("form mean applies to gradient terms (classifier, text, image, style); there are none")
        for term in self.terms:
            if not isinstance(term, GradientTerm):
                raise CondiffError(f"a guidance term must be a GradientTerm, got {type(term).__name__}")
        self._validate_family(schedule)
        if self.cfg_w is not None:
            check_scale("cfg weight w", self.cfg_w)
            if self.unconditional:
                raise CondiffError("classifier-free guidance and the unconditional null branch exclude each other")
        elif self.cfg_pp is None:
            if self.cfg_interval is not None:
                raise CondiffError("the CFG interval applies to classifier-free guidance: give a CFG weight w")
            if self.cfg_rescale:
                raise CondiffError("guidance rescale applies to classifier-free guidance: give a CFG weight w")
        if check_scale("guidance rescale", self.cfg_rescale) > 1:
            raise CondiffError(f"guidance rescale must lie in [0, 1], got {self.cfg_rescale}")
        check_interval(self.cfg_interval, "CFG interval", schedule.T if schedule is not None else None)
        needs_null = (self.cfg_w is not None and (self.weak_model is None or self.weak_w is not None)) or \
            self.unconditional or self.cfg_pp is not None
        if model is not None and needs_null and not hasattr(model, "null_cond"):
            what = ("the null branch" if self.unconditional else "CFG++" if self.cfg_pp is not None
                    else "classifier-free guidance")
            raise CondiffError(f"{what} needs a model trained with a null condition (condition dropout)")
        return self

    def _validate_family(self, schedule: Schedule | None) -> None:
        """The issue-16 fields: APG, autoguidance, CFG++, gradient interval, recurrence."""
        T = schedule.T if schedule is not None else None
        if self.apg is not None:
            if not isinstance(self.apg, APG):
                raise CondiffError(f"apg must be condiff.cfg_family.APG settings, got {type(self.apg).__name__}")
            if self.cfg_w is None:
                raise CondiffError("APG applies to classifier-free guidance: give a CFG weight w")
        if self.weak_model is not None:
            if self.cfg_w is None:
                raise CondiffError("autoguidance needs a guidance weight w (cfg_w)")
            if self.apg is not None:
                raise CondiffError("autoguidance and APG exclude each other (choose one)")
        if self.weak_w is not None:
            if self.weak_model is None:
                raise CondiffError("weak_w is autoguidance's weight: give the weak model too")
            check_scale("autoguidance weight weak_w", self.weak_w)
        if (self.apg is not None or self.weak_model is not None or self.cfg_pp is not None) and self.cfg_rescale:
            raise CondiffError("guidance rescale applies to plain classifier-free guidance (not APG, autoguidance "
                               "or CFG++)")
        if self.cfg_pp is not None:
            check_scale("CFG++ lambda", self.cfg_pp)
            if self.cfg_w is not None or self.unconditional:
                raise CondiffError("CFG++ (lambda) replaces classifier-free guidance: give cfg_pp or cfg_w, not both, "
                                   "and no null branch")
            if self.terms:
                raise CondiffError("CFG++ does not combine with gradient terms (use cfg_w)")
        if self.grad_interval is not None:
            if not self.terms:
                raise CondiffError("the guidance interval for gradient terms needs gradient terms (for CFG use "
                                   "the CFG interval)")
            check_interval(self.grad_interval, "guidance interval", T)
        if not isinstance(self.recurrence, int) or isinstance(self.recurrence, bool) or self.recurrence < 1:
            raise CondiffError(f"recurrence must be an integer >= 1, got {self.recurrence!r}")
        if self.recurrence > 1 and self.form == "mean":
            raise CondiffError("self-recurrence repeats the score-form step: use form score")

    def config(self) -> dict:
        """Everything but the networks, JSON-able; the terms as their settings (name, scale, key, ...)."""
        return {"cfg_w": self.cfg_w, "cfg_interval": None if self.cfg_interval is None else list(self.cfg_interval),
                "cfg_rescale": self.cfg_rescale, "unconditional": self.unconditional, "form": self.form,
                "grad_at": self.grad_at, "terms": [t.config() for t in self.terms],
                "apg": None if self.apg is None else self.apg.config(), "autoguidance": self.weak_model is not None,
                "weak_w": self.weak_w, "cfg_pp": self.cfg_pp, "recurrence": self.recurrence,
                "grad_interval": None if self.grad_interval is None else list(self.grad_interval)}

    @classmethod
    def from_config(cls, config: dict, terms: Sequence[GradientTerm] = (), weak_model=None) -> "Guidance":
        """The inverse of :meth:`config`; ``terms`` (and ``weak_model`` for autoguidance) supply the networks,
        the terms in the config's order.

        Each given term is copied with the config's scale, so one set of loaded terms serves
        every stored guidance.
        """
        config = dict(config)
        specs = config.pop("terms", [])
        autoguidance = bool(config.pop("autoguidance", False))
        if autoguidance != (weak_model is not None):
            raise CondiffError("the guidance config uses autoguidance: give its weak model" if autoguidance else
                               "a weak model was given but the guidance config does not use autoguidance")
        unknown = set(config) - {"cfg_w", "cfg_interval", "cfg_rescale", "unconditional", "form", "grad_at", "apg",
                                 "weak_w", "cfg_pp", "recurrence", "grad_interval"}
        if unknown:
            raise CondiffError(f"unknown guidance settings: {', '.join(sorted(unknown))}")
        terms = list(terms)
        if len(terms) != len(specs):
            raise CondiffError(f"the guidance config has {len(specs)} term(s), {len(terms)} given")
        built = []
        for spec, term in zip(specs, terms):
            if spec.get("name") != term.name:
                raise CondiffError(f"the guidance config's term {spec.get('name')!r} is given a {term.name!r} term")
            term = copy.copy(term)
            term.scale = check_scale(f"{term.name} scale", spec.get("scale", term.scale))
            if "sharpen" in spec:
                term.sharpen = bool(spec["sharpen"])
            if isinstance(term, X0Term):
                for key in ("path", "smoothing", "samples"):
                    if key in spec:
                        setattr(term, key, spec[key])
                if spec.get("weight", "custom") != "custom":  # a function weight is the given term's own
                    term.weight = spec["weight"]
            built.append(term)
        for key in ("cfg_interval", "grad_interval"):
            if config.get(key) is not None:
                config[key] = tuple(int(v) for v in config[key])
        if config.get("apg") is not None:
            config["apg"] = APG(**config["apg"])
        return cls(terms=built, weak_model=weak_model, **config)


class Composed(NamedTuple):
    """What a solver takes: the guided eps-model, and the mean shift (mean form) or None."""

    model: object
    mean_shift: object


class Recurrent:
    """A model with Universal Guidance's self-recurrence k (``recurrence``), which every solver reads
    (:func:`condiff.samplers._predict_step`); calls pass through unchanged."""

    def __init__(self, model, k: int):
        self.model, self.recurrence = model, int(k)
        if hasattr(model, "eps_pair"):
            self.eps_pair = model.eps_pair

    def __call__(self, x, t, cond=None):
        return self.model(x, t, cond)


def compose(model, schedule: Schedule, guidance: Guidance | None = None, sampling: Sampling | None = None) -> Composed:
    """Turn (model, schedule, guidance) into (guided eps-model, mean_shift) for any solver.

    CFG (eq 24) or the null branch wrap the network; gradient terms wrap that in score form
    (eq 19, every solver) or become the ``mean_shift`` of an ancestral sampler (eqs 6-7).  With
    ``sampling``, the pair is checked against the solver too (the mean form needs a reverse mean
    with sigma_t > 0).  The result is called with the batch condition ``cond`` (a class tensor, or
    a dict whose "y" entry the network sees and whose other entries the terms read).
    """
    guidance = (guidance or Guidance()).validate(schedule, model)
    if sampling is not None:
        sampling.validate(schedule, mean_shift=guidance.form == "mean" and bool(guidance.terms))
        if guidance.cfg_pp is not None and sampling.sampler not in (*CFGPP_SAMPLERS, AUTO):
            raise CondiffError(f"CFG++ re-noises with the unconditional eps inside the solver step: sampler "
                               f"{sampling.sampler} has no such hook (use {', '.join(CFGPP_SAMPLERS)})")
    g = guidance
    if g.unconditional:
        eps = NullBranch(model)
    elif g.cfg_pp is not None:
        eps = CFGPlusPlus(model, g.cfg_pp, interval=g.cfg_interval)
    elif g.cfg_w is not None and g.weak_model is not None:
        if g.weak_w is None:
            eps = AutoGuided(model, g.weak_model, g.cfg_w, interval=g.cfg_interval)
        else:
            eps = AutoGuided(model, g.weak_model, g.weak_w, interval=g.cfg_interval, cfg_w=g.cfg_w)
    elif g.cfg_w is not None and g.apg is not None:
        eps = ProjectedGuidance(model, schedule, g.cfg_w, g.apg, interval=g.cfg_interval)
    elif g.cfg_w is not None:
        eps = ClassifierFree(model, g.cfg_w, interval=g.cfg_interval, rescale=g.cfg_rescale)
    else:
        eps = Conditioned(model)
    terms = [t.bind(eps, schedule) if isinstance(t, X0Term) else t for t in g.terms]  # x0_hat from this eps
    shift = None
    if terms and g.form == "score":
        eps = ScoreGuided(eps, schedule, terms, interval=g.grad_interval)
    elif terms:
        shift = MeanShift(terms, at=g.grad_at, interval=g.grad_interval)
    return Composed(Recurrent(eps, g.recurrence) if g.recurrence > 1 else eps, shift)


def class_guidance(model, *, classes: bool, cfg_w: float | None = None, classifier: bool = False,
                   unconditional: bool = False) -> dict:
    """How a model meets class targets: the ``cfg_w`` / ``unconditional`` fields of :class:`Guidance`.

    A conditional model given classes samples them itself (CFG weight ``cfg_w``, 0 = plain
    conditional, None = :data:`DEFAULT_SCALES` ``["cfg"]``) unless a classifier guides it, which then works on the null branch (the
    unconditional model inside it, eq 24's phi); with no classes it samples the null branch.
    """
    conditional = bool(getattr(model, "conditional", False))
    if cfg_w is not None and not classes:
        raise CondiffError("classifier-free guidance needs a class (--class)")
    if classifier and not classes:
        raise CondiffError("classifier guidance needs a class (--class)")
    if classes and not conditional and not classifier:
        raise CondiffError("this model is unconditional: pass a classifier (--classifier CKPT) to guide it to a class")
    if cfg_w is not None and not conditional:
        raise CondiffError("classifier-free guidance needs a conditional model trained with a null condition")
    if unconditional:
        if cfg_w is not None:
            raise CondiffError("classifier-free guidance and the unconditional null branch exclude each other")
        if classes and not classifier:
            raise CondiffError("the unconditional null branch (--unconditional) ignores the class: give a "
                               "classifier (--classifier CKPT) or drop --unconditional")
        if not conditional:
            raise CondiffError("this model is unconditional already: it has no null branch (drop --unconditional)")
    use_model = conditional and not unconditional and (cfg_w is not None or (classes and not classifier))
    if use_model:
        return {"cfg_w": cfg_w if cfg_w is not None else DEFAULT_SCALES["cfg"], "unconditional": False}
    return {"cfg_w": None, "unconditional": conditional}


def saturated_images(x: torch.Tensor, level: float = 0.98, share: float = 0.995) -> int:
    """How many images of ``x`` (N, C, H, W) in [-1, 1] are saturated: nearly every pixel at -1 or +1.

    Real images (and good samples) have mid-tones at least along their edges; a guidance scale
    or eta far too large drives the x0 prediction to the clip range everywhere.
    """
    flat = x.detach().float().flatten(1)
    at_edge = (~torch.isfinite(flat)) | (flat.abs() >= level)
    return int((at_edge.float().mean(1) >= share).sum())


def saturation_warning(x: torch.Tensor) -> str | None:
    """A one-line warning when guidance saturated the samples, else None (see :func:`saturated_images`)."""
    k = saturated_images(x)
    if not k:
        return None
    return (f"{k} of {len(x)} images are saturated (every pixel black or white): the guidance scale or eta is "
            "far too large for this model; lower it")
