"""Text to image by the article's second route: a caption-conditional eps-model sampled with CFG (eqs 20-24).

The condition y of eq 22 is the MiniLM embedding E_text(caption) (384-d,
:mod:`condiff.similarity.text`) of a caption that says more than the class
(:mod:`condiff.captions`: "a dark patterned dress").  The UNet takes it through its vector
conditioning (:class:`condiff.nets.UNet` with ``cond_dim=384``: a linear projection into the
embedding the time embedding is added to) and has a *learned* null embedding phi, which
:class:`CaptionDiffusionTask` puts in place of the caption with probability p_uncond (eq 22's
training side of eq 24).  Each training image gets, at every step, a random caption among those
that are true of it (its class, and any subset of its pixel attributes in any training phrasing;
:func:`condiff.captions.caption_table`); the finite caption set is embedded once
(:class:`condiff.captions.CaptionBank`), so training never runs MiniLM.

Sampling is the one composition path: ``Guidance(cfg_w=w)`` with ``cond["y"]`` the prompts'
embeddings (:func:`prompt_condition`); :func:`sample_prompts` does it in one call::

    from condiff.pipeline import load_diffusion
    from condiff.text_cfg import sample_prompts
    model, schedule, config = load_diffusion("runs/text-cfg")
    x = sample_prompts(model, schedule, config, ["a black printed sundress"], n=8, cfg_w=2.0)

A checkpoint says it is text-conditional in its config (:data:`TEXT_KEY`: the text encoder, its
width, the caption set and the attribute rule with its thresholds, so samples are scored by the
rule the captions were made with).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .captions import CAPTION_SETS, AttributeRule, CaptionBank, attribute_codes, caption_table, split_captions
from .data import ImageDataset
from .distributed import Shard
from .errors import CondiffError
from .schedule import Schedule
from .training.tasks import DiffusionTask

__all__ = ["TEXT_KEY", "CAPTION_SETS", "text_condition_meta", "is_text_conditional", "attribute_rule",
           "caption_dataset", "CaptionDiffusionTask", "build_caption_task", "init_from_class_model",
           "prompt_condition", "sample_prompts"]

TEXT_KEY = "text_condition"


def text_condition_meta(rule: AttributeRule, encoder: str | None = None, dim: int | None = None,
                        vocabulary: str = "basic") -> dict:
    """The config entry of a text-conditional model (:data:`TEXT_KEY`)."""
    from .similarity.text import TEXT_DIM, TEXT_MODEL

    return {"encoder": encoder or TEXT_MODEL, "dim": int(dim or TEXT_DIM), "captions": CAPTION_SETS[vocabulary],
            "rule": rule.config()}


def is_text_conditional(config: dict) -> bool:
    """Whether a checkpoint config describes a caption-conditional eps-model."""
    return isinstance(config, dict) and isinstance(config.get(TEXT_KEY), dict)


def attribute_rule(config: dict) -> AttributeRule:
    """The attribute rule stored with a text-conditional model."""
    if not is_text_conditional(config):
        raise CondiffError("this eps-model is not text-conditional (train one with condiff train --cond text)")
    return AttributeRule.from_config(config[TEXT_KEY].get("rule"))


def caption_dataset(data: ImageDataset, rule: AttributeRule | None = None) -> tuple[ImageDataset, AttributeRule]:
    """``data`` with each label replaced by its (class, attributes) code (:func:`condiff.captions.attribute_codes`);
    the rule is fitted on ``data`` unless given."""
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    rule = rule or AttributeRule.fit(data.images, data.labels, names)
    attrs = torch.cat([rule.attributes(data.images[i:i + 10_000], data.labels[i:i + 10_000])
                       for i in range(0, len(data), 10_000)])
    return ImageDataset(data.images, attribute_codes(data.labels, attrs, len(names)), list(names)), rule


class CaptionDiffusionTask(DiffusionTask):
    """Eq 22 with y = E_text(c), c a random caption true of the image, and y -> phi with prob. p_uncond.

    Args:
        schedule: the noise schedule.
        embeddings: (M, D) caption embeddings (the bank).
        table, counts: :func:`condiff.captions.caption_table` of the bank's captions: row ``code`` lists
            the captions true of an image with that (class, attributes) code.
        p_uncond, min_snr_gamma, t_sampling, prediction: as :class:`~condiff.training.DiffusionTask`.
    The batch labels the training loop hands over are the codes (:func:`caption_dataset`).
    """

    def __init__(self, schedule: Schedule, embeddings: torch.Tensor, table: torch.Tensor, counts: torch.Tensor,
                 p_uncond: float = 0.1, min_snr_gamma: float | None = None, t_sampling: str = "uniform",
                 prediction: str = "eps", vocabulary: str = "basic"):
        super().__init__(schedule, p_uncond, min_snr_gamma, t_sampling, prediction)
        self.embeddings, self.table, self.counts = embeddings.float(), table.long(), counts.long()
        self.vocabulary = vocabulary
        if bool((self.counts < 1).any()):
            raise CondiffError("every (class, attributes) code needs at least one caption")

    def config(self) -> dict:
        return dict(super().config(), captions=CAPTION_SETS[self.vocabulary])

    def captions_for(self, codes: torch.Tensor, generator: torch.Generator, shard: Shard = Shard()) -> torch.Tensor:
        """(B,) caption indices: for each row, one caption of its code's row of the table, uniformly."""
        codes = codes.long().cpu()
        u = shard.rand(codes.shape[0], generator)
        j = (u * self.counts[codes]).long().clamp_max(self.counts[codes] - 1)
        return self.table[codes, j]

    def loss(self, model, x0, y, generator, shard: Shard = Shard()):
        emb = self.embeddings[self.captions_for(y, generator, shard)].to(x0.device)
        return super().loss(model, x0, emb, generator, shard)


