"""``condiff sample`` flags of the guidance family beyond the article (issue 16): x0-guidance, APG, CFG++,
autoguidance, the guidance interval of gradient terms and self-recurrence.

CLI only (the library never imports it): :func:`add_family_sample_args` adds one argument group,
:func:`check_family_args` gives the one-line errors that need no file, and :func:`family_guidance` loads
the networks and returns the fields of :class:`condiff.compose.Guidance`.
"""

from __future__ import annotations

import argparse

from .errors import CondiffError
from .validation import float_range, int_range, nonneg_float, timestep_interval

__all__ = ["SHIPPED_ARG", "shipped_or", "add_family_sample_args", "check_family_args", "family_guidance"]

SHIPPED_ARG = "@shipped"  # a model flag given without a value: the shipped model of its role (condiff.zoo)


def shipped_or(value, role: str):
    """A model flag's value, with SHIPPED_ARG (the flag alone) replaced by the shipped model of ``role``."""
    if value != SHIPPED_ARG:
        return value
    from .zoo import shipped

    return str(shipped(role))


def add_family_sample_args(p: argparse.ArgumentParser) -> None:
    """The argument group of issue 16's methods in ``condiff sample``."""
    from .x0guidance import PATHS, WEIGHTS

    g = p.add_argument_group("guidance beyond the article (x0-guidance, APG, CFG++, autoguidance; all off by "
                             "default)")
    g.add_argument("--x0-guidance", nargs="?", const=SHIPPED_ARG, default=None, metavar="CKPT",
                   help="guide with a clean classifier (condiff train-classifier --clean) on the denoised estimate "
                        "x0_hat = (x_t - bbar_t eps)/abar_t (DPS / Universal Guidance); the flag alone means the "
                        "shipped clean classifier; needs --class")
    g.add_argument("--x0-scale", type=nonneg_float, default=None, help="its scale gamma (default 1)")
    g.add_argument("--x0-path", choices=list(PATHS), default=None,
                   help="gradient through the eps-network (model, DPS; default) or with eps held fixed (fixed: "
                        "no backward pass through the network, (1/abar_t) grad f)")
    g.add_argument("--x0-smoothing", type=nonneg_float, default=None, metavar="RHO",
                   help="Monte-Carlo smoothing of f (TFG): average f(x0_hat + RHO n) over --x0-samples draws "
                        "(default 0 = off)")
    g.add_argument("--x0-samples", type=int_range(1, 1000), default=None, metavar="M",
                   help="draws of the smoothing (default 4 with --x0-smoothing)")
    g.add_argument("--x0-weight", choices=list(WEIGHTS), default=None,
                   help="per-t multiplier of the x0 scale: constant (default), abar (abar_t: damps the noisy "
                        "steps, where x0_hat is poor), abar2 (abar_t^2: with --x0-path fixed x0_hat moves by "
                        "gamma bbar_t^2 grad f, bounded), bbar")
    g.add_argument("--recurrence", type=int_range(1, 100), default=None, metavar="K",
                   help="Universal Guidance's self-recurrence: re-noise and repeat every step K-1 times (K network "
                        "calls per step; default 1 = off)")
    g.add_argument("--guidance-interval", type=timestep_interval, default=None, metavar="LO,HI",
                   help="apply the gradient terms (--classifier, --x0-guidance, --text, --image, --style) only for "
                        "timesteps LO<=t<=HI (--cfg-interval does the same for CFG)")
    g.add_argument("--apg", action="store_true",
                   help="adaptive projected guidance (Sadat et al. 2024) with the weight of --cfg-w: the update's "
                        "part parallel to the conditional x0 scaled by --apg-eta, its norm capped, with momentum")
    g.add_argument("--apg-eta", type=nonneg_float, default=None, help="weight of the parallel part (default 0)")
    g.add_argument("--apg-rescale", type=nonneg_float, default=None, metavar="R",
                   help="cap of the update's per-image norm (default 0 = off)")
    g.add_argument("--apg-momentum", type=float_range(-0.999, 0.999, "momentum"), default=None, metavar="BETA",
                   help="momentum of the update over the steps (the paper: negative, e.g. -0.5; default 0 = off)")
    g.add_argument("--cfg-pp", type=nonneg_float, default=None, metavar="LAMBDA",
                   help="CFG++ (Chung et al. 2024) instead of --cfg-w: x0 from eps_u + LAMBDA (eps_c - eps_u), "
                        "re-noised with the unconditional eps_u; LAMBDA in [0, 1]; --sampler ddim only; needs --class")
    g.add_argument("--autoguide", nargs="?", const=SHIPPED_ARG, default=None, metavar="CKPT",
                   help="autoguidance (Karras et al. 2024): guide with --cfg-w against this weaker eps-model (an "
                        "early checkpoint or a smaller model of the same recipe) instead of the null condition; the "
                        "flag alone means the shipped weak model (with the shipped eps-model only)")
    g.add_argument("--autoguide-w", type=nonneg_float, default=None, metavar="W",
                   help="autoguidance's own weight W, so that --cfg-w is classifier-free guidance's: both in one call, "
                        "eps_c + cfg_w (eps_c - eps_u) + W (eps_c - eps_weak) (default: off, --cfg-w is autoguidance's)")


