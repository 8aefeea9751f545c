"""Guidance: turn a model and a condition into a guided model.

Three families, all as wrappers around a model ``eps(x_t, t, cond)``:

* gradient terms (classifier guidance, eqs 1-10; similarity guidance, eqs 11-15):
  each :class:`GradientTerm` computes ``gamma * grad_x f(x_t, t, cond)``; they are applied
  either as a mean shift mu + sigma_t^2 * g for ancestral samplers
  (:class:`MeanShift`, eqs 6-8 and 14) or in score form
  eps - bbar_t * g, valid for any sigma_t including DDIM (:class:`ScoreGuided`,
  eqs 18-19);
* classifier-free guidance (:class:`ClassifierFree`, eqs 20-24);
* composition: several gradient terms in one wrapper, on top of a CFG model
  (described by :class:`condiff.compose.Guidance`, built by :func:`condiff.compose.compose`).

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
    "SimilarityTerm", "MeanShift", "check_interval", "ScoreGuided", "ClassifierFree", "NullBranch", "Conditioned", "check_scale",
    "cond_entry", "network_cond", "batch_cond", "slice_cond", "MODEL_KEY", "FORMS", "GRAD_AT",
]

FORMS = ("score", "mean")  # eq 19 (any sampler) or eqs 6-7 (ancestral samplers)
GRAD_AT = ("x_t", "mu")    # eq 6 or eq 7


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


def scaled_grad(fn: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, scale: float = 1.0,
                cond=None) -> torch.Tensor:
    """scale * d/dx fn(x, t, cond) for a per-sample objective ``fn -> (B,)``.

    The one gradient helper of condiff: it works inside ``torch.no_grad()``
    sampling loops, differentiates with respect to ``x`` only (no parameter
    receives a ``.grad``), and since samples are independent the gradient of the
    batch sum is each sample's own gradient.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = fn(xg, t, cond)
        if out.dim() != 1 or out.shape[0] != x.shape[0]:
            raise CondiffError(f"a guidance objective must return shape ({x.shape[0]},), got {tuple(out.shape)}")
        (g,) = torch.autograd.grad(out.sum(), xg)
    return (scale * g).detach()


# ----------------------------------------------------------------------------- the condition of a batch
# ``cond`` is what travels with a batch through ``generate`` (sliced with the batch) to every model
# call and every guidance term.  It is None, a tensor, or a dict of per-row entries:
#
#   cond = {"y": classes (B,), "text": targets (B, D), "image": targets (B, D), ...}
#
# The eps-network receives ``cond["y"]`` (a plain tensor is that entry alone); each gradient term
# reads the entry named by its ``key`` (ClassifierTerm "y", TextSimilarity "text", ImageSimilarity
# "image"), so per-row targets need no batch-size restriction and no term is rebuilt per batch.
MODEL_KEY = "y"


def cond_entry(cond, key: str | None):
    """Entry ``key`` of a batch condition: ``cond[key]`` of a dict, a plain tensor for key "y", else None."""
    if key is None or cond is None:
        return None
    if isinstance(cond, dict):
        return cond.get(key)
    return cond if key == MODEL_KEY else None


def network_cond(cond):
    """What the eps-network receives of a batch condition: its "y" entry (eq 22's y)."""
    return cond_entry(cond, MODEL_KEY)


def _rows_of(value, n: int, what: str) -> torch.Tensor:
    v = torch.as_tensor(value)
    if v.dim() == 0 or (v.shape[0] == 1 and n != 1):
        return v.expand(n, *v.shape[1:]) if v.dim() else v.expand(n)
    if v.shape[0] != n:
        raise CondiffError(f"{what} has {v.shape[0]} rows for {n} samples")
    return v


def batch_cond(cond, n: int):
    """``cond`` for ``n`` samples, every entry with n rows: a scalar or a single row repeats.

    A plain tensor is the network's condition (an int class, (n,) classes, or one (D,) vector
    for every row); a dict holds per-row entries (see :func:`cond_entry`).
    """
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: _rows_of(v, n, f"cond[{k!r}]") for k, v in cond.items()}
    cond = torch.as_tensor(cond)
    if cond.dim() == 1 and cond.dtype.is_floating_point:  # one condition vector for every row
        cond = cond[None]
    return _rows_of(cond, n, "cond")


