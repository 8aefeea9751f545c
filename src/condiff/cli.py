"""``condiff`` command line: a thin layer over the library.

Every command parses its arguments, calls library functions, and reports bad
input as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

from .cli_family import SHIPPED_ARG, shipped_or  # a model flag without a value (--classifier): the shipped model
from .errors import CondiffError
from .validation import (MAX_LEVELS, MAX_WIDTH, check_output_dir, describe_unexpected, finite_float, float_range,
                         int_range, key_value, nonneg_float, one_line, seed, timestep_interval)

EPILOG = "Article: Su Jianlin, 'Generative diffusion models (9): conditional control of generation'."


# ----------------------------------------------------------------------------- helpers
def _int_list(text: str) -> list[int]:
    """Network widths per level (--channels): 1 to MAX_LEVELS integers in [1, MAX_WIDTH]."""
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not 1 <= len(vals) <= MAX_LEVELS or any(not 1 <= v <= MAX_WIDTH for v in vals):
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LEVELS} widths in [1, {MAX_WIDTH}], got {text!r}")
    return vals


_pos_int = int_range(1)  # an integer in [1, MAX_INT]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present; default)")
    p.add_argument("--seed", type=seed, default=0, help="random seed, 0 to 2^32-1 (default 0)")


def _add_train_common(p: argparse.ArgumentParser, steps: int, lr: float, channels: str, blocks: int) -> None:
    p.add_argument("--data", default=None,
                   help="Fashion-MNIST folder of IDX files, a folder of class subfolders, or an .npz "
                        "(default: /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, samples/")
    p.add_argument("--steps", type=_pos_int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch-size", type=_pos_int, default=128,
                   help="global batch size; under torchrun each of N processes takes 1/N of it (default 128)")
    p.add_argument("--lr", type=nonneg_float, default=lr, help=f"peak AdamW learning rate (default {lr})")
    p.add_argument("--warmup", type=_pos_int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--ema-decay", type=nonneg_float, default=0.999, help="EMA decay (default 0.999)")
    p.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="gradient-norm clip, 0 = off (default 1)")
    p.add_argument("--channels", type=_int_list, default=_int_list(channels),
                   help=f"widths per resolution level (default {channels})")
    p.add_argument("--blocks", type=int_range(1, 64), default=blocks, help=f"residual blocks per level (default {blocks})")
    p.add_argument("--stem", type=int_range(1, 64), default=2, help="pixel-unshuffle factor of the input stem (default 2)")
    p.add_argument("--image-size", type=int_range(1, 4096), default=None,
                   help="image folders are resized to this size (default 28); other data must already have it")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="noise schedule (default cosine)")
    p.add_argument("--T", type=int_range(1, 100_000), default=1000, help="number of diffusion steps T (default 1000)")
    p.add_argument("--ckpt-every", type=_pos_int, default=250, help="checkpoint every N steps (default 250)")
    p.add_argument("--keep", type=_pos_int, default=3, help="keep the last K checkpoints (default 3)")
    p.add_argument("--log-every", type=_pos_int, default=25, help="log metrics every N steps (default 25)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--limit", type=_pos_int, default=None, help="use only the first N training images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "rsqrt"], default="constant",
                   help="after the warm-up: constant (default), cosine decay to --min-lr at --steps, or "
                        "inverse-square-root decay (docs/training.md)")
    p.add_argument("--min-lr", type=nonneg_float, default=0.0,
                   help="the cosine schedule's final lr as a fraction of --lr (default 0)")
    p.add_argument("--ema-profiles", type=_float_list, default=(),
                   help="post-hoc EMA: keep power-function EMA profiles of these relative widths, e.g. "
                        "0.05,0.1; snapshots go to OUT/posthoc-ema at every checkpoint, and "
                        "`condiff posthoc-ema` makes any width from them afterwards (default: none)")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout for the network and its inputs (a speed lever; docs/training.md)")
    _add_accel(p)
    _add_common(p)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0.001 <= v < 0.28 for v in vals):
        raise argparse.ArgumentTypeError(f"expected numbers in [0.001, 0.28), got {text!r}")
    return vals


def _add_accel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bf16", action="store_true",
                   help="run the networks under bfloat16 autocast (for GPUs; works but rarely pays on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (for GPUs; the first steps are slow while it compiles)")


def _train_config(args, **over):
    from .training import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       weight_decay=args.weight_decay, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
                       seed=args.seed, ckpt_every=args.ckpt_every, keep=args.keep, log_every=args.log_every,
                       bf16=getattr(args, "bf16", False), lr_schedule=getattr(args, "lr_schedule", "constant"),
                       min_lr=getattr(args, "min_lr", 0.0), ema_profiles=tuple(getattr(args, "ema_profiles", ())),
                       channels_last=getattr(args, "channels_last", False), **over)


def _stopped(stop) -> int:
    """Exit code of a training command stopped by SIGTERM (0) or SIGINT (130), after its checkpoint."""
    print(f"condiff: {stop}", file=sys.stderr)
    return stop.exit_code


def _load_data(args, split="train"):
    from .data import load_dataset

    check_output_dir(args.out)  # every training command loads its data first: fail before any work
    data = load_dataset(args.data, split, size=args.image_size or 28)
    if args.image_size and data.shape[1:] != (args.image_size, args.image_size):
        raise CondiffError(f"the data's images are {data.shape[1]}x{data.shape[2]}, not --image-size {args.image_size}")
    if data.shape[1] != data.shape[2]:
        raise CondiffError(f"images must be square, got {data.shape[1]}x{data.shape[2]}")
    if args.limit:
        data = type(data)(data.images[:args.limit], data.labels[:args.limit], data.class_names)
    if split == "train" and getattr(args, "batch_size", 0) > len(data):
        raise CondiffError(f"--batch-size {args.batch_size} is larger than the data ({len(data)} images)")
    return data


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``condiff CMD: error: ...``, exit 2); --help shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


class CliHelpers(NamedTuple):
    """What the other CLI modules (cli_eval, similarity.commands) take from this one, handed over at registration."""

    epilog: str
    add_common: Callable
    pos_int: Callable
    nonneg_float: Callable
    int_list: Callable
    load_data: Callable
    train_config: Callable
    add_sampler_args: Callable


SOLVER_FLAGS = ("eta", "variance")  # solver options with a flag of their own; the solver says which it takes


def _sampler_help() -> str:
    from .compose import AUTO_SAMPLERS
    from .samplers import SAMPLERS, STOCHASTIC

    kinds = ", ".join(f"{name} ({'stochastic' if name in STOCHASTIC else 'deterministic'})" for name in SAMPLERS)
    return (f"solver: auto, {kinds}. auto (default) picks the measured best for the guidance: "
            f"{AUTO_SAMPLERS['plain']} without gradient terms (unguided, CFG: at 15 steps it beats DDIM-50), "
            f"{AUTO_SAMPLERS['gradient']} with classifier / text / image / style / x0 terms (fresh noise each step "
            f"corrects the guidance's errors), {AUTO_SAMPLERS['mean']} for --form mean (docs/solvers.md). "
            "Deterministic solvers are reproducible from x_T; --eta and --variance need --sampler ddim / ddpm")


def _add_sampler_args(p: argparse.ArgumentParser, steps: int, eta_variance: bool = True) -> None:
    """--sampler, --steps, --spacing, --threshold and the solver options; the tables come from the library."""
    from .compose import DEFAULT_SAMPLER, DEFAULT_SPACING, MAX_ETA
    from .samplers import SAMPLERS
    from .schedule import SPACINGS

    p.add_argument("--sampler", choices=["auto", *SAMPLERS], default=DEFAULT_SAMPLER,
                   help=f"{_sampler_help()} (default {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=_pos_int, default=steps,
                   help=f"sampling steps after respacing (default {steps}); network calls per image: see the solver")
    p.add_argument("--spacing", choices=list(SPACINGS), default=DEFAULT_SPACING,
                   help="which timesteps the steps visit: linspace (uniform in t, both ends; default), leading / "
                        "trailing (uniform in t as diffusers names them), lambda (uniform in log(abar_t/bbar_t), "
                        "the DPM-Solver choice), karras (Karras et al.'s sigmas, rho 7: more steps at low noise)")
    p.add_argument("--threshold", type=float_range(0.0, 1.0, "a percentile", open_lo=True), default=None,
                   metavar="P", help="dynamic thresholding of the predicted x_0 (Imagen): clamp each sample to its "
                                     "P-quantile of |x_0| (at least 1) and rescale; for large guidance (default off)")
    if eta_variance:
        p.add_argument("--eta", type=float_range(0.0, MAX_ETA, "eta"), default=None,
                       help="ddim's eta in [0, 1]: sigma_t = eta * posterior std; 0 deterministic (default), 1 as "
                            "stochastic as ddpm; only for solvers that take eta")
        p.add_argument("--variance", choices=["ddpm", "ddpm-beta"], default=None,
                       help="ddpm's reverse variance: posterior (ddpm, default) or beta_t^2 (ddpm-beta); only for "
                            "--sampler ddpm")


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from .accel import compile_model
    from .distributed import current as current_dist
    from .images import save_grid
    from .nets import UNet
    from .pipeline import generate, resolve_device
    from .prediction import as_eps_model
    from .schedule import make_schedule
    from .training import DiffusionTask, TrainingStopped, train

    device = resolve_device(args.device)
    data = _load_data(args)
    C, H, W = data.shape
    if H != W:
        raise CondiffError(f"images must be square, got {H}x{W}")
    schedule = make_schedule(args.schedule, args.T)
    num_classes = data.num_classes if args.cond == "class" else None
    if args.init and args.cond != "text":
        raise CondiffError("--init applies to --cond text (a class model's weights as the starting point)")
    if args.captions is not None and args.cond != "text":
        raise CondiffError("--captions applies to --cond text (the caption vocabulary of a text-conditional model)")
    args.captions = args.captions or "basic"
    if args.prediction is None and not args.init:
        args.prediction = "eps"
    text = args.cond == "text"
    if text:
        from .similarity.text import TEXT_DIM
    model = UNet(in_channels=C, image_size=H, channels=args.channels, blocks=args.blocks, stem=args.stem,
                 num_classes=num_classes, cond_dim=TEXT_DIM if text else None, attention=args.attention).to(device)
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    meta = {"schedule": schedule.config(), "class_names": names, "image_shape": [C, H, W]}
    out = Path(args.out)
    dist = current_dist()
    if text:  # captions with pixel attributes, embedded once (condiff.text_cfg)
        data, task, sample_cond = _caption_training(args, data, names, schedule, meta, model, out, dist.main)
    else:
        task = DiffusionTask(schedule, args.p_uncond if num_classes else 0.0, min_snr_gamma=args.min_snr_gamma,
                             t_sampling=args.t_sampling, prediction=args.prediction)

    def on_sample(ema, step):
        k = min(num_classes or 8, 10)
        cond = __import__("torch").arange(k).repeat_interleave(8) if num_classes else None
        if text:
            k, cond = len(sample_cond), sample_cond.repeat_interleave(8, 0)
        eps = as_eps_model(ema, schedule, task.prediction)  # a v or x0 network sampled as eps
        x = generate(eps, schedule, 8 * k, shape=(C, H, W), cond=cond, steps=min(25, schedule.T), seed=0,
                     device=device)
        save_grid(x, out / "samples" / f"step-{step:07d}.png", nrow=8)

    cfg = _train_config(args, sample_every=args.sample_every)
    cfg.validate()  # before the banner: a bad value prints nothing but its error
    if dist.main:
        print(f"condiff train: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(data)} images {C}x{H}x{W}, device {device}, {dist.world_size} process(es)", file=sys.stderr)
    try:
        final = train(compile_model(dist.wrap(model), args.compile), task, data, cfg, out, meta=meta,
                      device=device, resume=not args.no_resume, progress=not args.no_progress, callback=on_sample,
                      **dist.train_kwargs())
    except TrainingStopped as stop:
        return _stopped(stop) if dist.main else stop.exit_code
    if dist.main:
        print(f"final checkpoint: {final}")
    return 0


def _caption_training(args, data, names, schedule, meta, model, out: Path, main: bool):
    """``condiff train --cond text``: (coded data, CaptionDiffusionTask, one caption embedding per class for the
    sample grids); the rule and text encoder go into ``meta``; ``--init`` copies a class model's weights."""
    from .similarity.text import load_text_encoder
    from .text_cfg import TEXT_KEY, build_caption_task, caption_dataset, init_from_class_model, text_condition_meta

    from .captions import split_captions

    caps = split_captions(names, "train", args.captions)  # classes without caption nouns fail here, before any work
    if args.init:
        from .checkpoints import read_config, resolve_checkpoint
        from .prediction import prediction_of

        init_config = read_config(resolve_checkpoint(args.init))
        if init_config.get("network", {}).get("num_classes") is None:
            raise CondiffError(f"{args.init}: --init takes a class-conditional eps-model")
        theirs = prediction_of(init_config, str(args.init))
        if args.prediction is None:  # the default: what the model it starts from predicts
            args.prediction = theirs
        if theirs != args.prediction:
            raise CondiffError(f"{args.init} predicts {theirs}: train from it with --prediction {theirs}")
    coded, rule = caption_dataset(data)
    encoder = load_text_encoder("cpu")  # a missing extra fails here
    task, bank = build_caption_task(schedule, names, encoder, cache=out / "captions.safetensors" if main else None,
                                    vocabulary=args.captions, p_uncond=args.p_uncond, min_snr_gamma=args.min_snr_gamma,
                                    t_sampling=args.t_sampling, prediction=args.prediction)
    meta[TEXT_KEY] = text_condition_meta(rule, encoder.name, encoder.dim, args.captions)
    if args.init:
        init_from_class_model(model, args.init, bank, [c.label for c in caps])
        meta["init"] = str(resolve_checkpoint(args.init))
    first = [next(i for i, c in enumerate(caps) if c.label == k) for k in range(len(names))]
    return coded, task, bank.embeddings[first]


