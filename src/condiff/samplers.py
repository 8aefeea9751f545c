"""Samplers: small pure functions over a model ``eps(x_t, t, cond)``.

All of them discretise the general reverse process of the article (eqs 16-17),
in which the reverse variance sigma_t^2 is free: DDPM's two classic choices and
DDIM's eta family (sigma_t = 0 at eta = 0) are special cases; the ODE solvers
(Euler, Heun, DPM-Solver++) integrate its sigma_t = 0 limit, the probability-flow
ODE, to higher order.  Guidance never lives here: a guidance term either wraps
the model (score form, eq 19; classifier-free, eq 24) or is passed as
``mean_shift`` (mean-shift form, eqs 6-8, 14) to the ancestral samplers.

Notation: abar_t, bbar_t (the article's), sigma_t = bbar_t / abar_t (the
variance-exploding noise level of Karras et al.), lambda_t = log(abar_t / bbar_t)
(DPM-Solver), and the data prediction x0 = (x_t - bbar_t eps~) / abar_t of the
(guided) eps~.  Every solver visits integer timesteps (:func:`~condiff.schedule.respace`)
with the schedule's exact abar_t, and its last step goes to the clean image
(abar = 1, bbar = 0).

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

__all__ = [
    "noise", "sample", "sample_ddpm", "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_unipc", "dynamic_threshold", "SAMPLERS", "STOCHASTIC",
    "MEAN_SHIFT_SAMPLERS", "nfe",
]

Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def noise(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I), drawn on the generator's device and moved to ``device``."""
    gdev = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device or gdev)


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Step noise z ~ N(0, I) shaped like x, drawn on the generator's device."""
    return torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                       dtype=x.dtype).to(x.device)


