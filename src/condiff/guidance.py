"""Guidance: turn a model and a condition into a guided model.

Three families, all as wrappers around a model ``eps(x_t, t, cond)``:

* gradient terms (classifier guidance, eqs 1-10; similarity guidance, eqs 11-15):
  each :class:`GradientTerm` computes ``gamma * grad_x f(x_t, t)``; they are applied
  either as a mean shift mu + sigma_t^2 * g for ancestral samplers
  (:class:`MeanShift`, eqs 6-8 and 14) or in score form
  eps - bbar_t * g, valid for any sigma_t including DDIM (:class:`ScoreGuided`,
  eqs 18-19);
* classifier-free guidance (:class:`ClassifierFree`, eqs 20-24);
* composition: several gradient terms in one wrapper, on top of a CFG model.

The factors sigma_t^2 and bbar_t are applied in exactly one place each:
:func:`condition_mean` and :func:`condition_score`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import CondiffError
from .schedule import Schedule

__all__ = [
    "condition_mean", "condition_score", "scaled_grad", "GradientTerm", "ClassifierTerm",
    "SimilarityTerm", "MeanShift", "ScoreGuided", "ClassifierFree", "NullBranch", "check_scale",
]


def check_scale(name: str, value: float, allow_negative: bool = False) -> float:
    """A guidance scale must be finite (and >= 0 unless stated); one-line error otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CondiffError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v < 0 and not allow_negative):
        raise CondiffError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def condition_mean(mu: torch.Tensor, sigma2: float | torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Mean-shift guidance, eq 6/8/14: mu(x_t) + sigma_t^2 * gamma * grad (grad already scaled)."""
    return mu + sigma2 * grad


def condition_score(eps: torch.Tensor, bbar: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Score-form guidance, eq 19: eps - bbar_t * gamma * grad (grad already scaled)."""
    return eps - bbar * grad


def scaled_grad(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * d/dx fn(x, t) for a per-sample objective ``fn -> (B,)``.

    The one gradient helper of condiff: it works inside ``torch.no_grad()``
    sampling loops, differentiates with respect to ``x`` only (no parameter
    receives a ``.grad``), and since samples are independent the gradient of the
    batch sum is each sample's own gradient.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = fn(xg, t)
        if out.dim() != 1 or out.shape[0] != x.shape[0]:
            raise CondiffError(f"a guidance objective must return shape ({x.shape[0]},), got {tuple(out.shape)}")
        (g,) = torch.autograd.grad(out.sum(), xg)
    return (scale * g).detach()


class GradientTerm:
    """A guidance term gamma * grad_x f(x_t, t) for any differentiable ``f(x_t, t) -> (B,)``.

    ``f`` is log p(y|x_t) for classifier guidance (eqs 6-8) or sim(x_t, y) for
    similarity guidance (eqs 11-15).  ``scale`` is gamma (eq 8).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float = 1.0,
                 name: str = "custom"):
        self.fn = fn
        self.scale = check_scale(f"{name} scale", scale)
        self.name = name

    def objective(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t)

    def grad(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return torch.zeros_like(x)
        return scaled_grad(self.objective, x, t, self.scale)


class ClassifierTerm(GradientTerm):
    """Classifier guidance: gamma * grad log p(y | x_t) (eqs 6-8).

    With ``sharpen=True`` the term is grad log p~(y|x_t) for the "sharpened"
    classifier p~ = p^gamma / Z = softmax(gamma * logits) (eq 9), whose gradient is
    gamma * grad log p - grad log Z (eq 10), not gamma * grad log p; the two agree
    at gamma = 1.

    Args:
        classifier: ``logits = classifier(x_t, t)``, (B, num_classes).
        y: target classes, an int or a (B,) long tensor.
    """

    def __init__(self, classifier, y, scale: float = 1.0, sharpen: bool = False):
        super().__init__(None, scale, name="classifier")
        self.classifier = classifier
        self.y = y
        self.sharpen = bool(sharpen)

    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(self.y, device=x.device, dtype=torch.long)
        return y.expand(x.shape[0]) if y.dim() == 0 else y

    def objective(self, x, t):
        logits = self.classifier(x, t)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.sharpen:
            logits = self.scale * logits
        return F.log_softmax(logits, dim=-1).gather(1, self._targets(x)[:, None])[:, 0]

    def grad(self, x, t):
        if self.sharpen:  # the scale lives inside the softmax (eq 9); no extra factor
            return scaled_grad(self.objective, x, t, 1.0)
        return super().grad(x, t)


class SimilarityTerm(GradientTerm):
    """Similarity guidance: gamma * grad sim(x_t, y) (eqs 11-14) for any ``sim(x_t, t) -> (B,)``."""

    def __init__(self, sim: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float = 1.0,
                 name: str = "similarity"):
        super().__init__(sim, scale, name=name)


def _total_grad(terms: Sequence[GradientTerm], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    g = torch.zeros_like(x)
    for term in terms:
        g = g + term.grad(x, t).to(x.dtype)
    return g


class MeanShift:
    """Mean-shift application of gradient terms for ancestral samplers (eqs 6-8, 14).

    Pass as ``mean_shift=`` to a sampler; the sampler adds sigma_t^2 * g to its mean
    via :func:`condition_mean`.  ``at="x_t"`` takes the gradient at x_t (eq 6, the
    article's form and openai/guided-diffusion's code); ``at="mu"`` takes it at
    mu(x_t) (eq 7, the original paper's statement).
    """

    def __init__(self, terms: Sequence[GradientTerm] | GradientTerm, at: str = "x_t"):
        if at not in ("x_t", "mu"):
            raise CondiffError(f"gradient location must be x_t or mu, got {at!r}")
        self.terms = [terms] if isinstance(terms, GradientTerm) else list(terms)
        self.at = at

    def __call__(self, x_t, t, mu, cond=None):
        return _total_grad(self.terms, x_t if self.at == "x_t" else mu, t)


class ScoreGuided:
    """Score-form guidance for any sampler (eqs 18-19): eps~ = eps - bbar_t * sum_k gamma_k grad f_k.

    Wraps ``model`` and returns a model of the same signature.
    """

    def __init__(self, model, schedule: Schedule, terms: Sequence[GradientTerm] | GradientTerm):
        self.model = model
        self.schedule = schedule
        self.terms = [terms] if isinstance(terms, GradientTerm) else list(terms)

    def __call__(self, x, t, cond=None):
        eps = self.model(x, t, cond)
        if all(term.scale == 0 for term in self.terms):
            return eps
        _, bbar = self.schedule.gather(t, x)
        return condition_score(eps, bbar, _total_grad(self.terms, x, t))


class NullBranch:
    """The unconditional model inside a conditional one: eps(x_t, phi, t) (eq 24's phi).

    A model trained with condition dropout is also an unconditional model; wrap it
    with this to use it for classifier or similarity guidance.
    """

    def __init__(self, model):
        if not hasattr(model, "null_cond"):
            raise CondiffError("this model has no null condition (train it with condition dropout)")
        self.model = model

    def __call__(self, x, t, cond=None):
        return self.model(x, t, self.model.null_cond(x.shape[0], x.device))


class ClassifierFree:
    """Classifier-free guidance (eq 24): eps~ = (1 + w) eps(x_t, y, t) - w eps(x_t, phi, t).

    ``w`` is the article's weight (w = gamma - 1, eq 23); the ``guidance_scale`` s of
    diffusers and most other libraries is s = 1 + w, so s = 1 (w = 0) is plain
    conditional sampling.  Conditional and null predictions come from one batched
    forward of 2B.

    Beyond the article, both off by default:
        interval: (t_lo, t_hi): guide only for t_lo <= t <= t_hi; elsewhere the
            output is the conditional prediction and the null forward is skipped
            (Kynkaanniemi et al. 2024).
        rescale: phi in [0, 1] of guidance rescale (Lin et al. 2023): the guided
            eps is rescaled to the per-sample std of the conditional eps and mixed
            with weight phi; phi = 0 is the identity.
    """

    def __init__(self, model, w: float, interval: tuple[int, int] | None = None, rescale: float = 0.0):
        if not hasattr(model, "null_cond"):
            raise CondiffError("classifier-free guidance needs a model trained with a null condition")
        self.model = model
        self.w = check_scale("cfg weight w", w)
        self.rescale = check_scale("guidance rescale", rescale)
        if self.rescale > 1:
            raise CondiffError(f"guidance rescale must lie in [0, 1], got {rescale}")
        if interval is not None:
            lo, hi = int(interval[0]), int(interval[1])
            if lo > hi:
                raise CondiffError(f"guidance interval must have lo <= hi, got {interval}")
            interval = (lo, hi)
        self.interval = interval

    def __call__(self, x, t, cond=None):
        if cond is None:
            raise CondiffError("classifier-free guidance needs a condition")
        B = x.shape[0]
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        if self.interval is not None:
            active = (t >= self.interval[0]) & (t <= self.interval[1])
        if self.w == 0 or not bool(active.any()):
            return self.model(x, t, cond)
        null = self.model.null_cond(B, x.device)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, null))
        e_c, e_u = both[:B], both[B:]
        guided = (1 + self.w) * e_c - self.w * e_u
        if self.rescale > 0:
            dims = tuple(range(1, x.dim()))
            ratio = e_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        if self.interval is not None:
            mask = active.view((-1,) + (1,) * (x.dim() - 1))
            guided = torch.where(mask, guided, e_c)
        return guided


def _cat_cond(cond, null):
    cond = torch.as_tensor(cond, device=null.device)
    if cond.dim() == 0:
        cond = cond.expand(null.shape[0])
    return torch.cat([cond.to(null.dtype), null])
