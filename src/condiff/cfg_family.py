"""The classifier-free guidance family beyond eq 24: APG, CFG++ and autoguidance.

All are model wrappers of the usual signature ``eps(x_t, t, cond)`` (CFG++ adds :meth:`CFGPlusPlus.eps_pair`
for the solvers that support it), built by :func:`condiff.compose.compose` from
:class:`condiff.compose.Guidance`:

* :class:`ProjectedGuidance`: adaptive projected guidance (APG, Sadat et al. 2024): the CFG update
  split into parts parallel and orthogonal to the conditional prediction, the parallel part scaled by
  ``eta``, the update's norm capped at ``rescale``, and a momentum over the steps of one chain.
* :class:`CFGPlusPlus`: CFG++ (Chung et al. 2024): x0 from eps_u + lambda (eps_c - eps_u), re-noised
  with the unconditional eps_u (DDIM only: :data:`CFGPP_SAMPLERS`).
* :class:`AutoGuided`: autoguidance (Karras et al. 2024): eps~ = (1 + w) eps(x_t, y) - w eps_weak(x_t, y),
  eq 24 with the null branch replaced by a weaker model of the same signature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import CondiffError
from .guidance import ClassifierFree, Conditioned, _cat_cond, check_interval, check_scale, network_cond
from .schedule import Schedule

__all__ = ["APG", "ProjectedGuidance", "CFGPlusPlus", "AutoGuided", "CFGPP_SAMPLERS"]

CFGPP_SAMPLERS = ("ddim",)  # solvers whose step is abar_s x0 + (...) eps: the re-noising eps can be swapped


@dataclass(frozen=True)
class APG:
    """Settings of adaptive projected guidance (Sadat et al. 2024, Algorithm 1), applied to the data prediction.

    Args:
        eta: weight of the update's part parallel to the conditional x0 (the paper's eta; 0 drops it, which
            the paper recommends; 1 keeps it: with ``rescale`` 0 and ``momentum`` 0 that is plain CFG).
        rescale: r, the per-sample norm cap of the update, ||u|| <= r; 0 is off.
        momentum: beta of the running update u_k = diff_k + beta u_{k-1} over the steps of one chain (the
            paper uses negative beta, e.g. -0.5); 0 is off.
    """

    eta: float = 0.0
    rescale: float = 0.0
    momentum: float = 0.0

    def __post_init__(self):
        check_scale("APG eta", self.eta)
        check_scale("APG rescale", self.rescale)
        m = check_scale("APG momentum", self.momentum, allow_negative=True)
        if not -1 < m < 1:
            raise CondiffError(f"APG momentum must lie in (-1, 1), got {self.momentum}")

    def config(self) -> dict:
        return asdict(self)


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1).view((-1,) + (1,) * (a.dim() - 1))


class ProjectedGuidance(ClassifierFree):
    """APG (Sadat et al. 2024) on the data prediction x0 = (x_t - bbar_t eps)/abar_t:

        d = x0_c - x0_u,  d <- d + beta d_prev (momentum),  d <- d min(1, r / ||d||) (rescale),
        d_par = (<d, x0_c> / ||x0_c||^2) x0_c,  x0~ = x0_c + w ((d - d_par) + eta d_par),

    returned as eps~ = (x_t - abar_t x0~)/bbar_t.  With eta = 1, r = 0, beta = 0 this is eq 24 exactly.

    Momentum is state of one sampling chain: it lives in this wrapper, is reset by :meth:`reset` and
    whenever a call comes at a larger t or another batch shape than the last (a new chain), and is never
    shared between wrappers (:func:`condiff.compose.compose` builds a new one per call).
    """

    what = "adaptive projected guidance"

    def __init__(self, model, schedule: Schedule, w: float, apg: APG = APG(), interval=None):
        super().__init__(model, w, interval=interval)
        self.schedule, self.apg = schedule, apg
        self.reset()

    def reset(self) -> None:
        """Forget the momentum: the next call starts a chain."""
        self._running, self._last = None, None

    def _mix(self, x, t, e_c, e_u):
        a, b = self.schedule.gather(t, x)
        x0_c, x0_u = (x - b * e_c) / a, (x - b * e_u) / a
        d = x0_c - x0_u
        if self.apg.momentum:
            key = (int(t.max()), tuple(x.shape))
            if self._last is None or key[0] > self._last[0] or key[1] != self._last[1]:
                self._running = None  # a new chain
            self._last = key
            d = d if self._running is None else d + self.apg.momentum * self._running
            self._running = d
        if self.apg.rescale:
            norm = d.flatten(1).norm(dim=1).view((-1,) + (1,) * (x.dim() - 1))
            d = d * torch.clamp(self.apg.rescale / norm.clamp_min(1e-12), max=1.0)
        par = _flat_dot(d, x0_c) / _flat_dot(x0_c, x0_c).clamp_min(1e-12) * x0_c
        x0 = x0_c + self.w * ((d - par) + self.apg.eta * par)
        return (x - a * x0) / b


class CFGPlusPlus:
    """CFG++ (Chung et al. 2024): x0 = (x_t - bbar_t eps_lam) / abar_t with eps_lam = eps_u + lam (eps_c - eps_u),
    then the DDIM step re-noises with the unconditional eps_u, x_s = abar_s x0 + bbar_s eps_u (eta = 0).

    ``lam`` in [0, 1] is the paper's range (lam = 0: unconditional DDIM); as a plain model this wrapper returns
    eps_lam (CFG with w = lam - 1); the solvers in :data:`CFGPP_SAMPLERS` call :meth:`eps_pair` instead, and
    the others refuse it in one line.  ``interval`` (lo, hi): CFG++ only there, the conditional model elsewhere.
    """

    def __init__(self, model, lam: float, interval=None):
        if not hasattr(model, "null_cond"):
            raise CondiffError("CFG++ needs a model trained with a null condition")
        self.model, self.lam = model, check_scale("CFG++ lambda", lam)
        self.interval = check_interval(interval, "CFG++ interval")

    def eps_pair(self, x, t, cond=None):
        """(eps_lam for x0, eps_u for re-noising); outside the interval both are the conditional eps."""
        cond = network_cond(cond)
        if cond is None:
            raise CondiffError("CFG++ needs a condition")
        B = x.shape[0]
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, self.model.null_cond(B, x.device)))
        e_c, e_u = both[:B], both[B:]
        e_lam = e_u + self.lam * (e_c - e_u)
        if self.interval is not None:
            mask = ((t >= self.interval[0]) & (t <= self.interval[1])).view((-1,) + (1,) * (x.dim() - 1))
            e_lam, e_u = torch.where(mask, e_lam, e_c), torch.where(mask, e_u, e_c)
        return e_lam, e_u

    def __call__(self, x, t, cond=None):
        return self.eps_pair(x, t, cond)[0]


class AutoGuided:
    """Autoguidance (Karras et al. 2024): eps~ = (1 + w) eps(x_t, y, t) - w eps_weak(x_t, y, t).

    Eq 24 with the null branch replaced by ``weak``, a weaker model of the same task and signature
    (an early checkpoint, a smaller network); both see the batch's condition.  w = 0 is the model itself,
    and so is any w when ``weak`` is the model.  ``interval`` (lo, hi): guide only there.

    ``cfg_w`` (off: None) adds classifier-free guidance (eq 24) in the same call, each difference with its
    own weight:

        eps~ = eps(x_t, y) + cfg_w (eps(x_t, y) - eps(x_t, phi)) + w (eps(x_t, y) - eps_weak(x_t, y)),

    so cfg_w = 0 is autoguidance alone and a ``weak`` equal to the model is CFG with weight cfg_w; the
    conditional and null predictions come from one batched forward of 2B (the model needs a null condition).
    """

    def __init__(self, model, weak, w: float, interval=None, cfg_w: float | None = None):
        if weak is None:
            raise CondiffError("autoguidance needs a weak model")
        self.model, self.weak = Conditioned(model), Conditioned(weak)
        self.w = check_scale("autoguidance weight w", w)
        self.interval = check_interval(interval, "autoguidance interval")
        self.cfg = None
        if cfg_w is not None and check_scale("cfg weight w", cfg_w) > 0:
            self.cfg = ClassifierFree(model, cfg_w)  # its interval is applied here, to both differences

    def __call__(self, x, t, cond=None):
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if self.interval is not None:
            active = (t >= self.interval[0]) & (t <= self.interval[1])
        if not bool(active.any()) or (self.w == 0 and self.cfg is None):
            return self.model(x, t, cond)
        if self.cfg is None:
            e = self.model(x, t, cond)
            guided = e
        else:
            c = network_cond(cond)
            if c is None:
                raise CondiffError("autoguidance with classifier-free guidance needs a condition")
            B = x.shape[0]
            null = self.cfg.model.null_cond(B, x.device)
            both = self.cfg.model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(c, null))
            e = both[:B]
            guided = self.cfg._mix(x, t, e, both[B:])
        if self.w != 0:
            guided = guided + self.w * (e - self.weak(x, t, cond))
        return torch.where(active.view((-1,) + (1,) * (x.dim() - 1)), guided, e)
