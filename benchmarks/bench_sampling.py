"""Speed and memory of condiff's training loop and samplers, with and without guidance.

Not a test: run by hand, writes docs/benchmarks.md (or --out) naming the machine.

    .venv/bin/python benchmarks/bench_sampling.py            # full: DDIM-50, batch 64 (< 10 min on 2 cores)
    .venv/bin/python benchmarks/bench_sampling.py --quick    # DDIM-10, batch 16, a smoke run

Measured (issues 2, 3, 4, 6):
* training images/s of :func:`condiff.training.train` (eq 22 loss, AdamW, EMA) at batch 128;
* DDIM (eta 0) and ancestral DDPM sampling images/s at batch 64 for: no guidance, classifier guidance (score form, eq 19),
  classifier-free guidance (eq 24, one batched forward of 2B) and text similarity guidance
  (eqs 11-15) when ``condiff.similarity`` provides a sweep builder for it;
* network evaluations per image, time relative to unguided;
* sampler overhead: total time minus the time spent inside network calls (forward, and the
  classifier's backward), as a fraction of the total (goal <= 2%);
* classifier guidance time / unguided against the limit 1 + (classifier fwd+bwd)/(model fwd)
  measured in isolation (goal: within 5%); CFG / unguided (goal <= 2.0);
* peak resident memory;
* when ``diffusers`` is importable: its DDIMScheduler loop on the same eps-model and the same
  initial noise; max |difference| of the samples (goal <= 1e-4) and time ratio (goal <= 1.0).

Models: the shipped ones (or the cfg/ and clf/ runs of --runs DIR), else random weights at the
shipped sizes (UNet channels 64,96, 1 block; EncoderNet 32,64, 1 block; 28x28).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from condiff.checkpoints import load_model  # noqa: E402
from condiff.compose import Guidance, compose  # noqa: E402
from condiff.guidance import ClassifierTerm, NullBranch, scaled_grad  # noqa: E402
from condiff.nets import EncoderNet, UNet  # noqa: E402
from condiff.samplers import noise, sample  # noqa: E402
from condiff.schedule import Schedule, cosine_schedule  # noqa: E402
from condiff.training import DiffusionTask, TrainConfig, train  # noqa: E402


# ----------------------------------------------------------------------------------------- timing
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = [time.perf_counter]


def clock() -> float:
    """The benchmark's clock: wall time, or this process's CPU time (fairer on a shared machine)."""
    return _clock[0]()


class _Mark(torch.autograd.Function):
    """Identity whose backward records the time at which the gradient passes through it."""

    @staticmethod
    def forward(ctx, x, marks):
        ctx.marks = marks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.marks.append(clock())
        return g, None


class Timed(torch.nn.Module):
    """Wraps a network: counts calls and rows, accumulates the seconds spent in its forward and backward."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.reset()

    def reset(self):
        self.calls, self.rows, self.seconds, self._marks = 0, 0, 0.0, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)

    def forward(self, x, *args):
        t0 = clock()
        if torch.is_grad_enabled() and x.requires_grad:  # time the backward pass too
            start, end = [], []
            self._marks.append((start, end))
            out = _Mark.apply(self.net(_Mark.apply(x, end), *args), start)
        else:
            out = self.net(x, *args)
        self.seconds += clock() - t0
        self.calls += 1
        self.rows += x.shape[0]
        return out

    def total_seconds(self) -> float:
        back = sum(e[0] - s[0] for s, e in self._marks if s and e)
        return self.seconds + back


def _time(fn, repeat: int) -> float:
    """Median seconds of fn() over ``repeat`` runs after one warm-up."""
    fn()
    out = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return statistics.median(out)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------- models
def _models(runs: Path | None):
    """(eps-model, classifier, schedule, description): the runs in ``runs`` if given, else the shipped models,
    else random weights at the shipped sizes."""
    from condiff.zoo import shipped

    sources = [("the shipped models (condiff.zoo)", lambda: (shipped("diffusion"), shipped("classifier")))]
    if runs is not None:
        sources.insert(0, (f"trained checkpoints from {runs}/cfg and {runs}/clf", lambda: (runs / "cfg", runs / "clf")))
    for where, paths in sources:
        try:
            model_path, clf_path = paths()
            model, cfg = load_model(model_path)
            clf, _ = load_model(clf_path)
        except Exception:  # noqa: BLE001 - try the next source
            continue
        return model, clf, cosine_schedule(int(cfg["schedule"]["T"])), where
    torch.manual_seed(0)
    model = UNet(1, 28, (64, 96), blocks=1, num_classes=10)
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)  # zero-initialised output: make eps non-trivial
    clf = EncoderNet(1, 28, (32, 64), blocks=1, out_dim=10)
    return model.eval(), clf.eval(), cosine_schedule(1000), "random weights at the shipped sizes"


