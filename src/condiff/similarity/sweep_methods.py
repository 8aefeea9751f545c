"""Similarity guidance as ``condiff sweep`` families (``--method text`` / ``--method image``).

Each builder follows :data:`condiff.sweep.METHODS`: ``builder(ctx, scale, labels) ->
(guidance, cond)``; the target class k of a sample becomes a per-row target
(``cond["text"]`` / ``cond["image"]``) that similarity guidance (eqs 11-15) steers to,
on the unconditional model (or the null branch of a conditional one):

* ``text``:  y = the prompt ``--option promptK=...`` or "a photo of <k's first synonym>";
  needs ``--option text_encoder=CKPT``;
* ``image``: y = test image ``--option refK=INDEX`` of the reference data
  (``--option ref_data=PATH``, default Fashion-MNIST), else the first test image of class k;
  needs ``--option image_encoder=CKPT``; ``--option image_prior=W`` as ``condiff sample --image-prior``.
"""

from __future__ import annotations

import torch

from ..compose import Guidance
from ..errors import CondiffError
from .captions import class_phrases
from .terms import EmbeddingSimilarity, ImageSimilarity, TextSimilarity, load_encoder, text_target

__all__ = ["SWEEP_METHODS", "class_references", "prompt_embeddings"]


def _option(ctx, key: str, method: str, what: str) -> str:
    value = ctx.options.get(key)
    if not value:
        raise CondiffError(f"method {method} needs --option {key}=CKPT ({what})")
    return str(value)


def _number(ctx, key: str) -> float | None:
    value = ctx.options.get(key)
    try:
        return None if value is None else float(value)
    except ValueError:
        raise CondiffError(f"{key} must be a number, got {value!r}") from None




def prompt_embeddings(ctx, labels: torch.Tensor) -> tuple[list, torch.Tensor]:
    """(the prompts of the first len(labels) samples, their MiniLM embeddings (N, D)); each distinct prompt is
    encoded once per sweep (the text encoder: ``ctx.cache["minilm"]``, loaded on first use)."""
    if ctx.prompts is None:
        raise CondiffError("this method samples prompts: give a prompt set (condiff sweep --prompts heldout)")
    rows = ctx.prompts[:len(labels)]
    if [p.label for p in rows] != labels.tolist():
        raise CondiffError("the sweep's prompts do not match its target classes")
    if "minilm" not in ctx.cache:
        from .text import load_text_encoder

        ctx.cache["minilm"] = load_text_encoder(ctx.device)
    memo = ctx.cache.setdefault("prompt_emb", {})
    todo = sorted({p.text for p in rows} - set(memo))
    if todo:
        memo.update(zip(todo, torch.as_tensor(ctx.cache["minilm"].encode(todo)).float().cpu()))
    return rows, torch.stack([memo[p.text] for p in rows])


def _text_method(ctx, scale: float, labels: torch.Tensor):
    """Text guidance toward each sample's class prompt: sim = cos(proj(E1(x_t, t)), E_text(prompt_k)).

    The prompt embeddings go through :func:`~.terms.text_target` (``--option text_prior=T``; default
    the encoder's default), as in ``condiff sample --text``.
    """
    if "text" not in ctx.cache:
        from .text import load_text_encoder

        enc, _ = load_encoder(_option(ctx, "text_encoder", "text", "condiff train-encoder --kind text"), "text",
                              ctx.device)
        prompts = [ctx.options.get(f"prompt{k}") or f"a photo of {class_phrases(name)[0]}"
                   for k, name in enumerate(ctx.class_names)]
        prior = _number(ctx, "text_prior")
        ctx.cache["text"] = (enc, text_target(enc, load_text_encoder(ctx.device).encode(prompts), prior))
    enc, emb = ctx.cache["text"]
    term = TextSimilarity(lambda x, t: enc(x, t, "text"), None, scale)  # each row's target: cond["text"]
    if ctx.prompts is not None:  # a prompt sweep (--prompts heldout): each sample's own prompt, same targets rule
        target = text_target(enc, prompt_embeddings(ctx, labels)[1], _number(ctx, "text_prior"))
        return Guidance(unconditional=ctx.conditional, terms=[term]), {"y": labels, "text": target}
    return Guidance(unconditional=ctx.conditional, terms=[term]), {"y": labels, "text": emb[labels.cpu()]}


_text_method.option_keys = ("text_encoder", "text_prior", r"prompt\d+", "prompts")


def class_references(ctx) -> ImageSimilarity:
    """The image target of each class (loaded once per sweep, ``ctx.cache["image"]``): test image
    ``--option refK=INDEX`` of ``--option ref_data`` (default: the first test image of class k), through E2 and
    the prototype prior (``--option image_prior=W``); ``.target[k]`` is class k's, ``.e1`` / ``.e2`` the encoder."""
    if "image" not in ctx.cache:
        from ..data import load_dataset

        enc, _ = load_encoder(_option(ctx, "image_encoder", "image", "condiff train-encoder --kind image"), "image",
                              ctx.device)
        C, H, _ = ctx.shape
        data = load_dataset(ctx.options.get("ref_data"), "test", size=H, channels=C)
        refs = []
        for k in range(len(ctx.class_names)):
            if f"ref{k}" in ctx.options:
                i = int(ctx.options[f"ref{k}"])
                if not 0 <= i < len(data):
                    raise CondiffError(f"ref{k}={i} out of range 0..{len(data) - 1}")
            else:
                hits = (data.labels == k).nonzero()
                if not len(hits):
                    raise CondiffError(f"no reference image of class {ctx.class_names[k]!r}: "
                                       f"give --option ref{k}=INDEX")
                i = int(hits[0, 0])
            refs.append(data.images[i])
        ctx.cache["image"] = ImageSimilarity.from_encoder(enc, torch.stack(refs), 1.0,
                                                          prior=_number(ctx, "image_prior"))
    return ctx.cache["image"]


def _image_method(ctx, scale: float, labels: torch.Tensor):
    """Image guidance toward each sample's class reference: sim = cos(E1(x_t, t), target(E2(ref_k))).

    The target is :class:`~.terms.ImageSimilarity`'s (``--option image_prior=W``; default the
    encoder's default), as in ``condiff sample --image``.
    """
    ref = class_references(ctx)  # one target per class, then one per sample: cond["image"]
    term = EmbeddingSimilarity(ref.e1, None, scale, name="image")
    return (Guidance(unconditional=ctx.conditional, terms=[term]),
            {"y": labels, "image": ref.target[labels.to(ref.target.device)]})


_image_method.option_keys = ("image_encoder", "image_prior", "ref_data", r"ref\d+")


SWEEP_METHODS = {"text": _text_method, "image": _image_method}
