"""Noise schedules in the article's notation.

The forward process (article, and DESIGN.md) is

    x_t = abar_t x_0 + bbar_t eps,      abar_t^2 + bbar_t^2 = 1,

one step at a time x_t = alpha_t x_{t-1} + beta_t eps_t with alpha_t^2 + beta_t^2 = 1.
Against the DDPM paper and diffusers: ``abar_t = sqrt(alphas_cumprod[t])``,
``bbar_t = sqrt(1 - alphas_cumprod[t])`` and ``beta_t^2 = betas[t]``.  The three
functions :meth:`Schedule.from_alphas_cumprod`, :meth:`Schedule.alphas_cumprod` and :meth:`Schedule.betas`
are the only place in condiff where that conversion happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import CondiffError

__all__ = ["Schedule", "linear_schedule", "cosine_schedule", "make_schedule", "respace", "SPACINGS"]

# Step schedules a sampler can visit (``respace(..., spacing=)``): uniform in t as diffusers names them
# ("linspace": both ends included, condiff's default; "leading"; "trailing"), uniform in
# lambda_t = log(abar_t / bbar_t), and Karras et al.'s sigmas (rho = 7), each snapped to integer timesteps.
SPACINGS = ("linspace", "leading", "trailing", "lambda", "karras")


@dataclass(frozen=True)
class Schedule:
    """abar_t for t = 0..T-1 (float64, decreasing); everything else derives from it.

    Index ``t`` is the 0-based timestep used by networks and samplers; the
    "previous" step of t = 0 is the clean image, abar = 1, bbar = 0.
    """

    abar: torch.Tensor
    name: str = "custom"
    params: tuple = ()

    def __post_init__(self):
        abar = torch.as_tensor(self.abar, dtype=torch.float64).flatten()
        if abar.numel() < 1 or not torch.isfinite(abar).all():
            raise CondiffError("schedule: abar must be a non-empty finite vector")
        if (abar <= 0).any() or (abar >= 1).any():
            raise CondiffError("schedule: abar_t must lie strictly inside (0, 1)")
        if (abar[1:] > abar[:-1]).any():
            raise CondiffError("schedule: abar_t must be non-increasing in t")
        object.__setattr__(self, "abar", abar)

    @property
    def T(self) -> int:
        return self.abar.numel()

    def same_as(self, other: "Schedule", rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """Whether ``other`` has the same T and the same noise levels abar_t (to the tolerance): a network
        trained on one reads its t as the same noise level under the other."""
        return self.T == other.T and bool(torch.allclose(self.abar, other.abar, rtol=rtol, atol=atol))

    @property
    def bbar(self) -> torch.Tensor:
        """bbar_t = sqrt(1 - abar_t^2)."""
        return (1.0 - self.abar**2).sqrt()

    @property
    def lambdas(self) -> torch.Tensor:
        """lambda_t = log(abar_t / bbar_t), the half log-SNR in which the DPM-Solver family steps (decreasing in t)."""
        return self.abar.log() - self.bbar.log()

    @property
    def alpha(self) -> torch.Tensor:
        """Per-step alpha_t = abar_t / abar_{t-1} (abar_{-1} = 1)."""
        prev = torch.cat([self.abar.new_ones(1), self.abar[:-1]])
        return self.abar / prev

    @property
    def beta(self) -> torch.Tensor:
        """Per-step beta_t = sqrt(1 - alpha_t^2)."""
        return (1.0 - self.alpha**2).clamp_min(0).sqrt()

    # --- the one conversion point to and from diffusers' convention -------------
    def alphas_cumprod(self) -> torch.Tensor:
        """diffusers' ``alphas_cumprod`` = abar_t^2."""
        return self.abar**2

    def betas(self) -> torch.Tensor:
        """diffusers' ``betas`` (its ``trained_betas``) = beta_t^2 = 1 - alpha_t^2 = 1 - ac_t / ac_{t-1}."""
        return 1.0 - self.alpha**2

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, name: str = "custom") -> "Schedule":
        """Build a schedule from diffusers' ``alphas_cumprod`` (abar_t = sqrt of it)."""
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(ac.sqrt(), name=name)

    @classmethod
    def from_betas(cls, betas, name: str = "custom", params: tuple = ()) -> "Schedule":
        """Build from DDPM ``betas`` (= beta_t^2 in the article's notation)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0).sqrt(), name=name, params=params)

    def coefficients(self, t: int) -> tuple[float, float]:
        """(abar_t, bbar_t) as Python floats; t = -1 is the clean image (1, 0)."""
        if t < 0:
            return 1.0, 0.0
        a = float(self.abar[t])
        return a, math.sqrt(max(1.0 - a * a, 0.0))

    def gather(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """abar_t, bbar_t for a batch of timesteps, shaped to broadcast against ``like``."""
        abar = self.abar.to(like.device)[t.to(like.device).long()].to(like.dtype)
        bbar = (1.0 - abar.double() ** 2).sqrt().to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.view(shape), bbar.view(shape)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = abar_t x_0 + bbar_t eps (the forward marginal; eq 22's network input)."""
        a, b = self.gather(t, x0)
        return a * x0 + b * noise

    def config(self) -> dict:
        return {"name": self.name, "T": self.T, "params": list(self.params)}


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear schedule: betas (= beta_t^2) evenly spaced from beta_start to beta_end."""
    _check_T(T)
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return Schedule.from_betas(betas, name="linear", params=(beta_start, beta_end))


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine schedule: abar_t^2 = f(t+1)/f(0) for 0-based t, f(u) = cos^2((u/T + s)/(1 + s) pi/2),
    with per-step betas clipped at max_beta."""
    _check_T(T)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=torch.float64)
    return Schedule.from_betas(betas, name="cosine", params=(s, max_beta))


