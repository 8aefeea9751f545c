"""One-call generation: a checkpoint plus guidance choices in, images out.

This is the library behind ``condiff sample``; everything the CLI does is a call
here that a user can make from Python::

    from condiff.compose import Guidance, Sampling
    from condiff.pipeline import load_diffusion, guided_generate
    model, schedule, config = load_diffusion("runs/cfg")
    x = guided_generate(model, schedule, 16, Guidance(cfg_w=2.0), Sampling("ddim", steps=50),
                        shape=config["image_shape"], cond=torch.full((16,), 7), seed=0)

How guidance and model are put together is :mod:`condiff.compose`'s alone.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .checkpoints import load_model
from .compose import (AUTO, DEFAULT_CLIP_X0, DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS, Guidance, Sampling,
                      auto_sampler, compose, saturation_warning)
from .errors import CondiffError
from .guidance import batch_cond, slice_cond
from .prediction import as_eps_model, prediction_of
from .samplers import SAMPLERS, noise
from .schedule import Schedule, make_schedule

__all__ = ["resolve_device", "load_diffusion", "load_classifier", "generate", "guided_generate", "GuidanceWarning",
           "warn_if_saturated"]


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu; an unavailable device is a one-line error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CondiffError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CondiffError("device cuda requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CondiffError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} cuda device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise CondiffError(f"unsupported device {name!r} (use cpu or cuda)")
    return dev


def _schedule_of(config: dict, where) -> Schedule:
    sc = config.get("schedule")
    if not isinstance(sc, dict):
        raise CondiffError(f"{where}: config has no schedule")
    return make_schedule(sc.get("name", "cosine"), int(sc.get("T", 1000)), sc.get("params", ()))


def load_diffusion(path, device="cpu", trust_pickle: bool = False):
    """Load an eps-model checkpoint: returns (model, schedule, config).

    ``model`` is always ``eps(x_t, t, cond)``: a network trained to predict v or x_0
    (config ``prediction``) comes wrapped in :class:`condiff.prediction.EpsFromPrediction`.
    """
    model, config = load_model(path, device, trust_pickle)
    if config.get("task") != "diffusion":
        raise CondiffError(f"{path}: not a diffusion model checkpoint (task {config.get('task')!r})")
    schedule = _schedule_of(config, path)
    return as_eps_model(model, schedule, prediction_of(config, str(path))), schedule, config


def load_classifier(path, device="cpu", trust_pickle: bool = False):
    """Load a noise-aware classifier checkpoint: returns (classifier, config)."""
    model, config = load_model(path, device, trust_pickle)
    if config.get("task") != "classifier":
        raise CondiffError(f"{path}: not a classifier checkpoint (task {config.get('task')!r})")
    return model, config


def generate(model, schedule: Schedule, n: int, *, shape: Sequence[int], cond=None, sampler: str = DEFAULT_SAMPLER,
             steps: int | Sequence[int] | None = DEFAULT_STEPS, spacing: str = DEFAULT_SPACING,
             clip_x0: float | None = DEFAULT_CLIP_X0, threshold: float | None = None, mean_shift=None, seed: int = 0,
             batch_size: int = 256, device="cpu", progress: bool = False, start: int = 0, callback=None,
             **options) -> torch.Tensor:
    """Sample ``n`` images of ``shape`` (C, H, W) in batches with solver ``sampler``.

    Batch b (of ``batch_size``) draws x_T and its step noise from a generator seeded
    by (seed, b), so any split of the batches (e.g. across ranks, via ``start``)
    gives the same images.  ``cond`` is None, an int, a (n,) tensor, or a dict of
    per-row entries (``{"y": classes, "text": (n, D), ...}``, see
    :func:`condiff.guidance.batch_cond`); each batch gets its rows.

    ``options`` are the solver's own (``eta=`` for ddim, ``variance=`` for ddpm;
    :func:`condiff.compose.solver_options`); ``sampler``, ``steps``, ``spacing``,
    ``clip_x0`` and ``threshold`` are :class:`condiff.compose.Sampling`'s fields
    (``**Sampling(...).kwargs()`` passes them all).  ``clip_x0`` (default 1) clamps
    the predicted x_0 to the data range at every step; 0 or None turns it off.

    ``callback`` is called at every step of every batch with the solver's dict
    (keys ``i, t, x, x0, eps``: the step, its timestep, x_s, the predicted x_0 and eps).
    """
    if n < 1:
        raise CondiffError(f"number of samples must be >= 1, got {n}")
    if batch_size < 1:
        raise CondiffError(f"batch size must be >= 1, got {batch_size}")
    sampling = Sampling(sampler, steps, spacing, clip_x0 or None, threshold, options)
    sampling.validate(schedule, mean_shift=mean_shift is not None)
    if sampler == AUTO:
        sampler = auto_sampler(model, mean_shift)
    cond = batch_cond(cond, n)
    solver = SAMPLERS[sampler]
    extra = dict(options)
    if spacing != DEFAULT_SPACING:
        extra["spacing"] = spacing
    if threshold is not None:
        extra["threshold"] = threshold
    if mean_shift is not None:
        extra["mean_shift"] = mean_shift
    if callback is not None:
        extra["callback"] = callback
    out = []
    batches = range(start // batch_size, -(-(start + n) // batch_size))
    for b in batches:
        lo, hi = max(b * batch_size, start), min((b + 1) * batch_size, start + n)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        x = noise((batch_size, *shape), g)[lo - b * batch_size:hi - b * batch_size].to(device)
        c = slice_cond(cond, lo - start, hi - start, device)
        try:
            x = solver(model, x, schedule, steps, cond=c, generator=g, clip_x0=clip_x0 or None, progress=progress,
                       **extra)
        except TypeError as e:  # a contract option this solver does not implement yet (threshold, spacing)
            if "unexpected keyword argument" not in str(e):
                raise
            name = str(e).rsplit("argument", 1)[-1].strip(" '")
            raise CondiffError(f"sampler {sampler} does not support {name} yet") from None
        out.append(x.cpu())
    return torch.cat(out)


def guided_generate(model, schedule: Schedule, n: int, guidance: Guidance | None = None,
                    sampling: Sampling | None = None, *, shape: Sequence[int], cond=None, seed: int = 0,
                    batch_size: int = 256, device="cpu", progress: bool = False) -> torch.Tensor:
    """:func:`condiff.compose.compose` then :func:`generate`: ``n`` guided images in one call.

    A saturated result (a guidance scale or eta far too large) gives a
    :class:`GuidanceWarning` (:func:`condiff.compose.saturation_warning`).
    """
    sampling = sampling or Sampling()
    eps, shift = compose(model, schedule, guidance, sampling)
    x = generate(eps, schedule, n, shape=shape, cond=cond, mean_shift=shift, seed=seed, batch_size=batch_size,
                 device=device, progress=progress, **sampling.kwargs())
    warn_if_saturated(x)
    return x


class GuidanceWarning(UserWarning):
    """Guidance drove the samples to saturation (all black or white)."""


def warn_if_saturated(x: torch.Tensor) -> None:
    """Warn (:class:`GuidanceWarning`) when :func:`condiff.compose.saturation_warning` finds saturated images."""
    message = saturation_warning(x)
    if message:
        warnings.warn(message, GuidanceWarning, stacklevel=3)
