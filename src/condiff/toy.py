"""Analytic Gaussian mixtures: exact scores, exact classifiers, exact conditional eps.

For data x_0 ~ sum_k pi_k N(m_k, C_k) the forward process x_t = abar_t x_0 + bbar_t eps
keeps every component Gaussian, so the marginal at time t is

    p_t(x) = sum_k pi_k N(x; abar_t m_k, abar_t^2 C_k + bbar_t^2 I)

and everything a trained network only approximates is available in closed form:
the score grad log p_t(x), the optimal eps*(x_t) = -bbar_t grad log p_t(x_t) (the
eps-parameterisation of the score, eqs 18-19), the conditional eps*(x_t, y) of
eqs 20-22 (the score of component y alone) and the noise-aware classifier
p(y | x_t) of eqs 3-8.  This gives ground truth for every sampler and guidance
in condiff.  All computations run in float64.
"""

from __future__ import annotations

import math

import torch

from .errors import CondiffError
from .schedule import Schedule

__all__ = ["GaussianMixture"]

_f64 = torch.float64


class GaussianMixture:
    """sum_k pi_k N(m_k, C_k) in R^d, with exact diffused quantities under ``schedule``.

    Also a condiff model: ``eps(x_t, t, cond)`` with ``cond`` None or K (the null
    condition phi) for the unconditional eps, or a class in 0..K-1 for the exact
    conditional eps; ``null_cond`` makes it usable by ClassifierFree and NullBranch.

    Args:
        means: (K, d) component means m_k.
        covs: (K, d, d) symmetric positive-definite C_k, or None for ``scale * I``.
        weights: (K,) positive mixture weights pi_k (normalised), None for uniform.
        schedule: the :class:`~condiff.schedule.Schedule` that defines abar_t, bbar_t.
        scale: variance of each component when ``covs`` is None.
    """

    def __init__(self, means, covs=None, weights=None, *, schedule: Schedule, scale: float = 1.0):
        means = torch.as_tensor(means, dtype=_f64)
        if means.dim() != 2:
            raise CondiffError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        if covs is None:
            covs = scale * torch.eye(d, dtype=_f64).expand(K, d, d)
        covs = torch.as_tensor(covs, dtype=_f64)
        if covs.shape != (K, d, d) or not torch.allclose(covs, covs.transpose(1, 2)):
            raise CondiffError(f"covs must be symmetric with shape ({K}, {d}, {d})")
        weights = torch.ones(K, dtype=_f64) if weights is None else torch.as_tensor(weights, dtype=_f64)
        if weights.shape != (K,) or not (weights > 0).all():
            raise CondiffError(f"weights must be {K} positive numbers")
        lam, Q = torch.linalg.eigh(covs)  # C_k = Q_k diag(lam_k) Q_k^T
        if not (lam > 0).all():
            raise CondiffError("covs must be positive definite")
        self.means, self.covs, self.weights = means, covs.clone(), weights / weights.sum()
        self.K, self.d, self.schedule = K, d, schedule
        self._lam, self._Q = lam, Q

    # --- core: per-component log densities and scores at (abar, bbar) -------------
    def _coeffs(self, t, B: int):
        if t is None:  # clean data: abar = 1, bbar = 0
            return torch.ones(B, dtype=_f64), torch.zeros(B, dtype=_f64)
        t = torch.as_tensor(t, dtype=torch.long).cpu().expand(B)
        return self.schedule.abar[t], self.schedule.bbar[t]

    def _parts(self, x: torch.Tensor, t):
        """log pi_k N_k(x) (K, B) and per-component scores (K, d, B) at time t.

        Batch-last layout: the reductions run over short leading axes (fast on CPU).
        """
        xT = x.to(_f64).cpu().T                                    # (d, B)
        a, b = self._coeffs(t, xT.shape[1])
        diff = xT - self.means[:, :, None] * a                     # x - abar m_k
        y = self._Q.transpose(1, 2) @ diff                         # Q_k^T (x - abar m_k)
        s = self._lam[:, :, None] * a**2 + b**2                    # eigenvalues of abar^2 C_k + bbar^2 I
        ys = y / s
        log_n = -0.5 * ((y * ys).sum(1) + s.log().sum(1) + self.d * math.log(2 * math.pi))
        scores = -(self._Q @ ys)                                   # -(abar^2 C_k + bbar^2 I)^{-1} (x - abar m_k)
        return self.weights.log()[:, None] + log_n, scores

    def _out(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.T.to(like.device, like.dtype)

    def log_prob(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """log p_t(x), (B,); ``t=None`` is the clean data density."""
        return torch.logsumexp(self._parts(x, t)[0], 0).to(x.device, x.dtype)

    def class_log_prob(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """Exact log p(y = k | x_t), (B, K), differentiable in x; ``t=None`` at clean data."""
        lj = self._parts(x, t)[0]
        return self._out(lj - torch.logsumexp(lj, 0, keepdim=True), x)

    def classifier(self, x: torch.Tensor, t) -> torch.Tensor:
        """Logits for :class:`~condiff.guidance.ClassifierTerm`: the exact log p(y | x_t)."""
        return self.class_log_prob(x, t)

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """Exact grad_x log p_t(x), (B, d): sum_k p(k | x_t) * score_k."""
        lj, scores = self._parts(x, t)
        return self._out((lj.softmax(0)[:, None] * scores).sum(0), x)

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """Optimal eps*(x_t, t, cond) = -bbar_t * score (eq 18's parameterisation).

        ``cond`` None or K: unconditional; a class (int or (B,) long) in 0..K-1:
        the score of that component alone, the exact conditional model of eq 22.
        """
        lj, scores = self._parts(x, t)
        _, b = self._coeffs(t, x.shape[0])
        out = (lj.softmax(0)[:, None] * scores).sum(0)             # (d, B)
        if cond is not None:
            c = torch.as_tensor(cond, dtype=torch.long).cpu().expand(x.shape[0])
            if (c < 0).any() or (c > self.K).any():
                raise CondiffError(f"class must lie in 0..{self.K} ({self.K} = null), got {c.unique().tolist()}")
            own = scores.gather(0, c.clamp(max=self.K - 1).expand(1, self.d, -1))[0]
            out = torch.where(c == self.K, out, own)
        return self._out(-b * out, x)

    __call__ = eps

    def null_cond(self, batch: int, device=None) -> torch.Tensor:
        """The null condition phi: class index K, (batch,) long."""
        return torch.full((batch,), self.K, dtype=torch.long, device=device)

    # --- data ------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, component=None) -> torch.Tensor:
        """n draws of x_0, (n, d) float64; ``component`` (int or (n,)) fixes the class."""
        if component is None:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            k = torch.as_tensor(component, dtype=torch.long).expand(n)
            if (k < 0).any() or (k >= self.K).any():
                raise CondiffError(f"component must lie in 0..{self.K - 1}")
        z = torch.randn(n, self.d, generator=generator, dtype=_f64)
        L = self._Q * self._lam.sqrt()[:, None, :]  # C_k = L_k L_k^T
        return self.means[k] + torch.einsum("nij,nj->ni", L[k], z)

    def component_of(self, x0: torch.Tensor) -> torch.Tensor:
        """Maximum-posterior component of clean points under the exact density, (B,) long."""
        return self.class_log_prob(x0, None).argmax(-1)

    def moments(self, component: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean (d,) and covariance (d, d) of the data, or of one component."""
        if component is not None:
            return self.means[component].clone(), self.covs[component].clone()
        mean = self.weights @ self.means
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return mean, second - torch.outer(mean, mean)
