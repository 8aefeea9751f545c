"""Samplers: small pure functions over a model ``eps(x_t, t, cond)``.

All of them discretise the general reverse process of the article (eqs 16-17),
in which the reverse variance sigma_t^2 is free: DDPM's two classic choices and
DDIM's eta family (sigma_t = 0 at eta = 0) are special cases.  Guidance never
lives here: a guidance term either wraps the model (score form, eq 19) or is
passed as ``mean_shift`` (mean-shift form, eqs 6-8, 14).

Every sampler takes the initial noise ``x`` (x_T; see :func:`noise`), the
:class:`~condiff.schedule.Schedule`, the number of steps or an explicit list of
timesteps, and an explicit ``torch.Generator`` for the noise it adds.  The same
generator state gives the same images.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import CondiffError, NonFiniteError
from .guidance import condition_mean
from .schedule import Schedule, respace

__all__ = ["noise", "sample", "sample_ddpm", "sample_ddim", "SAMPLERS", "STOCHASTIC", "MEAN_SHIFT_SAMPLERS", "nfe"]

Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def noise(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I), drawn on the generator's device and moved to ``device``."""
    gdev = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device or gdev)


def _step_sigma2(kind: str, eta: float, a_t: float, b_t: float, a_s: float, b_s: float) -> float:
    """sigma_t^2 of one reverse step t -> s (the free variance of eq 17)."""
    beta2 = 1.0 - (a_t / a_s) ** 2  # beta^2 of the (respaced) step
    if kind == "ddpm-beta":
        return beta2 if b_s > 0 else 0.0
    posterior = beta2 * b_s**2 / b_t**2  # q(x_s | x_t, x_0) variance
    return posterior if kind == "ddpm" else eta**2 * posterior


@torch.no_grad()
def sample(
    model: Model,
    x: torch.Tensor,
    schedule: Schedule,
    steps: int | Sequence[int] | None = None,
    *,
    variance: str = "ddim",
    eta: float = 0.0,
    cond=None,
    generator: torch.Generator | None = None,
    mean_shift=None,
    clip_x0: float | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process from x_T to x_0 (eqs 16-17 with a chosen sigma_t).

    Args:
        model: ``eps(x_t, t, cond) -> eps`` with x_t (B, C, H, W) and t (B,) long.
        x: x_T, (B, C, H, W).
        schedule: the training schedule (abar_t, bbar_t).
        steps: number of respaced steps K, or an explicit list of timesteps.
        variance: ``"ddim"`` (sigma_t = eta * posterior std), ``"ddpm"``
            (posterior variance) or ``"ddpm-beta"`` (sigma_t^2 = beta_t^2).
        eta: DDIM's eta; 0 is deterministic, 1 equals ``"ddpm"``.
        cond: passed unchanged to every model call.
        generator: source of the noise added at each step.
        mean_shift: optional ``(x_t, t, mu, cond) -> g``; the step mean becomes
            mu + sigma_t^2 g (eq 6/8/14).  See :class:`condiff.guidance.MeanShift`.
        clip_x0: clamp the predicted x_0 to [-clip_x0, clip_x0].
        callback: called each step with keys ``i, t, x, x0, eps``.
        progress: show a tqdm bar.
    Returns:
        x_0, same shape as ``x``.
    """
    if variance not in ("ddim", "ddpm", "ddpm-beta"):
        raise CondiffError(f"unknown variance {variance!r} (choose ddim, ddpm or ddpm-beta)")
    if not math.isfinite(eta) or eta < 0:
        raise CondiffError(f"eta must be a finite number >= 0, got {eta}")
    ts = respace(schedule, steps)
    B = x.shape[0]
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="sampling", leave=False)):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, b_t = schedule.coefficients(t)
        a_s, b_s = schedule.coefficients(s)
        tt = torch.full((B,), t, device=x.device, dtype=torch.long)
        eps = model(x, tt, cond)
        x0 = (x - b_t * eps) / a_t
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - a_t * x0) / b_t
        sigma2 = _step_sigma2(variance, eta, a_t, b_t, a_s, b_s)
        if variance == "ddim":
            # generalised DDIM: x_s = abar_s x0 + sqrt(bbar_s^2 - sigma^2) eps + sigma z
            mu = a_s * x0 + math.sqrt(max(b_s**2 - sigma2, 0.0)) * eps
        else:
            # posterior mean of q(x_s | x_t, x0); equals eq 21, (x_t - beta^2/bbar_t eps)/alpha
            beta2 = 1.0 - (a_t / a_s) ** 2
            mu = (a_s * beta2 / b_t**2) * x0 + ((a_t / a_s) * b_s**2 / b_t**2) * x
        if mean_shift is not None and sigma2 > 0:
            mu = condition_mean(mu, sigma2, mean_shift(x, tt, mu, cond))
        if sigma2 > 0:
            z = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                            dtype=x.dtype).to(x.device)
            x = mu + math.sqrt(sigma2) * z
        else:
            x = mu
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"non-finite sample at step {i} (t={t}); try a smaller guidance scale")
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0, "eps": eps})
    return x


def sample_ddpm(model: Model, x: torch.Tensor, schedule: Schedule, steps=None, *, variance: str = "ddpm", **kw):
    """Ancestral DDPM sampling (eq 6 without guidance); ``variance`` "ddpm" (posterior) or "ddpm-beta"."""
    if variance not in ("ddpm", "ddpm-beta"):
        raise CondiffError(f"DDPM variance must be ddpm or ddpm-beta, got {variance!r}")
    return sample(model, x, schedule, steps, variance=variance, **kw)


def sample_ddim(model: Model, x: torch.Tensor, schedule: Schedule, steps=50, *, eta: float = 0.0, **kw):
    """DDIM sampling (eq 17 with sigma_t = eta * posterior std; eta = 0 is deterministic)."""
    return sample(model, x, schedule, steps, variance="ddim", eta=eta, **kw)


# The calling convention of every solver (the sampling-core contract):
#   fn(model, x_T, schedule, steps, *, cond=None, generator=None, spacing="linspace", clip_x0=None,
#      threshold=None, callback=None, progress=False, **solver_options) -> x_0
# ``mean_shift=`` (eqs 6-8, 14) is accepted only by the samplers in MEAN_SHIFT_SAMPLERS.
SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}
STOCHASTIC = frozenset({"ddpm"})          # samplers that add fresh noise every step (ddim only with eta > 0)
MEAN_SHIFT_SAMPLERS = frozenset({"ddpm", "ddim"})  # ancestral samplers: mean-shift guidance has a meaning


def nfe(name: str, steps: int) -> int:
    """Network evaluations per image of sampler ``name`` over ``steps`` steps (guidance multiplies it)."""
    if name not in SAMPLERS:
        raise CondiffError(f"unknown sampler {name!r} (choose {', '.join(SAMPLERS)})")
    return int(steps)