def slice_cond(cond, lo: int, hi: int, device=None):
    """Rows lo:hi of a :func:`batch_cond` condition, moved to ``device``."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[lo:hi].to(device) for k, v in cond.items()}
    return cond[lo:hi].to(device)


class Conditioned:
    """A model called with the network part of a batch condition: ``model(x_t, t, cond["y"])``.

    A model that says it is unconditional (``model.conditional`` False) gets None: the
    classes in ``cond`` are then for the gradient terms (a classifier) alone.
    """

    def __init__(self, model):
        self.model = model
        self.uses_cond = getattr(model, "conditional", True) is not False

    def __call__(self, x, t, cond=None):
        return self.model(x, t, network_cond(cond) if self.uses_cond else None)


class GradientTerm:
    """A guidance term gamma * grad_x f(x_t, t, cond) for any differentiable ``f(x_t, t, cond) -> (B,)``.

    ``f`` is log p(y|x_t) for classifier guidance (eqs 6-8) or sim(x_t, y) for
    similarity guidance (eqs 11-15); ``cond`` is the batch's condition (see
    :func:`cond_entry`), so a per-row target travels with its row.  ``scale`` is gamma (eq 8).
    """

    key: str | None = None  # the entry of ``cond`` that holds this term's per-row target

    def __init__(self, fn: Callable[..., torch.Tensor] | None, scale: float = 1.0, name: str = "custom"):
        self.fn = fn
        self.scale = check_scale(f"{name} scale", scale)
        self.name = name

    def objective(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.fn(x, t, cond)

    def grad(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if self.scale == 0:
            return torch.zeros_like(x)
        return scaled_grad(self.objective, x, t, self.scale, cond)

    def config(self) -> dict:
        """The JSON-able settings of this term (its networks and targets are not)."""
        return {"name": self.name, "scale": self.scale, "key": self.key}


class ClassifierTerm(GradientTerm):
    """Classifier guidance: gamma * grad log p(y | x_t) (eqs 6-8).

    With ``sharpen=True`` the term is grad log p~(y|x_t) for the "sharpened"
    classifier p~ = p^gamma / Z = softmax(gamma * logits) (eq 9), whose gradient is
    gamma * grad log p - grad log Z (eq 10), not gamma * grad log p; the two agree
    at gamma = 1.

    Args:
        classifier: ``logits = classifier(x_t, t)``, (B, num_classes).
        y: the target class, an int or a (B,) long tensor; None (default) reads each
            row's class from the batch condition (``cond["y"]``, or a plain tensor cond).
    """

    key = MODEL_KEY

    def __init__(self, classifier, y=None, scale: float = 1.0, sharpen: bool = False):
        super().__init__(None, scale, name="classifier")
        self.classifier = classifier
        self.y = y
        self.sharpen = bool(sharpen)

    def _targets(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        y = self.y if self.y is not None else cond_entry(cond, self.key)
        if y is None:
            raise CondiffError("classifier guidance: no target class (give y, or put cond['y'] in the batch)")
        return _rows_of(y, x.shape[0], "the classifier's target").to(x.device).long()

    def objective(self, x, t, cond=None):
        logits = self.classifier(x, t)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.sharpen:
            logits = self.scale * logits
        return F.log_softmax(logits, dim=-1).gather(1, self._targets(x, cond)[:, None])[:, 0]

    def grad(self, x, t, cond=None):
        if self.sharpen:  # the scale lives inside the softmax (eq 9); no extra factor
            return scaled_grad(self.objective, x, t, 1.0, cond)
        return super().grad(x, t, cond)

    def config(self) -> dict:
        return dict(super().config(), sharpen=self.sharpen)


class SimilarityTerm(GradientTerm):
    """Similarity guidance: gamma * grad sim(x_t, y) (eqs 11-14) for any ``sim(x_t, t, cond) -> (B,)``."""

    def __init__(self, sim: Callable[..., torch.Tensor] | None, scale: float = 1.0, name: str = "similarity"):
        super().__init__(sim, scale, name=name)


def check_interval(interval, what: str = "guidance interval", T: int | None = None) -> tuple[int, int] | None:
    """(lo, hi) timesteps with 0 <= lo <= hi (< T when given), or None; one-line error otherwise."""
    if interval is None:
        return None
    try:
        lo, hi = (int(v) for v in interval)
    except (TypeError, ValueError):
        raise CondiffError(f"the {what} must be two timesteps lo,hi, got {interval!r}") from None
    if not 0 <= lo <= hi or (T is not None and hi >= T):
        bound = f"0 <= lo <= hi <= {T - 1}" if T is not None else "0 <= lo <= hi"
        raise CondiffError(f"the {what} must satisfy {bound}, got {lo},{hi}")
    return lo, hi


def _total_grad(terms: Sequence[GradientTerm], x: torch.Tensor, t: torch.Tensor, cond=None,
                interval: tuple[int, int] | None = None, eps: torch.Tensor | None = None, model=None) -> torch.Tensor:
    """sum_k gamma_k grad f_k; rows with t outside ``interval`` (lo, hi) get no gradient (a guidance interval
    for gradient terms, as Kynkaanniemi et al. 2024 for CFG).  Terms with ``uses_eps`` (x0-guidance with eps
    held fixed) whose own eps-model is ``model`` receive its ``eps`` at x_t, which the caller computed."""
    g = torch.zeros_like(x)
    if interval is not None:
        active = (t >= interval[0]) & (t <= interval[1])
        if not bool(active.any()):
            return g
    for term in terms:
        shared = eps is not None and getattr(term, "uses_eps", False) and getattr(term, "model", None) is model
        extra = {"eps": eps} if shared else {}
        g = g + term.grad(x, t, cond, **extra).to(x.dtype)
    if interval is not None:
        g = torch.where(active.view((-1,) + (1,) * (x.dim() - 1)), g, torch.zeros_like(g))
    return g


class MeanShift:
    """Mean-shift application of gradient terms for ancestral samplers (eqs 6-8, 14).

    Pass as ``mean_shift=`` to a sampler; the sampler adds sigma_t^2 * g to its mean
    via :func:`condition_mean`.  ``at="x_t"`` takes the gradient at x_t (eq 6, the
    article's form and openai/guided-diffusion's code); ``at="mu"`` takes it at
    mu(x_t) (eq 7, the original paper's statement).
    """

    def __init__(self, terms: Sequence[GradientTerm] | GradientTerm, at: str = "x_t",
                 interval: tuple[int, int] | None = None):
        if at not in GRAD_AT:
            raise CondiffError(f"gradient location must be x_t or mu, got {at!r}")
        self.terms = [terms] if isinstance(terms, GradientTerm) else list(terms)
        self.at = at
        self.interval = check_interval(interval)

    def __call__(self, x_t, t, mu, cond=None):
        return _total_grad(self.terms, x_t if self.at == "x_t" else mu, t, cond, self.interval)


class ScoreGuided:
    """Score-form guidance for any sampler (eqs 18-19): eps~ = eps - bbar_t * sum_k gamma_k grad f_k.

    Wraps ``model`` and returns a model of the same signature.  ``interval`` (lo, hi): the terms act only
    for lo <= t <= hi (see :func:`_total_grad`).
    """

    def __init__(self, model, schedule: Schedule, terms: Sequence[GradientTerm] | GradientTerm,
                 interval: tuple[int, int] | None = None):
        self.model = model
        self.schedule = schedule
        self.terms = [terms] if isinstance(terms, GradientTerm) else list(terms)
        self.interval = check_interval(interval)

    def _shares_forward(self, t: torch.Tensor):
        """The first term that can give eps from its own forward through this model (x0-guidance through the
        network), when every row is inside the interval; else None."""
        if self.interval is not None and not bool(((t >= self.interval[0]) & (t <= self.interval[1])).all()):
            return None
        return next((k for k in self.terms if k.scale != 0 and getattr(k, "path", None) == "model"
                     and getattr(k, "model", None) is self.model and hasattr(k, "grad_and_eps")), None)

    def __call__(self, x, t, cond=None):
        lead = self._shares_forward(t)
        if lead is None:
            eps = self.model(x, t, cond)
            if all(term.scale == 0 for term in self.terms):
                return eps
            g = _total_grad(self.terms, x, t, cond, self.interval, eps=eps, model=self.model)
        else:  # one forward + backward through the network serves the term and eps
            g, eps = lead.grad_and_eps(x, t, cond)
            g = g.to(x.dtype) + _total_grad([k for k in self.terms if k is not lead], x, t, cond, self.interval,
                                            eps=eps, model=self.model)
        _, bbar = self.schedule.gather(t, x)
        return condition_score(eps, bbar, g)


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
        self.interval = check_interval(interval)

    what = "classifier-free guidance"

    def _mix(self, x, t, e_c, e_u):
        """The guided eps from the conditional and null predictions (eq 24, then the rescale)."""
        guided = (1 + self.w) * e_c - self.w * e_u
        if self.rescale > 0:
            dims = tuple(range(1, x.dim()))
            ratio = e_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        return guided

    def __call__(self, x, t, cond=None):
        cond = network_cond(cond)
        if cond is None:
            raise CondiffError(f"{self.what} needs a condition")
        B = x.shape[0]
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        if self.interval is not None:
            active = (t >= self.interval[0]) & (t <= self.interval[1])
        if self.w == 0 or not bool(active.any()):
            return self.model(x, t, cond)
        null = self.model.null_cond(B, x.device)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, null))
        e_c, e_u = both[:B], both[B:]
        guided = self._mix(x, t, e_c, e_u)
        if self.interval is not None:
            mask = active.view((-1,) + (1,) * (x.dim() - 1))
            guided = torch.where(mask, guided, e_c)
        return guided


def _cat_cond(cond, null):
    cond = torch.as_tensor(cond, device=null.device)
    if cond.dim() == 0:
        cond = cond.expand(null.shape[0])
    return torch.cat([cond.to(null.dtype), null])
