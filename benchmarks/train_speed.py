"""Seconds per training step of the shipped eps-model's architecture under each speed-relevant lever.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_speed.py --steps 6
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_speed.py --variants base,channels_last
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_speed.py --variants base,two_threads --repeats 3  # idle machine

Each variant trains the Fashion-MNIST UNet (channels 64,96, blocks 1, batch 128) for --steps
steps in a temporary run folder through :func:`condiff.training.train`, and reports the median
wall time of the steps after the first (the log's images_per_s, one record per step). The
numbers go to docs/training.md; on a shared machine repeat them, the median is the estimate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from condiff.data import load_dataset
from condiff.nets import UNet
from condiff.schedule import make_schedule
from condiff.training import DiffusionTask, TrainConfig, train

VARIANTS = {
    "base": ({}, {}, {}),
    "channels_last": ({"channels_last": True}, {}, {}),
    "min_snr+stratified": ({}, {"min_snr_gamma": 5.0, "t_sampling": "stratified"}, {}),
    "ema_profiles": ({"ema_profiles": (0.05, 0.1)}, {}, {}),
    "attention": ({}, {}, {"attention": True}),
    "v2 recipe": ({"ema_profiles": (0.05, 0.1), "lr_schedule": "cosine"},
                  {"min_snr_gamma": 5.0, "t_sampling": "stratified"}, {}),
    "two_threads": ({}, {}, {}),  # the "both cores" lever: the base variant on THREADS["two_threads"] threads
}
#: variants that run on another number of intra-op threads than the process's (torch.set_num_threads)
THREADS = {"two_threads": 2}


def seconds_per_step(data, variant: str, steps: int, batch: int) -> tuple[float, int]:
    cfg_kw, task_kw, net_kw = VARIANTS[variant]
    torch.manual_seed(0)
    net = UNet(channels=(64, 96), blocks=1, num_classes=10, **net_kw)
    schedule = make_schedule("cosine", 1000)
    cfg = TrainConfig(steps=steps, batch_size=batch, log_every=1, ckpt_every=10**6, **cfg_kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS.get(variant, threads))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(net, DiffusionTask(schedule, 0.1, **task_kw), data, cfg, tmp, progress=False)
            log = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    finally:
        torch.set_num_threads(threads)
    per_step = [batch / r["images_per_s"] for r in log[1:]]  # the first step warms up allocators
    return statistics.median(per_step), sum(p.numel() for p in net.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the variants (interleaved: a shared "
                    "machine's load then hits every variant alike); the table gives each round and the median")
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    data = load_dataset(args.data, "train")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}, "
          f"median of {args.steps - 1} steps")
    variants = args.variants.split(",")
    got: dict = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            s, n = seconds_per_step(data, v, args.steps, args.batch_size)
            got[v].append(s)
            print(f"round {r + 1}: {v:20s} {s:6.3f} s/step  ({n / 1e6:.2f}M parameters)", flush=True)
    for v in variants:
        print(f"{v:20s} median {statistics.median(got[v]):6.3f} s/step over {args.repeats} round(s): "
              f"{', '.join(f'{s:.3f}' for s in got[v])}")


if __name__ == "__main__":
    main()
