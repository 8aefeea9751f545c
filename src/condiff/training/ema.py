"""Weight averages of a training run: the classic EMA and EDM2's post-hoc EMA.

* :class:`EMA` keeps the averaged networks, each a ``torch.optim.swa_utils.AveragedModel``:
  the classic exponential average (decay ``min(d, (1 + s) / (10 + s))`` after step s),
  and optional *power-function* profiles (Karras et al. 2024, "Analyzing and improving
  the training dynamics of diffusion models", sec. 3): after step t the profile
  with exponent gamma has beta_t = (1 - 1/t)^(gamma + 1), i.e. it averages the
  weights theta_tau, tau <= t, with weights proportional to tau^gamma. Its width
  relative to t is ``sigma_rel`` (:func:`sigma_rel_to_gamma`).
* :func:`posthoc_ema` combines stored snapshots of two or more profiles, by least
  squares over their weighting functions, into the average of any other sigma_rel
  at any stored step: the averaging length is chosen *after* training, by FID.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from ..checkpoints import load_checkpoint, read_config, save_checkpoint
from ..errors import CondiffError

__all__ = ["EMA", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "posthoc_weights", "posthoc_ema",
           "save_posthoc_ema", "list_snapshots", "SNAPSHOT_DIR"]

SNAPSHOT_DIR = "posthoc-ema"  # run_dir/posthoc-ema/step-N/sigma-0.100/: one checkpoint folder per profile
_STEP = re.compile(r"^step-(\d+)$")
_SIGMA = re.compile(r"^sigma-([0-9.]+)$")


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile tau^gamma on [0, t] (EDM2 eq 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has relative width ``sigma_rel`` (the real root of EDM2 eq 3)."""
    if not 0.001 <= sigma_rel < gamma_to_sigma_rel(0.0):  # 0.001: gamma ~ 1000, the last weights alone
        raise CondiffError(f"sigma-rel must lie in [0.001, {gamma_to_sigma_rel(0.0):.3f}), got {sigma_rel}")
    s2 = sigma_rel ** -2  # (gamma+2)^2 (gamma+3) = (gamma+1) / sigma_rel^2, a cubic in gamma
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1))


def _lerp_avg(decay_of_step):
    """A multi_avg_fn for AveragedModel: a <- decay a + (1 - decay) m (integer buffers copied)."""

    def avg(averaged: list, current: list, _num_averaged) -> None:
        decay = decay_of_step()
        for a, m in zip(averaged, current):
            if a.dtype.is_floating_point:
                a.lerp_(m, 1 - decay)
            else:
                a.copy_(m)
    return avg


