"""GPU options: bfloat16 autocast and torch.compile, both off unless asked for.

Both work on CPU too (CPU autocast, inductor's C++ backend) but rarely pay
there; on GPUs bf16 roughly halves the time of the convolutions.  Sampler and
guidance arithmetic stays float32: autocast only lowers the networks' matmuls
and convolutions, and every place that consumes a network output upcasts it.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "compile_model"]


def autocast(device, enabled: bool = True):
    """A bf16 autocast context for ``device`` (cpu or cuda); a no-op context when not enabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def compile_model(model, enabled: bool = True, **kw):
    """``torch.compile(model, **kw)`` when enabled, else ``model``.

    The compiled wrapper keeps the model's attributes (``conditional``,
    ``null_cond``) and ``condiff.training`` unwraps it (``_orig_mod``) for
    checkpoints, so it can be passed anywhere the model can; compile *after*
    wrapping in DistributedDataParallel.
    """
    return torch.compile(model, **kw) if enabled else model
