"""Similarity guidance terms (eqs 11-15): image, text and style.

Each term is a :class:`~condiff.guidance.SimilarityTerm` whose ``sim(x_t, t, cond) -> (B,)``
is one of the article's similarities; the gradient, its scale gamma and the
factors sigma_t^2 (mean shift, eq 14) or bbar_t (score form, eq 19) all come from
:mod:`condiff.guidance`, so every term works with :class:`MeanShift` and
:class:`ScoreGuided`, on every sampler, and terms with separate scales add up.

* :class:`ImageSimilarity`  sim = cos(E1(x_t, t), E2(y)) for a reference image y (eq 15), E2(y)
  optionally pulled toward the class prototypes E2 was trained with (:func:`prototype_prior`);
* :class:`TextSimilarity`   sim = cos(proj(E1(x_t, t)), E_text(prompt)) (eq 15, y a text), the prompt
  mapped onto the caption classes the projection was aligned with (:func:`text_target`);
* :class:`StyleSimilarity`  sim = -sum_l ||G^_l(x_t) - G^_l(style)||^2, unit-norm Gram matrices G^ of
  encoder feature maps (the article's remark under eq 15 on style transfer).

Any other differentiable ``sim(x_t, t, cond) -> (B,)`` is a term as it is:
``SimilarityTerm(sim, scale)``.

Per-row targets: a term built without a target (``target=None``) reads each row's
target from the batch condition, ``cond["text"]`` (TextSimilarity) or ``cond["image"]``
(ImageSimilarity), (B, D) rows that :func:`condiff.pipeline.generate` slices with the
batch (see :func:`condiff.guidance.cond_entry`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..compose import DEFAULT_SCALES  # every method's default scale, in one place
from ..errors import CondiffError
from ..guidance import SimilarityTerm, cond_entry
from ..schedule import Schedule
from .captions import caption_prior, centre

__all__ = ["DEFAULT_SCALES", "DEFAULT_TEXT_PRIOR", "DEFAULT_IMAGE_PRIOR", "EmbeddingSimilarity", "ImageSimilarity", "TextSimilarity",
           "text_target", "prototype_prior",
           "StyleSimilarity", "gram", "gram_distance", "cosine", "load_encoder", "encoder_for", "reference_image",
           "describe_reference", "shipped_encoder",
           "similarity_guidance"]

DEFAULT_TEXT_PRIOR = 0.25  # temperature of caption_prior (docs/similarity.md: held-out prompts)
DEFAULT_IMAGE_PRIOR = 1.0  # weight of prototype_prior (docs/similarity.md: 200 random references)

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (B, D) and (B or 1, D) embeddings, (B,) (eq 15), in float32 or wider."""
    a = _at_least_f32(a)
    return F.cosine_similarity(a, b.to(a.device, a.dtype), dim=-1, eps=1e-8)


