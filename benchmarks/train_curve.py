"""FID_fm against training CPU-minutes, old recipe against new, from the intermediate snapshots of runs.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_curve.py \\
        --run "v1 (old recipe)=/work/runs/ablation/v1/run" --run "v2=/work/runs/ablation/v2/run" \\
        --posthoc-run "v2, 1500 steps, post-hoc EMA 0.05=/work/runs/cfg-v2" --out /work/runs/curve

Each ``--run LABEL=DIR`` contributes a point per checkpoint kept in DIR/checkpoints (train with
``--keep`` large); each ``--posthoc-run LABEL=DIR`` a point per post-hoc EMA snapshot
DIR/posthoc-ema/step-N/sigma-S (S = --sigma, default 0.050), both loadable checkpoint folders. A point
at step N sits at N's training CPU-minutes: the run's cumulative wall_s at step N (metrics.jsonl,
linear between log records; it counts resumed runs' time too) times --threads (or that run's
--threads-of), over 60. Wall time
on a shared machine is CPU time only while the run has its thread to itself, so the x-axis is an
upper bound of the CPU the run used.

Every point is scored like benchmarks/train_eval.py (its :func:`score`): CFG at w = --w (default 2),
DDIM-25, --n balanced samples (default 250), seed 0, the shipped judge. Each point's score is cached in
OUT/points.json, so rerunning after a run has gone on scores only the new snapshots. Writes
OUT/curve.json and the plot (--png, default docs/training/fid-vs-cpu-minutes.png), drawn with
:mod:`condiff.plots`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from condiff.errors import CondiffError  # noqa: E402
from condiff.training import list_snapshots  # noqa: E402
from train_ablation import cached_scores, read_metrics  # noqa: E402

_REPO = Path(__file__).resolve().parent.parent


def cpu_minutes_at(records: list[dict], step: int, threads: int = 1) -> float:
    """CPU-minutes spent up to ``step``: cumulative wall_s (linear between log records, 0 at step 0) x threads / 60."""
    pts = [(0, 0.0)] + sorted((int(r["step"]), float(r["wall_s"])) for r in records)
    for (s0, w0), (s1, w1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            wall = w0 if s1 == s0 else w0 + (w1 - w0) * (step - s0) / (s1 - s0)
            return wall * threads / 60.0
    raise CondiffError(f"step {step} lies beyond the metrics log (last logged step {pts[-1][0]})")


def snapshots(run: Path, posthoc_sigma: float | None) -> list[tuple[int, Path]]:
    """(step, checkpoint folder) of a run's kept checkpoints, or of its post-hoc EMA snapshots of one width."""
    if posthoc_sigma is None:
        ckdir = Path(run) / "checkpoints"
        found = [(int(p.name.split("-")[1]), p) for p in (ckdir.iterdir() if ckdir.is_dir() else ())
                 if p.name.startswith("step-") and (p / "model.safetensors").is_file()
                 and (p / "config.json").is_file()]
    else:
        found = [(step, p) for step, s, p in list_snapshots(run) if abs(s - posthoc_sigma) < 5e-4]
    if not found:
        what = f"post-hoc EMA snapshots of sigma {posthoc_sigma:.3f}" if posthoc_sigma else "checkpoints"
        raise CondiffError(f"{run}: no {what}")
    return sorted(found)


def curve_points(label: str, run: Path, posthoc_sigma: float | None, threads: int) -> list[dict]:
    """The points of one run, unscored: label, step, cpu_minutes, path."""
    recs = read_metrics(run)
    return [{"label": label, "step": step, "cpu_minutes": round(cpu_minutes_at(recs, step, threads), 3),
             "path": str(path)} for step, path in snapshots(run, posthoc_sigma)]


def point_key(point: dict, w: float, n: int, steps: int, seed: int) -> str:
    """Cache key of one point's score: its snapshot folder and the evaluation protocol."""
    return f"{point['path']}|w={w:g}|n={n}|ddim-{steps}|seed={seed}"


