"""diffusers interoperability: a pretrained ``UNet2DModel`` as condiff's unconditional eps-model.

A diffusers DDPM folder (for instance a copy of ``google/ddpm-cifar10-32``) holds a
``UNet2DModel`` and the config of its ``DDPMScheduler``, either side by side or in
``unet/`` and ``scheduler/`` subfolders.  :func:`load_diffusers` turns it into

* an eps-model ``eps(x_t, t, cond)`` = ``unet(x_t, t).sample`` (cond must be None); a scheduler
  ``prediction_type`` of v_prediction or sample is converted to eps (:mod:`condiff.prediction`),
* the :class:`~condiff.schedule.Schedule` of its ``alphas_cumprod``, converted once
  by :meth:`Schedule.from_alphas_cumprod` (abar_t = sqrt(alphas_cumprod[t])),

so every condiff sampler and every gradient guidance term (classifier, eqs 6-8 and
19; similarity, eqs 11-15) works on it.  Timesteps are the same 0-based indices in
both libraries.  Nothing is downloaded: the folder must be local.  Requires the
optional extra ``pip install 'condiff[diffusers]'``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .errors import CondiffError
from .prediction import PREDICTION_KEY, as_eps_model
from .schedule import Schedule

__all__ = ["DiffusersEps", "load_diffusers", "diffusers_schedule", "diffusers_prediction", "check_classifier_schedule"]

INSTALL_HINT = "diffusers is not installed: pip install 'condiff[diffusers]' (or pip install diffusers)"


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise CondiffError(INSTALL_HINT) from None
    diffusers.utils.logging.set_verbosity_error()  # no hub or accelerate chatter on stderr
    return diffusers


class DiffusersEps(torch.nn.Module):
    """The output of an unconditional diffusers ``UNet2DModel``: eps(x_t, t, cond) for epsilon prediction
    (:func:`load_diffusers` converts a v_prediction or sample model's output to eps).

    Args of the call: x_t (B, C, H, W) in the model's [-1, 1] range, t (B,) long
    0-based timesteps; ``cond`` must be None (the model is unconditional).
    """

    conditional = False

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        size = unet.config.sample_size
        self.in_channels = int(unet.config.in_channels)
        self.image_size = int(size if isinstance(size, int) else size[0])
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.image_shape = (self.in_channels, int(h), int(w))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if cond is not None:
            raise CondiffError("a diffusers UNet2DModel is used unconditionally; guide it with --classifier")
        t = torch.as_tensor(t, device=x.device)
        return self.unet(x, t.expand(x.shape[0]) if t.dim() == 0 else t).sample


def _folder(root: Path, sub: str, filename: str) -> Path | None:
    for d in (root / sub, root):
        if (d / filename).is_file():
            return d
    return None


#: diffusers' ``prediction_type`` -> condiff's prediction target (:mod:`condiff.prediction`): the same
#: quantities, as diffusers' v = sqrt(alphas_cumprod) eps - sqrt(1 - alphas_cumprod) x_0 = abar_t eps - bbar_t x_0.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def diffusers_prediction(scheduler_config: dict) -> str:
    """condiff's name ("eps", "v" or "x0") of a diffusers scheduler config's ``prediction_type``."""
    pred = scheduler_config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise CondiffError(f"scheduler prediction_type {pred!r} is not supported; condiff loads "
                           f"{', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[pred]


def diffusers_schedule(scheduler_config: dict) -> Schedule:
    """The Schedule of a diffusers scheduler config: its ``alphas_cumprod`` through the one conversion point."""
    diffusers = _import_diffusers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = diffusers.DDPMScheduler.from_config(scheduler_config)
    return Schedule.from_alphas_cumprod(sched.alphas_cumprod, name="diffusers")


def load_diffusers(path, device="cpu", trust_pickle: bool = False):
    """Load a local diffusers UNet2DModel + scheduler config; returns (eps-model, schedule, config).

    ``config`` has ``image_shape`` [C, H, W], empty ``class_names`` and ``source``.
    Weights load from ``diffusion_pytorch_model.safetensors``; a pickle-based
    ``.bin`` only with ``trust_pickle=True``.
    """
    root = Path(path)
    if not root.is_dir():
        raise CondiffError(f"diffusers model folder not found: {root}")
    diffusers = _import_diffusers()
    unet_dir = _folder(root, "unet", "config.json")
    sched_dir = _folder(root, "scheduler", "scheduler_config.json")
    if unet_dir is None:
        raise CondiffError(f"{root}: no UNet config.json here or in {root / 'unet'}")
    if sched_dir is None:
        raise CondiffError(f"{root}: no scheduler_config.json here or in {root / 'scheduler'}")
    try:
        unet_config = json.loads((unet_dir / "config.json").read_text())
        sched_config = json.loads((sched_dir / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CondiffError(f"{root}: unreadable diffusers config ({e})") from None
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CondiffError(f"{unet_dir}: a {unet_config.get('_class_name')}, not a UNet2DModel")
    if unet_config.get("num_class_embeds") or unet_config.get("class_embed_type"):
        raise CondiffError(f"{unet_dir}: a class-conditional UNet2DModel; only unconditional ones are supported")
    prediction = diffusers_prediction(sched_config)
    schedule = diffusers_schedule(sched_config)
    safe = (unet_dir / "diffusion_pytorch_model.safetensors").is_file()
    if not safe and not trust_pickle:
        raise CondiffError(f"{unet_dir}: no diffusion_pytorch_model.safetensors; refusing to unpickle a .bin "
                           "(it can run code): convert it to safetensors or pass --trust-pickle")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, use_safetensors=safe,
                                                         low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CondiffError(f"{unet_dir}: cannot load the UNet2DModel ({msg})") from None
    model = DiffusersEps(unet).to(device).eval()
    if int(unet.config.out_channels) != model.in_channels:
        raise CondiffError(f"{unet_dir}: out_channels {unet.config.out_channels} != in_channels "
                           f"{model.in_channels}; not an eps-model")
    config = {"image_shape": list(model.image_shape), "class_names": [], "source": str(root)}
    if prediction != "eps":  # a v- or x_0-prediction UNet: converted to eps once, as condiff's own (eq 22)
        model = as_eps_model(model, schedule, prediction)
        config[PREDICTION_KEY] = prediction
    return model, schedule, config


def check_classifier_schedule(schedule: Schedule, classifier_config: dict) -> str | None:
    """A warning text when a classifier was trained on other noise levels than ``schedule``, else None.

    A noise-aware classifier reads t as the noise level abar_t of the schedule it
    was trained on; guiding a model whose abar_t differs feeds it wrong levels.
    """
    from .pipeline import _schedule_of

    try:
        theirs = _schedule_of(classifier_config, "classifier")
    except CondiffError:
        return None
    if theirs.same_as(schedule, rtol=1e-3, atol=1e-4):
        return None
    return (f"the classifier was trained on a {theirs.name} schedule with T={theirs.T}, the model samples a "
            f"{schedule.name} schedule with T={schedule.T}: its t means another noise level "
            "(train it with matching --schedule/--T)")
