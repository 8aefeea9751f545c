"""Issue 17's ablation of the training recipe: one row per lever, every row at the same CPU budget.

    # the eight quality rows, one after the other on one thread (about 20 minutes a row here)
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_ablation.py --out /work/runs/ablation
    # some rows; the speed-only rows train --speed-steps steps and report s/step only
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_ablation.py --out runs/abl --rows v1,v2+channels-last

**A reduced budget.** Every row trains the shipped eps-model's network (channels 64,96, blocks 1,
batch 128, one thread) for --steps steps (default 500), not the 1500 to 3600 steps of a shipped
model: a full-length row takes 30-70 minutes of a CPU thread plus its evaluation, and the table needs
six of them on a 2-core machine shared with the release training. The ranking of levers at 500
steps need not hold at 1500 (a lever that helps late, such as the cosine decay's end, is judged
on a shorter decay); the table says which lever helps at this budget, docs/training.md's
full-length run says what the whole recipe does at the shipped budget.

Rows (``ROWS``): ``v1``, the recipe of the shipped model (lr 1e-3, 100 warm-up steps, EMA 0.999,
p-uncond 0.1, constant lr); ``v2`` = v1 + min-SNR-5 + stratified t + cosine decay; ``v2-no-min-snr``,
``v2-no-stratified``, ``v2-no-cosine`` (v2 less one lever); ``v2+attention``; ``v2+v-target`` and
``v2+x0-target`` (v2 with the network trained to predict v = abar_t eps - bbar_t x_0 or x_0, its
min-SNR-5 weight the same x_0 weighting; :mod:`condiff.prediction`). Speed-only rows
(``v2+channels-last``, ``v2+2-threads``) train --speed-steps steps and give s/step only; they are
run only when named in --rows (two threads slow every other process on the machine).

Each row trains with ``condiff train`` in OUT/ROW/run (resumable: a cut-off row continues from its
last checkpoint; a finished row is not retrained), then its last checkpoint (classic EMA) is scored
with benchmarks/train_eval.py's :func:`score`: DDIM-25, balanced classes, seed 0, --n samples, FID_fm
and judge accuracy at w = 0 and at each of --scales; the best w is the one of lowest FID_fm. Each
score is cached in OUT/ROW/eval.json (keyed by the settings and the checkpoint), so a rerun only
does what is missing. s/step is the median over the run's log windows (metrics.jsonl, the first
window left out: it holds the start-up) of batch / images_per_s. Writes OUT/results.json and
OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from condiff.checkpoints import latest_checkpoint  # noqa: E402
from condiff.errors import CondiffError  # noqa: E402

#: The v1 recipe (the shipped fashion-cfg's), less the budget flags (steps, batch, network, warm-up).
V1_FLAGS = ("--lr", "1e-3", "--ema-decay", "0.999", "--p-uncond", "0.1", "--seed", "0")
#: Recipe v2's three levers, each a list of ``condiff train`` flags.
LEVERS = {"min-snr": ("--min-snr-gamma", "5"), "stratified": ("--t-sampling", "stratified"),
          "cosine": ("--lr-schedule", "cosine")}
V2 = tuple(LEVERS)


@dataclass(frozen=True)
class Row:
    """One row of the table: the v1 recipe plus ``levers`` and ``extra`` flags, on ``threads`` threads."""

    name: str
    levers: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    threads: int = 1
    speed_only: bool = False
    what: str = ""


ROWS = {r.name: r for r in [
    Row("v1", (), what="the shipped model's recipe"),
    Row("v2", V2, what="v1 + min-SNR-5 + stratified t + cosine decay"),
    Row("v2-no-min-snr", ("stratified", "cosine"), what="v2 without min-SNR weighting"),
    Row("v2-no-stratified", ("min-snr", "cosine"), what="v2 with i.i.d. uniform t"),
    Row("v2-no-cosine", ("min-snr", "stratified"), what="v2 with a constant lr"),
    Row("v2+attention", V2, ("--attention",), what="v2 + self-attention at 7x7"),
    Row("v2+v-target", V2, ("--prediction", "v"), what="v2, the network predicts v"),
    Row("v2+x0-target", V2, ("--prediction", "x0"), what="v2, the network predicts x0"),
    Row("v2+channels-last", V2, ("--channels-last",), speed_only=True, what="v2, NHWC layout (speed only)"),
    Row("v2+2-threads", V2, threads=2, speed_only=True, what="v2 on two threads (speed only)"),
]}
QUALITY_ROWS = [n for n, r in ROWS.items() if not r.speed_only]


@dataclass(frozen=True)
class Budget:
    """What every row shares: steps, batch, network, warm-up, checkpointing, data."""

    steps: int = 500
    speed_steps: int = 50
    batch_size: int = 128
    channels: str = "64,96"
    blocks: int = 1
    warmup: int = 100
    ckpt_every: int = 100
    keep: int = 100
    log_every: int = 10
    limit: int | None = None
    data: str | None = None


def row_flags(row: Row, budget: Budget) -> list[str]:
    """The ``condiff train`` flags of ``row`` (without --out): the budget's, v1's, then the levers'."""
    unknown = [lv for lv in row.levers if lv not in LEVERS]
    if unknown:
        raise CondiffError(f"row {row.name}: unknown lever(s) {', '.join(unknown)}")
    steps = budget.speed_steps if row.speed_only else budget.steps
    flags = ["--steps", str(steps), "--batch-size", str(budget.batch_size), "--channels", budget.channels,
             "--blocks", str(budget.blocks), "--warmup", str(min(budget.warmup, steps)), *V1_FLAGS]
    for lever in row.levers:
        flags += LEVERS[lever]
    flags += list(row.extra)
    flags += ["--ckpt-every", str(budget.ckpt_every), "--keep", str(budget.keep),
              "--log-every", str(budget.log_every), "--device", "cpu", "--no-progress"]
    if budget.limit:
        flags += ["--limit", str(budget.limit)]
    if budget.data:
        flags += ["--data", budget.data]
    return flags