def _text_method(model, schedule, options: dict):
    """(builder, context) of text guidance from condiff.similarity's sweep builder, or (None, why not)."""
    try:
        from condiff.sweep import SweepContext, get_method

        builder = get_method("text")
        if "text_encoder" not in options:  # default: the shipped text-aligned encoder
            from condiff.zoo import shipped

            options = dict(options, text_encoder=str(shipped("text-encoder")))
        return builder, SweepContext(model, schedule, (1, 28, 28), [str(i) for i in range(10)], "cpu", options)
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _time_terms(terms) -> list:
    """Wrap every network a guidance term holds (classifier, encoders) in Timed; returns the wrappers."""
    timed = []
    for term in terms:
        for attr, value in list(vars(term).items()):
            if isinstance(value, torch.nn.Module) and not isinstance(value, Timed):
                wrapped = Timed(value)
                wrapped.label = f"{attr} fwd+bwd"
                setattr(term, attr, wrapped)
                timed.append(wrapped)
    return timed


# ----------------------------------------------------------------------------------------- benchmarks
def bench_training(model, schedule, batch: int, steps: int) -> float:
    """Images/s of condiff.training.train (eq 22 loss, backward, AdamW, EMA) on Fashion-MNIST or noise."""
    from condiff.data import ImageDataset, load_fashion_mnist

    try:
        data = load_fashion_mnist(None, "train").subset(batch * (steps + 2), 0)
    except Exception:  # noqa: BLE001
        g = torch.Generator().manual_seed(0)
        data = ImageDataset(torch.rand(batch * (steps + 2), 1, 28, 28, generator=g) * 2 - 1,
                            torch.randint(0, 10, (batch * (steps + 2),), generator=g), [str(i) for i in range(10)])
    net = UNet(**{k: v for k, v in model.config.items() if k != "kind"})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=1, batch_size=batch, log_every=1, ckpt_every=10**6)
        train(net, DiffusionTask(schedule), data, cfg, tmp, progress=False)  # warm-up, then time from step 1
        cfg = TrainConfig(steps=steps + 1, batch_size=batch, log_every=steps + 1, ckpt_every=10**6)
        t0 = clock()
        train(net, DiffusionTask(schedule), data, cfg, tmp, progress=False)
        dt = clock() - t0
    return batch * steps / dt


def bench_sampling(name, eps, x_T, schedule, steps, cond, timed, gen_seed=0, variance="ddim"):
    for t in timed:
        t.reset()
    g = torch.Generator().manual_seed(gen_seed)
    t0 = clock()
    x = sample(eps, x_T.clone(), schedule, steps, cond=cond, generator=g, variance=variance)
    total = clock() - t0
    net = sum(t.total_seconds() for t in timed)
    evals = {t.label: t.rows / x_T.shape[0] for t in timed}
    return {"name": name, "seconds": total, "images_per_s": x_T.shape[0] / total, "network_seconds": net,
            "overhead": (total - net) / total, "evals": evals, "x": x}


