"""Issue 16, goal 3: the time per image of unguided sampling, plain CFG (w = 1) and CFG on an interval (w = 2),
measured side by side in one run.

The table of ``benchmarks/guidance_table.py`` times each row on its own, at a different moment of a shared
machine; this script times the three settings in one process, one thread, in interleaved batches (the order
rotates every repetition), so a change of the machine's load hits all three alike.  Each batch is timed by
wall clock and by the process's CPU time (the CPU time is what an idle machine would take; the load of other
jobs inflates only the wall clock).  It prints the seconds per image and each row's ratio to unguided
sampling (per repetition, then the median and the min-max spread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_timing.py                # ~1-2 CPU-minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_timing.py --reps 5 --batch 50

The rows are the table's own (:func:`guidance_table.default_rows`: same sweep builders, DDIM-25, eta 0, the
same interval), sampled by :func:`condiff.sweep.sample_at_scale`, as ``condiff sweep`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guidance_table as gt  # noqa: E402  (also puts src/ on the path)

from condiff.errors import CondiffError  # noqa: E402

ROWS = ("unguided", "cfg-1", "cfgi-2")  # the goal's three settings, as the table's rows


def time_rows(ctx, rows, sampling, reps: int, batch: int, seed: int = 0):
    """{row id: [(wall s/image, CPU s/image) per repetition]}: one batch of each row per repetition, the order
    rotated each time; one warm-up batch of each row first (not counted)."""
    from condiff.sweep import get_method, sample_at_scale, sweep_labels

    labels = sweep_labels(batch, list(range(len(ctx.class_names))))

    def one(row, n, s):
        t0, c0 = time.perf_counter(), time.process_time()
        sample_at_scale(dataclasses.replace(ctx, options=dict(row.options)), get_method(row.method), row.scale,
                        labels[:n], sampling=sampling, seed=s, batch_size=n)
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

    for row in rows:  # warm-up: allocator, first-call overheads
        one(row, min(batch, 10), seed)
    out = {r.id: [] for r in rows}
    for k in range(reps):
        order = rows[k % len(rows):] + rows[:k % len(rows)]
        for row in order:
            out[row.id].append(one(row, batch, seed + 1 + k))
    return out


def report(times: dict, labels: dict, base: str = "unguided") -> tuple[str, dict]:
    """The markdown table (s/image, ratio to ``base``: median and spread over repetitions) and its numbers."""
    lines = ["| row | wall s / image (median) | CPU s / image (median) | wall ratio to unguided: median (min-max) "
             "| CPU ratio to unguided: median (min-max) |", "|---|---:|---:|---:|---:|"]
    numbers = {}
    for rid, ts in times.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        rw = [w / b for w, (b, _) in zip(walls, times[base])]  # per repetition: the same moment's unguided batch
        rc = [c / b for c, (_, b) in zip(cpus, times[base])]
        numbers[rid] = {"wall": statistics.median(walls), "cpu": statistics.median(cpus),
                        "wall_ratio": statistics.median(rw), "wall_ratio_range": [min(rw), max(rw)],
                        "cpu_ratio": statistics.median(rc), "cpu_ratio_range": [min(rc), max(rc)]}
        n = numbers[rid]
        lines.append(f"| {labels[rid]} | {n['wall']:.3f} | {n['cpu']:.3f} | {n['wall_ratio']:.2f} "
                     f"({min(rw):.2f}-{max(rw):.2f}) | {n['cpu_ratio']:.2f} ({min(rc):.2f}-{max(rc):.2f}) |")
    return "\n".join(lines), numbers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions of the three interleaved batches (default 3)")
    p.add_argument("--batch", type=int, default=25, help="images per batch (default 25)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--interval", default=f"{gt.INTERVAL[0]},{gt.INTERVAL[1]}")
    p.add_argument("--ckpt", default=None, help="the eps-model (default src/condiff/models/fashion-cfg)")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    args = p.parse_args(argv)
    try:
        if args.reps < 1 or args.batch < 1:
            raise CondiffError("--reps and --batch must be at least 1")
        torch.set_num_threads(1)
        from condiff.checkpoints import resolve_checkpoint
        from condiff.compose import Sampling
        from condiff.pipeline import load_diffusion
        from condiff.sweep import SweepContext

        ckpt = Path(args.ckpt) if args.ckpt else gt.MODELS / gt.ROLES["model"][0]
        if not ckpt.exists():
            raise CondiffError(f"the model {ckpt} is missing: pass --ckpt")
        model, schedule, config = load_diffusion(str(resolve_checkpoint(ckpt)))
        ctx = SweepContext(model, schedule, tuple(config["image_shape"]), config.get("class_names"), "cpu")
        by_id = {r.id: r for r in gt.default_rows(tuple(int(v) for v in args.interval.split(",")))}
        rows = [by_id[i] for i in ROWS]
        sampling = Sampling("ddim", args.steps, options={"eta": 0.0})
        c0 = time.process_time()
        times = time_rows(ctx, rows, sampling, args.reps, args.batch)
        md, numbers = report(times, {r.id: r.label for r in rows})
    except CondiffError as e:
        print(f"guidance_timing: error: {e}", file=sys.stderr)
        return 2
    print(f"`benchmarks/guidance_timing.py --reps {args.reps} --batch {args.batch}` on "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: DDIM-{args.steps}, eta 0, one thread, "
          f"{args.reps} repetitions of {args.batch} images per row, interleaved; {time.process_time() - c0:.0f} CPU s "
          "in all.\n")
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": numbers, "raw": times}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