def _batched(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise CondiffError(f"a reference image must have shape (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
    return image


class EmbeddingSimilarity(SimilarityTerm):
    """sim(x_t, y) = cos(E1(x_t, t), e_y) for a condition embedding e_y = E2(y) (eq 15).

    Args:
        e1: the noise-aware encoder, ``e1(x_t, t) -> (B, D)``.
        target: e_y, (D,) or (1, D) for every row, (B, D) for a batch of exactly B rows,
            or None: each row's e_y is read from the batch condition, ``cond[key]`` (B, D).
        scale: gamma (eq 14).
        key: the entry of the batch condition holding per-row targets (default: ``name``).
    """

    def __init__(self, e1: Embed, target: torch.Tensor | None = None, scale: float = 1.0, name: str = "similarity",
                 key: str | None = None):
        if target is not None:
            target = _at_least_f32(torch.as_tensor(target).detach())
            target = target[None] if target.dim() == 1 else target
            if target.dim() != 2:
                raise CondiffError(f"a {name} embedding must have shape (D,) or (B, D), got {tuple(target.shape)}")
        self.target = target
        self.key = key or name
        self.e1 = e1
        super().__init__(self.similarity, scale, name=name)

    def similarity(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """cos(E1(x_t, t), e_y), (B,), e_y the fixed target or the row's ``cond[key]``."""
        target = self.target if self.target is not None else cond_entry(cond, self.key)
        if target is None:
            raise CondiffError(f"{self.name} guidance: no target (give one, or put cond[{self.key!r}] in the batch)")
        if target.shape[0] not in (1, x.shape[0]):
            raise CondiffError(f"{self.name} guidance: {target.shape[0]} targets for a batch of {x.shape[0]}; "
                               f"pass per-row targets as cond[{self.key!r}]")
        return cosine(self.e1(x, t), target)


class ImageSimilarity(EmbeddingSimilarity):
    """Image guidance: sim(x_t, y) = cos(E1(x_t, t), E2(y)) for a reference image y (eq 15).

    Args:
        e1: noise-aware encoder ``e1(x_t, t) -> (B, D)``.
        e2: clean encoder ``e2(y) -> (B, D)`` of the same embedding space.
        reference: (C, H, W) or (B, C, H, W) images in [-1, 1], at the model's size, or None:
            per-row targets from ``cond["image"]`` (see :meth:`targets`).
        prototypes, prior: E2's class prototypes (K, D) and the weight of :func:`prototype_prior`
            (0: the target is E2(y) itself).
    """

    def __init__(self, e1: Embed, e2: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor | None,
                 scale: float = 1.0, prototypes: torch.Tensor | None = None, prior: float = 0.0):
        if prior != 0 and prototypes is None and prior > 0:
            raise CondiffError("this image encoder has no class prototypes; use --image-prior 0")
        self.e2, self.prototypes, self.prior = e2, prototypes, prior
        super().__init__(e1, None, scale, name="image")
        if reference is not None:
            self.target = self.targets(reference)

    def targets(self, reference: torch.Tensor) -> torch.Tensor:
        """The targets of references (C, H, W) or (B, C, H, W): E2(y), pulled by the prototype prior, (B, D).

        Put them in the batch condition as ``cond["image"]`` for one reference per row.
        """
        with torch.no_grad():
            target = self.e2(_batched(reference))
        if self.prior != 0:
            target = prototype_prior(target, self.prototypes, self.prior)
        return _at_least_f32(target.detach())

    @classmethod
    def from_encoder(cls, encoder, reference: torch.Tensor | None = None, scale: float = 1.0,
                     prior: float | None = None) -> "ImageSimilarity":
        """From a :class:`~condiff.nets.SimilarityEncoder` with its E1 and E2.

        ``prior``: weight of :func:`prototype_prior`; None is :data:`DEFAULT_IMAGE_PRIOR`
        for encoders with class prototypes and 0 (E2(y) as it is) for those without.
        """
        protos = getattr(encoder, "prototypes", None)
        if prior is None:
            prior = DEFAULT_IMAGE_PRIOR if protos is not None else 0.0
        ref = None if reference is None else _batched(reference).to(next(encoder.parameters()).device)
        return cls(lambda x, t: encoder(x, t, "e1"), lambda y: encoder(y, None, "e2"), ref, scale,
                   None if protos is None else protos.detach(), prior)


def prototype_prior(emb: torch.Tensor, prototypes: torch.Tensor, weight: float, tau: float = 0.1) -> torch.Tensor:
    """A reference's target pulled toward its class: e^ + weight * sum_k w_k p^_k, renormalised.

    e^ = E2(y) / |E2(y)|, p^_k the unit class prototypes of E2's training objective
    (:class:`~.tasks.CleanEncoderTask`) and w = softmax_k(cos(e^, p^_k) / tau) E2's own class
    posterior at its training temperature (CleanEncoderTask's default 0.1).  weight 0 gives e^ (eq 15 as written); a large weight
    steers toward the reference's class more than toward the reference itself (docs/similarity.md
    measures both).  Image counterpart of :func:`~.captions.caption_prior`.

    Args:
        emb: E2 embeddings of the references, (B, D).
        prototypes: (K, D).
    """
    if weight < 0:
        raise CondiffError(f"the image prior's weight must be >= 0, got {weight}")
    e = F.normalize(_at_least_f32(emb), dim=-1)
    p = F.normalize(prototypes.to(e.device, e.dtype), dim=-1)
    w = torch.softmax(e @ p.T / tau, dim=-1)
    return F.normalize(e + weight * (w @ p), dim=-1)


class TextSimilarity(EmbeddingSimilarity):
    """Text guidance: sim(x_t, prompt) = cos(proj(E1(x_t, t)), E_text(prompt)) (eq 15).

    Args:
        image_side: ``f(x_t, t) -> (B, D_text)``, E1 followed by its projection.
        text_embedding: the prompt's target in that space, (D_text,) or (B, D_text):
            :func:`text_target` of E_text(prompt); None reads per-row targets from ``cond["text"]``.
    """

    def __init__(self, image_side: Embed, text_embedding: torch.Tensor | None = None, scale: float = 1.0):
        super().__init__(image_side, text_embedding, scale, name="text")

    @classmethod
    def from_prompt(cls, encoder, prompt: str | Sequence[str], scale: float = 1.0,
                    text_encoder=None, prior: float | None = None) -> "TextSimilarity":
        """From a text-aligned :class:`~condiff.nets.SimilarityEncoder` and a prompt (or one per sample).

        ``prior``: see :func:`text_target` (default :data:`DEFAULT_TEXT_PRIOR` when the
        encoder stores its caption bank).
        """
        from .text import load_text_encoder

        if encoder.proj is None:
            raise CondiffError("this encoder was not trained for text (train it with --kind text)")
        text_encoder = text_encoder or load_text_encoder("cpu")
        if text_encoder.dim != encoder.text_dim:
            raise CondiffError(f"the encoder expects {encoder.text_dim}-d text embeddings, "
                               f"the text encoder gives {text_encoder.dim}-d")
        return cls(lambda x, t: encoder(x, t, "text"), text_target(encoder, text_encoder.encode(prompt), prior), scale)


def text_target(encoder, emb: torch.Tensor, prior: float | None = None) -> torch.Tensor:
    """E_text(prompt) -> the vector that eq 15's cosine compares proj(E1(x_t, t)) with.

    With a caption bank in ``encoder`` and ``prior`` > 0: :func:`~.captions.caption_prior`
    at temperature ``prior`` (the class directions the image side was aligned with, weighted
    by how well each class's captions describe the prompt).  With ``prior`` = 0: the prompt's
    own embedding, centred on the bank's mean when there is a bank.  ``None``: the default,
    :data:`DEFAULT_TEXT_PRIOR` with a bank, 0 without (encoders trained before banks were stored).
    """
    bank = getattr(encoder, "captions", 0)
    if prior is None:
        prior = DEFAULT_TEXT_PRIOR if bank else 0.0
    if prior < 0:
        raise CondiffError(f"the text prior's temperature must be >= 0, got {prior}")
    if prior > 0 and not bank:
        raise CondiffError("this text encoder stores no caption bank (trained by an earlier condiff); "
                           "use --text-prior 0 or retrain it")
    if prior > 0:
        return caption_prior(emb, encoder.caption_bank.cpu(), encoder.caption_labels.cpu(), prior)
    return centre(emb, None if not bank else encoder.text_mean.cpu())


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrix of feature maps (B, C, H, W) -> (B, C, C), normalised by C*H*W."""
    B, C, H, W = f.shape
    v = _at_least_f32(f).reshape(B, C, H * W)
    return v @ v.transpose(1, 2) / (C * H * W)


def gram_distance(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l ||G^_l(a) - G^_l(b)||_F^2 with G^ = G / ||G||_F the unit-norm Gram matrix, (B,).

    Each level contributes 2 - 2 cos(G_l(a), G_l(b)), in [0, 4]: like eq 15's cosine
    the distance ignores the overall feature scale, so its gradient shrinks rather
    than grows when x_t is large (an unnormalised Gram distance is quartic in the
    features and makes score-form guidance diverge where abar_t is small), and one
    style scale gamma suits encoders of any feature scale.
    """
    total = 0.0
    for fa, fb in zip(feats_a, feats_b, strict=True):
        ga, gb = gram(fa).flatten(1), gram(fb).to(fa.device).flatten(1)
        ga = ga / ga.norm(dim=1, keepdim=True).clamp_min(1e-12)
        gb = gb / gb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        total = total + (ga - gb).pow(2).sum(1)
    return total


class StyleSimilarity(SimilarityTerm):
    """Style guidance: sim(x_t, s) = -sum_l ||G^_l(x_t, t) - G^_l(s_t, t)||^2 (eq 15's remark on style).

    G^_l are the unit-norm Gram matrices (:func:`gram_distance`) of the feature maps
    ``features(x, t)`` of a noise-aware encoder (E1).  With a ``schedule`` the style image s is compared at the noise
    level of x_t: s_t = abar_t s + bbar_t eps with one fixed eps (seeded), so both
    Gram matrices carry the same noise statistics; without one, the target is the
    clean style image's features at t = 0.

    Args:
        features: ``features(x, t) -> list of (B, C_l, H_l, W_l)``.
        style: (C, H, W) or (1, C, H, W) image in [-1, 1].
        scale: gamma (eq 14).
        schedule: the diffusion model's schedule, or None.
        seed: seed of the fixed eps of s_t.
    """

    def __init__(self, features: Callable[[torch.Tensor, torch.Tensor], list], style: torch.Tensor,
                 scale: float = 1.0, schedule: Schedule | None = None, seed: int = 0):
        style = _batched(style).detach()
        if style.shape[0] != 1:
            raise CondiffError("style guidance takes one style image")
        self.features, self.style, self.schedule = features, style, schedule
        self.eps = torch.randn(style.shape, generator=torch.Generator().manual_seed(seed)).to(style)
        self._targets: dict[int, list[torch.Tensor]] = {}
        super().__init__(self.similarity, scale, name="style")

    @torch.no_grad()
    def target(self, t: int) -> list[torch.Tensor]:
        """Feature maps (1, C_l, H_l, W_l) of the style image at timestep t (memoised)."""
        t = int(t) if self.schedule is not None else 0
        if t not in self._targets:
            tt = torch.full((1,), t, dtype=torch.long, device=self.style.device)
            s = self.schedule.add_noise(self.style, tt, self.eps) if self.schedule is not None else self.style
            self._targets[t] = [f.detach() for f in self.features(s, tt)]
        return self._targets[t]

    def similarity(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """-gram_distance(features of x_t, features of s_t), (B,); one style image for every row."""
        t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
        feats = self.features(x, t)
        dist = x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
        for tv in t.unique().tolist():  # samplers pass one t per batch; mixed t works too
            idx = (t == tv).nonzero()[:, 0]
            dist = dist.index_put((idx,), gram_distance([f[idx] for f in feats], self.target(tv)))
        return -dist

    @classmethod
    def from_encoder(cls, encoder, style: torch.Tensor, scale: float = 1.0, schedule: Schedule | None = None,
                     seed: int = 0) -> "StyleSimilarity":
        """From any encoder with ``features(x, t)`` (a SimilarityEncoder's E1, or an EncoderNet)."""
        style = _batched(style).to(next(encoder.parameters()).device)
        return cls(encoder.features, style, scale, schedule, seed)


ENCODER_TASKS = {"image": "encoder", "text": "text-encoder"}


def load_encoder(path, kind: str | None = None, device="cpu", trust_pickle: bool = False):
    """Load a similarity-encoder checkpoint of ``kind`` "image", "text" or None (either): (encoder, config)."""
    from ..checkpoints import load_model

    if kind is not None and kind not in ENCODER_TASKS:
        raise CondiffError(f"encoder kind must be image or text, got {kind!r}")
    model, config = load_model(path, device, trust_pickle)
    wanted = [ENCODER_TASKS[kind]] if kind else list(ENCODER_TASKS.values())
    if config.get("task") not in wanted:
        raise CondiffError(f"{path}: not {'an' if kind == 'image' else 'a'} {kind or 'similarity'} encoder "
                           f"checkpoint (task {config.get('task')!r}; train one with condiff train-encoder "
                           f"--kind {kind or 'image'})")
    for p in model.parameters():  # guidance differentiates with respect to x only
        p.requires_grad_(False)
    return model, config


# ----------------------------------------------------------------------------- from files to terms
def encoder_for(path, kind: str | None, shape, device="cpu", trust_pickle: bool = False):
    """A similarity encoder checkpoint for images of ``shape`` (C, H, W); a size mismatch is one line."""
    enc, config = load_encoder(path, kind, device, trust_pickle)
    enc.class_names = config.get("class_names")  # for describe_reference
    if (enc.in_channels, enc.image_size) != (shape[0], shape[1]):
        raise CondiffError(f"{path}: encoder for {enc.in_channels}x{enc.image_size}x{enc.image_size} images, "
                           f"the model makes {'x'.join(map(str, shape))}")
    return enc


def reference_image(shape, image=None, index: int | None = None, ref_data=None) -> torch.Tensor:
    """A reference image (C, H, W) in [-1, 1]: a file (any size, converted) or test image ``index`` of ``ref_data``."""
    from ..data import load_dataset
    from ..images import load_image

    C, H, _ = shape
    if (image is None) == (index is None):
        raise CondiffError("give a reference image file or an index into the reference data, not both")
    if image is not None:
        from ..zoo import image_path

        return load_image(image_path(image), H, C)
    data = load_dataset(ref_data, "test", size=H, channels=C)
    if not 0 <= index < len(data):
        raise CondiffError(f"--image-index {index} out of range 0..{len(data) - 1}")
    if data.shape != tuple(shape):
        raise CondiffError(f"--ref-data images are {'x'.join(map(str, data.shape))}, the model makes "
                           f"{'x'.join(map(str, shape))}")
    return data.images[index]


FAR_COSINE = 0.5  # below this max cos(E2(ref), prototype) a reference is far from the training data (about
#                   2% of Fashion-MNIST test images with the shipped encoder; median 0.83)


def describe_reference(encoder, reference: torch.Tensor, name="the reference", class_names=None) -> str:
    """One line: the class E2's prototypes see in ``reference`` (C, H, W), with E2's own probability.

    Warns (:class:`UserWarning`) when the reference lies far from the encoder's training data
    (max cosine to the class prototypes below :data:`FAR_COSINE`), or when its negative (-x, light
    and dark swapped) lies clearly nearer (by 0.15) than the reference itself: image guidance then
    steers toward whatever class E2 sees, not toward the drawing.
    """
    import warnings

    protos = getattr(encoder, "prototypes", None)
    if protos is None:
        return f"{name}: this image encoder has no class prototypes to name what it sees"
    ref = _batched(reference).to(next(encoder.parameters()).device)
    with torch.no_grad():
        emb = _at_least_f32(encoder(torch.cat([ref[:1], -ref[:1]]), None, "e2"))
        cos = F.normalize(emb, dim=-1) @ F.normalize(_at_least_f32(protos), dim=-1).T
    p = torch.softmax(cos[0] / 0.1, dim=-1)
    k = int(p.argmax())
    names = list(class_names or [])
    label = names[k] if k < len(names) else f"class {k}"
    near, near_negative = float(cos[0].max()), float(cos[1].max())
    if near_negative > near + 0.15:
        warnings.warn(f"{name} looks inverted: with light and dark swapped it is much nearer the image encoder's "
                      f"training data (cosine {near_negative:.2f} against {near:.2f}); as given it reads as {label}. "
                      "Invert it if that is not what you meant")
    elif near < FAR_COSINE:
        warnings.warn(f"{name} lies far from the image encoder's training data (cosine {near:.2f} to the nearest "
                      f"class, below {FAR_COSINE}); guidance will steer toward {label}, not toward the picture itself")
    return f"{name}: the image encoder sees {label} (p = {float(p[k]):.2f})"


def shipped_encoder(role: str, shape, flag: str, option: str, train: str) -> str:
    """The shipped encoder ``role`` when it takes images of ``shape`` (C, H, W); otherwise a one-line error
    that names it, its size, and how to get an encoder for this model."""
    import json

    from ..zoo import shipped

    try:
        path = shipped(role)
        takes = tuple(json.loads((path / "config.json").read_text()).get("image_shape") or ())
    except (CondiffError, OSError, ValueError) as e:
        raise CondiffError(f"{flag} needs {option} ({train}); the shipped {role} is not usable: {e}") from None
    if takes != tuple(shape):
        raise CondiffError(f"{flag} needs {option}: the shipped {role} ({path.name}) takes "
                           f"{'x'.join(map(str, takes))} images, this model makes {'x'.join(map(str, shape))}; "
                           f"train one with {train}")
    return str(path)


def similarity_guidance(shape, schedule: Schedule, device="cpu", *, text: str | None = None, text_encoder=None,
                        text_scale: float | None = None, text_prior: float | None = None, image=None,
                        image_index: int | None = None, ref_data=None, image_encoder=None,
                        image_scale: float | None = None, image_prior: float | None = None, style=None,
                        style_encoder=None, style_scale: float | None = None, trust_pickle: bool = False,
                        log: Callable[[str], None] | None = None):
    """Text, image and style guidance (eqs 11-15) from checkpoints and inputs: ``(terms, cond)``.

    ``terms`` go into :class:`condiff.compose.Guidance`; ``cond`` holds their targets as one-row
    entries of the batch condition (``{"text": (1, D), "image": (1, D)}``), repeated for every
    row by :func:`condiff.guidance.batch_cond` (replace them with (n, D) rows for one target per
    row).  A scale of None is :data:`DEFAULT_SCALES`'; an encoder of None is the shipped one
    when it takes images of ``shape`` (:func:`shipped_encoder`), else a one-line error naming it.
    ``log`` receives one line on the reference image: the class the encoder sees in it
    (:func:`describe_reference`); a reference far from the encoder's training data is also a warning.
    """
    terms, cond = [], {}

    def scale(kind, value):
        return DEFAULT_SCALES[kind] if value is None else value

    if text is not None:
        text_encoder = text_encoder or shipped_encoder("text-encoder", shape, "--text", "--text-encoder CKPT",
                                                       "condiff train-encoder --kind text")
        from .text import load_text_encoder

        enc = encoder_for(text_encoder, "text", shape, device, trust_pickle)
        if enc.proj is None:
            raise CondiffError("this encoder was not trained for text (train it with --kind text)")
        te = load_text_encoder(device)
        if te.dim != enc.text_dim:
            raise CondiffError(f"the encoder expects {enc.text_dim}-d text embeddings, the text encoder gives {te.dim}-d")
        side = lambda x, t, enc=enc: enc(x, t, "text")  # noqa: E731 (bound now: enc is rebound below)
        terms.append(TextSimilarity(side, None, scale("text", text_scale)))
        cond["text"] = text_target(enc, te.encode(text), text_prior).reshape(1, -1)
    if image is not None or image_index is not None:
        image_encoder = image_encoder or shipped_encoder("image-encoder", shape, "--image/--image-index",
                                                         "--image-encoder CKPT", "condiff train-encoder --kind image")
        enc = encoder_for(image_encoder, "image", shape, device, trust_pickle)
        term = ImageSimilarity.from_encoder(enc, None, scale("image", image_scale), prior=image_prior)
        terms.append(term)
        ref = reference_image(shape, image, image_index, ref_data).to(device)
        cond["image"] = term.targets(ref)
        if log is not None:
            log(describe_reference(enc, ref, image if image is not None else f"test image {image_index}",
                                   getattr(enc, "class_names", None)))
    if style is not None:
        path = style_encoder or image_encoder or shipped_encoder(
            "image-encoder", shape, "--style", "--style-encoder or --image-encoder CKPT",
            "condiff train-encoder --kind image")
        from ..images import load_image
        from ..zoo import image_path

        enc = encoder_for(path, None, shape, device, trust_pickle)
        terms.append(StyleSimilarity.from_encoder(enc, load_image(image_path(style), shape[1], shape[0]),
                                                  scale("style", style_scale), schedule))
    return terms, cond