def bench_diffusers(model, x_T, schedule, steps, cond):
    """Our DDIM vs diffusers' DDIMScheduler loop on the same eps-model and noise."""
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    import diffusers

    T = schedule.T
    sched = DDIMScheduler(num_train_timesteps=T, trained_betas=schedule.betas().float().numpy(),
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                          prediction_type="epsilon")
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    ours_schedule = Schedule.from_alphas_cumprod(sched.alphas_cumprod)  # the one conversion point

    timed = Timed(model)

    def run_diffusers():
        x = x_T.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                e = timed(x, t.expand(x.shape[0]).long(), cond)
                x = sched.step(e, t, x, eta=0.0).prev_sample
        return x

    def run_ours():
        return sample(timed, x_T.clone(), ours_schedule, ts, cond=cond)

    t_d, t_o, o_d, o_o = [], [], [], []
    for _ in range(2):  # alternate to share the machine's load fairly
        for fn, wall, loop in ((run_diffusers, t_d, o_d), (run_ours, t_o, o_o)):
            timed.reset()
            t0 = clock()
            x = fn()
            wall.append(clock() - t0)
            loop.append(wall[-1] - timed.total_seconds())
            if fn is run_diffusers:
                xd = x
            else:
                xo = x
    return {"version": diffusers.__version__, "max_abs_diff": float((xd - xo).abs().max()),
            "ours_s": min(t_o), "diffusers_s": min(t_d), "ratio": min(t_o) / min(t_d), "timesteps": len(ts),
            "ours_loop_ms": 1e3 * min(o_o), "diffusers_loop_ms": 1e3 * min(o_d)}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg": os.getloadavg()}


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="DDIM-10, batch 16, 2 training steps: a smoke run")
    p.add_argument("--runs", default=None, help="folder with trained cfg/ and clf/ runs (default: the shipped models)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown report to write")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time (default), or this process's CPU time: on a machine shared with other jobs, "
                        "CPU time measures this process's work without the time the scheduler gave to others")
    p.add_argument("--rounds", type=int, default=0,
                   help="round-robin repetitions of the sampling runs, fastest kept (default 2; 1 with --quick)")
    p.add_argument("--text-option", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   help="KEY=VALUE for the text-guidance sweep builder (e.g. its encoder checkpoints)")
    p.add_argument("--note", default="", help="conditions to state in the report (e.g. other jobs running)")
    args = p.parse_args(argv)
    batch, steps, train_steps, repeat = (16, 10, 2, 3) if args.quick else (64, 50, 6, 10)
    rounds = args.rounds or (1 if args.quick else 2)
    _clock[0] = CLOCKS[args.clock]
    torch.manual_seed(0)
    started = time.time()
    info = machine()
    model, clf, schedule, source = _models(Path(args.runs) if args.runs else None)
    model.eval().requires_grad_(False)
    clf.eval().requires_grad_(False)
    print(f"models: {source}; machine: {info}", flush=True)

    train_ips = bench_training(model, schedule, 128 if not args.quick else 32, train_steps)
    print(f"training: {train_ips:.1f} images/s", flush=True)
    rss = {"after training": _rss_mib()}

    tm = Timed(model)
    tm.label = "eps"
    y = torch.arange(batch) % 10
    x_T = noise((batch, 1, 28, 28), torch.Generator().manual_seed(1))

    # isolated costs for the classifier-guidance limit
    t_b = torch.full((batch,), schedule.T // 2, dtype=torch.long)
    with torch.no_grad():
        model_fwd = _time(lambda: model(x_T, t_b, None), repeat)
    term = ClassifierTerm(clf, y, 1.0)
    clf_fb = _time(lambda: scaled_grad(term.objective, x_T, t_b, 1.0), repeat)
    with torch.no_grad():
        model_fwd2 = _time(lambda: model(torch.cat([x_T, x_T]), torch.cat([t_b, t_b]), torch.cat([y, y])), repeat)

    clf_terms = [ClassifierTerm(clf, None, 2.0)]  # each row's class: cond["y"]
    configs = [("none", compose(tm, schedule, Guidance(unconditional=True)).model, None, [tm]),
               ("classifier (eq 19)", compose(tm, schedule, Guidance(unconditional=True, terms=clf_terms)).model,
                {"y": y}, [tm] + _time_terms(clf_terms)),
               ("CFG (eq 24)", compose(tm, schedule, Guidance(cfg_w=2.0)).model, {"y": y}, [tm])]
    builder, ctx = _text_method(tm, schedule, dict(args.text_option))
    text_note = ""
    if builder is not None:
        try:
            builder(ctx, 1.0, y)  # loads the encoder into ctx.cache; the term calls it through a closure,
            enc, emb = ctx.cache["text"]  # so time it by wrapping the cached encoder and building again
            timed_enc = Timed(enc)
            timed_enc.label = "text encoder fwd+bwd"
            ctx.cache["text"] = (timed_enc, emb)
            guidance_t, cond_t = builder(ctx, 1.0, y)  # per-row prompt targets: cond_t["text"]
            configs.append(("text (eqs 11-15)", compose(tm, schedule, guidance_t).model, cond_t,
                            [tm, timed_enc] + _time_terms(guidance_t.terms)))
        except Exception as e:  # noqa: BLE001
            text_note = f"Text guidance not measured: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        text_note = f"Text guidance not measured ({ctx})."
    best = {}
    samplers = ("ddim", "ddpm")  # DDIM (eta 0) and ancestral DDPM (posterior variance): same network calls
    for _ in range(rounds):  # round-robin, fastest of the rounds: load spikes of a shared machine drop out
        for variance in samplers:
            for name, eps, cond, timed in configs:
                r = bench_sampling(name, eps, x_T, schedule, steps, cond, timed, variance=variance)
                r["sampler"] = variance.upper()
                if (variance, name) not in best or r["seconds"] < best[variance, name]["seconds"]:
                    best[variance, name] = r
    all_runs = [best[v, c[0]] for v in samplers for c in configs]
    runs = [best["ddim", c[0]] for c in configs]  # the ratios and limits below: DDIM
    rss["after sampling"] = _rss_mib()
    for r in all_runs:
        r["ratio"] = r["seconds"] / best[r["sampler"].lower(), configs[0][0]]["seconds"]
        print(f"{r['sampler']} {r['name']}: {r['images_per_s']:.2f} images/s, x{r['ratio']:.2f}, "
              f"overhead {100 * r['overhead']:.2f}%, evals {r['evals']}", flush=True)
    limit = 1 + clf_fb / model_fwd
    cg = runs[1]["ratio"]
    dif = bench_diffusers(NullBranch(model), x_T, schedule, steps, None)
    rss["end"] = _rss_mib()
    elapsed = time.time() - started

    lines = ["# Benchmarks", "",
             f"Written by `benchmarks/bench_sampling.py{' --quick' if args.quick else ''}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s).", "",
             f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} with {info['torch_threads']} "
             f"threads (OMP_NUM_THREADS={info['OMP_NUM_THREADS']}); Python {info['python']}; load average at start "
             f"{info['load_avg'][0]:.2f}.", "",
             f"Models: {source} (eps-model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"classifier {sum(p.numel() for p in clf.parameters()) / 1e6:.2f}M). Sampling: DDIM (eta 0) and ancestral "
             f"DDPM (posterior variance), {steps} steps, "
             f"batch {batch}, float32, CPU; each configuration run {rounds} times round-robin, the fastest kept. "
             f"Clock: {'wall time' if args.clock == 'wall' else 'CPU time of the benchmark process (time.process_time): every time, rate and ratio below is per CPU-second'}.",
             ""]
    if args.note:
        lines += [f"Conditions: {args.note}", ""]
    lines += [f"Training ({'batch 128' if not args.quick else 'batch 32'}, `condiff.training.train`, eq 22 "
              f"loss + AdamW + EMA): **{train_ips:.1f} images/s**.", "",
              "| sampler | guidance | images/s | time / unguided | network evaluations per image | sampler overhead |",
              "|---|---|---:|---:|---|---:|"]
    for r in all_runs:
        ev = ", ".join(f"{v:.0f} {k}" for k, v in r["evals"].items())
        lines.append(f"| {r['sampler']} | {r['name']} | {r['images_per_s']:.2f} | {r['ratio']:.3f} | {ev} | "
                     f"{100 * r['overhead']:.2f}% |")
    lines += ["", "Sampler overhead = (total - time inside network calls) / total; for classifier guidance the "
                  "classifier's backward pass counts as network time. Goal <= 2%.", "",
              f"Classifier guidance: time / unguided = {cg:.3f}; limit 1 + (classifier fwd+bwd {1e3 * clf_fb:.1f} ms) "
              f"/ (model fwd {1e3 * model_fwd:.1f} ms) = {limit:.3f}; ratio to the limit {cg / limit:.3f} "
              f"(goal within 5%: {'met' if abs(cg / limit - 1) <= 0.05 else 'NOT met'}).", "",
              f"Classifier-free guidance: time / unguided = {runs[2]['ratio']:.3f} (goal <= 2.0: "
              f"{'met' if runs[2]['ratio'] <= 2.0 else 'NOT met'}); one batched forward of 2B costs "
              f"{model_fwd2 / model_fwd:.2f}x a forward of B.", ""]
    if text_note:
        lines += [text_note, ""]
    if dif is None:
        lines += ["diffusers is not installed: no comparison (pip install 'condiff[diffusers]').", ""]
    else:
        lines += [f"diffusers {dif['version']} DDIMScheduler (eta 0, same eps-model, same x_T, its {dif['timesteps']} "
                  f"'leading' timesteps, schedule converted with `Schedule.from_alphas_cumprod`): max |ours - "
                  f"diffusers| = {dif['max_abs_diff']:.2e} (goal <= 1e-4: "
                  f"{'met' if dif['max_abs_diff'] <= 1e-4 else 'NOT met'}); time ours {dif['ours_s']:.2f} s, "
                  f"diffusers {dif['diffusers_s']:.2f} s, ratio {dif['ratio']:.3f} (goal <= 1.0: "
                  f"{'met' if dif['ratio'] <= 1.0 else 'NOT met'}; best of 2 alternating runs). Time outside the network "
                  f"calls, i.e. the loops themselves: ours {dif['ours_loop_ms']:.1f} ms, diffusers "
                  f"{dif['diffusers_loop_ms']:.1f} ms.", ""]
    lines += ["Peak resident memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) + ".", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
