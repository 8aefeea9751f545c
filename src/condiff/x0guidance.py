"""x0-guidance: guide with a *clean* objective f(x_0) through the denoised estimate x0_hat(x_t).

The article's classifier and similarity guidance (eqs 6-15) need networks trained on noisy inputs,
log p(y|x_t) and E1(x_t).  DPS (Chung et al. 2023), Universal Guidance (Bansal et al. 2023),
FreeDoM (Yu et al. 2023) and TFG (Ye et al. 2024) guide with a clean network instead, evaluated on

    x0_hat(x_t) = (x_t - bbar_t eps(x_t)) / abar_t                     (eq 19's data prediction)

and use g = gamma grad_{x_t} f(x0_hat(x_t)) in place of gamma grad log p(y|x_t) in eq 19 (score form,
every solver) or eq 6 (mean form).  Two gradient paths:

* ``path="model"`` (DPS, Universal Guidance's forward guidance): autograd through the eps-network,
  grad_{x_t} = (1/abar_t) (I - bbar_t J_eps)^T grad_{x0} f;
* ``path="fixed"``: eps held fixed, grad_{x_t} = (1/abar_t) grad_{x0} f; no backward pass through
  the eps-network (the paths differ by exactly -(bbar_t/abar_t) J_eps^T grad_{x0} f).

Options, each off by default: Monte-Carlo smoothing of f (TFG: E_n f(x0_hat + rho n), n ~ N(0, I)),
a per-t scale schedule, and the guidance-level ones of :class:`condiff.compose.Guidance`
(self-recurrence, a guidance interval).  An :class:`X0Term` is a :class:`~condiff.guidance.GradientTerm`:
it sits in ``Guidance.terms`` next to the article's terms, with CFG, on every solver; the gradient is
taken by :func:`~condiff.guidance.scaled_grad` and applied by :func:`~condiff.guidance.condition_score`.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import CondiffError
from .guidance import MODEL_KEY, GradientTerm, _rows_of, cond_entry, scaled_grad
from .schedule import Schedule

__all__ = ["X0Term", "PATHS", "WEIGHTS", "clean_classifier", "at_t0"]

PATHS = ("model", "fixed")  # through the eps-network (DPS / forward guidance) or with eps held fixed
WEIGHTS = ("constant", "abar", "abar2", "bbar")  # per-t multipliers of gamma: 1, abar_t, abar_t^2, bbar_t


def at_t0(net) -> Callable[[torch.Tensor], torch.Tensor]:
    """A time-conditioned network ``net(x, t)`` as a clean one, ``x -> net(x, 0)`` (a classifier trained on t = 0)."""
    return lambda x: net(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


def clean_classifier(classifier: Callable[[torch.Tensor], torch.Tensor], key: str = MODEL_KEY):
    """The objective f(x0, t, cond) = log p(y | x0) of a clean classifier ``logits = classifier(x0)``; y per row
    from ``cond[key]`` (an int or (B,) tensor)."""

    def log_p(x0: torch.Tensor, t, cond=None) -> torch.Tensor:
        y = cond_entry(cond, key)
        if y is None:
            raise CondiffError(f"x0 classifier guidance: no target class (put cond[{key!r}] in the batch)")
        logits = classifier(x0)
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        y = _rows_of(y, x0.shape[0], "the classifier's target").to(x0.device).long()
        return F.log_softmax(logits, dim=-1).gather(1, y[:, None])[:, 0]

    return log_p


class X0Term(GradientTerm):
    """x0-guidance: gamma * w(t) * grad_{x_t} f(x0_hat(x_t), cond) (DPS, Universal Guidance, TFG; eq 19's x0).

    Args:
        objective: the clean objective ``f(x0, t0, cond) -> (B,)`` (t0 = zeros), e.g.
            :func:`clean_classifier`, or any :class:`~condiff.guidance.GradientTerm`'s ``objective`` built
            on clean networks (``ImageSimilarity`` with E2 in place of E1, ``StyleSimilarity`` without a
            schedule); :meth:`of` takes such a term with its scale, name and key.
        scale: gamma.
        path: "model" (autograd through the eps-network) or "fixed" (eps held fixed); see the module.
        smoothing: rho of TFG's Monte-Carlo smoothing, f -> mean_j f(x0_hat + rho n_j); 0 is off.
        samples: the number of draws n_j (>= 1) when smoothing; their noise is seeded by (seed, t), so
            the same seed gives the same images.
        weight: per-t multiplier of gamma: "constant" (default), "abar" (abar_t: cancels the 1/abar_t of
            x0_hat where the noise is large), "abar2" (abar_t^2: with path "fixed" under eq 19 the step
            moves x0_hat by exactly gamma bbar_t^2 grad_{x0} f, bounded by gamma at every t), "bbar", or a
            callable ``t (B,) -> (B,)``.
        model, schedule: the eps-model whose x0_hat is used; :func:`condiff.compose.compose` binds the
            model it builds (:meth:`bind`), so a user rarely gives them.
        key: the entry of the batch condition holding per-row targets (for :meth:`~GradientTerm.config`).
    """

    uses_eps = True  # ScoreGuided hands over the eps it computed at x_t (path "fixed" then needs no call)

    def __init__(self, objective: Callable[..., torch.Tensor], scale: float = 1.0, *, path: str = "model",
                 smoothing: float = 0.0, samples: int = 1, weight: str | Callable | None = None, model=None,
                 schedule: Schedule | None = None, name: str = "x0", key: str | None = MODEL_KEY, seed: int = 0):
        super().__init__(objective, scale, name=name)
        if path not in PATHS:
            raise CondiffError(f"x0-guidance path must be model or fixed, got {path!r}")
        if not isinstance(smoothing, (int, float)) or not smoothing >= 0 or smoothing == float("inf"):
            raise CondiffError(f"x0-guidance smoothing rho must be a finite number >= 0, got {smoothing!r}")
        if not isinstance(samples, int) or samples < 1:
            raise CondiffError(f"x0-guidance smoothing samples must be an integer >= 1, got {samples!r}")
        if weight is None:
            weight = "constant"
        if isinstance(weight, str) and weight not in WEIGHTS:
            raise CondiffError(f"x0-guidance weight must be one of {', '.join(WEIGHTS)} or a function, got {weight!r}")
        self.path, self.smoothing, self.samples, self.weight = path, float(smoothing), samples, weight
        self.model, self.schedule, self.key, self.seed = model, schedule, key, int(seed)

    @classmethod
    def of(cls, term: GradientTerm, **options) -> "X0Term":
        """An x0 version of ``term`` (its objective on clean networks, its scale, name and key)."""
        return cls(term.objective, term.scale, name=f"x0-{term.name}", key=term.key, **options)

    def bind(self, model, schedule: Schedule) -> "X0Term":
        """A copy of this term that computes x0_hat with ``model`` under ``schedule``."""
        term = copy.copy(self)
        term.model, term.schedule = model, schedule
        return term

    def x0_hat(self, x: torch.Tensor, t: torch.Tensor, cond=None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """x0_hat(x_t) = (x_t - bbar_t eps(x_t)) / abar_t, differentiable through the model when x requires grad."""
        a, b = self.schedule.gather(t, x)
        return (x - b * (self.model(x, t, cond) if eps is None else eps)) / a

    def clean_objective(self, x0: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """f(x0), smoothed by TFG's Monte-Carlo average when ``smoothing`` > 0; (B,)."""
        t0 = torch.zeros_like(t)
        if self.smoothing == 0:
            return self.fn(x0, t0, cond)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(t.max()))
        total = 0.0
        for _ in range(self.samples):
            n = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
            total = total + self.fn(x0 + self.smoothing * n, t0, cond)
        return total / self.samples

    def objective(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """f(x0_hat(x_t)) through the eps-network (path "model")."""
        return self.clean_objective(self.x0_hat(x, t, cond), t, cond)

    def _weight(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
        if self.weight == "constant":
            return 1.0
        a, b = self.schedule.gather(t, x)
        if self.weight == "abar":
            return a
        if self.weight == "abar2":
            return a * a
        if self.weight == "bbar":
            return b
        return torch.as_tensor(self.weight(t), dtype=x.dtype, device=x.device).view((-1,) + (1,) * (x.dim() - 1))

    def grad_and_eps(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the path-"model" gradient, eps(x_t)) from one forward and one backward pass of the eps-network:
        :class:`~condiff.guidance.ScoreGuided` uses this eps too, so DPS costs no extra forward."""
        if self.path != "model":
            raise CondiffError("grad_and_eps is the gradient through the eps-network (path model)")
        a, b = self.schedule.gather(t, x)
        box = {}

        def through_model(xg, tt, c):
            box["eps"] = self.model(xg, tt, c)
            return self.clean_objective((xg - b * box["eps"]) / a, tt, c)

        g = scaled_grad(through_model, x, t, self.scale, cond)
        return g * self._weight(t, x), box["eps"].detach()

    def grad(self, x: torch.Tensor, t: torch.Tensor, cond=None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """gamma w(t) grad_{x_t} f(x0_hat(x_t)) along ``path``; ``eps``: the model's eps at x_t, if known."""
        if self.model is None or self.schedule is None:
            raise CondiffError(f"the {self.name} term has no eps-model: build it with compose() or .bind(model, "
                               "schedule)")
        if self.scale == 0:
            return torch.zeros_like(x)
        if self.path == "model":
            g = scaled_grad(self.objective, x, t, self.scale, cond)
        else:
            if eps is None:
                with torch.no_grad():
                    eps = self.model(x, t, cond)
            x0 = self.x0_hat(x, t, cond, eps.detach())
            a, _ = self.schedule.gather(t, x)
            g = scaled_grad(self.clean_objective, x0, t, self.scale, cond) / a  # chain rule with eps fixed
        return g * self._weight(t, x)

    def config(self) -> dict:
        weight = self.weight if isinstance(self.weight, str) else "custom"
        return dict(super().config(), path=self.path, smoothing=self.smoothing, samples=self.samples, weight=weight)