def cmd_posthoc_ema(args) -> int:
    from .training import save_posthoc_ema

    check_output_dir(args.out)
    if Path(args.out).resolve() == Path(args.run).resolve():
        raise CondiffError("--out must not be the run folder")
    outs = [Path(args.out)] if len(args.sigma_rel) == 1 else \
        [Path(args.out) / f"sigma-{s:.3f}" for s in args.sigma_rel]
    for s, out in zip(args.sigma_rel, outs):
        print(f"wrote {save_posthoc_ema(args.run, s, out, args.step)}")
    return 0


def cmd_train_classifier(args) -> int:
    from .accel import compile_model
    from .distributed import current as current_dist
    from .nets import EncoderNet
    from .pipeline import resolve_device
    from .schedule import make_schedule
    from .training import ClassifierTask, TrainingStopped, classifier_accuracy_by_t, train

    device = resolve_device(args.device)
    data = _load_data(args)
    C, H, W = data.shape
    schedule = make_schedule(args.schedule, args.T)
    model = EncoderNet(in_channels=C, image_size=H, channels=args.channels, blocks=args.blocks, stem=args.stem,
                       out_dim=data.num_classes).to(device)
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    meta = {"schedule": schedule.config(), "class_names": names, "image_shape": [C, H, W]}
    dist = current_dist()
    task = ClassifierTask(schedule, args.t_max, clean=getattr(args, "clean", False))
    try:
        final = train(compile_model(dist.wrap(model), args.compile), task, data,
                      _train_config(args), args.out, meta=meta, device=device, resume=not args.no_resume,
                      progress=not args.no_progress, **dist.train_kwargs())
    except TrainingStopped as stop:
        return _stopped(stop) if dist.main else stop.exit_code
    if not dist.main:
        return 0
    try:
        held_out = _load_data(args, "test") if args.data is None or Path(args.data).is_dir() and \
            any(Path(args.data).glob("t10k-*")) else data
    except CondiffError:
        held_out = data
    from .checkpoints import load_model

    clf, _ = load_model(final, device)
    acc = classifier_accuracy_by_t(clf, schedule, held_out, n=1000, device=device)
    print("held-out accuracy by t-range: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"final checkpoint: {final}")
    return 0


# ----------------------------------------------------------------------------- sample


def _sampling(args):
    """The sampler flags as a :class:`condiff.compose.Sampling` (solver options only when given)."""
    from .compose import Sampling

    options = {name: getattr(args, name) for name in SOLVER_FLAGS if getattr(args, name, None) is not None}
    return Sampling(args.sampler, args.steps, args.spacing, clip_x0=getattr(args, "clip_x0", 1.0) or None,
                    threshold=args.threshold, options=options)


def cmd_sample(args) -> int:
    import torch

    from .accel import autocast, compile_model
    from .compose import DEFAULT_SCALES, Guidance, class_guidance, compose, saturation_warning
    from .data import resolve_class
    from .distributed import current as current_dist, generate_sharded
    from .guidance import ClassifierTerm
    from .images import save_grid, save_npz
    from .interop import check_classifier_schedule
    from .pipeline import load_classifier, load_diffusion, resolve_device
    from .cli_family import check_family_args, family_guidance
    from .similarity.commands import similarity_terms
    from .validation import check_output_file

    out_path = check_output_file(args.out, "--out")  # before any work: a failed run writes nothing
    if args.npz:
        if check_output_file(args.npz, "--npz").resolve() == out_path.resolve():
            raise CondiffError("--npz and --out name the same file")
    if not args.classifier and (args.sharpen or args.scale is not None):
        raise CondiffError(f"{'--sharpen' if args.sharpen else '--scale'} applies to classifier guidance: "
                           "give --classifier")
    device = resolve_device(args.device)
    if args.cfg_w is not None and args.cfg_scale is not None:
        raise CondiffError("give --cfg-w (the article's w) or --cfg-scale (s = 1 + w), not both")
    cfg_w = args.cfg_w if args.cfg_scale is None else args.cfg_scale - 1
    if cfg_w is not None and cfg_w < 0:
        raise CondiffError(f"--cfg-scale must be >= 1 (s = 1 + w), got {args.cfg_scale}")
    check_family_args(args, cfg_w)  # x0-guidance, APG, CFG++, autoguidance (cli_family)
    if args.ckpt is not None and args.diffusers_model is not None:
        raise CondiffError("give --ckpt CKPT or --diffusers-model DIR, not both")
    sampling = _sampling(args).validate()  # unknown options for this solver (--eta with ddpm, ...)
    from .zoo import shipped

    args.use_shipped = args.ckpt is None and args.diffusers_model is None
    if args.use_shipped:  # the models shipped in the package (condiff.zoo): the eps-model and its companions
        args.ckpt = str(shipped("text-diffusion" if args.prompts else "diffusion"))  # --prompt: the text model
    args.classifier = shipped_or(args.classifier, "classifier")
    if args.diffusers_model is not None:
        from .checkpoints import read_config, resolve_checkpoint
        from .interop import load_diffusers

        if args.classes and not args.classifier:
            raise CondiffError("a diffusers UNet2DModel is unconditional: pass --classifier CKPT to guide it to a class")
        model, schedule, config = load_diffusers(args.diffusers_model, device, args.trust_pickle)
        if args.classifier:  # class names come from the classifier that guides it
            config["class_names"] = read_config(resolve_checkpoint(args.classifier, args.trust_pickle)).get(
                "class_names", [])
    else:
        model, schedule, config = load_diffusion(args.ckpt, device, args.trust_pickle)
    model = compile_model(model, args.compile)
    names = config.get("class_names", [])
    shape = tuple(config.get("image_shape", (model.in_channels, model.image_size, model.image_size)))
    prompt_emb = _prompt_condition(args, config, model, device)  # --prompt on a text-conditional model
    if prompt_emb is not None and cfg_w is None and args.cfg_pp is None:
        cfg_w = DEFAULT_SCALES["text-cfg"]  # measured on prompts in training phrasings (docs/text-to-image.md)
    classes = [resolve_class(c, names, len(names) or None) for c in args.classes] if args.classes else []
    how = class_guidance(model, classes=bool(classes) or prompt_emb is not None, cfg_w=cfg_w if args.cfg_pp is None else args.cfg_pp,
                         classifier=bool(args.classifier or args.x0_guidance), unconditional=args.unconditional)
    if args.cfg_pp is not None:  # CFG++'s lambda in place of the CFG weight
        how["cfg_pp"], how["cfg_w"] = how["cfg_w"], None
    if how["cfg_w"] is None and how.get("cfg_pp") is None and \
            (args.cfg_interval is not None or args.cfg_rescale is not None):
        raise CondiffError(f"{'--cfg-interval' if args.cfg_interval is not None else '--cfg-rescale'} applies to "
                           "classifier-free guidance: give --class (and --cfg-w) without --classifier")
    x0_terms, family = family_guidance(args, model, schedule, shape, device)
    terms = []
    if args.classifier:
        clf, clf_config = load_classifier(args.classifier, device, args.trust_pickle)
        mismatch = check_classifier_schedule(schedule, clf_config)
        if mismatch and current_dist().main:
            print(f"condiff sample: warning: {mismatch}", file=sys.stderr)
        scale = DEFAULT_SCALES["classifier"] if args.scale is None else args.scale
        terms.append(ClassifierTerm(clf, None, scale, sharpen=args.sharpen))
    sim_terms, cond = similarity_terms(args, schedule, shape, device)  # --text, --image, --style (eqs 11-15)
    guidance = Guidance(cfg_interval=args.cfg_interval, cfg_rescale=args.cfg_rescale or 0.0,
                        terms=terms + x0_terms + sim_terms, form=args.form, grad_at=args.grad_at, **how, **family)
    eps, shift = compose(model, schedule, guidance, sampling)
    rows = classes or (args.prompts if prompt_emb is not None else [None])
    n = len(rows) * args.n
    y = torch.tensor([c for c in rows for _ in range(args.n)]) if classes else None
    if y is not None:
        cond["y"] = y  # per-row targets travel with their rows: any --batch-size
    if prompt_emb is not None:
        cond["y"] = prompt_emb.repeat_interleave(args.n, 0)  # eq 22's y: E_text(prompt), one grid row per prompt
    with autocast(device, args.bf16):  # batches split across torchrun ranks, gathered on rank 0
        x = generate_sharded(eps, schedule, n, shape=shape, cond=cond or None, mean_shift=shift, seed=args.seed,
                             batch_size=args.batch_size, device=device,
                             progress=not args.no_progress and current_dist().main, **sampling.kwargs())
    if x is None:  # not rank 0: rank 0 writes
        return 0
    warning = saturation_warning(x)
    if warning:
        print(f"condiff sample: warning: {warning}", file=sys.stderr)
    out = save_grid(x, args.out, nrow=args.n)
    print(f"wrote {out}")
    if args.npz:
        print(f"wrote {save_npz(args.npz, x, y if y is not None else None)}")
    return 0


def _prompt_condition(args, config, model, device):
    """--prompt checked against the model and the other flags, then embedded: (rows, D), or None."""
    from .text_cfg import is_text_conditional, prompt_condition

    text_model = is_text_conditional(config)
    if not args.prompts:
        if text_model and args.classes:
            raise CondiffError("this eps-model is text-conditional: give --prompt TEXT instead of --class")
        return None
    if not text_model:
        raise CondiffError("--prompt needs a text-conditional eps-model (condiff train --cond text); this one is "
                           "not (text similarity guidance on it: --text)")
    for flag, given in (("--class", args.classes), ("--classifier", args.classifier), ("--unconditional",
                                                                                      args.unconditional)):
        if given:
            raise CondiffError(f"--prompt does not combine with {flag}")
    return prompt_condition(args.prompts, config, device)


# ----------------------------------------------------------------------------- demo, export
def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    from .pipeline import resolve_device
    from .zoo import shipped

    check_output_dir(args.out)
    device = resolve_device(args.device)
    ckpt = args.ckpt or shipped("diffusion")
    default = args.ckpt is None  # the shipped eps-model: its shipped companions are the defaults

    def companion(given, role):
        if given or not default:
            return given
        try:
            return shipped(role)
        except CondiffError as e:  # a partial install still demos what it has
            print(f"condiff demo: skipping {role} sections: {e}", file=sys.stderr)
            return None

    clf = companion(args.classifier, "classifier")
    text = companion(args.text_encoder, "text-encoder")
    text_cfg = companion(None, "text-diffusion")  # text to image by CFG: with the shipped eps-model only
    if (text is not None and not args.text_encoder) or text_cfg is not None:
        try:
            from .similarity.text import load_text_encoder

            load_text_encoder(device)  # loaded once per device: the demo reuses it
        except CondiffError as e:  # the optional extra condiff[text] is missing
            print(f"condiff demo: skipping text guidance and text to image: {e}", file=sys.stderr)
            text = None if not args.text_encoder else text
            text_cfg = None
    image = companion(args.image_encoder, "image-encoder")
    warn = lambda message: print(f"condiff demo: warning: {message}", file=sys.stderr)  # noqa: E731
    index = run_demo(DemoConfig(diffusion=ckpt, classifier=clf, steps=args.steps, per_class=args.per_class,
                                seed=args.seed, device=device, text_encoder=text, image_encoder=image,
                                text_diffusion=text_cfg,
                                sampler=args.sampler, spacing=args.spacing, threshold=args.threshold, log=warn),
                     args.out, progress=not args.no_progress)
    print(f"wrote {index}")
    return 0


def cmd_export(args) -> int:
    from .zoo import export_model

    check_output_dir(args.out)
    metrics = {key: value.strip() for key, value in args.metrics}
    print(f"wrote {export_model(args.ckpt, args.out, command=args.train_command, metrics=metrics)}")
    return 0


def cmd_serve(args) -> int:
    from .serve.request import load_models

    models = load_models(args.ckpt, args.classifier, args.text_encoder, args.image_encoder, text=not args.no_text,
                         device=args.device)
    for note in models.notes:
        print(f"condiff serve: {note}", file=sys.stderr)
    from .serve.app import serve

    serve(models, args.host, args.port)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .similarity.commands import add_similarity_sample_args, add_train_encoder_parser
    from .cli_family import add_family_sample_args

    from .compose import DEFAULT_CLIP_X0, DEFAULT_SCALES, DEFAULT_STEPS, SCALE_RANGES
    from .demo import DemoConfig
    from .prediction import PREDICTIONS

    parser = OneLineParser(
        prog="condiff", epilog=EPILOG,
        description="Control what a diffusion model generates: classifier guidance, similarity guidance "
                    "and classifier-free guidance, on every solver of condiff.samplers.")
    helpers = CliHelpers(EPILOG, _add_common, _pos_int, nonneg_float, _int_list, _load_data, _train_config,
                         _add_sampler_args)
    parser.add_argument("--version", action="version", version=f"condiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train an eps-model (eq 22), optionally class-conditional with a null class",
                       description="Train an eps-prediction UNet with the loss of eq 22. With --cond class the "
                                   "class is dropped to the learned null phi with probability --p-uncond, so "
                                   "the model serves classifier-free guidance (eq 24) and, through its null "
                                   "branch, classifier and similarity guidance. Resumes from --out.",
                       epilog=EPILOG)
    _add_train_common(p, steps=2000, lr=1e-3, channels="64,96", blocks=1)
    p.add_argument("--cond", choices=["class", "text", "none"], default="class",
                   help="class-conditional with a null class (default); text: conditioned on the MiniLM embedding "
                        "of a random caption with pixel attributes per image per step ('a dark patterned dress', "
                        "condiff.captions; needs condiff[text]), with a learned null embedding, sampled with "
                        "condiff sample --prompt; or unconditional")
    p.add_argument("--p-uncond", type=nonneg_float, default=0.1,
                   help="probability of dropping the class or caption to the null phi (default 0.1)")
    from .captions import VOCABULARIES

    p.add_argument("--captions", choices=list(VOCABULARIES), default=None,
                   help="--cond text: the training caption vocabulary (condiff.captions): basic (default; 3 nouns per "
                        "class, 2 words per attribute value, 4 templates: 10,788 captions) or rich (basic's plus "
                        "6 nouns, 12-14 words and 9 templates more: 20,654; it followed attributes less, "
                        "docs/text-to-image.md); the held-out prompts are the same for both")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="--cond text: start from this class-conditional eps-model (same network but the condition): "
                        "every weight copied, the null embedding from its null class, the caption projection "
                        "fitted to its class embeddings")
    p.add_argument("--sample-every", type=int_range(0), default=0, help="write a sample grid every N steps (0 = never)")
    p.add_argument("--min-snr-gamma", type=nonneg_float, default=None,
                   help="weight the eps-loss by min(SNR, G)/SNR, SNR = abar^2/bbar^2 (Hang et al. 2023; "
                        "5 is usual; default: off); with --prediction v by min(SNR, G)/(SNR+1), x0 by min(SNR, G)")
    p.add_argument("--t-sampling", choices=["uniform", "stratified"], default="uniform",
                   help="t within a batch: i.i.d. uniform (default) or stratified over [0, T)")
    p.add_argument("--prediction", choices=list(PREDICTIONS), default=None,
                   help="what the network learns to predict: eps (eq 22; the default, or with --init what that model "
                        "predicts), v = abar*eps - bbar*x0, or x0; "
                        "stored in the checkpoint and converted to eps when it is loaded, so every sampler and "
                        "guidance works unchanged; --min-snr-gamma weights each target to the same x0 weighting")
    p.add_argument("--attention", action="store_true",
                   help="a self-attention block at the lowest resolution (7x7 for 28-pixel images)")
    p.set_defaults(func=cmd_train, distributed=True)

    p = sub.add_parser("train-classifier", help="train a noise-aware classifier p(y|x_t) for classifier guidance",
                       description="Train a time-conditioned classifier on noisy inputs x_t = abar_t x_0 + "
                                   "bbar_t eps, t uniform in [0, --t-max). Its log reports accuracy in clean, "
                                   "mid and noisy t-ranges.", epilog=EPILOG)
    _add_train_common(p, steps=1000, lr=1e-3, channels="32,64", blocks=1)
    p.add_argument("--t-max", type=_pos_int, default=None, help="train only on t < T_MAX (default T)")
    p.add_argument("--clean", action="store_true",
                   help="a clean classifier p(y|x_0): train on the data itself at t = 0 only, for x0-guidance "
                        "(condiff sample --x0-guidance CKPT)")
    p.set_defaults(func=cmd_train_classifier, distributed=True)

    add_train_encoder_parser(sub, _add_train_common, helpers)  # similarity encoders (eq 15)

    p = sub.add_parser("posthoc-ema", help="average a run's weights with any EMA length, after training (EDM2)",
                       description="Combine the power-function EMA snapshots that `condiff train --ema-profiles` "
                                   "stored in RUN/posthoc-ema into the EMA of relative width --sigma-rel at --step "
                                   "(least squares over the profiles, Karras et al. 2024), written as a "
                                   "checkpoint folder that every command can load.", epilog=EPILOG)
    p.add_argument("--run", required=True, help="run folder trained with --ema-profiles")
    p.add_argument("--sigma-rel", type=_float_list, required=True,
                   help="relative EMA width(s), e.g. 0.08; several give OUT/sigma-0.080 etc.")
    p.add_argument("--step", type=_pos_int, default=None, help="a step with snapshots (default: the last)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.set_defaults(func=cmd_posthoc_ema)

    p = sub.add_parser("sample", help="sample a grid, unguided or guided (classifier, classifier-free)",
                       description="Sample images from an eps-model checkpoint. Classifier guidance: "
                                   "--classifier CKPT --class NAME --scale GAMMA (eqs 6-8, 19). Classifier-free "
                                   "guidance: --class NAME --cfg-w W (eq 24; diffusers' guidance_scale is "
                                   "s = 1 + w, use --cfg-scale S for that convention). Similarity guidance "
                                   "(eqs 11-15): --text, --image/--image-index, --style with their encoders. "
                                   "All combine.",
                       epilog=EPILOG)
    p.add_argument("--ckpt", default=None, help="eps-model checkpoint folder or run folder (default: the shipped "
                                                "Fashion-MNIST model, with the shipped encoders as the defaults of "
                                                "--text-encoder and --image-encoder)")
    p.add_argument("--diffusers-model", default=None, metavar="DIR",
                   help="instead of --ckpt: a local diffusers folder with an unconditional UNet2DModel and its "
                        "scheduler config (epsilon, v_prediction or sample), guided with --classifier; needs condiff[diffusers]")
    p.add_argument("--class", dest="classes", action="append", default=[],
                   help="class name (case-insensitive) or index; repeat for one grid row per class")
    p.add_argument("--prompt", dest="prompts", action="append", default=[],
                   help="a text-conditional eps-model (default: the shipped fashion-text-cfg; condiff train --cond "
                        "text) samples this caption, e.g. 'a dark patterned dress', with classifier-free guidance "
                        f"--cfg-w (eq 24; default {DEFAULT_SCALES['text-cfg']:g}: {SCALE_RANGES['text-cfg']}); "
                        "repeat for one grid row per prompt")
    p.add_argument("--n", "--per-class", dest="n", type=int_range(1, 100_000), default=8,
                   help="samples per class (per grid row; default 8); under torchrun write --per-class, "
                        "since torchrun's own parser rejects --n as ambiguous")
    p.add_argument("--classifier", nargs="?", const=SHIPPED_ARG, default=None, metavar="CKPT",
                   help="noise-aware classifier checkpoint for classifier guidance; the flag alone means the "
                        "shipped Fashion-MNIST classifier")
    p.add_argument("--scale", type=nonneg_float, default=None,
                   help=f"classifier guidance scale gamma (default {DEFAULT_SCALES['classifier']:g}; "
                        f"{SCALE_RANGES['classifier']}); a scale far too large saturates the images, which condiff "
                        "reports as a warning")
    p.add_argument("--form", choices=["score", "mean"], default="score",
                   help="apply gradients as eps - bbar_t*grad (score, eq 19, any sampler; default) "
                        "or as a mean shift mu + sigma_t^2*grad (mean, eq 6, ancestral samplers)")
    p.add_argument("--grad-at", choices=["x_t", "mu"], default="x_t",
                   help="mean form only: gradient at x_t (eq 6, default) or at mu(x_t) (eq 7)")
    p.add_argument("--sharpen", action="store_true",
                   help="use the sharpened classifier softmax(gamma*logits) of eqs 9-10 instead of gamma*grad")
    p.add_argument("--cfg-w", type=nonneg_float, default=None,
                   help="classifier-free weight w of eq 24: (1+w) eps(x,y) - w eps(x,phi); 0 = plain conditional "
                        f"(default {DEFAULT_SCALES['cfg']:g} when a conditional model samples --class without "
                        f"--classifier; {SCALE_RANGES['cfg']})")
    p.add_argument("--cfg-scale", type=finite_float, default=None,
                   help=f"the same in diffusers' convention: guidance_scale s = 1 + w (s >= 1; default "
                        f"{1 + DEFAULT_SCALES['cfg']:g})")
    p.add_argument("--cfg-interval", type=timestep_interval, default=None,
                   help="apply CFG only for timesteps LO<=t<=HI, inside [0, T) (Kynkaanniemi et al. 2024), e.g. 100,800")
    p.add_argument("--cfg-rescale", type=nonneg_float, default=None,
                   help="guidance rescale factor phi in [0,1] (Lin et al. 2023; default 0 = off)")
    p.add_argument("--unconditional", action="store_true",
                   help="sample the null branch of a conditional model (the unconditional model)")
    _add_sampler_args(p, DEFAULT_STEPS)
    p.add_argument("--clip-x0", type=nonneg_float, default=DEFAULT_CLIP_X0,
                   help=f"clamp the predicted x_0 to [-C, C] at every step (default {DEFAULT_CLIP_X0:g}, the data "
                        "range; 0 = off)")
    p.add_argument("--batch-size", type=_pos_int, default=256,
                   help="images per batch; under torchrun whole batches are split across processes (default 256)")
    p.add_argument("--out", default="samples.png", help="output PNG grid (default samples.png)")
    p.add_argument("--npz", default=None, help="also save the samples (uint8) and labels to this .npz")
    p.add_argument("--trust-pickle", action="store_true",
                   help="also read .pt/.pth/.bin state dicts (next to a config.json; diffusers .bin weights), "
                        "with torch.load(weights_only=True): tensors only, never full unpickling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_similarity_sample_args(p)
    add_family_sample_args(p)
    _add_accel(p)
    _add_common(p)
    p.set_defaults(func=cmd_sample, distributed=True)

    p = sub.add_parser("demo", help="every guidance method side by side on the shipped models (index.html)",
                       description="Sample unguided, classifier-guided (several gamma) and classifier-free "
                                   "(several w) grids, plus text/image/style guidance when those models are "
                                   "present, and write index.html + report.md. Uses the models shipped in the "
                                   "package unless checkpoints are given.", epilog=EPILOG)
    p.add_argument("--out", default="demo", help="output folder (default demo/)")
    p.add_argument("--ckpt", default=None, help="eps-model checkpoint (default: shipped)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier (default: shipped)")
    p.add_argument("--text-encoder", default=None, help="text-aligned encoder (default: shipped)")
    p.add_argument("--image-encoder", default=None, help="image encoder for the reference and style grids "
                                                         "(default: shipped)")
    _add_sampler_args(p, DemoConfig.steps, eta_variance=False)  # similarity grids: eta 1 when the solver takes eta
    p.add_argument("--per-class", type=_pos_int, default=6, help="samples per grid row (default 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="copy a run's weights + config into a model folder with a model card",
                       description="Export the newest checkpoint of a run as an inference model folder "
                                   "(config.json, model.safetensors, README.md model card).", epilog=EPILOG)
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--command", dest="train_command", default="",  # not dest=command: that names the subcommand
                   help="the training command, recorded in the model card")
    p.add_argument("--metric", dest="metrics", action="append", default=[], metavar="KEY=VALUE",
                   type=key_value(last=True),  # the last "=": keys like "accuracy at w=2" are common
                   help="a measured result for the card's Measured section; repeat for several "
                        "('wall time=...' replaces the logged wall time)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a local web page: pick guidance, watch the image form (needs condiff[serve])",
                       description="Serve a web page on HOST:PORT (default 127.0.0.1:7860) that samples with any "
                                   "combination of classifier-free, classifier, text, reference-image and style "
                                   "guidance, shows the x0 prediction while denoising, a scale strip, the time "
                                   "taken and the equivalent condiff sample command. Models load once at start: "
                                   "the shipped ones unless --ckpt is given. Needs pip install 'condiff[serve]'.",
                       epilog=EPILOG)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--ckpt", default=None, help="eps-model checkpoint (default: shipped, with its shipped companions)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier (default with the shipped model: shipped)")
    p.add_argument("--text-encoder", default=None, help="text-aligned encoder (default with the shipped model: shipped)")
    p.add_argument("--image-encoder", default=None, help="image encoder for reference and style images "
                                                         "(default with the shipped model: shipped)")
    p.add_argument("--no-text", action="store_true", help="do not load the sentence embedder (text guidance off; "
                                                           "starts about 15 s sooner)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present; default)")
    p.set_defaults(func=cmd_serve)

    from .cli_eval import register as register_eval  # train-judge, evaluate, sweep

    register_eval(sub, helpers)
    return parser


def _reject_swallowed_values(parser: argparse.ArgumentParser, args) -> None:
    """argparse (3.11-3.13) turns ``--flag=--`` into [] without calling the flag's type: one error line."""
    sub = next((a.choices[args.command] for a in parser._actions  # noqa: SLF001 (argparse has no public API)
                if isinstance(a, argparse._SubParsersAction) and args.command in a.choices), None)
    for action in sub._actions if sub is not None else ():  # noqa: SLF001
        value = getattr(args, action.dest, None)
        if action.nargs is None and (type(action) is argparse._StoreAction and value == []  # noqa: SLF001
                                     or type(action) is argparse._AppendAction and [] in (value or [])):  # noqa: SLF001
            sub.error(f"argument {'/'.join(action.option_strings)}: expected one argument")


def _one_line_warning(command: str):
    """``warnings.formatwarning`` for the CLI: one line per library warning.  Formatting, not showing, is
    replaced, so whoever records warnings (``pytest.warns``, ``catch_warnings(record=True)``) still does."""
    def fmt(message, category, filename, lineno, line=None):
        return f"condiff {command}: warning: {one_line(message)}\n"
    return fmt


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _reject_swallowed_values(parser, args)
    try:
        import torch

        torch.manual_seed(getattr(args, "seed", 0))
        from .distributed import launch

        # under torchrun: one process group around the command (NCCL on CUDA, gloo on CPU)
        saved_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning(args.command)
        try:
            with launch(getattr(args, "device", "cpu"), args.command, getattr(args, "distributed", False)):
                return args.func(args)
        finally:
            warnings.formatwarning = saved_format
    except CondiffError as e:
        print(f"condiff {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"condiff {args.command}: error: {one_line(f'{e.strerror or e}: {e.filename}')}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as e:  # a full disk, no memory: one line; anything else is a bug
        message = describe_unexpected(e)
        if message is None:
            raise
        print(f"condiff {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"condiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