def select_rows(spec: str | None) -> list[Row]:
    """Rows named in a comma-separated ``spec`` (default: every quality row), in the order given."""
    names = [n.strip() for n in spec.split(",") if n.strip()] if spec else QUALITY_ROWS
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise CondiffError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    return [ROWS[n] for n in names]


def read_metrics(run: Path) -> list[dict]:
    """The records of ``run/metrics.jsonl`` (a partial last line, from a kill, is skipped)."""
    path = Path(run) / "metrics.jsonl"
    recs = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return recs


def seconds_per_step(records: list[dict], batch_size: int) -> float | None:
    """Median over log windows of batch / images_per_s, the first window (start-up) left out."""
    vals = [batch_size / r["images_per_s"] for r in records[1:] if r.get("images_per_s")]
    return statistics.median(vals) if vals else None


def run_step(run: Path) -> int:
    """The step of the run's newest complete checkpoint (0 when none)."""
    ck = latest_checkpoint(run)
    return int(ck.name.split("-")[1]) if ck else 0


def train_row(row: Row, budget: Budget, run: Path) -> Path:
    """Train (or resume) ``row`` in ``run`` unless its last checkpoint is already at the row's steps."""
    steps = budget.speed_steps if row.speed_only else budget.steps
    flags, stamp = row_flags(row, budget), run.parent / "flags.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != flags:
        raise CondiffError(f"{run.parent} holds row {row.name} trained with other flags; use another --out")
    run.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(flags))
    if run_step(run) < steps:
        env = {**os.environ, "OMP_NUM_THREADS": str(row.threads), "MKL_NUM_THREADS": str(row.threads)}
        cmd = [sys.executable, "-m", "condiff", "train", "--out", str(run), *flags]
        print(f"[{row.name}] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, env=env, check=True)
    if run_step(run) < steps:
        raise CondiffError(f"row {row.name}: training stopped before step {steps}; rerun to resume")
    return latest_checkpoint(run)


def eval_key(ckpt: Path, w: float, n: int, sampler_steps: int, seed: int) -> str:
    """The cache key of one score: the checkpoint, w, and the evaluation protocol."""
    return f"{ckpt.name}|w={w:g}|n={n}|ddim-{sampler_steps}|seed={seed}"


def cached_scores(path: Path, keys: list[str], compute) -> dict:
    """``{key: compute(key)}``, reading and extending the JSON cache at ``path`` (written after each key)."""
    cache = json.loads(path.read_text()) if path.is_file() else {}
    for key in keys:
        if key not in cache:
            cache[key] = compute(key)
            path.write_text(json.dumps(cache, indent=1))
    return {k: cache[k] for k in keys}


def summarize(name: str, scores: dict[float, dict], s_step: float | None, steps: int, threads: int) -> dict:
    """One table row from the scores by w: FID_fm at w = 0, the best w among the others and its scores."""
    row = {"row": name, "steps": steps, "threads": threads, "s_per_step": s_step,
           "fid_w0": scores[0.0]["fid_fm"] if 0.0 in scores else None,
           "judge_w0": scores[0.0]["judge_accuracy"] if 0.0 in scores else None,
           "scores": {f"{w:g}": v for w, v in sorted(scores.items())}}
    guided = {w: v for w, v in scores.items() if w != 0.0}
    if guided:
        best = min(guided, key=lambda w: guided[w]["fid_fm"])
        row.update(best_w=best, fid_best=guided[best]["fid_fm"], judge_best=guided[best]["judge_accuracy"])
    return row


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict], n: int | None = None, sampler_steps: int = 25) -> str:
    """The ablation table (markdown): one line per row of :func:`summarize`."""
    lines = ["| row | what | steps | FID_fm w = 0 | best w | FID_fm best w | judge acc (best w) | s/step | threads |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        what = ROWS[r["row"]].what if r["row"] in ROWS else ""
        lines.append(f"| {r['row']} | {what} | {r['steps']} | {_fmt(r.get('fid_w0'), '.2f')} | {_fmt(r.get('best_w'), 'g')} | "
                     f"{_fmt(r.get('fid_best'), '.2f')} | {_fmt(r.get('judge_best'), '.3f')} | "
                     f"{_fmt(r.get('s_per_step'), '.3f')} | {r['threads']} |")
    if n:
        lines.append(f"\n{n} samples per setting, DDIM-{sampler_steps} (eta 0), balanced classes, seed 0; judge accuracy "
                     "at the best w (lowest FID_fm among w > 0).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder: one subfolder per row, results.json, table.md")
    ap.add_argument("--rows", default=None, help=f"comma-separated rows, in order (default: {','.join(QUALITY_ROWS)}); "
                    f"all rows: {','.join(ROWS)}")
    b = Budget()
    ap.add_argument("--steps", type=int, default=b.steps, help="training steps of every quality row: a REDUCED "
                    f"budget (default {b.steps}, about 10 minutes of one idle thread; the shipped model takes "
                    "1500-3600), so that six rows fit a shared 2-core machine")
    ap.add_argument("--speed-steps", type=int, default=b.speed_steps, help="steps of a speed-only row")
    ap.add_argument("--batch-size", type=int, default=b.batch_size)
    ap.add_argument("--channels", default=b.channels)
    ap.add_argument("--blocks", type=int, default=b.blocks)
    ap.add_argument("--warmup", type=int, default=b.warmup)
    ap.add_argument("--ckpt-every", type=int, default=b.ckpt_every)
    ap.add_argument("--keep", type=int, default=b.keep, help=f"checkpoints kept per row (default {b.keep}: all of them at the default budget, so "
                    "that benchmarks/train_curve.py can score the intermediate ones)")
    ap.add_argument("--log-every", type=int, default=b.log_every)
    ap.add_argument("--limit", type=int, default=None, help="train on the first N images only (tests)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--n", type=int, default=500, help="samples per evaluated setting (default 500)")
    ap.add_argument("--sampler-steps", type=int, default=25, help="DDIM steps of the evaluation (default 25)")
    ap.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",") if v], default=[1.0, 2.0, 3.0],
                    help="guidance weights w > 0 among which the best is taken (default 1,2,3); w = 0 always")
    ap.add_argument("--judge", default=None)
    ap.add_argument("--seed", type=int, default=0, help="the evaluation's seed")
    args = ap.parse_args()
    try:
        run_ablation(args)
    except CondiffError as e:
        ap.exit(2, f"error: {e}\n")
    except subprocess.CalledProcessError as e:
        ap.exit(1, f"error: condiff train failed (exit {e.returncode}); rerun to resume\n")


