"""Training the encoders of similarity guidance (eq 15), as tasks for :func:`condiff.training.train`.

The article (under eq 15): x_t is noisy, so E1 cannot be an encoder trained on
clean data; it has to be fine-tuned on noisy inputs.  We follow "More Control for
Free!" (SDG, Liu et al. 2023), where E2 is a clean image encoder (CLIP's image
tower there) and E1 is trained so that E1(x_t, t) matches E2(x_0) of the same image:

1. :class:`CleanEncoderTask` trains E2 (CLIP cannot be downloaded here): a cosine
   classifier, softmax(cos(E2(aug(x_0)), p_k) / tau) over learned class prototypes
   p_k, with random shifts as augmentation.  This shapes exactly the cosine geometry
   that eq 15 uses: images of one class point the same way.
2. :class:`EncoderTask` fine-tunes E1 (initialised from E2) on noisy inputs with
   InfoNCE between E1(x_t, t) and the frozen E2(x_0) of the same image, the other
   images of the batch being the negatives (SDG's recipe).
3. :class:`TextAlignTask` trains E1 and a projection into the space of a frozen
   pretrained text encoder: a multi-positive InfoNCE of proj(E1(x_t, t)) against a
   bank of caption embeddings, every caption of the image's class a positive.

:func:`train_image_encoder` and :func:`train_text_encoder` chain these with
:func:`~condiff.training.train` (EMA, crash-safe checkpoints, exact resume).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..captions import CAPTION_SETS
from ..checkpoints import atomic_write_text, load_checkpoint
from ..data import ImageDataset
from ..errors import CondiffError
from ..nets import SimilarityEncoder
from ..schedule import Schedule
from ..training import T_RANGES, TrainConfig, train
from .captions import caption_class_logits, centre, class_centroids, training_captions

__all__ = ["DEFAULT_ALIGN", "CleanEncoderTask", "EncoderTask", "TextAlignTask", "random_shift", "info_nce",
           "caption_bank", "train_image_encoder", "train_text_encoder"]


DEFAULT_ALIGN = 10.0  # weight of TextAlignTask's alignment term (docs/similarity.md: 10 steers better than 1)


def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [-pad, pad]^2, edges replicated."""
    if pad <= 0:
        return x
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator).tolist()
    return torch.stack([xp[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(off)])


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE of row i of ``a`` against row i of ``b`` among all rows of ``b`` (cosine / tau logits)."""
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device)), logits


def _noisy(schedule: Schedule, t_max: int, x0: torch.Tensor, generator: torch.Generator):
    """t uniform in [0, t_max) and x_t = abar_t x_0 + bbar_t eps."""
    t = torch.randint(0, t_max, (x0.shape[0],), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    return schedule.add_noise(x0, t, eps), t


def _by_t_range(name: str, correct: torch.Tensor, t: torch.Tensor, T: int) -> dict:
    """(hits, count) of ``correct`` in each t-range of :data:`condiff.training.T_RANGES`."""
    out = {}
    for rng, (lo, hi) in T_RANGES.items():
        m = (t >= lo * T) & (t < hi * T)
        if m.any():
            out[f"{name}_{rng}"] = (float(correct[m].float().sum()), int(m.sum()))
    return out


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0 < tau <= 10:
        raise CondiffError(f"temperature tau must lie in (0, 10], got {tau}")
    return tau


def _check_t_max(schedule: Schedule, t_max: int | None) -> int:
    t_max = schedule.T if t_max is None else int(t_max)
    if not 1 <= t_max <= schedule.T:
        raise CondiffError(f"t-max must lie in [1, {schedule.T}], got {t_max}")
    return t_max


class CleanEncoderTask:
    """E2 as a cosine classifier: CE of cos(E2(shift(x_0)), p_k) / tau over class prototypes p_k."""

    name = "clean-encoder"

    def __init__(self, tau: float = 0.1, shift: int = 2):
        self.tau, self.shift = _check_tau(tau), int(shift)
        if self.shift < 0:
            raise CondiffError(f"shift must be >= 0, got {shift}")

    def config(self) -> dict:
        return {"task": self.name, "tau": self.tau, "shift": self.shift}

    def loss(self, model, x0, y, generator):
        z = model(random_shift(x0, self.shift, generator), None, "e2")
        logits = F.normalize(z.float(), dim=-1) @ F.normalize(model.prototypes.float(), dim=-1).T / self.tau
        return F.cross_entropy(logits, y), {"acc": (float((logits.argmax(1) == y).sum()), len(y))}


class EncoderTask:
    """SDG's E1: InfoNCE between E1(x_t, t) and the frozen E2(x_0) of the same image (eq 15)."""

    name = "encoder"

    def __init__(self, schedule: Schedule, tau: float = 0.1, t_max: int | None = None):
        self.schedule, self.tau, self.t_max = schedule, _check_tau(tau), _check_t_max(schedule, t_max)

    def config(self) -> dict:
        return {"task": self.name, "tau": self.tau, "t_max": self.t_max}

    def loss(self, model, x0, y, generator):
        with torch.no_grad():  # E2 is frozen: no gradient reaches it
            z2 = model(x0, None, "e2")
        xt, t = _noisy(self.schedule, self.t_max, x0, generator)
        loss, logits = info_nce(model(xt, t, "e1"), z2, self.tau)
        hit = logits.argmax(1) == torch.arange(len(x0), device=x0.device)  # in-batch retrieval
        return loss, _by_t_range("top1", hit, t, self.schedule.T)


class TextAlignTask:
    """proj(E1(x_t, t)) against a frozen caption bank: multi-positive InfoNCE (eq 15 with y a text).

    The logit of class k is log mean_{captions c of k} exp(cos(proj(E1(x_t, t)), E_text(c)) / tau),
    and the loss is the cross-entropy of the image's class over these logits, plus
    ``align`` * (1 - cos(proj(E1(x_t, t)), c_y)) with c_y the mean caption direction of
    the image's class.  The contrastive part only ranks captions; the alignment part
    puts the embedding *on* its class's caption direction, so that the cosine with a
    prompt never seen in training (eq 15's sim) follows the text encoder's own
    geometry instead of arbitrary components outside the captions' span.

    Args:
        bank: caption embeddings (M, D_text), unit norm.
        bank_labels: class of each caption, (M,) long; every class must have a caption.
        align: weight of the alignment term (0 = contrastive only).
    """

    name = "text-encoder"

    def __init__(self, schedule: Schedule, bank: torch.Tensor, bank_labels: torch.Tensor, tau: float = 0.07,
                 t_max: int | None = None, align: float = DEFAULT_ALIGN):
        self.schedule, self.tau, self.t_max = schedule, _check_tau(tau), _check_t_max(schedule, t_max)
        self.align = float(align)
        if not 0 <= self.align <= 100:
            raise CondiffError(f"alignment weight must lie in [0, 100], got {align}")
        self.bank = F.normalize(torch.as_tensor(bank).float(), dim=-1)
        self.bank_labels = torch.as_tensor(bank_labels).long()
        self.num_classes = int(self.bank_labels.max()) + 1
        counts = torch.bincount(self.bank_labels, minlength=self.num_classes)
        if (counts == 0).any():
            raise CondiffError("every class needs at least one caption")
        self.centroids = class_centroids(self.bank, self.bank_labels, self.num_classes)

    @classmethod
    def for_encoder(cls, encoder, schedule: Schedule, tau: float = 0.07, t_max: int | None = None,
                    align: float = DEFAULT_ALIGN) -> "TextAlignTask":
        """The task against the caption bank stored in ``encoder``, centred on its mean."""
        if not getattr(encoder, "captions", 0):
            raise CondiffError("this text encoder stores no caption bank")
        return cls(schedule, centre(encoder.caption_bank, encoder.text_mean), encoder.caption_labels, tau, t_max,
                   align)

    def config(self) -> dict:
        return {"task": self.name, "tau": self.tau, "t_max": self.t_max, "captions": int(self.bank.shape[0]),
                "align": self.align, "centred": True}

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K) log mean exp of caption similarities / tau per class."""
        return caption_class_logits(z, self.bank, self.bank_labels, self.num_classes, self.tau)

    def loss(self, model, x0, y, generator):
        if int(y.max()) >= self.num_classes:
            raise CondiffError(f"label {int(y.max())} has no captions")
        xt, t = _noisy(self.schedule, self.t_max, x0, generator)
        z = model(xt, t, "text")
        logits = self.class_logits(z)
        loss = F.cross_entropy(logits, y)
        if self.align:
            cos_y = F.cosine_similarity(z.float(), self.centroids.to(z.device)[y], dim=-1)
            loss = loss + self.align * (1 - cos_y).mean()
        return loss, _by_t_range("acc", logits.argmax(1) == y, t, self.schedule.T)


def caption_bank(class_names: list[str], text_encoder, cache: str | Path | None = None,
                 captions: tuple[list[str], list[int]] | None = None):
    """Captions of every class, their embeddings (M, D) and labels (M,), computed once per run.

    With ``cache`` (a .safetensors path) the embeddings are stored there with the
    caption list and reused when the captions and the text model are the same.
    ``captions``: (texts, labels) instead of :func:`~.captions.training_captions` of the classes.
    """
    texts, labels = captions if captions is not None else training_captions(class_names)
    key = json.dumps({"model": text_encoder.name, "captions": texts})
    if cache is not None and Path(cache).is_file():
        try:
            stored = load_file(str(cache))
            meta = Path(cache).with_suffix(".json").read_text()
            if meta == key:
                return texts, stored["embeddings"], stored["labels"]
        except (OSError, ValueError, KeyError, SafetensorError):
            pass  # recompute a stale or damaged cache
    emb = text_encoder.encode(texts)
    lab = torch.tensor(labels)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb.contiguous(), "labels": lab}, str(cache))
        atomic_write_text(Path(cache).with_suffix(".json"), key)
    return texts, emb, lab


def _arch(data: ImageDataset, arch: dict) -> dict:
    C, H, W = data.shape
    if H != W:
        raise CondiffError(f"images must be square, got {H}x{W}")
    return dict(arch, in_channels=C, image_size=H)


def train_image_encoder(data: ImageDataset, out: str | Path, schedule: Schedule, *, arch: dict, dim: int = 64,
                        clean_cfg: TrainConfig, cfg: TrainConfig, tau: float = 0.1, shift: int = 2,
                        t_max: int | None = None, meta: dict | None = None, device="cpu", resume: bool = True,
                        progress: bool = True) -> Path:
    """Train E2 (``out/clean``), then E1 from E2 on noisy inputs (``out``); returns the final checkpoint.

    Args:
        arch: EncoderNet architecture (channels, blocks, stem) of both encoders.
        clean_cfg, cfg: optimisation of the two stages (E2, then E1).
    """
    out = Path(out)
    torch.manual_seed(clean_cfg.seed)  # the initial weights follow the seed, as in train()
    enc = SimilarityEncoder(**_arch(data, arch), dim=dim, clean=True, num_classes=data.num_classes).to(device)
    meta = dict(meta or {}, schedule=schedule.config())
    clean = train(enc, CleanEncoderTask(tau, shift), data, clean_cfg, out / "clean", meta=meta, device=device,
                  resume=resume, progress=progress)
    enc.load_state_dict({k: v.to(device) for k, v in load_checkpoint(clean)["weights"].items()})
    # E1 starts as a copy of E2 and is fine-tuned on noisy inputs (the article's remark under eq 15)
    enc.e1.load_state_dict(enc.e2.state_dict())
    return train(enc, EncoderTask(schedule, tau, t_max), data, replace(cfg, seed=cfg.seed + 1), out, meta=meta,
                 device=device, resume=resume, progress=progress)


def train_text_encoder(data: ImageDataset, out: str | Path, schedule: Schedule, text_encoder, *, arch: dict,
                       dim: int = 64, cfg: TrainConfig, tau: float = 0.07, t_max: int | None = None,
                       align: float = DEFAULT_ALIGN, init: str | Path | None = None, meta: dict | None = None,
                       device="cpu", resume: bool = True, progress: bool = True, captions: str = "classes") -> Path:
    """Align proj(E1(x_t, t)) with caption embeddings of the data's classes; returns the final checkpoint.

    Args:
        text_encoder: a :class:`~condiff.similarity.text.TextEncoder` (or anything with
            ``name``, ``dim`` and ``encode(list[str]) -> (N, dim)``).
        align: weight of :class:`TextAlignTask`'s alignment term.
        init: an image-encoder checkpoint whose E1 initialises this E1 (same architecture).
        captions: "classes" (captions name the class) or "attributes": the captions state the class and its
            pixel attributes (:func:`attribute_dataset`), each image is aligned with the captions of its own
            class and attributes, and the stored bank maps prompts onto (class, attributes) combinations;
            "attributes-rich": the same with the rich vocabulary's captions added (:data:`condiff.captions.VOCABULARIES`).
    """
    from ..checkpoints import load_model

    out = Path(out)
    if not data.class_names:
        raise CondiffError("text alignment needs class names (Fashion-MNIST, an image folder, or an .npz "
                           "with class_names)")
    if captions not in CAPTION_KINDS:
        raise CondiffError(f"captions must be one of {', '.join(CAPTION_KINDS)}, got {captions!r}")
    texts_labels = None
    if captions != "classes":
        from ..captions import combo_captions

        vocabulary = next(v for v, name in CAPTION_SETS.items() if name == captions)
        data, rule = attribute_dataset(data)
        texts_labels = combo_captions(data.class_names, "train", vocabulary)
        meta = dict(meta or {}, caption_set=captions, attribute_rule=rule.config())
    torch.manual_seed(cfg.seed)  # the initial weights follow the seed, as in train()
    n_captions = len((texts_labels or training_captions(data.class_names))[1])
    enc = SimilarityEncoder(**_arch(data, arch), dim=dim, clean=False, text_dim=text_encoder.dim,
                            captions=n_captions).to(device)
    if init is not None:  # checked before anything is written
        src, src_cfg = load_model(init, device)
        if src_cfg.get("task") != "encoder" or src.e1.config != enc.e1.config:
            raise CondiffError(f"{init}: not an image encoder with this architecture (--channels, --blocks, "
                               "--stem, --dim must match)")
        enc.e1.load_state_dict(src.e1.state_dict())
    cache = out / "captions.safetensors"
    created = [p for p in (cache, cache.with_suffix(".json"), out, *out.parents) if not p.exists()]
    try:
        _, bank, labels = caption_bank(data.class_names, text_encoder, cache, texts_labels)
        enc.set_captions(bank, labels)  # saved with the weights: guidance maps prompts onto it
        meta = dict(meta or {}, schedule=schedule.config(), text_model=text_encoder.name)
        return train(enc, TextAlignTask.for_encoder(enc, schedule, tau, t_max, align), data, cfg, out, meta=meta,
                     device=device, resume=resume, progress=progress)
    except BaseException:
        _remove_unless_started(out, created)
        raise


CAPTION_KINDS = ("classes", *CAPTION_SETS.values())


def attribute_dataset(data: ImageDataset, rule=None):
    """(``data`` with each label replaced by its :func:`condiff.captions.attribute_combos` index, the rule):
    the targets of text alignment with attribute captions; the rule is fitted on ``data`` unless given."""
    from ..captions import AttributeRule, combo_labels

    rule = rule or AttributeRule.fit(data.images, data.labels, data.class_names)
    attrs = torch.cat([rule.attributes(data.images[i:i + 10_000], data.labels[i:i + 10_000])
                       for i in range(0, len(data), 10_000)])
    return ImageDataset(data.images, combo_labels(data.labels, attrs, data.class_names), data.class_names), rule


def _remove_unless_started(out: Path, created: list[Path]) -> None:
    """A run that failed before its first log line or checkpoint leaves nothing: remove what it created."""
    from ..checkpoints import latest_checkpoint

    if not out.is_dir() or latest_checkpoint(out) is not None or (out / "metrics.jsonl").is_file():
        return
    for p in created:  # the files, then the folders this run made, deepest first, where empty
        if p.is_file():
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
