"""condiff's networks and the registry that rebuilds them from a JSON config."""

from ..errors import CondiffError
from .encoder import EncoderNet
from .judge import JudgeNet
from .similarity import SimilarityEncoder
from .unet import UNet

NETWORKS = {"unet": UNet, "encoder": EncoderNet, "judge": JudgeNet,
            "similarity-encoder": SimilarityEncoder}


def build(config: dict):
    """Rebuild a network from its ``config`` dict (as stored in a checkpoint)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in NETWORKS:
        raise CondiffError(f"unknown network kind {kind!r} in config (known: {', '.join(NETWORKS)})")
    try:
        return NETWORKS[kind](**config)
    except (TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as e:
        raise CondiffError(f"invalid {kind} config: {e}") from None


__all__ = ["UNet", "EncoderNet", "JudgeNet", "SimilarityEncoder", "NETWORKS", "build"]
