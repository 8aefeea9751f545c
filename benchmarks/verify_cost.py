"""What verifying SHA256SUMS on load costs for the shipped models.

Not a test: run by hand.  For each shipped model folder: the bytes hashed, the time of
``verify_folder`` alone (cold: the folder not seen before in this process), and the
time of ``load_model`` with and without the check (the check switched off by hand
here only, to measure it; condiff has no such switch).  Medians of ``--repeat`` runs.

    .venv/bin/python benchmarks/verify_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import condiff.integrity as integrity
from condiff.checkpoints import load_model
from condiff.zoo import SHIPPED, shipped


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        integrity._VERIFIED.clear()  # cold: as in a fresh `condiff` process
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    real = integrity.verify_folder
    print(f"{'model':24} {'MB':>6} {'verify ms':>10} {'load ms':>9} {'load, no check ms':>18} {'share':>6}")
    total = [0.0, 0.0, 0.0]
    for role in SHIPPED:
        folder = shipped(role)
        mb = sum(p.stat().st_size for p in folder.iterdir() if p.name != "README.md") / 1e6
        verify = _median(lambda: real(folder), args.repeat)
        load = _median(lambda: load_model(folder), args.repeat)
        integrity.verify_folder = lambda f: True  # measurement only: the load without hashing
        try:
            bare = _median(lambda: load_model(folder), args.repeat)
        finally:
            integrity.verify_folder = real
        for i, v in enumerate((verify, load, bare)):
            total[i] += v
        print(f"{folder.name:24} {mb:6.2f} {verify * 1e3:10.1f} {load * 1e3:9.1f} {bare * 1e3:18.1f} "
              f"{verify / load:6.0%}")
    print(f"{'all five':24} {'':6} {total[0] * 1e3:10.1f} {total[1] * 1e3:9.1f} {total[2] * 1e3:18.1f} "
          f"{total[0] / total[1]:6.0%}")


if __name__ == "__main__":
    main()
