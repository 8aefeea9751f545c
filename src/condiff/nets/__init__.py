"""condiff's networks and the registry that rebuilds them from a JSON config."""

from ..errors import CondiffError
from .encoder import EncoderNet
from .unet import UNet

NETWORKS = {"unet": UNet, "encoder": EncoderNet}


def build(config: dict):
    """Rebuild a network from its ``config`` dict (as stored in a checkpoint)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in NETWORKS:
        raise CondiffError(f"unknown network kind {kind!r} in config (known: {', '.join(NETWORKS)})")
    try:
        return NETWORKS[kind](**config)
    except TypeError as e:
        raise CondiffError(f"invalid {kind} config: {e}") from None


__all__ = ["UNet", "EncoderNet", "NETWORKS", "build"]