def dynamic_threshold(x0: torch.Tensor, p: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022): s = max(1, p-quantile of |x0| per sample),
    x0 clamped to [-s, s] and divided by s.  Args: x0 (B, ...); p in (0, 1]."""
    flat = x0.detach().reshape(x0.shape[0], -1).abs()
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat, p, dim=1).clamp_min(1.0).to(x0.dtype).view((-1,) + (1,) * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _predict(model: Model, x: torch.Tensor, t: int, schedule: Schedule, cond, clip_x0, threshold,
             renoise: bool = False):
    """eps~ = model(x_t, t, cond) and x0 = (x_t - bbar_t eps~) / abar_t (eq 19's eps~, any guidance inside).

    When x0 is thresholded and/or clipped, eps~ is re-derived from it, eps~ = (x_t - abar_t x0) / bbar_t,
    so the step stays on the line through x_t and the corrected x0.

    A model with ``eps_pair`` (CFG++, :class:`condiff.cfg_family.CFGPlusPlus`) gives the eps of x0 and a
    separate re-noising eps, returned as ``eps``; only a solver whose step is abar_s x0 + c eps can use
    that (``renoise=True``), the others refuse it.
    """
    a, b = schedule.coefficients(t)
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    pair = getattr(model, "eps_pair", None)
    if pair is not None:
        if not renoise:
            raise CondiffError("CFG++ re-noises with the unconditional eps: only the ddim sampler supports it")
        eps, eps_renoise = pair(x, tt, cond)
    else:
        eps = eps_renoise = model(x, tt, cond)
    x0 = (x - b * eps) / a
    if threshold is not None or clip_x0 is not None:
        if threshold is not None:
            x0 = dynamic_threshold(x0, threshold)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if pair is None:
            eps_renoise = (x - a * x0) / b
    return eps_renoise, x0


def _plain(model: Model) -> bool:
    """No self-recurrence: a multistep solver may use its history (under recurrence the re-noised x_t does not
    continue the trajectory the history was taken on, so the multistep solvers take first-order steps)."""
    return int(getattr(model, "recurrence", 1)) == 1


def _predict_step(model: Model, x: torch.Tensor, t: int, s: int, schedule: Schedule, cond, generator, clip_x0,
                  threshold, renoise: bool = False):
    """(x_t, eps~, x0) at the start of a step t -> s, with Universal Guidance's self-recurrence when the model
    has ``recurrence`` k > 1 (:class:`condiff.compose.Recurrent`; Bansal et al. 2023, Algorithm 1).

    k - 1 times: the DDIM step x_s = abar_s x0 + bbar_s eps~ (eq 17, sigma_t = 0), then fresh noise back to t
    by the forward process q(x_t | x_s) = N((abar_t/abar_s) x_s, (bbar_t^2 - (abar_t/abar_s)^2 bbar_s^2) I);
    the solver then takes its own step from the last x_t (multistep solvers a first-order one, see
    :func:`_plain`).  k = 1 is :func:`_predict` unchanged.
    """
    for _ in range(int(getattr(model, "recurrence", 1)) - 1):
        eps, x0 = _predict(model, x, t, schedule, cond, clip_x0, threshold, renoise)
        (a_t, b_t), (a_s, b_s) = schedule.coefficients(t), schedule.coefficients(s)
        r = a_t / a_s
        x = r * (a_s * x0 + b_s * eps) + math.sqrt(max(b_t**2 - (r * b_s) ** 2, 0.0)) * _randn(x, generator)
    eps, x0 = _predict(model, x, t, schedule, cond, clip_x0, threshold, renoise)
    return x, eps, x0


def _steps(name: str, schedule: Schedule, steps, spacing: str, clip_x0, threshold, options: dict):
    """Check the options every solver shares; the pairs (t, s) of the chain, s = -1 being the clean image."""
    if options.get("mean_shift") is not None and name not in MEAN_SHIFT_SAMPLERS:
        raise CondiffError(f"mean-shift guidance (eqs 6-8) needs an ancestral sampler "
                           f"({', '.join(sorted(MEAN_SHIFT_SAMPLERS))}), not {name}: use the score form (eq 19)")
    options.pop("mean_shift", None)
    extra = set(options)
    if extra:
        raise CondiffError(f"sampler {name} has no option {', '.join(sorted(extra))}")
    if clip_x0 is not None and not (isinstance(clip_x0, (int, float)) and math.isfinite(clip_x0) and clip_x0 > 0):
        raise CondiffError(f"clip_x0 must be a finite number > 0, got {clip_x0!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise CondiffError(f"dynamic threshold must be a quantile in (0, 1], got {threshold!r}")
    ts = respace(schedule, steps, spacing)
    return list(zip(ts, ts[1:] + [-1]))


def _after_step(i: int, t: int, x, x0, eps, callback) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"non-finite sample at step {i} (t={t}); try a smaller guidance scale")
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0, "eps": eps})


def _bar(pairs, progress: bool, name: str):
    return enumerate(tqdm(pairs, disable=not progress, desc=name, leave=False))


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
    spacing: str = "linspace",
    clip_x0: float | None = None,
    threshold: float | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    **options,
) -> torch.Tensor:
    """Run the reverse process from x_T to x_0 (eqs 16-17 with a chosen sigma_t): DDPM and DDIM.

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
            Refused where sigma_t = 0 (DDIM with eta = 0): there is no mean to shift.
        spacing: the step schedule, one of :data:`condiff.schedule.SPACINGS`.
        clip_x0: clamp the predicted x_0 to [-clip_x0, clip_x0].
        threshold: dynamic thresholding of the predicted x_0 at this quantile (:func:`dynamic_threshold`).
        callback: called each step with keys ``i, t, x, x0, eps``.
        progress: show a tqdm bar.
    Returns:
        x_0, same shape as ``x``.
    """
    if variance not in ("ddim", "ddpm", "ddpm-beta"):
        raise CondiffError(f"unknown variance {variance!r} (choose ddim, ddpm or ddpm-beta)")
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise CondiffError(f"eta must be a finite number >= 0, got {eta}")
    if mean_shift is not None and variance == "ddim" and eta == 0:
        raise CondiffError("mean-shift guidance needs sigma_t > 0: use ddpm, ddim with eta > 0, or the score form")
    pairs = _steps("ddim" if variance == "ddim" else "ddpm", schedule, steps, spacing, clip_x0, threshold, options)
    for i, (t, s) in _bar(pairs, progress, "sampling"):
        a_t, b_t = schedule.coefficients(t)
        a_s, b_s = schedule.coefficients(s)
        x, eps, x0 = _predict_step(model, x, t, s, schedule, cond, generator, clip_x0, threshold,
                                   renoise=variance == "ddim")
        sigma2 = _step_sigma2(variance, eta, a_t, b_t, a_s, b_s)
        if variance == "ddim":
            # generalised DDIM: x_s = abar_s x0 + sqrt(bbar_s^2 - sigma^2) eps + sigma z
            mu = a_s * x0 + math.sqrt(max(b_s**2 - sigma2, 0.0)) * eps
        else:
            # posterior mean of q(x_s | x_t, x0); equals eq 21, (x_t - beta^2/bbar_t eps)/alpha
            beta2 = 1.0 - (a_t / a_s) ** 2
            mu = (a_s * beta2 / b_t**2) * x0 + ((a_t / a_s) * b_s**2 / b_t**2) * x
        if mean_shift is not None and sigma2 > 0:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            mu = condition_mean(mu, sigma2, mean_shift(x, tt, mu, cond))
        x = mu + math.sqrt(sigma2) * _randn(x, generator) if sigma2 > 0 else mu
        _after_step(i, t, x, x0, eps, callback)
    return x


def sample_ddpm(model: Model, x: torch.Tensor, schedule: Schedule, steps=None, *, variance: str = "ddpm", **kw):
    """Ancestral DDPM sampling (Ho et al. 2020; eq 6 without guidance); ``variance`` "ddpm" (posterior) or
    "ddpm-beta" (sigma_t^2 = beta_t^2)."""
    if variance not in ("ddpm", "ddpm-beta"):
        raise CondiffError(f"DDPM variance must be ddpm or ddpm-beta, got {variance!r}")
    return sample(model, x, schedule, steps, variance=variance, **kw)


def sample_ddim(model: Model, x: torch.Tensor, schedule: Schedule, steps=50, *, eta: float = 0.0, **kw):
    """DDIM sampling (Song et al. 2021; eq 17 with sigma_t = eta * posterior std; eta = 0 is deterministic)."""
    return sample(model, x, schedule, steps, variance="ddim", eta=eta, **kw)


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, schedule: Schedule, steps=25, *, cond=None, generator=None,
                 spacing: str = "linspace", clip_x0=None, threshold=None, callback=None, progress: bool = False,
                 **options):
    """Euler on the probability-flow ODE d(x/abar)/dsigma = eps~ (Karras et al. 2022, eq 4 in sigma = bbar/abar).

    The article's eq 17 at sigma_t = 0 (DDIM) takes the same step: equal to DDIM(eta = 0) up to rounding.
    """
    pairs = _steps("euler", schedule, steps, spacing, clip_x0, threshold, options)
    for i, (t, s) in _bar(pairs, progress, "euler"):
        (a_t, b_t), (a_s, b_s) = schedule.coefficients(t), schedule.coefficients(s)
        x, eps, x0 = _predict_step(model, x, t, s, schedule, cond, generator, clip_x0, threshold)
        x = a_s * (x / a_t + (b_s / a_s - b_t / a_t) * eps)  # Euler step in x~ = x/abar, dx~/dsigma = eps
        _after_step(i, t, x, x0, eps, callback)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: torch.Tensor, schedule: Schedule, steps=25, *, eta: float = 1.0,
                           cond=None, generator=None, spacing: str = "linspace", clip_x0=None, threshold=None,
                           callback=None, progress: bool = False, **options):
    """Euler-ancestral (k-diffusion's sample_euler_ancestral): an Euler step down to sigma_down, then fresh
    noise of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_s^2 (eq 17's free sigma_t, in sigma = bbar/abar).

    With sigma_up = eta x the posterior std this is the article's eq 17 step, i.e. DDIM(eta), up to rounding.
    """
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise CondiffError(f"eta must be a finite number >= 0, got {eta}")
    pairs = _steps("euler-ancestral", schedule, steps, spacing, clip_x0, threshold, options)
    for i, (t, s) in _bar(pairs, progress, "euler-ancestral"):
        (a_t, b_t), (a_s, b_s) = schedule.coefficients(t), schedule.coefficients(s)
        sig_t, sig_s = b_t / a_t, b_s / a_s
        sig_up = min(sig_s, eta * math.sqrt(max(sig_s**2 * (sig_t**2 - sig_s**2) / sig_t**2, 0.0)))
        sig_down = math.sqrt(sig_s**2 - sig_up**2)
        x, eps, x0 = _predict_step(model, x, t, s, schedule, cond, generator, clip_x0, threshold)
        xt = x / a_t + (sig_down - sig_t) * eps  # Euler step in x~ = x/abar to sigma_down
        if sig_up > 0:
            xt = xt + sig_up * _randn(x, generator)
        x = a_s * xt
        _after_step(i, t, x, x0, eps, callback)
    return x


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, schedule: Schedule, steps=25, *, cond=None, generator=None,
                spacing: str = "linspace", clip_x0=None, threshold=None, callback=None, progress: bool = False,
                **options):
    """Heun's 2nd-order method on the probability-flow ODE d(x/abar)/dsigma = eps~ (eq 17's sigma_t = 0 limit;
    Karras et al. 2022, Algorithm 1, deterministic): Euler predictor, trapezoidal corrector.

    Two steps are plain Euler: the last (to the clean image, sigma = 0, as EDM does) and the first.  The first
    leaves sigma_{T-1}, which on the cosine schedule is about 2e4 (EDM stops at 80): eps varies too fast in
    sigma there for the trapezoid rule, whose correction (sigma_t/sigma_s)(x0_t - x0_s)/2 then explodes,
    while the Euler (= DDIM) step is exact for a constant x0.  One first-order step keeps global order 2.
    Network calls: 2 per step except these two, 2K - 2 for K >= 2 steps.
    """
    pairs = _steps("heun", schedule, steps, spacing, clip_x0, threshold, options)
    for i, (t, s) in _bar(pairs, progress, "heun"):
        (a_t, b_t), (a_s, b_s) = schedule.coefficients(t), schedule.coefficients(s)
        dsig = b_s / a_s - b_t / a_t
        x, eps, x0 = _predict_step(model, x, t, s, schedule, cond, generator, clip_x0, threshold)
        xt = x / a_t + dsig * eps  # Euler step
        if 0 < i and s >= 0:  # 2nd-order correction: average the slopes at both ends
            eps_s, _ = _predict(model, a_s * xt, s, schedule, cond, clip_x0, threshold)
            xt = x / a_t + dsig * 0.5 * (eps + eps_s)
        x = a_s * xt
        _after_step(i, t, x, x0, eps, callback)
    return x


def _multistep_x0(x0: torch.Tensor, x0_prev, h: float, h_prev) -> torch.Tensor:
    """DPM-Solver++(2M)'s data term: x0 + (x0 - x0_prev) / (2r), r = h_prev / h (first order without history)."""
    if x0_prev is None:
        return x0
    return x0 + (0.5 * h / h_prev) * (x0 - x0_prev)


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, schedule: Schedule, steps=25, *, cond=None, generator=None,
                    spacing: str = "linspace", clip_x0=None, threshold=None, callback=None, progress: bool = False,
                    **options):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep exponential integrator of the probability-flow
    ODE (eq 17, sigma_t = 0) in lambda_t, on the data prediction x0 = (x_t - bbar_t eps~)/abar_t of eq 19's eps~:

        x_s = (bbar_s / bbar_t) x_t - abar_s (e^{-h} - 1) D,   h = lambda_s - lambda_t,

    D = x0 on the first step, else x0 + (x0 - x0_prev)/(2r), r = h_prev/h.  The last step, to the clean
    image (lambda = inf), is first order: x_0 = x0 (as diffusers does with final sigma zero).
    """
    pairs = _steps("dpm++2m", schedule, steps, spacing, clip_x0, threshold, options)
    x0_prev = h_prev = None
    for i, (t, s) in _bar(pairs, progress, "dpm++2m"):
        (a_t, b_t), (a_s, b_s) = schedule.coefficients(t), schedule.coefficients(s)
        x, eps, x0 = _predict_step(model, x, t, s, schedule, cond, generator, clip_x0, threshold)
        if s < 0:
            x, h = x0, None
        else:
            h = math.log(a_s / b_s) - math.log(a_t / b_t)
            x = (b_s / b_t) * x - (a_s * math.expm1(-h)) * _multistep_x0(x0, x0_prev, h, h_prev)
        x0_prev, h_prev = (x0, h) if _plain(model) else (None, None)
        _after_step(i, t, x, x0, eps, callback)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, schedule: Schedule, steps=25, *, cond=None,
                        generator=None, spacing: str = "linspace", clip_x0=None, threshold=None, callback=None,
                        progress: bool = False, **options):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++, midpoint form as diffusers and k-diffusion), the
    reverse SDE of eq 16 with sigma_t at its DDPM value, stepped in lambda_t:

        x_s = (bbar_s / bbar_t) e^{-h} x_t + abar_s (1 - e^{-2h}) D + bbar_s sqrt(1 - e^{-2h}) z,

    D as in :func:`sample_dpmpp_2m`; the last step to the clean image is x_0 = x0 and adds no noise.
    """
    pairs = _steps("dpm++2m-sde", schedule, steps, spacing, clip_x0, threshold, options)
    x0_prev = h_prev = None
    for i, (t, s) in _bar(pairs, progress, "dpm++2m-sde"):
        (a_t, b_t), (a_s, b_s) = schedule.coefficients(t), schedule.coefficients(s)
        x, eps, x0 = _predict_step(model, x, t, s, schedule, cond, generator, clip_x0, threshold)
        if s < 0:
            x, h = x0, None
        else:
            h = math.log(a_s / b_s) - math.log(a_t / b_t)
            one_minus = -math.expm1(-2 * h)  # 1 - e^{-2h}
            x = ((b_s / b_t) * math.exp(-h)) * x + (a_s * one_minus) * _multistep_x0(x0, x0_prev, h, h_prev) \
                + (b_s * math.sqrt(one_minus)) * _randn(x, generator)
        x0_prev, h_prev = (x0, h) if _plain(model) else (None, None)
        _after_step(i, t, x, x0, eps, callback)
    return x


def _lam(schedule: Schedule, t: int) -> float:
    """lambda_t = log(abar_t / bbar_t) of an integer timestep."""
    a, b = schedule.coefficients(t)
    return math.log(a / b)


@torch.no_grad()
def sample_unipc(model: Model, x: torch.Tensor, schedule: Schedule, steps=25, *, cond=None, generator=None,
                 spacing: str = "linspace", clip_x0=None, threshold=None, callback=None, progress: bool = False,
                 **options):
    """UniPC (Zhao et al. 2023), order 2, data prediction, B(h) = e^{-h} - 1 ("bh2"), on the probability-flow
    ODE (eq 17, sigma_t = 0) in lambda_t.

    Each step first corrects x_t with the x0 just predicted there (UniC, no extra network call; the model
    output itself is the one taken at the uncorrected x_t), then predicts x_s (UniP-2, which with bh2 is the
    DPM-Solver++(2M) step).  Warm-up and the last step are first order, as in diffusers' UniPCMultistepScheduler
    (lower_order_final); the last step lands on x0.  Under self-recurrence (a model with ``recurrence`` > 1)
    the corrector is skipped: the x_t it would correct has been re-noised.
    """
    pairs = _steps("unipc", schedule, steps, spacing, clip_x0, threshold, options)
    hist = []  # (t, x0) of the last two steps, newest last
    x_prev = order_prev = None
    for i, (t, s) in _bar(pairs, progress, "unipc"):
        (a_t, b_t), (a_s, b_s) = schedule.coefficients(t), schedule.coefficients(s)
        x, eps, x0 = _predict_step(model, x, t, s, schedule, cond, generator, clip_x0, threshold)
        if x_prev is not None and _plain(model):  # UniC-p: corrector from the previous
            # timestep with the new data prediction (not under self-recurrence: x_t was re-noised, not predicted)
            (t0, m0), h = hist[-1], _lam(schedule, t) - _lam(schedule, hist[-1][0])
            phi1 = math.expm1(-h)  # h phi_1 = B(h) for bh2
            b1 = (phi1 / -h - 1) / phi1
            if order_prev == 1:
                rho, corr = 0.5, 0.0
            else:
                t2, m2 = hist[-2]
                r = (_lam(schedule, t2) - _lam(schedule, t0)) / h
                b2 = 2 * ((phi1 / -h - 1) / -h - 0.5) / phi1
                rho0 = (b1 - b2) / (1 - r)
                rho, corr = b1 - rho0, rho0 * (m2 - m0) / r
            b_0 = schedule.coefficients(t0)[1]
            x = (b_t / b_0) * x_prev - (a_t * phi1) * m0 - (a_t * phi1) * (corr + rho * (x0 - m0))
        hist = (hist + [(t, x0)])[-2:] if _plain(model) else [(t, x0)]
        order = min(2, len(pairs) - i, len(hist))
        x_prev, order_prev = x, order
        if s < 0:
            x = x0
        else:  # UniP-p predictor
            h = _lam(schedule, s) - _lam(schedule, t)
            phi1 = math.expm1(-h)
            x = (b_s / b_t) * x - (a_s * phi1) * x0
            if order == 2:
                t1, m1 = hist[-2]
                r = (_lam(schedule, t1) - _lam(schedule, t)) / h
                x = x - (a_s * phi1 * 0.5 / r) * (m1 - x0)
        _after_step(i, t, x, x0, eps, callback)
    return x


# The calling convention of every solver (the sampling-core contract):
#   fn(model, x_T, schedule, steps, *, cond=None, generator=None, spacing="linspace", clip_x0=None,
#      threshold=None, callback=None, progress=False, **solver_options) -> x_0
# ``mean_shift=`` (eqs 6-8, 14) is accepted only by the samplers in MEAN_SHIFT_SAMPLERS; ``eta=`` by ddim and
# euler-ancestral, ``variance=`` ("ddpm" or "ddpm-beta") by ddpm.
SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler-ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++2m-sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}
# samplers that add fresh noise every step (ddim only with eta > 0)
STOCHASTIC = frozenset({"ddpm", "euler-ancestral", "dpm++2m-sde"})
MEAN_SHIFT_SAMPLERS = frozenset({"ddpm", "ddim"})  # ancestral samplers: mean-shift guidance has a meaning


def nfe(name: str, steps: int | Sequence[int]) -> int:
    """Network evaluations per image of sampler ``name`` over ``steps`` steps (guidance multiplies it):
    one per step; Heun two per step except its first and last (plain Euler steps), 2K - 2 for K >= 2."""
    if name not in SAMPLERS:
        raise CondiffError(f"unknown sampler {name!r} (choose {', '.join(SAMPLERS)})")
    k = int(steps) if isinstance(steps, int) else len(list(steps))
    return max(2 * k - 2, k) if name == "heun" else k
