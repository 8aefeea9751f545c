"""``condiff sweep`` methods of the guidance family beyond the article (issue 16), registered in
:data:`condiff.sweep.METHODS`.

Each is a builder ``(ctx, scale, labels) -> (Guidance, cond)`` with its ``option_keys``:

=================  ======================  ==============================================================
method             scale                   options (``--option KEY=VALUE``)
=================  ======================  ==============================================================
``cfg-interval``   w (eq 24)               ``interval=LO,HI`` (required)
``apg``            w                       ``eta``, ``rescale``, ``momentum``, ``interval``
``cfg++``          lambda                  ``interval``; ``--sampler ddim``
``autoguide``      w                       ``weak=CKPT`` (required), ``interval``, ``cfg_w`` (CFG as well,
                                           with this weight: eps_c + cfg_w (eps_c - eps_u) + w (eps_c - eps_weak))
``x0-classifier``  gamma                   ``classifier=CKPT`` (``--classifier``; a clean one), ``path``,
                                           ``smoothing``, ``samples``, ``weight``, ``recurrence``,
                                           ``interval`` (of the gradient term), ``cfg_w``
``x0-image``       gamma                   as ``image`` (``image_encoder``, ``image_prior``, ``ref_data``,
                                           ``refK``): cos(E2(x0_hat), target) with the clean E2; and
                                           ``path``, ``smoothing``, ``samples``, ``weight``, ``recurrence``,
                                           ``interval``
=================  ======================  ==============================================================
"""

from __future__ import annotations

import torch

from .cfg_family import APG
from .compose import Guidance
from .errors import CondiffError
from .guidance import cond_entry
from .x0guidance import X0Term, at_t0, clean_classifier

__all__ = ["FAMILY_METHODS"]

_X0_KEYS = ("path", "smoothing", "samples", "weight", "recurrence", "interval")


def _number(ctx, key: str, default: float | None = None) -> float | None:
    value = ctx.options.get(key)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise CondiffError(f"--option {key} must be a number, got {value!r}") from None


def _integer(ctx, key: str, default: int) -> int:
    value = _number(ctx, key)
    if value is None:
        return default
    if value != int(value):
        raise CondiffError(f"--option {key} must be an integer, got {ctx.options[key]!r}")
    return int(value)


def _interval(ctx) -> tuple[int, int] | None:
    value = ctx.options.get("interval")
    if not value:
        return None
    try:
        lo, hi = (int(v) for v in str(value).split(","))
    except ValueError:
        raise CondiffError(f"--option interval must be LO,HI timesteps, got {value!r}") from None
    return lo, hi


def _needs_conditional(ctx, method: str) -> None:
    if not ctx.conditional:
        raise CondiffError(f"method {method} needs a conditional model trained with a null condition")


def _cfg_interval_method(ctx, scale: float, labels: torch.Tensor):
    """CFG (eq 24) with weight w = scale, only for LO <= t <= HI (Kynkaanniemi et al. 2024)."""
    _needs_conditional(ctx, "cfg-interval")
    interval = _interval(ctx)
    if interval is None:
        raise CondiffError("method cfg-interval needs --option interval=LO,HI")
    return Guidance(cfg_w=scale, cfg_interval=interval), {"y": labels}


_cfg_interval_method.option_keys = ("interval",)


def _apg_method(ctx, scale: float, labels: torch.Tensor):
    """Adaptive projected guidance (Sadat et al. 2024) with weight w = scale."""
    _needs_conditional(ctx, "apg")
    apg = APG(_number(ctx, "eta", 0.0), _number(ctx, "rescale", 0.0), _number(ctx, "momentum", 0.0))
    return Guidance(cfg_w=scale, apg=apg, cfg_interval=_interval(ctx)), {"y": labels}


_apg_method.option_keys = ("eta", "rescale", "momentum", "interval")


def _cfgpp_method(ctx, scale: float, labels: torch.Tensor):
    """CFG++ (Chung et al. 2024) with lambda = scale (ddim only)."""
    _needs_conditional(ctx, "cfg++")
    return Guidance(cfg_pp=scale, cfg_interval=_interval(ctx)), {"y": labels}


_cfgpp_method.option_keys = ("interval",)


