"""The losses of condiff's networks, as tasks for :func:`condiff.training.train`.

* :class:`DiffusionTask`  eps-MSE of eq 22, with condition dropout to the learned
  null phi (the classifier-free hook of eq 24), optional min-SNR-gamma weighting,
  stratified t sampling, and optionally v or x_0 in place of eps as the
  network's target (:mod:`condiff.prediction`).
* :class:`ClassifierTask` cross-entropy of a noise-aware classifier p(y|x_t) on
  x_t = abar_t x_0 + bbar_t eps (classifier guidance, eqs 1-8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import ImageDataset
from ..distributed import Shard
from ..errors import CondiffError
from ..prediction import PREDICTION_KEY, check_prediction, regression_target, x0_error_scale
from ..schedule import Schedule

__all__ = ["DiffusionTask", "ClassifierTask", "classifier_accuracy_by_t", "min_snr_weight", "sample_t",
           "T_RANGES", "T_SAMPLING"]

# t-ranges (fractions of T) in which classifier accuracy is reported
T_RANGES = {"clean": (0.0, 0.1), "mid": (0.1, 0.6), "noisy": (0.6, 1.0)}
T_SAMPLING = ("uniform", "stratified")


def unwrap(model):
    """The network inside torch.compile and/or DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def sample_t(T: int, n: int, generator: torch.Generator, shard: Shard = Shard(), how: str = "uniform"):
    """(n,) timesteps in [0, T): i.i.d. uniform, or stratified over the global batch.

    Stratified: row i of the global batch of N = n * world_size rows gets
    t_i = floor((i + u_i) T / N), u_i ~ U[0, 1), so the batch covers [0, T) evenly
    (each t still has the uniform marginal) and the loss estimate has less variance.
    """
    if how == "uniform":
        return shard.randint(T, n, generator)
    if how != "stratified":
        raise CondiffError(f"unknown t sampling {how!r} (choose from {', '.join(T_SAMPLING)})")
    N = n * shard.world_size
    u = torch.rand(N, generator=generator)
    t = ((torch.arange(N, dtype=torch.float64) + u.double()) * (T / N)).long().clamp_(0, T - 1)
    return t[shard.rank::shard.world_size]  # this rank's rows, as Shard slices every global draw


