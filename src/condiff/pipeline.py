"""One-call generation: a checkpoint plus guidance choices in, images out.

This is the library behind ``condiff sample``; everything the CLI does is a call
here that a user can make from Python::

    from condiff.pipeline import load_diffusion, guided_model, generate
    model, schedule, config = load_diffusion("runs/cfg")
    eps, shift = guided_model(model, schedule, cfg_w=2.0)
    x = generate(eps, schedule, n=16, cond=torch.full((16,), 7), steps=50, seed=0)
"""

from __future__ import annotations

from typing import Sequence

import torch

from .checkpoints import load_model
from .errors import CondiffError
from .guidance import ClassifierFree, ClassifierTerm, GradientTerm, MeanShift, NullBranch, ScoreGuided
from .samplers import noise, sample
from .schedule import Schedule, make_schedule

__all__ = ["resolve_device", "load_diffusion", "load_classifier", "guided_model", "generate"]


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
    """Load an eps-model checkpoint: returns (model, schedule, config)."""
    model, config = load_model(path, device, trust_pickle)
    if config.get("task") != "diffusion":
        raise CondiffError(f"{path}: not a diffusion model checkpoint (task {config.get('task')!r})")
    return model, _schedule_of(config, path), config


def load_classifier(path, device="cpu", trust_pickle: bool = False):
    """Load a noise-aware classifier checkpoint: returns (classifier, config)."""
    model, config = load_model(path, device, trust_pickle)
    if config.get("task") != "classifier":
        raise CondiffError(f"{path}: not a classifier checkpoint (task {config.get('task')!r})")
    return model, config


def guided_model(model, schedule: Schedule, *, cfg_w: float | None = None, cfg_interval=None,
                 cfg_rescale: float = 0.0, unconditional: bool = False,
                 terms: Sequence[GradientTerm] = (), form: str = "score", grad_at: str = "x_t"):
    """Compose guidance around ``model``; returns (eps-model, mean_shift or None).

    Args:
        cfg_w: classifier-free weight w (eq 24); None means no CFG.
        unconditional: use the null branch phi of a conditional model.
        terms: gradient terms (classifier, similarity, ...), each with its own scale.
        form: "score" (eq 19, any sampler) or "mean" (eq 6, ancestral samplers).
        grad_at: "x_t" (eq 6) or "mu" (eq 7) for the mean form.
    """
    if form not in ("score", "mean"):
        raise CondiffError(f"guidance form must be score or mean, got {form!r}")
    eps = model
    if unconditional:
        if cfg_w:
            raise CondiffError("classifier-free guidance and --unconditional exclude each other")
        eps = NullBranch(model)
    elif cfg_w is not None:
        eps = ClassifierFree(model, cfg_w, interval=cfg_interval, rescale=cfg_rescale)
    terms = list(terms)
    if not terms:
        return eps, None
    if form == "score":
        return ScoreGuided(eps, schedule, terms), None
    return eps, MeanShift(terms, at=grad_at)


def generate(model, schedule: Schedule, n: int, *, shape: Sequence[int], cond=None, sampler: str = "ddim",
             steps: int | Sequence[int] | None = 50, eta: float = 0.0, variance: str = "ddpm",
             mean_shift=None, seed: int = 0, batch_size: int = 256, device="cpu", clip_x0: float | None = 1.0,
             progress: bool = False, start: int = 0) -> torch.Tensor:
    """Sample ``n`` images of ``shape`` (C, H, W) in batches.

    Batch b (of ``batch_size``) draws x_T and its step noise from a generator seeded
    by (seed, b), so any split of the batches (e.g. across ranks, via ``start``)
    gives the same images.  ``cond`` is None, an int, or a (n,) tensor.

    ``clip_x0`` (default 1) clamps the predicted x_0 to the data range [-1, 1] at
    every step; 0 or None turns it off.  Without it, the first steps of a schedule
    whose abar_{T-1} is tiny (cosine: 5e-5) amplify small eps errors into saturated
    pixels.
    """
    if n < 1:
        raise CondiffError(f"number of samples must be >= 1, got {n}")
    if batch_size < 1:
        raise CondiffError(f"batch size must be >= 1, got {batch_size}")
    if sampler not in ("ddim", "ddpm"):
        raise CondiffError(f"unknown sampler {sampler!r} (choose ddim or ddpm)")
    kind = "ddim" if sampler == "ddim" else variance
    if mean_shift is not None and sampler == "ddim" and eta == 0:
        raise CondiffError("mean-shift guidance needs sigma_t > 0: use --sampler ddpm, --eta > 0 or --form score")
    if cond is not None:
        cond = torch.as_tensor(cond)
        if cond.dim() == 0:
            cond = cond.expand(n)
        elif cond.dim() == 1 and cond.dtype.is_floating_point:
            cond = cond.expand(n, -1)
        if cond.shape[0] != n:
            raise CondiffError(f"cond has {cond.shape[0]} rows for {n} samples")
    out = []
    batches = range(start // batch_size, -(-(start + n) // batch_size))
    for b in batches:
        lo, hi = max(b * batch_size, start), min((b + 1) * batch_size, start + n)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        x = noise((batch_size, *shape), g)[lo - b * batch_size:hi - b * batch_size].to(device)
        c = cond[lo - start:hi - start].to(device) if cond is not None else None
        out.append(sample(model, x, schedule, steps, variance=kind, eta=eta, cond=c, generator=g,
                          mean_shift=mean_shift, clip_x0=clip_x0 or None, progress=progress).cpu())
    return torch.cat(out)
