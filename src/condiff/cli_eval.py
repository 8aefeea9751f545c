"""``condiff train-judge``, ``condiff evaluate`` and ``condiff sweep``: the evaluation commands.

A thin layer over :mod:`condiff.evaluation` and :mod:`condiff.sweep`; registered by
:func:`condiff.cli.build_parser`.  Bad input is a CondiffError (one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CondiffError
from .validation import check_output_file, key_value


def _scales(text: str) -> list[float]:
    import math

    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    if len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"scales must not repeat, got {text!r}")
    return vals


# ------------------------------------------------------------------------------------------- commands
def cmd_train_judge(args) -> int:
    from .evaluation import train_judge
    from .pipeline import resolve_device

    if not 0 <= args.dropout < 1:
        raise CondiffError(f"--dropout must lie in [0, 1), got {args.dropout}")
    device = resolve_device(args.device)
    _load_data, _train_config = args.helpers.load_data, args.helpers.train_config
    train_data = _load_data(args, "train")
    test_data = _load_data(args, "test")
    if args.data is not None and Path(args.data).is_file():
        print("note: an .npz has no test split; the reported accuracy is on the training images", file=sys.stderr)
    final, report = train_judge(train_data, test_data, args.out, _train_config(args), channels=args.channels,
                                feature_dim=args.feature_dim, dropout=args.dropout, data_spec=args.data,
                                device=device, progress=not args.no_progress, resume=not args.no_resume)
    print(f"judge test accuracy: {report['test_accuracy']:.4f} on {report['test_images']} held-out images")
    print(f"final checkpoint: {final}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_file, format_report, to_json
    from .checkpoints import atomic_write_text
    from .pipeline import resolve_device

    if args.no_labels and args.class_ is not None:
        raise CondiffError("give --class or --no-labels, not both")
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".eval.json")
    check_output_file(out)  # before the work: a bad --out is one line, not a lost evaluation
    labels = "none" if args.no_labels else "file"
    if args.class_ is not None:
        from .data import resolve_class
        from .evaluation import load_judge

        _, jconf = load_judge(args.judge, "cpu")
        labels = resolve_class(args.class_, jconf.get("class_names", []))
    report = evaluate_file(args.samples, args.judge, data=args.data, labels=labels,
                           device=resolve_device(args.device), seed=args.seed, batch_size=args.batch_size)
    print(format_report(report))
    atomic_write_text(out, to_json(report))
    print(f"wrote {out}")
    return 0


def cmd_sweep(args) -> int:
    from .compose import Sampling
    from .pipeline import resolve_device
    from .sweep import sweep_checkpoint
    from .validation import check_output_dir

    check_output_dir(args.out)
    options = {name: getattr(args, name) for name in ("eta", "variance") if getattr(args, name) is not None}
    sampling = Sampling(args.sampler, args.steps, args.spacing, threshold=args.threshold, options=options).validate()
    options = dict(args.options)
    if args.prompts:
        if "prompts" in options:
            raise CondiffError("give --prompts or --option prompts=..., not both")
        options["prompts"] = args.prompts
    sweep_checkpoint(args.ckpt, args.method, args.scales, args.n, args.out, judge=args.judge, data=args.data,
                     classes=args.classes, options=options, classifier=args.classifier, sampling=sampling,
                     form=args.form, seed=args.seed, batch_size=args.batch_size, device=resolve_device(args.device),
                     progress=not args.no_progress, log=print)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.{{md,csv,json}}, sweep.png, grid-scale-*.png, samples-scale-*.npz")
    return 0


# ------------------------------------------------------------------------------------------- parsers
def register(sub, helpers) -> None:
    """Add the evaluation subcommands to ``condiff``'s subparsers (``helpers``: :class:`condiff.cli.CliHelpers`)."""
    EPILOG, common, pos_int, nonneg_float, int_list = (helpers.epilog, helpers.add_common, helpers.pos_int,
                                                       helpers.nonneg_float, helpers.int_list)

    p = sub.add_parser("train-judge", help="train the independent judge / FID_fm feature network on clean images",
                       description="Train a plain CNN classifier on clean images (no time input; an architecture "
                                   "and seed independent of every guidance network). It judges the class of "
                                   "generated samples and its penultimate layer is the feature space of FID_fm. "
                                   "Reports held-out (test split) accuracy and writes OUT/judge.json.",
                       epilog=EPILOG)
    p.add_argument("--data", default=None,
                   help="Fashion-MNIST folder of IDX files (train and t10k), a folder of class subfolders or an "
                        ".npz (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, judge.json")
    p.add_argument("--steps", type=pos_int, default=1000, help="optimizer steps (default 1000, ~2 epochs)")
    p.add_argument("--batch-size", type=pos_int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=nonneg_float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--warmup", type=pos_int, default=50, help="linear warm-up steps (default 50)")
    p.add_argument("--weight-decay", type=nonneg_float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--ema-decay", type=nonneg_float, default=0.995, help="EMA decay (default 0.995)")
    p.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="gradient-norm clip, 0 = off (default 1)")
    p.add_argument("--channels", type=int_list, default=int_list("32,64,128"),
                   help="widths of the three convolutions (default 32,64,128)")
    p.add_argument("--feature-dim", type=pos_int, default=128, help="width of the feature layer (default 128)")
    p.add_argument("--dropout", type=nonneg_float, default=0.3, help="dropout before the last layer (default 0.3)")
    p.add_argument("--image-size", type=pos_int, default=None,
                   help="image folders are resized to this size (default 28); other data must already have it")
    p.add_argument("--limit", type=pos_int, default=None, help="use only the first N images of each split")
    p.add_argument("--ckpt-every", type=pos_int, default=250, help="checkpoint every N steps (default 250)")
    p.add_argument("--keep", type=pos_int, default=2, help="keep the last K checkpoints (default 2)")
    p.add_argument("--log-every", type=pos_int, default=50, help="log metrics every N steps (default 50)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_train_judge, seed=1234, helpers=helpers)  # JUDGE_SEED: not the guidance nets' seed 0

    p = sub.add_parser("evaluate", help="score samples (.npz): FID_fm, precision/recall, density/coverage, "
                                        "judge accuracy, diversity",
                       description="Evaluate generated samples with an independent judge network: FID_fm (in the "
                                   "judge's feature space) against the held-out images of the samples' classes, "
                                   "k-NN precision/recall and density/coverage, per-class judge accuracy and "
                                   "confidence, intra-class diversity; each with its real-data floor (training "
                                   "images with the same class counts). Prints a table and writes JSON.",
                       epilog=EPILOG)
    p.add_argument("--samples", required=True,
                   help=".npz with 'images' uint8 (N,H,W[,C]) and optional 'labels' (e.g. condiff sample --npz)")
    p.add_argument("--judge", default=None,
                   help="judge checkpoint or run folder (default: $CONDIFF_JUDGE, else the shipped judge)")
    p.add_argument("--data", default=None,
                   help="real data for the reference statistics (default: the data the judge was trained on)")
    p.add_argument("--class", dest="class_", default=None,
                   help="every sample is of this class (name or index), overriding the file's labels")
    p.add_argument("--no-labels", action="store_true",
                   help="ignore the file's labels: score the samples as unconditional")
    p.add_argument("--out", default=None, help="JSON report (default: SAMPLES with suffix .eval.json)")
    p.add_argument("--batch-size", type=pos_int, default=500, help="judge batch size (default 500)")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="sample at several guidance scales, evaluate each, write tables and plots",
                       description="For each scale: sample N images balanced over the classes (same seed, so the "
                                   "same initial noise at every scale), evaluate them with the judge, and write "
                                   "OUT/results.{json,csv,md}, OUT/sweep.png (judge accuracy and FID_fm against "
                                   "scale; precision against recall), OUT/grid-scale-S.png and "
                                   "OUT/samples-scale-S.npz. Methods: classifier (gamma of eq 8 on the "
                                   "unconditional model or the null branch, score form eq 19 by default), cfg "
                                   "(the article's w of eq 24; diffusers' guidance_scale is 1 + w). Samples of a "
                                   "scale already in OUT with the same settings are reused.",
                       epilog=EPILOG)
    from .sweep import PROMPT_SETS, SWEEP_SCALES

    defaults = "; ".join(f"{m} {','.join(f'{v:g}' for v in vals)}" for m, vals in SWEEP_SCALES.items())
    p.add_argument("--ckpt", default=None, help="eps-model checkpoint or run folder (default: the shipped "
                                                "Fashion-MNIST model)")
    p.add_argument("--method", required=True,
                   help="guidance family: classifier, cfg, text, image, text-cfg (a caption-conditional model, condiff train "
                        "--cond text, on --prompts); beyond the article: cfg-interval, apg, "
                        "cfg++, autoguide, x0-classifier, x0-image (condiff.sweep_family lists their options)")
    p.add_argument("--scales", type=_scales, default=None,
                   help=f"comma-separated scales: gamma for classifier, text and image, w for cfg (default, those "
                        f"of docs/results.md: {defaults})")
    p.add_argument("--n", type=pos_int, default=1000, help="samples per scale, balanced over classes (default 1000)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier checkpoint (method classifier; "
                                                      "default: the shipped one when the model makes 1x28x28 images)")
    p.add_argument("--class", dest="classes", action="append", default=[],
                   help="restrict to this class (name or index); repeat for several (default: all classes)")
    p.add_argument("--option", dest="options", type=key_value(), action="append", default=[],
                   help="KEY=VALUE passed to the method: classifier: sharpen=true; text: text_encoder=CKPT, "
                        "text_prior=T, promptK=TEXT; image: image_encoder=CKPT, image_prior=W, ref_data=PATH, "
                        "refK=INDEX; cfg-interval: interval=LO,HI; apg: eta, rescale, momentum; autoguide: "
                        "weak=CKPT; x0-classifier / x0-image: path=model|fixed, smoothing, samples, weight, "
                        "recurrence, interval (an unknown key is an error; the encoders default to the shipped ones "
                        "when the model makes 1x28x28 images)")
    p.add_argument("--prompts", choices=list(PROMPT_SETS), default=None,
                   help="one prompt per sample with its class and pixel attributes (condiff.captions), for methods "
                        "text-cfg and text: heldout (the default of text-cfg) in phrasings and synonyms never seen in "
                        "training, train in training phrasings; adds the accuracy of each attribute, by the rule the "
                        "captions were made with")
    p.add_argument("--form", choices=["score", "mean"], default="score",
                   help="gradient terms as eps - bbar_t*grad (score, eq 19; default) or mean shift (eq 6; an "
                        "ancestral stochastic sampler only); not for method cfg")
    p.add_argument("--judge", default=None, help="judge checkpoint (default: $CONDIFF_JUDGE, else the shipped one)")
    p.add_argument("--data", default=None, help="real data for the reference statistics (default: the judge's)")
    p.add_argument("--out", required=True, help="output folder")
    from .compose import DEFAULT_STEPS

    helpers.add_sampler_args(p, DEFAULT_STEPS)
    p.add_argument("--batch-size", type=pos_int, default=250, help="images per sampling batch (default 250)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_sweep)