def plot(points: list[dict], path: Path, w: float, n: int, floor: float | None = None) -> Path:
    """FID_fm against CPU-minutes, one line per label (and the real-data floor, dashed)."""
    from condiff.plots import Panel, Series, save_panels

    labels = list(dict.fromkeys(p["label"] for p in points))
    series = []
    for label in labels:
        ps = sorted((p for p in points if p["label"] == label), key=lambda p: p["cpu_minutes"])
        series.append(Series([p["cpu_minutes"] for p in ps], [p["fid_fm"] for p in ps], label=label))
    if floor is not None and points:
        xs = [p["cpu_minutes"] for p in points]
        series.append(Series([min(xs), max(xs)], [floor, floor], label="real data", dashed=True))
    panel = Panel(f"FID_fm (w = {w:g}, {n} samples) against training CPU-minutes", "training CPU-minutes",
                  "FID_fm", series)
    return save_panels([panel], path, size=(720, 420))


def _spec(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {text!r}")
    return label, Path(path)


def _threads_spec(text: str) -> tuple[str, int]:
    label, sep, n = text.partition("=")
    if not sep or not label or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected LABEL=N with N a whole number of threads >= 1, got {text!r}")
    return label, int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=_spec, action="append", default=[], help="LABEL=DIR: a run's kept checkpoints")
    ap.add_argument("--posthoc-run", type=_spec, action="append", default=[],
                    help="LABEL=DIR: a run's post-hoc EMA snapshots of width --sigma")
    ap.add_argument("--sigma", type=float, default=0.05, help="post-hoc EMA width of --posthoc-run (default 0.05)")
    ap.add_argument("--threads", type=int, default=1, help="threads each run trained on (default 1)")
    ap.add_argument("--threads-of", type=_threads_spec, action="append", default=[], metavar="LABEL=N",
                    help="threads the run LABEL trained on, where not --threads (e.g. a two-thread release)")
    ap.add_argument("--w", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=250)
    ap.add_argument("--sampler-steps", type=int, default=25)
    ap.add_argument("--judge", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for points.json (the cache) and curve.json")
    ap.add_argument("--png", default=str(_REPO / "docs" / "training" / "fid-vs-cpu-minutes.png"))
    args = ap.parse_args()
    try:
        threads = dict(args.threads_of)
        points = [p for label, run in args.run for p in curve_points(label, run, None, threads.get(label, args.threads))]
        points += [p for label, run in args.posthoc_run
                   for p in curve_points(label, run, args.sigma, threads.get(label, args.threads))]
    except CondiffError as e:
        ap.exit(2, f"error: {e}\n")
    if not points:
        ap.exit(2, "error: give at least one --run or --posthoc-run\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = {}

    def compute(key):
        if not ev:
            from condiff.sweep import sweep_labels
            from train_eval import make_evaluator, score, sweep_context
            evaluator, shape, num_classes = make_evaluator(args.judge, args.seed)
            ev.update(evaluator=evaluator, shape=shape, labels=sweep_labels(args.n, list(range(num_classes))),
                      score=score, ctx=sweep_context)
        p = by_key[key]
        r = ev["score"](ev["ctx"](p["path"], ev["shape"]), ev["evaluator"], ev["labels"], args.w,
                        steps=args.sampler_steps, seed=args.seed)
        print(f"{p['label']} step {p['step']} ({p['cpu_minutes']:.1f} CPU-min): FID_fm {r['fid_fm']:.2f}, "
              f"judge acc {r['judge_accuracy']:.3f} ({r['seconds']:.0f} s)", flush=True)
        return r

    by_key = {point_key(p, args.w, args.n, args.sampler_steps, args.seed): p for p in points}
    scores = cached_scores(out / "points.json", list(by_key), compute)
    for key, p in by_key.items():
        p.update(fid_fm=scores[key]["fid_fm"], judge_accuracy=scores[key]["judge_accuracy"])
    floor = next(iter(scores.values()))["fid_fm_floor"]
    settings = {**vars(args), "run": [[lb, str(r)] for lb, r in args.run],
                "posthoc_run": [[lb, str(r)] for lb, r in args.posthoc_run],
                "threads_of": [list(spec) for spec in args.threads_of]}
    (out / "curve.json").write_text(json.dumps({"settings": settings,
                                                "fid_fm_floor": floor, "points": points}, indent=1))
    png = plot(points, Path(args.png), args.w, args.n, floor)
    print("| run | step | CPU-min | FID_fm | judge acc |\n|---|---:|---:|---:|---:|")
    for p in points:
        print(f"| {p['label']} | {p['step']} | {p['cpu_minutes']:.1f} | {p['fid_fm']:.2f} | {p['judge_accuracy']:.3f} |")
    print(f"wrote {out / 'curve.json'} and {png}")


if __name__ == "__main__":
    main()