def make_schedule(name: str = "cosine", T: int = 1000, params: Sequence[float] = ()) -> Schedule:
    """Schedule by name, as stored in a checkpoint's config."""
    if name == "linear":
        return linear_schedule(T, *params)
    if name == "cosine":
        return cosine_schedule(T, *params)
    raise CondiffError(f"unknown schedule {name!r} (choose linear or cosine)")


def respace(schedule: Schedule, steps: int | Sequence[int] | None = None, spacing: str = "linspace") -> list[int]:
    """Timesteps a sampler visits, in decreasing order; after the last one it steps to the clean image.

    ``steps`` is either a count K or an explicit list of timesteps (then ``spacing`` is not used).
    A count is placed by ``spacing`` (one of :data:`SPACINGS`):

    * ``"linspace"``: evenly over [0, T-1], both ends included (condiff's default);
    * ``"leading"``: t = i * (T // K), i = 0..K-1 (diffusers' leading spacing, steps_offset 0);
    * ``"trailing"``: t = round(T - i * T / K) - 1 (diffusers' trailing spacing, numpy.arange's float
      steps included; starts at T-1);
    * ``"lambda"``: uniform in lambda_t = log(abar_t / bbar_t) from lambda_{T-1} to lambda_0 (DPM-Solver);
    * ``"karras"``: Karras et al.'s sigma_i = (smax^(1/7) + i/(K-1) (smin^(1/7) - smax^(1/7)))^7 in
      sigma_t = bbar_t / abar_t, from sigma_{T-1} down to sigma_0.

    The last two are continuous; each value is snapped to the nearest integer timestep (nearest in lambda
    = -log sigma), and collisions are pushed to the next free timestep, so K distinct steps come out.
    A respaced chain keeps the marginals: the sampler goes from t to the next kept s with
    alpha_{t|s} = abar_t / abar_s.
    """
    T = schedule.T
    if spacing not in SPACINGS:
        raise CondiffError(f"unknown step spacing {spacing!r} (choose {', '.join(SPACINGS)})")
    if steps is None:
        steps = T
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps < 1 or steps > T:
            raise CondiffError(f"steps must be between 1 and T={T}, got {steps}")
        return _spaced(schedule, steps, spacing)
    ts = [int(s) for s in steps]
    if not ts:
        raise CondiffError("the list of timesteps is empty")
    if any(s < 0 or s >= T for s in ts):
        raise CondiffError(f"timesteps must lie in [0, {T - 1}], got {ts}")
    if len(set(ts)) != len(ts):
        raise CondiffError("timesteps must not repeat")
    return sorted(ts, reverse=True)


def _spaced(schedule: Schedule, K: int, spacing: str) -> list[int]:
    """K distinct decreasing timesteps placed by ``spacing`` (see :func:`respace`)."""
    T = schedule.T
    if spacing == "leading":
        return [i * (T // K) for i in range(K - 1, -1, -1)]
    if spacing == "trailing":
        # numpy's arange, as diffusers computes it: its float steps decide the ties of the rounding
        return _distinct([int(v) - 1 for v in np.arange(T, 0, -T / K).round()[:K]], T)
    if K == 1:
        return [T - 1]
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, K, dtype=torch.float64).round().long().tolist()
        return sorted(set(ts), reverse=True)
    lam = schedule.lambdas  # decreasing in t
    lo, hi = float(lam[-1]), float(lam[0])
    if spacing == "lambda":
        targets = torch.linspace(lo, hi, K, dtype=torch.float64)
    else:  # karras, rho = 7, in sigma = bbar / abar = exp(-lambda)
        rho = 7.0
        smax, smin = math.exp(-lo), math.exp(-hi)
        ramp = torch.linspace(0, 1, K, dtype=torch.float64)
        sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        targets = -sig.log()
    nearest = (targets[:, None] - lam[None, :]).abs().argmin(1).tolist()
    return _distinct(nearest, T)


def _distinct(ts: list[int], T: int) -> list[int]:
    """Make a non-increasing list strictly decreasing inside [0, T-1], moving each clash to the next free step."""
    K, out = len(ts), []
    for i, t in enumerate(ts):
        hi = out[-1] - 1 if out else T - 1
        out.append(min(max(int(t), K - 1 - i), hi))
    return out


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise CondiffError(f"T must be a positive integer, got {T!r}")