def min_snr_weight(schedule: Schedule, t: torch.Tensor, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma weight of the loss (Hang et al. 2023): min(SNR_t, gamma) / SNR_t for the eps-loss.

    SNR_t = abar_t^2 / bbar_t^2 in the article's notation (x_t = abar_t x_0 + bbar_t eps).
    Weighting eq 22's eps-MSE by it equals an x0-MSE weighted by min(SNR, gamma):
    the nearly clean steps, whose eps-error is cheap to shrink and matters little
    to the samples, stop dominating the gradient.  The same x0 weighting for a
    network that predicts v or x_0 (:mod:`condiff.prediction`) is min(SNR, gamma) / (SNR + 1)
    or min(SNR, gamma) (:func:`condiff.prediction.x0_error_scale`).
    """
    abar = schedule.abar.to(t.device)[t.long()]
    snr = abar**2 / (1.0 - abar**2)
    return (snr.clamp(max=gamma) / x0_error_scale(prediction, snr)).float()


class DiffusionTask:
    """Eq 22: E w(t) || eps - eps_theta(abar_t x_0 + bbar_t eps, y, t) ||^2, y -> phi with prob. p_uncond.

    Args:
        schedule: the noise schedule (abar_t, bbar_t).
        p_uncond: probability of replacing the condition by the null phi (eq 24).
        min_snr_gamma: w(t) = min(SNR_t, gamma) / SNR_t (:func:`min_snr_weight`); None = 1.
        t_sampling: "uniform" (i.i.d.) or "stratified" (:func:`sample_t`).
        prediction: the network's target, "eps" (eq 22), "v" = abar_t eps - bbar_t x_0, or "x0"
            (:func:`condiff.prediction.regression_target`); the loss is the MSE to it, and the
            min-SNR weight is the one of that target.  Loaders turn the network back into eps.
    """

    name = "diffusion"

    def __init__(self, schedule: Schedule, p_uncond: float = 0.1, min_snr_gamma: float | None = None,
                 t_sampling: str = "uniform", prediction: str = "eps"):
        if not 0 <= p_uncond <= 1:
            raise CondiffError(f"p-uncond must lie in [0, 1], got {p_uncond}")
        if min_snr_gamma is not None and not (math.isfinite(min_snr_gamma) and min_snr_gamma > 0):
            raise CondiffError(f"min-snr-gamma must be a finite number > 0, got {min_snr_gamma}")
        if t_sampling not in T_SAMPLING:
            raise CondiffError(f"t-sampling must be one of {', '.join(T_SAMPLING)}, got {t_sampling!r}")
        self.schedule, self.p_uncond = schedule, float(p_uncond)
        self.min_snr_gamma, self.t_sampling = min_snr_gamma, t_sampling
        self.prediction = check_prediction(prediction)

    def config(self) -> dict:
        out = {"task": self.name, "p_uncond": self.p_uncond}
        if self.min_snr_gamma is not None:  # only the levers in use: older run folders keep their config
            out["min_snr_gamma"] = self.min_snr_gamma
        if self.t_sampling != "uniform":
            out["t_sampling"] = self.t_sampling
        if self.prediction != "eps":  # no key: eps, as every checkpoint before the key
            out[PREDICTION_KEY] = self.prediction
        return out

    def drop_condition(self, model, y: torch.Tensor, generator: torch.Generator,
                       shard: Shard = Shard()) -> torch.Tensor:
        """Replace each condition by the null phi with probability p_uncond (eq 24's training side)."""
        drop = shard.rand(y.shape[0], generator) < self.p_uncond
        null = model.null_cond(y.shape[0], y.device)
        mask = drop.to(y.device).view((-1,) + (1,) * (y.dim() - 1))
        return torch.where(mask, null, y.to(null.dtype))

    def loss(self, model, x0, y, generator, shard: Shard = Shard()):
        B = x0.shape[0]
        t = sample_t(self.schedule.T, B, generator, shard, self.t_sampling).to(x0.device)
        eps = shard.randn(x0.shape, generator).to(x0.device)
        cond = self.drop_condition(unwrap(model), y, generator, shard) if unwrap(model).conditional else None
        pred = model(self.schedule.add_noise(x0, t, eps), t, cond)
        target = regression_target(self.prediction, x0.float(), eps, *self.schedule.gather(t, eps))
        if self.min_snr_gamma is None:
            return F.mse_loss(pred.float(), target), {}
        per_row = (pred.float() - target).pow(2).flatten(1).mean(1)
        w = min_snr_weight(self.schedule, t, self.min_snr_gamma, self.prediction)
        # "mse" is the unweighted loss (eq 22's for eps; the MSE to v or x_0 otherwise), comparable across
        # runs with and without the weighting
        return (w * per_row).mean(), {"mse": (float(per_row.detach().sum()), B)}


class ClassifierTask:
    """Cross-entropy of p(y | x_t, t) on noisy inputs, t uniform in [0, t_max).

    ``clean=True``: a clean classifier p(y | x_0) for x0-guidance (:mod:`condiff.x0guidance`), trained on the
    data itself at t = 0 (no noise at all; call it as ``net(x, 0)``, :func:`condiff.x0guidance.at_t0`).
    """

    name = "classifier"

    def __init__(self, schedule: Schedule, t_max: int | None = None, clean: bool = False):
        if clean and t_max is not None:
            raise CondiffError("a clean classifier trains on t = 0 only: drop --t-max")
        t_max = schedule.T if t_max is None else int(t_max)
        if not 1 <= t_max <= schedule.T:
            raise CondiffError(f"t-max must lie in [1, {schedule.T}], got {t_max}")
        self.schedule, self.t_max, self.clean = schedule, t_max, bool(clean)

    def config(self) -> dict:
        return {"task": self.name, "t_max": 1 if self.clean else self.t_max, "clean": self.clean}

    def loss(self, model, x0, y, generator, shard: Shard = Shard()):
        B = x0.shape[0]
        if self.clean:
            t = torch.zeros(B, dtype=torch.long, device=x0.device)
            logits = model(x0, t).float()
        else:
            t = shard.randint(self.t_max, B, generator).to(x0.device)
            eps = shard.randn(x0.shape, generator).to(x0.device)
            logits = model(self.schedule.add_noise(x0, t, eps), t).float()
        correct = (logits.argmax(1) == y).float()
        metrics = {}
        for name, (lo, hi) in T_RANGES.items():
            m = (t >= lo * self.schedule.T) & (t < hi * self.schedule.T)
            if m.any():
                metrics[f"acc_{name}"] = (float(correct[m].sum()), int(m.sum()))
        return F.cross_entropy(logits, y), metrics


@torch.no_grad()
def classifier_accuracy_by_t(model, schedule: Schedule, data: ImageDataset, n: int = 1000, seed: int = 0,
                             device="cpu", batch_size: int = 500) -> dict:
    """Accuracy of a noise-aware classifier on held-out data in each t-range of T_RANGES."""
    g = torch.Generator().manual_seed(seed)
    sub = data.subset(min(n, len(data)), seed)
    out = {}
    for name, (lo, hi) in T_RANGES.items():
        correct = 0
        for i in range(0, len(sub), batch_size):
            x0 = sub.images[i:i + batch_size].to(device)
            y = sub.labels[i:i + batch_size].to(device)
            t = torch.randint(int(lo * schedule.T), max(int(hi * schedule.T), int(lo * schedule.T) + 1),
                              (len(x0),), generator=g).to(device)
            eps = torch.randn(x0.shape, generator=g).to(device)
            correct += int((model(schedule.add_noise(x0, t, eps), t).argmax(1) == y).sum())
        out[name] = correct / len(sub)
    return out