def build_caption_task(schedule: Schedule, class_names: Sequence[str], encoder, cache=None, vocabulary: str = "basic",
                       **kwargs):
    """(task, bank): the training captions of ``class_names`` in ``vocabulary`` (:func:`condiff.captions.split_captions`)
    embedded once by ``encoder`` (cached at ``cache``)."""
    caps = split_captions(class_names, "train", vocabulary)
    bank = CaptionBank.build([c.text for c in caps], encoder, cache)
    table, counts = caption_table(caps, len(class_names))
    return CaptionDiffusionTask(schedule, bank.embeddings, table, counts, vocabulary=vocabulary, **kwargs), bank


def init_from_class_model(model, ckpt, bank: CaptionBank | None = None, labels: Sequence[int] | None = None,
                          ridge: float = 1e-2) -> list[str]:
    """Start a text-conditional UNet from a class-conditional checkpoint's weights; returns what was not copied.

    Every weight but the condition's is copied (the networks must agree in everything else).  The
    learned null embedding starts at the class model's null class phi.  With the caption ``bank`` and
    each caption's class ``labels``, the projection starts at the ridge least-squares map from caption
    embeddings to the class model's embedding of the caption's class, so the new model begins as the
    class model conditioned on the class its caption names; otherwise it keeps its random init.
    """
    from .checkpoints import load_model

    src, sconf = load_model(ckpt, "cpu")
    net = getattr(model, "module", model)
    if getattr(src, "num_classes", None) is None or getattr(net, "cond_dim", None) is None:
        raise CondiffError(f"{ckpt}: --init takes a class-conditional eps-model for a text-conditional one")
    a, b = dict(src.config), dict(net.config)
    for key in ("num_classes", "cond_dim"):
        a.pop(key, None)
        b.pop(key, None)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise CondiffError(f"{ckpt}: its network differs from this one in {', '.join(diff)}; match them to --init")
    state, mine = src.state_dict(), net.state_dict()
    copied = {k: v for k, v in state.items() if k in mine and not k.startswith("class_emb")}
    net.load_state_dict(copied, strict=False)
    with torch.no_grad():
        cls_emb = state["class_emb.weight"]  # (K + 1, E); row K is phi
        net.null_emb.copy_(cls_emb[-1])
        if bank is not None and labels is not None:
            X = torch.cat([bank.embeddings, torch.ones(len(bank), 1)], 1).double()
            Y = cls_emb[torch.as_tensor(list(labels)).long()].double()
            W = torch.linalg.solve(X.T @ X + ridge * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)
            net.cond_proj.weight.copy_(W[:-1].T.float())
            net.cond_proj.bias.copy_(W[-1].float())
    return sorted(k for k in mine if k not in copied)


def prompt_condition(prompts: Sequence[str] | str, config: dict | None = None, device="cpu",
                     encoder=None) -> torch.Tensor:
    """(N, D) condition vectors y = E_text(prompt) for a text-conditional model (its ``config`` checks the
    encoder); ``encoder`` defaults to the shipped MiniLM (:func:`condiff.similarity.text.load_text_encoder`)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise CondiffError("a prompt must be a non-empty string")
    if config is not None:
        if not is_text_conditional(config):
            raise CondiffError("--prompt needs a text-conditional eps-model (condiff train --cond text); this one "
                               "is not (text similarity guidance on it: --text)")
        from .similarity.text import TEXT_MODEL

        if encoder is None and config[TEXT_KEY].get("encoder") != TEXT_MODEL:
            raise CondiffError(f"this model was trained with the text encoder {config[TEXT_KEY].get('encoder')!r}, "
                               f"condiff has {TEXT_MODEL!r}")
    if encoder is None:
        from .similarity.text import load_text_encoder

        encoder = load_text_encoder(device)
    return torch.as_tensor(encoder.encode(list(prompts))).float().cpu()


def sample_prompts(model, schedule: Schedule, config: dict, prompts: Sequence[str], n: int = 8,
                   cfg_w: float = 2.0, sampling=None, seed: int = 0, batch_size: int = 256, device="cpu",
                   encoder=None, progress: bool = False) -> torch.Tensor:
    """``n`` images per prompt (prompt-major), by CFG with weight ``cfg_w`` (eq 24) through the one composition path."""
    from .compose import Guidance
    from .pipeline import guided_generate

    emb = prompt_condition(prompts, config, device, encoder)
    shape = tuple(config.get("image_shape", (model.in_channels, model.image_size, model.image_size)))
    return guided_generate(model, schedule, len(prompts) * n, Guidance(cfg_w=cfg_w), sampling, shape=shape,
                           cond={"y": emb.repeat_interleave(n, 0)}, seed=seed, batch_size=batch_size,
                           device=device, progress=progress)