_X0_OPTIONS = ("x0_scale", "x0_path", "x0_smoothing", "x0_samples", "x0_weight")
_APG_OPTIONS = ("apg_eta", "apg_rescale", "apg_momentum")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_family_args(args, cfg_w) -> None:
    """One-line errors for flags that would be ignored (before any file is read)."""
    for name in _X0_OPTIONS:
        if getattr(args, name, None) is not None and not args.x0_guidance:
            raise CondiffError(f"{_flag(name)} applies to x0-guidance: give --x0-guidance CKPT")
    if args.x0_samples is not None and not args.x0_smoothing:
        raise CondiffError("--x0-samples applies to the smoothing: give --x0-smoothing RHO")
    for name in _APG_OPTIONS:
        if getattr(args, name, None) is not None and not args.apg:
            raise CondiffError(f"{_flag(name)} applies to APG: give --apg")
    if (args.apg or args.autoguide) and cfg_w is None:
        raise CondiffError(f"{'--apg' if args.apg else '--autoguide'} guides with the weight of --cfg-w: give "
                           "--cfg-w (or --cfg-scale)")
    if getattr(args, "autoguide_w", None) is not None and not args.autoguide:
        raise CondiffError("--autoguide-w is autoguidance's weight: give --autoguide CKPT")
    if args.cfg_pp is not None and cfg_w is not None:
        raise CondiffError("--cfg-pp replaces --cfg-w: give one of them")
    from .cfg_family import CFGPP_SAMPLERS
    from .compose import AUTO

    if args.cfg_pp is not None and args.sampler not in (*CFGPP_SAMPLERS, AUTO):  # auto is ddim under CFG++
        raise CondiffError(f"--cfg-pp needs --sampler {' or '.join(CFGPP_SAMPLERS)} (its step re-noises with the "
                           f"unconditional eps), not {args.sampler}")


def family_guidance(args, model, schedule, shape, device) -> tuple[list, dict]:
    """(x0 terms, the other Guidance fields) from the flags; loads --x0-guidance and --autoguide."""
    from .cfg_family import APG
    from .pipeline import load_classifier, load_diffusion
    from .x0guidance import X0Term, at_t0, clean_classifier

    terms, fields = [], {}
    args.x0_guidance = shipped_or(args.x0_guidance, "clean-classifier")
    if args.autoguide == SHIPPED_ARG and not getattr(args, "use_shipped", False):
        raise CondiffError("--autoguide alone means the shipped weak model, which guides only the shipped "
                           "eps-model: give --autoguide CKPT, a weaker model of your own")
    args.autoguide = shipped_or(args.autoguide, "weak-diffusion")
    if args.x0_guidance:
        clf, _ = load_classifier(args.x0_guidance, device, args.trust_pickle)
        smoothing = args.x0_smoothing or 0.0
        terms.append(X0Term(clean_classifier(at_t0(clf)), 1.0 if args.x0_scale is None else args.x0_scale,
                            path=args.x0_path or "model", smoothing=smoothing,
                            samples=(args.x0_samples or 4) if smoothing else 1, weight=args.x0_weight,
                            name="x0-classifier"))
    if args.apg:
        fields["apg"] = APG(args.apg_eta or 0.0, args.apg_rescale or 0.0, args.apg_momentum or 0.0)
    if args.autoguide:
        weak, weak_schedule, weak_config = load_diffusion(args.autoguide, device, args.trust_pickle)
        if not weak_schedule.same_as(schedule):
            raise CondiffError(f"{args.autoguide}: the weak model's noise schedule differs from the model's")
        weak_shape = tuple(weak_config.get("image_shape") or (weak.in_channels, weak.image_size, weak.image_size))
        if weak_shape != tuple(shape):
            raise CondiffError(f"{args.autoguide}: the weak model makes {'x'.join(map(str, weak_shape))} images, "
                               f"the model {'x'.join(map(str, shape))}")
        if bool(getattr(weak, "conditional", False)) != bool(getattr(model, "conditional", False)):
            raise CondiffError(f"{args.autoguide}: the weak model must be conditional exactly when the model is")
        fields["weak_model"] = weak
        if getattr(args, "autoguide_w", None) is not None:
            fields["weak_w"] = args.autoguide_w
    if args.guidance_interval is not None:
        fields["grad_interval"] = args.guidance_interval
    if args.recurrence is not None:
        fields["recurrence"] = args.recurrence
    return terms, fields
