"""Score a training run's eps-models by FID_fm and judge accuracy: checkpoints, post-hoc EMA widths, baselines.

    # choose the post-hoc EMA width of a run (small sample sets, w = 2 only)
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_eval.py --run /work/runs/cfg-v2 \\
        --sigma-rel 0.03,0.05,0.08,0.1,0.13 --classic --n 250 --scales 2 --out runs/cfg-v2-eval/ema
    # measure chosen models side by side: CFG at w = 0 and 2, and the null branch with DDIM eta = 1
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_eval.py --ckpt shipped=src/condiff/models/fashion-cfg \\
        --ckpt v2=runs/cfg-v2-eval/ema/sigma-0.080 --n 500 --scales 0,2 --null --out runs/cfg-v2-eval/final

Every model gets the same evaluation as ``condiff sweep`` / benchmarks/results.sh: DDIM-25 (eta 0) with
classifier-free guidance of weight w (eq 24) for balanced class labels, the same initial noise for
every model and scale (seed 0), scored by :class:`condiff.evaluation.Evaluator` with the shipped judge
(FID_fm against every held-out image; judge accuracy against the intended labels). ``--null`` adds the
model's unconditional null branch (phi of eq 24) sampled with DDIM eta = 1 (as the similarity sweeps
do), scored against all classes. Post-hoc EMA candidates (``--sigma-rel``) are rebuilt from the run's
snapshots with :func:`condiff.training.save_posthoc_ema` and kept under OUT as checkpoint folders.
Prints a markdown table; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from condiff.checkpoints import latest_checkpoint
from condiff.compose import Guidance, Sampling
from condiff.evaluation import Evaluator, load_judge, load_real_data
from condiff.pipeline import load_diffusion
from condiff.sweep import SweepContext, get_method, sample_at_scale, sweep_labels
from condiff.training import save_posthoc_ema


def _null_method(ctx, scale, labels):
    """The unconditional null branch eps(x_t, phi, t): no condition, no guidance."""
    return Guidance(unconditional=True), {"y": labels}


def make_evaluator(judge=None, seed: int = 0) -> tuple[Evaluator, tuple, int]:
    """The shipped judge (or ``judge``) and its held-out data: (evaluator, image shape, number of classes)."""
    model, jconf = load_judge(judge)
    shape = tuple(jconf.get("image_shape") or (1, 28, 28))
    evaluator = Evaluator(model, *load_real_data(jconf.get("data"), shape), jconf.get("class_names"), seed=seed)
    return evaluator, shape, model.num_classes


def sweep_context(path, shape) -> SweepContext:
    """A diffusion checkpoint folder, loaded for :func:`score`."""
    model, schedule, config = load_diffusion(path)
    return SweepContext(model, schedule, shape, config.get("class_names") or [])


def score(ctx: SweepContext, evaluator: Evaluator, labels: torch.Tensor, w: float = 0.0, *, null: bool = False,
          steps: int = 25, seed: int = 0) -> dict:
    """FID_fm and judge accuracy of DDIM-``steps`` samples for ``labels``: CFG of weight ``w`` (eq 24, eta 0),
    or the null branch (phi of eq 24, eta 1). Returns fid_fm, judge_accuracy, fid_fm_floor, seconds."""
    t0 = time.time()
    builder = _null_method if null else get_method("cfg")
    sampling = Sampling(sampler="ddim", steps=steps, options={"eta": 1.0 if null else 0.0})
    with torch.no_grad():
        x = sample_at_scale(ctx, builder, 0.0 if null else w, labels, sampling=sampling, seed=seed)
    r = evaluator.evaluate(x, labels)
    return {"fid_fm": r["fid_fm"], "judge_accuracy": r["judge_accuracy"], "fid_fm_floor": r["fid_fm_floor"],
            "seconds": round(time.time() - t0, 1)}


def candidates(args, out: Path) -> list[tuple[str, Path]]:
    found = []
    for spec in args.ckpt:
        name, _, path = spec.partition("=")
        found.append((name, Path(path)))
    if args.run:
        if args.classic:
            found.append(("classic EMA 0.999", latest_checkpoint(args.run)))
        for s in args.sigma_rel:
            dest = out / f"sigma-{s:.3f}"
            if not (dest / "model.safetensors").is_file():
                save_posthoc_ema(args.run, s, dest, args.step)
            found.append((f"post-hoc sigma_rel {s:.3f}", dest))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run folder trained with --ema-profiles")
    ap.add_argument("--sigma-rel", type=lambda s: [float(v) for v in s.split(",") if v], default=[])
    ap.add_argument("--step", type=int, default=None, help="the run's step for post-hoc EMA (default: last)")
    ap.add_argument("--classic", action="store_true", help="also the run's last checkpoint (classic EMA)")
    ap.add_argument("--ckpt", action="append", default=[], help="NAME=PATH of another model (repeatable)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",") if v], default=[0.0, 2.0])
    ap.add_argument("--null", action="store_true", help="also the null branch with DDIM eta = 1")
    ap.add_argument("--judge", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator, shape, num_classes = make_evaluator(args.judge, args.seed)
    labels = sweep_labels(args.n, list(range(num_classes)))
    rows = []
    settings = [(False, w) for w in args.scales] + ([(True, 0.0)] if args.null else [])
    print("| model | setting | FID_fm | judge acc | s |\n|---|---|---:|---:|---:|", flush=True)
    for name, path in candidates(args, out):
        ctx = sweep_context(path, shape)
        for null, w in settings:
            r = score(ctx, evaluator, labels, w, null=null, steps=args.steps, seed=args.seed)
            setting = "null branch, eta 1" if null else f"w = {w:g}"
            row = {"model": name, "path": str(path), "setting": setting, "n": args.n, "steps": args.steps, **r}
            rows.append(row)
            print(f"| {name} | {setting} | {row['fid_fm']:.2f} | {row['judge_accuracy']:.3f} | {row['seconds']:.0f} |",
                  flush=True)
            (out / "results.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print(f"real-data floor of FID_fm at n = {args.n}: {rows[-1]['fid_fm_floor']:.2f}" if rows else "nothing to do")


if __name__ == "__main__":
    main()
