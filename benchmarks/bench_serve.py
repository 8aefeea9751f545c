"""Latency and memory of ``condiff serve`` over HTTP on 127.0.0.1 (docs/serve.md).

Not a test: starts ``python -m condiff serve --no-text`` on a free local port (one torch thread
unless --threads), then measures

* the server's start time (launch to the first answered page);
* time to first preview: from the request to the first streamed x0 prediction, one client;
* time per request with 1, 4 and 8 concurrent clients (each request queued; one runs at a time);
* the server's CPU seconds per request (less sensitive to a busy machine than wall time);
* the server's peak resident memory (VmHWM).

    .venv/bin/python benchmarks/bench_serve.py                 # CFG Sneaker, 8 images, DDIM-25
    .venv/bin/python benchmarks/bench_serve.py --steps 10 --n 4 --clients 1,4

Traffic goes to 127.0.0.1 only; the request loops are bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, data: list) -> tuple[float | None, float]:
    """One generate request: (seconds to the first x0 preview, seconds to the result)."""
    t0 = time.perf_counter()
    post = urllib.request.Request(base + "/gradio_api/call/generate", json.dumps({"data": data}).encode(),
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as r:
        event_id = json.load(r)["event_id"]
    first, event = None, None
    with urllib.request.urlopen(f"{base}/gradio_api/call/generate/{event_id}", timeout=600) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                if event == "generating" and first is None and json.loads(line[5:])[1] is not None:
                    first = time.perf_counter() - t0
                elif event == "complete":
                    return first, time.perf_counter() - t0
                elif event == "error":
                    raise RuntimeError(line)
    raise RuntimeError("the event stream ended without a result")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="images per request (default 8)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    ap.add_argument("--strip", action="store_true", help="also make the scale strip (4 scales x 4 seeds)")
    ap.add_argument("--clients", default="1,4,8", help="concurrent clients to measure (default 1,4,8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "condiff", "serve", "--no-text", "--device", "cpu", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise SystemExit("condiff serve did not start")
                time.sleep(0.2)
        print(f"server start: {time.perf_counter() - t0:.1f} s; request: CFG Sneaker w=2, {args.n} images, "
              f"DDIM-{args.steps}, strip {'on' if args.strip else 'off'}; server threads {args.threads}")

        def data(seed):
            return [["cfg"], "Sneaker", "", None, None, 2.0, 4.0, 100.0, 100.0, 10.0, "ddim", args.steps, 0.0, seed,
                    args.n, args.strip]

        call(base, data(999))  # warm-up (first-call costs of the server and the model)
        for k in [int(c) for c in args.clients.split(",")]:
            results, threads = [None] * k, []
            for i in range(k):
                def client(i=i):
                    results[i] = call(base, data(i))
                threads.append(threading.Thread(target=client))
            t, cpu = time.perf_counter(), cpu_seconds(proc.pid)
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall, cpu = time.perf_counter() - t, cpu_seconds(proc.pid) - cpu
            firsts = sorted(r[0] for r in results)
            totals = sorted(r[1] for r in results)
            print(f"{k} concurrent client(s): all done in {wall:.2f} s; per request {totals[0]:.2f} s fastest, "
                  f"{sum(totals) / k:.2f} s mean, {totals[-1]:.2f} s slowest; first preview "
                  f"{firsts[0]:.2f} s (first served) to {firsts[-1]:.2f} s (last queued); server CPU "
                  f"{cpu / k:.2f} s per request; load average {os.getloadavg()[0]:.1f}")
        print(f"server peak memory (VmHWM): {peak_rss_mib(proc.pid):.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