def _autoguide_method(ctx, scale: float, labels: torch.Tensor):
    """Autoguidance (Karras et al. 2024) with weight w = scale against ``--option weak=CKPT``; with ``--option
    cfg_w=W`` classifier-free guidance with weight W in the same call (a combination)."""
    if "weak" not in ctx.cache:
        from .pipeline import load_diffusion

        path = ctx.options.get("weak")
        if not path:
            raise CondiffError("method autoguide needs --option weak=CKPT (a weaker eps-model of the same recipe)")
        weak, schedule, _ = load_diffusion(path, ctx.device)
        if not schedule.same_as(ctx.schedule):
            raise CondiffError(f"{path}: the weak model's noise schedule differs from the model's")
        if bool(getattr(weak, "conditional", False)) != ctx.conditional:
            raise CondiffError(f"{path}: the weak model must be conditional exactly when the model is")
        ctx.cache["weak"] = weak
    cfg_w = _number(ctx, "cfg_w")
    if cfg_w is None:
        return Guidance(cfg_w=scale, weak_model=ctx.cache["weak"], cfg_interval=_interval(ctx)), {"y": labels}
    _needs_conditional(ctx, "autoguide with cfg_w")
    return Guidance(cfg_w=cfg_w, weak_model=ctx.cache["weak"], weak_w=scale, cfg_interval=_interval(ctx)), \
        {"y": labels}


_autoguide_method.option_keys = ("weak", "interval", "cfg_w")


def _x0_options(ctx) -> dict:
    smoothing = _number(ctx, "smoothing", 0.0)
    return dict(path=ctx.options.get("path") or "model", smoothing=smoothing,
                samples=_integer(ctx, "samples", 4 if smoothing else 1), weight=ctx.options.get("weight") or None)


def _x0_guidance(ctx, term: X0Term, cfg_w: float | None = None) -> Guidance:
    if cfg_w is None:
        return Guidance(unconditional=ctx.conditional, terms=[term], grad_interval=_interval(ctx),
                        recurrence=_integer(ctx, "recurrence", 1))
    _needs_conditional(ctx, "x0 guidance with cfg_w")
    return Guidance(cfg_w=cfg_w, terms=[term], grad_interval=_interval(ctx), recurrence=_integer(ctx, "recurrence", 1))


def _x0_classifier_method(ctx, scale: float, labels: torch.Tensor):
    """x0-guidance with a clean classifier, gamma = scale: grad_{x_t} log p(y | x0_hat(x_t)) (DPS / Universal
    Guidance), on the unconditional model (or the null branch; with ``cfg_w`` on CFG instead)."""
    if "x0-classifier" not in ctx.cache:
        from .pipeline import load_classifier

        path = ctx.options.get("classifier")
        if not path:
            raise CondiffError("method x0-classifier needs a clean classifier (--classifier CKPT; condiff "
                               "train-classifier --clean)")
        clf, cconf = load_classifier(path, ctx.device)
        names = cconf.get("class_names") or []
        if names and ctx.class_names and names != ctx.class_names:
            raise CondiffError(f"{path}: the classifier's classes differ from the model's")
        ctx.cache["x0-classifier"] = at_t0(clf)
    term = X0Term(clean_classifier(ctx.cache["x0-classifier"]), scale, name="x0-classifier", **_x0_options(ctx))
    return _x0_guidance(ctx, term, _number(ctx, "cfg_w")), {"y": labels}


_x0_classifier_method.option_keys = ("classifier", "cfg_w") + _X0_KEYS


def _x0_image_method(ctx, scale: float, labels: torch.Tensor):
    """x0-guidance with the clean image encoder, gamma = scale: grad_{x_t} cos(E2(x0_hat(x_t)), target_k), the
    targets of method image (E2 of each class's reference, with the prototype prior)."""
    from .similarity.sweep_methods import class_references
    from .similarity.terms import cosine

    ref = class_references(ctx)
    e2 = ref.e2

    def similarity(x0, t, cond):
        target = cond_entry(cond, "image")
        if target is None:
            raise CondiffError("x0 image guidance: no target (put cond['image'] in the batch)")
        return cosine(e2(x0), target)

    term = X0Term(similarity, scale, name="x0-image", key="image", **_x0_options(ctx))
    return _x0_guidance(ctx, term), {"y": labels, "image": ref.target[labels.to(ref.target.device)]}


_x0_image_method.option_keys = ("image_encoder", "image_prior", "ref_data", r"ref\d+") + _X0_KEYS

FAMILY_METHODS = {"cfg-interval": _cfg_interval_method, "apg": _apg_method, "cfg++": _cfgpp_method,
                  "autoguide": _autoguide_method, "x0-classifier": _x0_classifier_method,
                  "x0-image": _x0_image_method}
