"""condiff's networks and the registry that rebuilds them from a JSON config."""

import torch

from ..errors import CondiffError
from ..validation import MAX_BLOCKS, MAX_LEVELS, MAX_WIDTH
from .encoder import EncoderNet
from .judge import JudgeNet
from .similarity import SimilarityEncoder
from .unet import UNet

NETWORKS = {"unet": UNet, "encoder": EncoderNet, "judge": JudgeNet,
            "similarity-encoder": SimilarityEncoder}

# bounds on the integer entries of a network config (None allowed where the network takes it)
_INTS = {"in_channels": (1, 64), "image_size": (1, 4096), "blocks": (1, MAX_BLOCKS), "stem": (1, 64),
         "num_classes": (0, 100_000), "cond_dim": (1, 65_536), "emb_dim": (1, 65_536), "out_dim": (1, 65_536),
         "dim": (1, 65_536), "text_dim": (1, 65_536), "feature_dim": (1, 65_536), "captions": (0, 1_000_000)}
_BOOLS = {"time", "clean"}


def check_config(config) -> None:
    """Check every value of a network ``config`` (types and bounded sizes) before anything is built.

    A config read from a file is untrusted: ``blocks: 100000`` would take minutes to
    construct and ``channels: [2147483647]`` would exhaust memory, so each size is
    bounded (far above any model trained here) and a bad one is a one-line error.
    """
    if not isinstance(config, dict):
        raise CondiffError(f"a network config must be a JSON object, got {type(config).__name__}")
    kind = config.get("kind")
    if kind not in NETWORKS:
        raise CondiffError(f"unknown network kind {kind!r} in config (known: {', '.join(NETWORKS)})")
    for key, value in config.items():
        if key in _INTS:
            lo, hi = _INTS[key]
            if value is not None and (type(value) is not int or not lo <= value <= hi):
                raise CondiffError(f"invalid {kind} config: {key} must be an integer in [{lo}, {hi}], got {value!r}")
        elif key in _BOOLS and type(value) is not bool:
            raise CondiffError(f"invalid {kind} config: {key} must be true or false, got {value!r}")
        elif key == "dropout" and (type(value) not in (int, float) or not 0 <= value < 1):
            raise CondiffError(f"invalid {kind} config: dropout must be a number in [0, 1), got {value!r}")
        elif key == "channels" and (not isinstance(value, list) or not 1 <= len(value) <= MAX_LEVELS
                                    or any(type(c) is not int or not 1 <= c <= MAX_WIDTH for c in value)):
            raise CondiffError(f"invalid {kind} config: channels must be 1 to {MAX_LEVELS} integers in "
                               f"[1, {MAX_WIDTH}], got {value!r}"[:300])


def build(config: dict, device=None):
    """Rebuild a network from its ``config`` dict (as stored in a checkpoint), after :func:`check_config`.

    ``device="meta"`` lays the network out without allocating its weights: its
    state dict then gives every name, shape and dtype, for checking a weights file
    against the config before the real network is built.
    """
    check_config(config)
    config = dict(config)
    kind = config.pop("kind")
    try:
        if device is None:
            return NETWORKS[kind](**config)
        with torch.device(device):
            return NETWORKS[kind](**config)
    except (TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as e:
        raise CondiffError(f"invalid {kind} config: {e}") from None


__all__ = ["UNet", "EncoderNet", "JudgeNet", "SimilarityEncoder", "NETWORKS", "build", "check_config"]
