"""condiff: conditional control of diffusion models.

Classifier guidance, similarity guidance and classifier-free guidance (Su Jianlin,
"Generative diffusion models (9)"), on DDPM, DDIM, Euler, Heun, DPM-Solver++ and UniPC samplers.  See
``condiff.compose`` (Guidance, Sampling, compose: the one composition path),
``condiff.samplers``, ``condiff.guidance``, ``condiff.schedule``.
"""

__version__ = "0.1.0"

from .errors import CondiffError, NonFiniteError  # noqa: E402
from .schedule import Schedule, cosine_schedule, linear_schedule, respace  # noqa: E402
from .samplers import (  # noqa: E402
    SAMPLERS, nfe, sample, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde,
    sample_euler, sample_euler_ancestral, sample_heun, sample_unipc,
)
from .guidance import (  # noqa: E402
    ClassifierFree, ClassifierTerm, GradientTerm, MeanShift, NullBranch, ScoreGuided, SimilarityTerm,
)
from .compose import Guidance, Sampling, compose  # noqa: E402

__all__ = [
    "CondiffError", "NonFiniteError", "Schedule", "cosine_schedule", "linear_schedule", "respace", "sample",
    "sample_ddim", "sample_ddpm", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_unipc", "SAMPLERS", "nfe", "ClassifierFree", "ClassifierTerm", "GradientTerm",
    "MeanShift", "NullBranch", "ScoreGuided", "SimilarityTerm", "Guidance", "Sampling", "compose",
]
