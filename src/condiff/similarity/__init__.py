"""Similarity guidance (article eqs 11-15): steer a model by a reference image, a text prompt or a style.

* :mod:`.terms`     ImageSimilarity, TextSimilarity, StyleSimilarity (and similarity_guidance: terms from files) for
                    :class:`~condiff.guidance.ScoreGuided` / :class:`~condiff.guidance.MeanShift`;
* :mod:`.tasks`     training of the encoders E1 (noise-aware) and E2 (clean), SDG's recipe;
* :mod:`.text`      the pretrained text encoder (all-MiniLM-L6-v2, extra ``condiff[text]``);
* :mod:`.captions`  captions from class names, synonyms and templates;
* :mod:`.commands`  ``condiff train-encoder`` and the similarity flags of ``condiff sample``;
* :mod:`.sweep_methods`  ``condiff sweep --method text|image`` (:data:`SWEEP_METHODS`).

Any differentiable ``sim(x_t, t, cond) -> (B,)`` is a term already: ``SimilarityTerm(sim, scale)``.
"""

from ..guidance import SimilarityTerm
from .sweep_methods import SWEEP_METHODS
from .tasks import CleanEncoderTask, EncoderTask, TextAlignTask, train_image_encoder, train_text_encoder
from .terms import (EmbeddingSimilarity, ImageSimilarity, StyleSimilarity, TextSimilarity, gram, gram_distance,
                    load_encoder)

__all__ = ["SimilarityTerm", "EmbeddingSimilarity", "ImageSimilarity", "TextSimilarity", "StyleSimilarity", "gram",
           "gram_distance", "load_encoder", "CleanEncoderTask", "EncoderTask", "TextAlignTask",
           "train_image_encoder", "train_text_encoder", "SWEEP_METHODS"]
