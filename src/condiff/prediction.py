"""What an eps-model's network predicts (eps, v or x0), and the one place it becomes eps.

Eq 22 trains the network to predict the noise eps of x_t = abar_t x_0 + bbar_t eps.  A network may
instead regress on

* ``"v"``:  v = abar_t eps - bbar_t x_0  (Salimans & Ho 2022, in the article's notation), or
* ``"x0"``: the clean image x_0 itself,

and is still the same model: given x_t, each of eps, v, x_0 determines the others, because
abar_t^2 + bbar_t^2 = 1 gives

    eps = abar_t v + bbar_t x_t,          x_0 = abar_t x_t - bbar_t v,
    eps = (x_t - abar_t x_0) / bbar_t.

Every sampler, guidance term and the CLI take an ``eps(x_t, t, cond)`` callable (DESIGN.md); the
conversion happens once, when a checkpoint is loaded (:func:`condiff.pipeline.load_diffusion` wraps
the network in :class:`EpsFromPrediction`) and in training's sample grids.  The choice is stored in
the checkpoint's config under :data:`PREDICTION_KEY`; a config without the key predicts eps, so old
run folders load as before (the shipped ``fashion-cfg`` of recipe v3 predicts v).

Training (:class:`condiff.training.DiffusionTask`) regresses on :func:`regression_target`; the
min-SNR-gamma weight of each target is min(SNR, gamma) / :func:`x0_error_scale` (Hang et al. 2023).
"""

from __future__ import annotations

import torch

from .errors import CondiffError
from .schedule import Schedule

__all__ = ["PREDICTIONS", "PREDICTION_KEY", "check_prediction", "prediction_of", "regression_target",
           "eps_from_prediction", "x0_error_scale", "EpsFromPrediction", "as_eps_model"]

PREDICTIONS = ("eps", "v", "x0")
PREDICTION_KEY = "prediction"


def check_prediction(prediction) -> str:
    """``prediction`` if it is one of :data:`PREDICTIONS`, else a one-line :class:`CondiffError`."""
    if prediction not in PREDICTIONS:
        raise CondiffError(f"unknown prediction target {prediction!r} (choose {', '.join(PREDICTIONS)})"[:300])
    return prediction


def prediction_of(config: dict, where: str = "config") -> str:
    """The prediction target a checkpoint config names; "eps" when it has no :data:`PREDICTION_KEY`."""
    value = config.get(PREDICTION_KEY, "eps") if isinstance(config, dict) else "eps"
    try:
        return check_prediction(value)
    except CondiffError as e:
        raise CondiffError(f"{where}: {e}") from None


def regression_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor,
                      bbar: torch.Tensor) -> torch.Tensor:
    """What a network with this ``prediction`` regresses on at x_t = abar_t x_0 + bbar_t eps (eq 22's target
    for "eps", returned as the very tensor ``eps``; v = abar_t eps - bbar_t x_0; x_0).

    Args: x0, eps (B, ...); abar, bbar broadcastable to them (:meth:`Schedule.gather`).
    """
    if check_prediction(prediction) == "eps":
        return eps
    return abar * eps - bbar * x0 if prediction == "v" else x0


def eps_from_prediction(prediction: str, out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor,
                        bbar: torch.Tensor) -> torch.Tensor:
    """The eps (eq 22's, the eps of eqs 18-19 and 24) implied by a network output ``out`` at x_t.

    "eps": ``out`` itself; "v": eps = abar_t v + bbar_t x_t; "x0": eps = (x_t - abar_t x_0) / bbar_t.

    The x0 form divides by bbar_t without a floor.  bbar_t > 0 at every t (a :class:`Schedule` keeps
    abar_t < 1), but at t = 0 of the cosine schedule bbar_t is about 0.006, so an error in x_0 becomes
    an eps error about 160 times larger.  That is exact, not a loss of accuracy: the samplers take
    x0_hat = (x_t - bbar_t eps) / abar_t, which gives back the network's x_0 (up to float rounding),
    and eq 19's correction bbar_t grad log p is added to eps, where it is as small as before.

    Args: out, x_t (B, ...); abar, bbar broadcastable to them (:meth:`Schedule.gather`).
    """
    if check_prediction(prediction) == "eps":
        return out
    return abar * out + bbar * x_t if prediction == "v" else (x_t - abar * out) / bbar


def x0_error_scale(prediction: str, snr: torch.Tensor) -> torch.Tensor:
    """k_t with |error of the prediction|^2 = k_t |implied error of x_0|^2 at SNR_t = abar_t^2 / bbar_t^2.

    eps: SNR_t (eps error = -(abar_t / bbar_t) x_0 error); v: SNR_t + 1 = 1 / bbar_t^2; x0: 1.
    Min-SNR-gamma (Hang et al. 2023) weights the x_0 error by min(SNR_t, gamma), so the loss of each
    target carries min(SNR_t, gamma) / k_t: min(SNR, g)/SNR, min(SNR, g)/(SNR + 1), min(SNR, g).
    For "eps" the very tensor ``snr`` is returned.
    """
    if check_prediction(prediction) == "eps":
        return snr
    return snr + 1.0 if prediction == "v" else torch.ones_like(snr)


class EpsFromPrediction(torch.nn.Module):
    """eps(x_t, t, cond) of a network that predicts v or x_0 (:func:`eps_from_prediction`).

    Everything else is the network's: its attributes (``conditional``, ``null_cond``, ``num_classes``,
    ``cond_dim``, ``in_channels``, ``config`` ...) are looked up on it, so the classifier-free null
    condition and the text condition work unchanged.

    Args:
        net: the network, called as ``net(x_t, t, cond)``; t (B,) long timesteps or a scalar.
        schedule: the schedule it was trained with.
        prediction: "v" or "x0" ("eps" works too but :func:`as_eps_model` returns such a network as is).
    """

    def __init__(self, net, schedule: Schedule, prediction: str):
        super().__init__()
        self.net, self.schedule, self.prediction = net, schedule, check_prediction(prediction)

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        out = self.net(x, t, cond)
        tt = torch.as_tensor(t, device=x.device)
        abar, bbar = self.schedule.gather(tt.expand(x.shape[0]) if tt.dim() == 0 else tt, x)
        return eps_from_prediction(self.prediction, out, x, abar, bbar)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, sub-modules (the net itself)
        except AttributeError:
            net = self.__dict__.get("net", self.__dict__.get("_modules", {}).get("net"))
            if net is None or name.startswith("__"):
                raise
            return getattr(net, name)


def as_eps_model(net, schedule: Schedule, prediction: str = "eps"):
    """An eps-model of ``net``: ``net`` itself when it predicts eps, else :class:`EpsFromPrediction`."""
    return net if check_prediction(prediction) == "eps" else EpsFromPrediction(net, schedule, prediction)