class EMA:
    """The averaged networks of a run: ``classic`` and one power profile per sigma_rel.

    Args:
        net: the (unwrapped) network being trained; the averages start as copies of it.
        decay: the classic EMA's decay d; after step s it uses min(d, (1 + s) / (10 + s)).
        profiles: sigma_rel of each power-function profile to keep (EDM2's post-hoc EMA).
    """

    def __init__(self, net: torch.nn.Module, decay: float, profiles=()):
        self.step = 0
        self.classic = self._average(net, lambda: min(decay, (1 + self.step) / (10 + self.step)))
        self.profiles = {}
        for s in profiles:
            gamma = sigma_rel_to_gamma(float(s))
            self.profiles[float(s)] = self._average(net, lambda g=gamma: (1 - 1 / max(self.step, 1)) ** (g + 1))

    def _average(self, net, decay_of_step) -> AveragedModel:
        avg = AveragedModel(net, multi_avg_fn=_lerp_avg(decay_of_step), use_buffers=True)
        avg.update_parameters(net)  # the first update copies the weights
        return avg

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1, 2, ...) into every average."""
        self.step = step
        for avg in (self.classic, *self.profiles.values()):
            avg.update_parameters(net)

    def state_dict(self) -> dict:
        """The classic EMA weights (a checkpoint's inference weights)."""
        return self.classic.module.state_dict()

    def load(self, classic: dict, profiles: dict | None = None, step: int = 0) -> None:
        self.step = step
        self.classic.module.load_state_dict(classic)
        for s, avg in self.profiles.items():
            avg.module.load_state_dict((profiles or {})[s])

    # --- snapshots of the profiles, kept for post-hoc EMA (and for resume) ---------------
    def save_snapshots(self, run_dir: str | Path, step: int, config: dict) -> None:
        """Write each profile at ``step`` as a checkpoint folder under run_dir/posthoc-ema/step-N/."""
        for s, avg in self.profiles.items():
            save_checkpoint(snapshot_path(run_dir, step, s), avg.module,
                            dict(config, ema={"kind": "power", "sigma_rel": s, "gamma": sigma_rel_to_gamma(s),
                                              "step": step}))

    def load_snapshots(self, run_dir: str | Path, step: int) -> dict:
        out = {}
        for s in self.profiles:
            path = snapshot_path(run_dir, step, s)
            if not (path / "model.safetensors").is_file():
                raise CondiffError(f"{path} is missing: the run's EMA profile at step {step} is needed to "
                                   "resume with --ema-profiles; resume without that option or use another --out")
            out[s] = load_checkpoint(path)["weights"]
        return out


def snapshot_path(run_dir: str | Path, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step-{step:07d}" / f"sigma-{sigma_rel:.3f}"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, float, Path]]:
    """(step, sigma_rel, folder) of every stored profile snapshot of a run, by step."""
    root = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for sd in root.iterdir() if root.is_dir() else ():
        m = _STEP.match(sd.name)
        for pd in sd.iterdir() if m else ():
            ms = _SIGMA.match(pd.name)
            if ms and (pd / "model.safetensors").is_file():
                found.append((int(m.group(1)), float(ms.group(1)), pd))
    return sorted(found)


def posthoc_weights(snapshots: list[tuple[int, float]], step: int, sigma_rel: float) -> np.ndarray:
    """Coefficients x with sum_i x_i p_i ~ p_target in L2 (EDM2 sec. 3.2, continuous-time form).

    Snapshot i is the average of theta over [0, t_i] with density
    p_i(tau) = (g_i + 1) tau^g_i / t_i^(g_i + 1); the target has (gamma(sigma_rel), step).
    The Gram entries are closed-form: <p_i, p_j> = (g_i+1)(g_j+1) m^(g_i+g_j+1) /
    ((g_i+g_j+1) t_i^(g_i+1) t_j^(g_j+1)), m = min(t_i, t_j).

    Args:
        snapshots: (t_i, sigma_rel_i) of each stored average.
    """
    ts = np.array([float(t) for t, _ in snapshots] + [float(step)])
    gs = np.array([sigma_rel_to_gamma(s) for _, s in snapshots] + [sigma_rel_to_gamma(sigma_rel)])
    if (ts <= 0).any():
        raise CondiffError("post-hoc EMA needs snapshots at steps >= 1")
    m = np.minimum(ts[:, None], ts[None, :])
    gi, gj = gs[:, None], gs[None, :]
    gram = (gi + 1) * (gj + 1) / (gi + gj + 1) * (m / ts[:, None]) ** (gi + 1) * (m / ts[None, :]) ** (gj + 1) / m
    A, b = gram[:-1, :-1], gram[:-1, -1]
    return np.linalg.lstsq(A, b, rcond=None)[0]


def posthoc_ema(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> tuple[dict, dict]:
    """The post-hoc EMA of a run with relative width ``sigma_rel`` at ``step`` (default: the last snapshot).

    Uses every stored snapshot at or before ``step`` (:func:`posthoc_weights`).
    Returns (weights name -> tensor, the run's config).
    """
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise CondiffError(f"{run_dir}: no post-hoc EMA snapshots (train with --ema-profiles)")
    step = snaps[-1][0] if step is None else int(step)
    use = [(t, s, p) for t, s, p in snaps if t <= step]
    if step not in {t for t, _, _ in use}:
        raise CondiffError(f"{run_dir}: no snapshot at step {step} (have {sorted({t for t, _, _ in snaps})})")
    x = posthoc_weights([(t, s) for t, s, _ in use], step, sigma_rel)
    out: dict = {}
    for coef, (_, _, path) in zip(x, use):
        weights = load_checkpoint(path)["weights"]
        for k, v in weights.items():
            if not v.dtype.is_floating_point:
                out[k] = v  # integer buffers: the newest value
            else:
                out[k] = out.get(k, torch.zeros_like(v, dtype=torch.float64)) + float(coef) * v.double()
    weights = {k: v.to(torch.float32) if v.dtype == torch.float64 else v for k, v in out.items()}
    return weights, read_config(use[-1][2])


def save_posthoc_ema(run_dir: str | Path, sigma_rel: float, out: str | Path, step: int | None = None) -> Path:
    """Write the post-hoc EMA of :func:`posthoc_ema` as a checkpoint folder ``out`` (samplable as is)."""
    from ..nets import build

    weights, config = posthoc_ema(run_dir, sigma_rel, step)
    net = build(config["network"])
    net.load_state_dict(weights)
    config = dict(config, ema={"kind": "posthoc", "sigma_rel": float(sigma_rel), "gamma": sigma_rel_to_gamma(sigma_rel),
                               "step": int(config.get("ema", {}).get("step", 0))})
    config.pop("format", None)
    config.pop("version", None)
    return save_checkpoint(out, net, config)