def run_ablation(args) -> None:
    """Train, score and tabulate the rows of ``args`` (see the module docstring)."""
    rows = select_rows(args.rows)
    budget = Budget(args.steps, args.speed_steps, args.batch_size, args.channels, args.blocks, args.warmup,
                    args.ckpt_every, args.keep, args.log_every, args.limit, args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scales = [0.0] + [w for w in args.scales if w != 0.0]
    ev = None
    results = json.loads((out / "results.json").read_text())["rows"] if (out / "results.json").is_file() else []
    for row in rows:
        run = out / row.name / "run"
        ckpt = train_row(row, budget, run)
        s_step = seconds_per_step(read_metrics(run), budget.batch_size)
        scores: dict[float, dict] = {}
        if not row.speed_only:
            if ev is None:
                import torch

                from condiff.sweep import sweep_labels
                from train_eval import make_evaluator, score, sweep_context
                torch.set_num_threads(row.threads)
                evaluator, shape, num_classes = make_evaluator(args.judge, args.seed)
                labels = sweep_labels(args.n, list(range(num_classes)))
                ev = (evaluator, shape, labels, score, sweep_context)
            evaluator, shape, labels, score, sweep_context = ev
            ctx = sweep_context(ckpt, shape)
            keys = {eval_key(ckpt, w, args.n, args.sampler_steps, args.seed): w for w in scales}

            def compute(key, ctx=ctx, keys=keys, name=row.name):
                r = score(ctx, evaluator, labels, keys[key], steps=args.sampler_steps, seed=args.seed)
                print(f"[{name}] w = {keys[key]:g}: FID_fm {r['fid_fm']:.2f}, judge acc {r['judge_accuracy']:.3f} "
                      f"({r['seconds']:.0f} s)", flush=True)
                return r

            got = cached_scores(out / row.name / "eval.json", list(keys), compute)
            scores = {keys[k]: v for k, v in got.items()}
        steps = budget.speed_steps if row.speed_only else budget.steps
        summary = summarize(row.name, scores, s_step, steps, row.threads)
        summary.update(flags=row_flags(row, budget), checkpoint=str(ckpt), n=None if row.speed_only else args.n)
        results = [r for r in results if r["row"] != row.name] + [summary]
        order = {n: i for i, n in enumerate(ROWS)}
        results.sort(key=lambda r: order.get(r["row"], len(order)))
        (out / "results.json").write_text(json.dumps({"settings": vars(args), "rows": results}, indent=1))
        (out / "table.md").write_text(markdown_table(results, args.n, args.sampler_steps))
        print(markdown_table([summary]), flush=True)
    print(markdown_table(results, args.n, args.sampler_steps))


if __name__ == "__main__":
    main()
