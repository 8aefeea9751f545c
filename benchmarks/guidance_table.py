"""Issue 16's measured table: the CFG family, the article's noise-aware guidance and x0-guidance on clean
networks, side by side on the shipped models, from one command.

Not a test: run by hand (or in the background) once the shipped models are in place:

    .venv/bin/python benchmarks/guidance_table.py --estimate          # time every row on a few images, print the total
    .venv/bin/python benchmarks/guidance_table.py --jobs 2            # the table: --n 500, --n-goal 1000 (goal rows)
    .venv/bin/python benchmarks/guidance_table.py --report            # re-render from the cached rows only

Every row is one :func:`condiff.sweep.run_sweep` call (one method, one scale) through the sweep builders of
:mod:`condiff.sweep` / :mod:`condiff.sweep_family`, so a row is what ``condiff sweep --method M`` samples.
Same solver and NFE for every row: DDIM with 25 steps (``--steps``), eta 0 for the CFG family
(deterministic, as docs/results.md) and eta 1 for gradient guidance (``--eta-grad``; the stochastic step
corrects the gradients' errors, docs/similarity.md: the library's "auto" solver is stochastic there too);
seed 0 (the same x_T in every row, paired samples), classes balanced.  Goal rows get ``--n-goal`` samples.

Outputs under ``--out`` (default runs/guidance-table): ``rows/ID/`` the sweep folder of each row (samples,
cached: a rerun with the same settings and model weights only re-scores), ``grids/ID.png`` (4 samples of
each class, one row per class), ``results.json``, ``table.md`` (the table, the four goals checked with
their numbers, the recommended defaults: paste into docs/guidance-family.md).  ``--docs DIR`` copies the
grids there as well.

Network calls per image are counted, not computed: global forward hooks on condiff's networks count every
row of every forward (the eps-model, the weak model of autoguidance, the guiding classifier or encoder; the
judge is not counted), and a hook on each output that requires a gradient counts the backward pass
through that network.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from condiff.errors import CondiffError  # noqa: E402

MODELS = ROOT / "src" / "condiff" / "models"
ACC_GOAL = 0.95  # goals 2 and 3: "at equal judge accuracy (>= 95%)"
ACC_CLEAN = 0.90  # goal 1: a training-free clean-classifier variant reaches >= 90% judge accuracy
TIME_CLEAN = 3.0  # goal 1: ... at no more than 3x the time per image of noise-aware classifier guidance
TIME_INTERVAL = 1.5  # goal 3: CFG with an interval at no more than 1.5x the time of unguided sampling
MATCH_TOL = 0.05  # goal 3: "matches" = FID_fm within 5% of plain CFG's best
INTERVAL = (420, 880)  # DDIM-25 on T = 1000: the steps 874 ... 458, 11 of 25 (1.44x the calls of unguided)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a sweep method at one scale with its options.

    ``family`` groups the rows whose best setting becomes a method's default; ``grad`` rows are sampled
    with ``--eta-grad``, the others with ``--eta-cfg``; ``goal`` rows get ``--n-goal`` samples.
    ``models`` maps an option key to the model role whose checkpoint it takes (added at run time).
    """

    id: str
    family: str
    method: str
    scale: float
    options: tuple = ()
    models: tuple = ()
    grad: bool = False
    goal: bool = False
    label: str = ""

    def setting(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.scale:g}" + (f" ({opts})" if opts else "")


def _shown(path: str) -> str:
    """A model path as the docs show it: relative to the checkout when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def default_rows(interval: tuple[int, int] = INTERVAL) -> list[Row]:
    """The issue's rows, with the few scales each goal needs (21 rows: ~30 min in 2 lanes at --n 500 --n-goal 1000,
    from --estimate on 2026-11-30 for 24 rows: 3835 CPU s of sampling + ~200 CPU s of scoring; four were dropped
    to fit the release's evaluation: APG w = 4 without rescale, CFG++ lambda = 0.4, eps fixed at gamma = 16, and
    E2 at gamma = 300).  Five were added after small-n explorations (docs/guidance-family.md): APG w = 1 and 1.5,
    the combination autoguidance w = 1 with CFG w = 1, and x0-guidance with TFG's smoothing, with and without
    weight abar (goals 1 and 2)."""
    iv = f"{interval[0]},{interval[1]}"
    clean = (("classifier", "clean-classifier"),)
    rows = [Row("unguided", "unguided", "cfg", 0.0, label="unguided (conditional model, w = 0)")]
    rows += [Row(f"cfg-{w:g}", "cfg", "cfg", w, goal=True, label=f"CFG w = {w:g}") for w in (1.0, 2.0, 3.0)]
    rows += [Row(f"cfgi-{w:g}", "cfg-interval", "cfg-interval", w, (("interval", iv),), goal=True,
                 label=f"CFG w = {w:g}, interval t in [{iv}]") for w in (2.0, 3.0, 5.0)]
    rows += [Row(f"apg-{w:g}", "apg", "apg", w, goal=True, label=f"APG w = {w:g} (eta 0)") for w in (1.0, 1.5, 2.0)]
    rows += [Row("apg-4-m", "apg", "apg", 4.0, (("momentum", "-0.5"), ("rescale", "4")), goal=True,
                 label="APG w = 4 (eta 0, rescale 4, momentum -0.5)")]
    rows += [Row(f"cfgpp-{lam:g}", "cfg++", "cfg++", lam, label=f"CFG++ lambda = {lam:g}") for lam in (0.6,)]
    rows += [Row(f"ag-{w:g}", "autoguide", "autoguide", w, models=(("weak", "weak"),), goal=True,
                 label=f"autoguidance w = {w:g}") for w in (1.0, 2.0, 3.0)]
    rows += [Row(f"agc-{w:g}-{c:g}", "autoguide+cfg", "autoguide", w, (("cfg_w", f"{c:g}"),), (("weak", "weak"),),
                 goal=True, label=f"combination: autoguidance w = {w:g} with CFG w = {c:g}") for w, c in ((1.0, 1.0),)]
    rows += [Row("clf-16", "classifier", "classifier", 16.0, models=(("classifier", "classifier"),), grad=True,
                 label="noise-aware classifier gamma = 16 (the article)")]
    for g in (16.0, 64.0):
        rows.append(Row(f"x0m-{g:g}", "x0-classifier model", "x0-classifier", g, models=clean, grad=True, goal=True,
                        label=f"clean classifier on x0, through the eps-model, gamma = {g:g}"))
    for g in (64.0,):
        rows.append(Row(f"x0f-{g:g}", "x0-classifier fixed", "x0-classifier", g,
                        (("path", "fixed"), ("weight", "abar")), clean, grad=True, goal=True,
                        label=f"clean classifier on x0, eps fixed (weight abar), gamma = {g:g}"))
    rows.append(Row("x0m-16-k2", "x0-classifier model k2", "x0-classifier", 16.0, (("recurrence", "2"),), clean,
                    grad=True, goal=True, label="clean classifier on x0, through the eps-model, gamma = 16, recurrence 2"))
    for g, rho in ((16.0, 0.5),):
        rows.append(Row(f"x0m-{g:g}-s{rho:g}", "x0-classifier model smoothed", "x0-classifier", g,
                        (("samples", "4"), ("smoothing", f"{rho:g}")), clean, grad=True, goal=True,
                        label=f"clean classifier on x0, through the eps-model, gamma = {g:g}, smoothing rho {rho:g} "
                              "(4 draws)"))
    rows.append(Row("x0m-32-s0.5-a", "x0-classifier model smoothed abar", "x0-classifier", 32.0,
                    (("samples", "4"), ("smoothing", "0.5"), ("weight", "abar")), clean, grad=True, goal=True,
                    label="clean classifier on x0, through the eps-model, gamma = 32 x abar_t, smoothing rho 0.5 "
                          "(4 draws)"))
    rows.append(Row("x0f-64-k2", "x0-classifier fixed k2", "x0-classifier", 64.0,
                    (("path", "fixed"), ("recurrence", "2"), ("weight", "abar")), clean, grad=True, goal=True,
                    label="clean classifier on x0, eps fixed (weight abar), gamma = 64, recurrence 2"))
    enc = (("image_encoder", "image-encoder"),)
    rows.append(Row("e1-100", "image E1", "image", 100.0, models=enc, grad=True,
                    label="image similarity, noise-aware E1(x_t), gamma = 100 (the article)"))
    for g in (100.0,):
        rows.append(Row(f"e2-{g:g}", "image E2 on x0", "x0-image", g, models=enc, grad=True,
                        label=f"image similarity, clean E2 on x0 (through the eps-model), gamma = {g:g}"))
    return rows


# ------------------------------------------------------------------------------------------- models
ROLES = {"model": ("fashion-cfg", "--ckpt"), "classifier": ("fashion-classifier", "--classifier"),
         "clean-classifier": ("fashion-clean-classifier", "--clean-classifier"), "weak": ("fashion-cfg-weak", "--weak"),
         "image-encoder": ("fashion-image-encoder", "--image-encoder"), "judge": ("fashion-judge", "--judge")}


def resolve_models(args, rows: list[Row]) -> dict[str, str]:
    """The checkpoint of every model role the rows need (flags, else the shipped folders); one line if absent."""
    from condiff.checkpoints import resolve_checkpoint

    needed = {"model", "judge"} | {role for r in rows for _, role in r.models}
    out = {}
    for role in sorted(needed):
        folder, flag = ROLES[role]
        given = getattr(args, role.replace("-", "_"))
        path = Path(given) if given else MODELS / folder
        if not path.exists():
            raise CondiffError(f"the {role} model {path} is missing: pass {flag} CKPT (or --skip-missing to drop "
                               f"its rows)")
        out[role] = str(resolve_checkpoint(path))
    return out


def fingerprint(ckpt: str) -> str:
    """A short hash of a checkpoint's weights: cached samples of a retrained model are not reused."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        p = Path(ckpt) / name
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------- call counts
class CallCounter:
    """Counts forward and backward passes of condiff's networks by role, per image row.

    A global forward hook sees every module call; only the outermost call of a condiff network counts
    (``net(x)`` inside another network's forward is part of that call).  ``role_of(module)`` names it
    ("eps", "weak", "guide"; None: not counted, e.g. the judge).  A forward whose output requires a
    gradient gets a hook on that output: it counts the backward pass through the network when autograd
    reaches it.
    """

    def __init__(self, role_of):
        self.role_of = role_of
        self.counts: dict[str, int] = {}
        self.depth = 0
        self.active = False
        self._handles = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _add(self, key: str, rows: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + rows

    def _is_net(self, module) -> bool:
        return type(module).__module__.startswith("condiff.nets") and hasattr(module, "in_channels")

    def _pre(self, module, inputs):
        if self._is_net(module):
            self.depth += 1

    def _post(self, module, inputs, output):
        if not self._is_net(module):
            return
        self.depth -= 1
        role = self.role_of(module) if self.active and self.depth == 0 else None
        if role is None or not isinstance(output, torch.Tensor):
            return
        rows = int(output.shape[0])
        self._add(role, rows)
        if output.requires_grad:
            output.register_hook(lambda g, role=role, rows=rows: self._add(role + "_backward", rows))

    @contextlib.contextmanager
    def counting(self):
        self.counts, self.active, self.depth = {}, True, 0
        try:
            yield self.counts
        finally:
            self.active = False

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


def per_image(counts: dict, n: int) -> dict:
    """Calls per image from totals: each role's forwards and backwards, and ``total`` (all passes)."""
    out = {k: v / n for k, v in sorted(counts.items())}
    out["total"] = sum(counts.values()) / n
    return out


def calls_text(calls: dict) -> str:
    """'eps 25+25b, guide 25+25b': forwards (+ backwards) of each network per image."""
    parts = []
    for role in ("eps", "weak", "guide"):
        f, b = calls.get(role, 0), calls.get(role + "_backward", 0)
        if f or b:
            parts.append(f"{role} {f:g}" + (f"+{b:g}b" if b else ""))
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------- one row
class Lane:
    """One worker: the eps-model, the evaluator and the networks the builders load (shared cache)."""

    def __init__(self, models: dict, steps: int, eta_cfg: float, eta_grad: float, seed: int, batch_size: int,
                 device="cpu", ctx=None, evaluator=None):
        from condiff.compose import Sampling

        self.models, self.seed, self.batch_size = models, seed, batch_size
        self.sampling = {False: Sampling("ddim", steps, options={"eta": eta_cfg}),
                         True: Sampling("ddim", steps, options={"eta": eta_grad})}
        if ctx is None:
            ctx, evaluator = _load(models, seed, device)
        self.base, self.evaluator = ctx, evaluator
        self.counter = CallCounter(self._role_of)
        self.counter.__enter__()

    def close(self) -> None:
        """Remove the counting hooks (a lane in a longer-lived process, e.g. a test)."""
        self.counter.__exit__(None, None, None)

    def _role_of(self, module):
        from condiff.nets import JudgeNet

        if module is self.base.model:
            return "eps"
        if module is self.base.cache.get("weak"):
            return "weak"
        return None if isinstance(module, JudgeNet) else "guide"

    def context(self, row: Row):
        options = dict(row.options)
        options.update({key: self.models[role] for key, role in row.models})
        return dataclasses.replace(self.base, options=options)  # the cache dict is shared: networks load once

    def key(self, row: Row, n: int) -> str:
        """Everything that decides a row's samples, model weights included."""
        fp = {role: fingerprint(self.models[role]) for role in ["model", *(r for _, r in row.models)]}
        s = self.sampling[row.grad]
        what = {k: v for k, v in dataclasses.asdict(row).items() if k != "label"}
        return json.dumps({"row": what, "n": n, "sampling": s.config(), "seed": self.seed,
                           "models": fp}, sort_keys=True)

    def run(self, row: Row, n: int, out: Path) -> dict:
        """Sample (or reuse) and score one row with :func:`condiff.sweep.run_sweep`; its table entry."""
        from condiff.sweep import run_sweep

        folder = out / "rows" / row.id
        key = self.key(row, n)
        side = folder / "calls.json"
        known = json.loads(side.read_text()) if side.is_file() else {}
        if known.get("key") != key:  # other settings or retrained models: sample again
            for old in folder.glob("samples-scale-*.npz"):
                old.unlink()
        evaluator = _Paused(self.evaluator, self.counter)
        self.warm(row)
        with self.counter.counting() as counts:
            c0 = time.process_time()
            result = run_sweep(self.context(row), row.method, [row.scale], n, folder, evaluator,
                               classes=self.classes(n), sampling=self.sampling[row.grad], seed=self.seed,
                               batch_size=self.batch_size, source=self.models["model"])
            cpu = (time.process_time() - c0 - evaluator.cpu) / n  # this lane's CPU time: not inflated by load
        if sum(counts.values()):
            calls = per_image(counts, n)
            folder.mkdir(parents=True, exist_ok=True)
            side.write_text(json.dumps({"key": key, "calls": calls, "cpu_seconds_per_image": cpu}, indent=1,
                                       sort_keys=True))
        elif known.get("key") == key:
            calls, cpu = known["calls"], known.get("cpu_seconds_per_image")
        else:  # samples of an earlier sweep with these settings: count on one image per class
            calls, cpu = self.probe(row, len(self.base.class_names))["calls"], None
        m = result["rows"][0]
        _grid(folder / f"samples-scale-{row.scale:g}.npz", out / "grids" / f"{row.id}.png")
        return dict(entry(row, n, m, calls), cpu_seconds_per_image=cpu)

    def warm(self, row: Row) -> None:
        """Let the row's builder load its networks and targets (E2 of the references) before calls are counted:
        that is set-up, once per lane, not a cost per image."""
        from condiff.sweep import get_method

        with torch.no_grad():
            get_method(row.method)(self.context(row), row.scale, torch.zeros(1, dtype=torch.long))

    def classes(self, n: int) -> list[int]:
        """All classes, or the first n // 2 when n is too small for two samples of each (a tiny test run)."""
        return list(range(min(len(self.base.class_names), n // 2)))

    def probe(self, row: Row, n: int) -> dict:
        """Sample ``n`` images of ``row`` in one batch (nothing written): seconds per image and calls per image."""
        from condiff.sweep import get_method, sample_at_scale, sweep_labels

        ctx = self.context(row)
        self.warm(row)
        labels = sweep_labels(n, list(range(len(ctx.class_names))))  # one batch: any n
        with self.counter.counting() as counts:
            t0, c0 = time.perf_counter(), time.process_time()
            x = sample_at_scale(ctx, get_method(row.method), row.scale, labels, sampling=self.sampling[row.grad],
                                seed=self.seed, batch_size=n)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"seconds_per_image": seconds / n, "cpu_seconds_per_image": cpu / n, "calls": per_image(counts, n),
                "x": x, "labels": labels}


class _Paused:
    """The evaluator with call counting paused (the judge's passes are not the row's)."""

    def __init__(self, evaluator, counter):
        self._e, self._c, self.cpu = evaluator, counter, 0.0

    def __getattr__(self, name):
        return getattr(self._e, name)

    def evaluate(self, *a, **k):
        c0 = time.process_time()
        with self._c.paused():
            out = self._e.evaluate(*a, **k)
        self.cpu += time.process_time() - c0
        return out


def _load(models: dict, seed: int, device="cpu"):
    from condiff.evaluation import Evaluator, load_judge, load_real_data
    from condiff.pipeline import load_diffusion
    from condiff.sweep import SweepContext

    model, schedule, config = load_diffusion(models["model"], device)
    shape = tuple(config["image_shape"])
    judge, jconf = load_judge(models["judge"], device)
    train_data, test_data = load_real_data(jconf.get("data"), shape)
    names = config.get("class_names") or jconf.get("class_names")
    evaluator = Evaluator(judge, train_data, test_data, jconf.get("class_names") or names, device=device, seed=seed)
    return SweepContext(model, schedule, shape, names, device), evaluator


def _grid(npz: Path, path: Path, per_class: int = 4) -> None:
    """4 samples of each class, one row per class (the sweep's stored uint8 images)."""
    import numpy as np

    from condiff.images import save_grid

    with np.load(npz, allow_pickle=False) as z:
        x = torch.from_numpy(z["images"]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        labels = torch.from_numpy(z["labels"])
    rows = [torch.nonzero(labels == c).flatten() for c in sorted(set(labels.tolist()))]
    k = min(per_class, *(len(r) for r in rows))
    save_grid(x[torch.cat([r[:k] for r in rows])], path, nrow=k)


def entry(row: Row, n: int, m: dict, calls: dict) -> dict:
    """A row of results.json from the sweep's metrics ``m``."""
    return {"id": row.id, "label": row.label or row.id, "family": row.family, "method": row.method,
            "scale": row.scale, "options": dict(row.options), "goal": row.goal, "grad": row.grad, "n": n,
            "judge_accuracy": m["judge_accuracy"], "fid_fm": m["fid_fm"], "diversity_ratio": m["diversity_ratio"],
            "precision": m.get("precision"), "recall": m.get("recall"),
            "seconds_per_image": m["seconds_per_image"], "calls": calls,
            "fid_fm_floor": m.get("fid_fm_floor"), "judge_accuracy_real": m.get("judge_accuracy_real")}


# ------------------------------------------------------------------------------------------- goals (pure)
def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _of(rows: list[dict], *families: str) -> list[dict]:
    return [r for r in rows if r["family"] in families]


def best_fid(rows: list[dict], acc: float = ACC_GOAL) -> dict | None:
    """The row with the lowest FID_fm among those with judge accuracy >= ``acc``; None if none reaches it."""
    ok = [r for r in rows if r["judge_accuracy"] >= acc]
    return min(ok, key=lambda r: r["fid_fm"]) if ok else None


def _goal(number: int, title: str, met: bool, text: str, **numbers) -> dict:
    return {"goal": number, "title": title, "met": bool(met), "text": text, "numbers": numbers}


def goal_clean_classifier(rows: list[dict]) -> dict:
    """Goal 1: a training-free clean-classifier variant reaches >= 90% judge accuracy at <= 3x the time per
    image of noise-aware classifier guidance (its fastest row).

    The time is the lane's CPU time per image when both rows have it (one thread: what an idle machine takes;
    the wall clock of rows sampled at different moments of a shared machine is not comparable), else wall."""
    title = (f"a clean-classifier variant reaches >= {ACC_CLEAN:.0%} judge accuracy at <= {TIME_CLEAN:g}x the time "
             "of noise-aware classifier guidance")
    ref = _of(rows, "classifier")
    clean = [r for r in rows if r["family"].startswith("x0-classifier")]
    if not ref or not clean:
        return _goal(1, title, False, "not measured (needs the noise-aware classifier row and x0-classifier rows)")
    cpu = all(r.get("cpu_seconds_per_image") for r in ref + clean)
    key = "cpu_seconds_per_image" if cpu else "seconds_per_image"
    what = "CPU s/image" if cpu else "s/image"
    t_ref = min(r[key] for r in ref)
    ok = [r for r in clean if r["judge_accuracy"] >= ACC_CLEAN and r[key] <= TIME_CLEAN * t_ref]
    if ok:
        best = min(ok, key=lambda r: r[key])
        text = (f"{best['label']}: judge accuracy {best['judge_accuracy']:.3f}, "
                f"{best[key] / t_ref:.2f}x the time of noise-aware guidance "
                f"({best[key]:.3f} vs {t_ref:.3f} {what}), FID_fm {best['fid_fm']:.2f}")
        return _goal(1, title, True, text, row=best["id"], accuracy=best["judge_accuracy"],
                     time_ratio=best[key] / t_ref)
    top = max(clean, key=lambda r: r["judge_accuracy"])
    text = (f"best clean variant {top['label']}: judge accuracy {top['judge_accuracy']:.3f} at "
            f"{top[key] / t_ref:.2f}x the time ({top[key]:.3f} vs {t_ref:.3f} {what})")
    return _goal(1, title, False, text, row=top["id"], accuracy=top["judge_accuracy"], time_ratio=top[key] / t_ref)


def goal_beats_cfg(rows: list[dict]) -> dict:
    """Goal 2: autoguidance or APG has a lower FID_fm than plain CFG's best, both at judge accuracy >= 95%."""
    title = f"autoguidance or APG beats plain CFG's best FID_fm at judge accuracy >= {ACC_GOAL:.0%}"
    cfg = best_fid(_of(rows, "cfg"))
    if cfg is None:
        return _goal(2, title, False, f"no plain CFG row reaches judge accuracy {ACC_GOAL:.2f}")
    parts, met, numbers = [], False, {"cfg": cfg["id"], "cfg_fid": cfg["fid_fm"]}
    for fam in ("autoguide", "apg"):
        cand = best_fid(_of(rows, fam))
        if cand is None:
            measured = _of(rows, fam)
            top = max((r["judge_accuracy"] for r in measured), default=None)
            parts.append(f"{fam}: no row reaches {ACC_GOAL:.2f}" + (f" (best {top:.3f})" if top is not None else ""))
            continue
        met |= cand["fid_fm"] < cfg["fid_fm"]
        numbers[fam], numbers[fam + "_fid"] = cand["id"], cand["fid_fm"]
        parts.append(f"{cand['label']}: FID_fm {cand['fid_fm']:.2f} (judge {cand['judge_accuracy']:.3f})")
    both = best_fid(_of(rows, "autoguide+cfg"))
    if both is not None:  # reported, not counted: CFG is part of it
        numbers["combination"], numbers["combination_fid"] = both["id"], both["fid_fm"]
        parts.append(f"not counted, as it contains CFG: {both['label']}: FID_fm {both['fid_fm']:.2f} (judge "
                     f"{both['judge_accuracy']:.3f}), {'below' if both['fid_fm'] < cfg['fid_fm'] else 'not below'} "
                     "plain CFG's best")
    text = (f"plain CFG's best: {cfg['label']}, FID_fm {cfg['fid_fm']:.2f} (judge {cfg['judge_accuracy']:.3f}); "
            + "; ".join(parts))
    return _goal(2, title, met, text, **numbers)


def goal_interval(rows: list[dict], timing: dict | None = None) -> dict:
    """Goal 3: CFG with an interval matches plain CFG's best FID_fm (within MATCH_TOL, judge accuracy >= 95% both)
    at <= 1.5x the time per image of unguided sampling.

    ``timing``: the rows of ``benchmarks/guidance_timing.py --json`` (the settings timed side by side in one run);
    a row it timed is judged on its median CPU-time ratio to unguided sampling there instead of on the table's
    seconds per image (each row timed alone, at another moment of a shared machine)."""
    title = (f"CFG with an interval matches plain CFG's best FID_fm (within {MATCH_TOL:.0%}) at <= {TIME_INTERVAL:g}x "
             "the time of unguided sampling")
    cfg, base = best_fid(_of(rows, "cfg")), _of(rows, "unguided")
    inter = _of(rows, "cfg-interval")
    if cfg is None or not base or not inter:
        return _goal(3, title, False, "not measured (needs plain CFG at judge accuracy >= 0.95, the unguided row "
                                      "and cfg-interval rows)")
    t0 = base[0]["seconds_per_image"]
    c0 = base[0]["calls"].get("total") or float("nan")
    timing = timing or {}

    def ratio(r):
        side = timing.get(r["id"])
        return side["cpu_ratio"] if side else r["seconds_per_image"] / t0

    def how(r):
        side = timing.get(r["id"])
        if not side:
            return f"{ratio(r):.2f}x unguided"
        lo, hi = side["cpu_ratio_range"]
        return (f"{ratio(r):.2f}x unguided side by side (CPU time, median; {lo:.2f}-{hi:.2f}; wall "
                f"{side['wall_ratio']:.2f}x; the table's own rows: {r['seconds_per_image'] / t0:.2f}x)")

    def ok(r):
        return (r["judge_accuracy"] >= ACC_GOAL and r["fid_fm"] <= cfg["fid_fm"] * (1 + MATCH_TOL)
                and ratio(r) <= TIME_INTERVAL)

    good = [r for r in inter if ok(r)]
    pick = min(good or inter, key=lambda r: (r["judge_accuracy"] < ACC_GOAL, r["fid_fm"]))
    text = (f"{pick['label']}: FID_fm {pick['fid_fm']:.2f} vs plain CFG's best {cfg['fid_fm']:.2f} ({cfg['label']}), "
            f"judge {pick['judge_accuracy']:.3f}, time {how(pick)} "
            f"(calls {pick['calls'].get('total', float('nan')) / c0:.2f}x); plain CFG ({cfg['label']}): "
            f"{how(cfg)}")
    return _goal(3, title, bool(good), text, row=pick["id"], fid=pick["fid_fm"], cfg_fid=cfg["fid_fm"],
                 time_ratio=ratio(pick), cfg_time_ratio=ratio(cfg), side_by_side=pick["id"] in timing)


def goal_noisy_encoder(rows: list[dict]) -> dict:
    """Goal 4: what training E1 on noisy inputs buys against the clean E2 on x0, and at what cost (a paragraph)."""
    title = "how much training E1 on noisy inputs buys, and at what cost"
    e1, e2 = _of(rows, "image E1"), _of(rows, "image E2 on x0")
    if not e1 or not e2:
        return _goal(4, title, False, "not measured (needs the image E1 and image E2 on x0 rows)")
    a = max(e1, key=lambda r: r["judge_accuracy"])
    b = max(e2, key=lambda r: (r["judge_accuracy"], -r["fid_fm"]))
    text = (f"noise-aware E1 ({a['label']}): judge accuracy {a['judge_accuracy']:.3f}, FID_fm {a['fid_fm']:.2f}, "
            f"diversity/real {a['diversity_ratio']:.2f}, {a['seconds_per_image']:.3f} s/image ({calls_text(a['calls'])}); "
            f"clean E2 on x0 ({b['label']}): {b['judge_accuracy']:.3f}, FID_fm {b['fid_fm']:.2f}, "
            f"{b['diversity_ratio']:.2f}, {b['seconds_per_image']:.3f} s/image ({calls_text(b['calls'])}). "
            f"Training on noisy inputs buys {a['judge_accuracy'] - b['judge_accuracy']:+.3f} judge accuracy and "
            f"{b['fid_fm'] - a['fid_fm']:.2f} lower FID_fm at {a['seconds_per_image'] / b['seconds_per_image']:.2f}x the "
            "sampling time of the x0 route; its price is E1's fine-tuning on noisy images (see the encoder's model card)")
    return _goal(4, title, True, text, e1=a["id"], e2=b["id"], accuracy_gain=a["judge_accuracy"] - b["judge_accuracy"],
                 fid_gain=b["fid_fm"] - a["fid_fm"], time_ratio=a["seconds_per_image"] / b["seconds_per_image"])


GOALS = (goal_clean_classifier, goal_beats_cfg, goal_interval, goal_noisy_encoder)


def check_goals(rows: list[dict], timing: dict | None = None) -> list[dict]:
    return [g(rows, timing) if g is goal_interval else g(rows) for g in GOALS]


def recommend(rows: list[dict]) -> list[dict]:
    """Per family, the setting to make its default: the lowest FID_fm among the rows with judge accuracy at the
    bar (0.95 for CFG-type families, 0.90 for gradient guidance); if none reaches it, the most accurate row."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        group = _of(rows, fam)
        if fam == "unguided":
            continue
        bar = ACC_CLEAN if group[0]["grad"] else ACC_GOAL
        pick = best_fid(group, bar)
        why = f"lowest FID_fm at judge accuracy >= {bar:.2f}"
        if pick is None:
            pick = max(group, key=lambda r: (r["judge_accuracy"], -r["fid_fm"]))
            why = f"no setting reaches judge accuracy {bar:.2f}: the most accurate"
        out.append({"family": fam, "row": pick["id"], "method": pick["method"], "scale": pick["scale"],
                    "options": pick["options"], "why": why, "judge_accuracy": pick["judge_accuracy"],
                    "fid_fm": pick["fid_fm"], "seconds_per_image": pick["seconds_per_image"]})
    return out


# ------------------------------------------------------------------------------------------- the table
COLUMNS = ("row", "method / scale (options)", "n", "judge acc", "FID_fm", "div / real", "s / image",
           "network calls / image")


def table_md(result: dict, grid_prefix: str = "grids/") -> str:
    """The markdown of ``table.md``: settings, the table, the goals, the recommended defaults, the grids."""
    st, rows = result["settings"], result["rows"]
    md = [f"Made by `benchmarks/guidance_table.py` on {st['date']}: DDIM, {st['steps']} steps for every row "
          f"(eta {st['eta_cfg']:g} for the CFG family, {st['eta_grad']:g} for gradient guidance), seed {st['seed']}, "
          f"classes balanced, {st['n']} samples per row and {st['n_goal']} for the rows a goal is judged on; "
          f"{st['jobs']} lane(s) of one thread. Models: "
          + ", ".join(f"{role} `{_shown(path)}` ({st['fingerprints'][role]})" for role, path in sorted(st['models'].items()))
          + ". Calls count every forward (and `b`: backward) pass per image of the eps-model, the weak model and "
            "the guiding network."
          + (f" Rows {', '.join(st['updated_rows'])} added or sampled again on {st['updated']} (`--rows`)."
             if st.get("updated_rows") else ""), ""]
    md += ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        md.append(f"| {r['label']} | {r['method']} {r['scale']:g}{f' ({opts})' if opts else ''} | {r['n']} "
                  f"| {_fmt(r['judge_accuracy'])} | {_fmt(r['fid_fm'], '.2f')} | {_fmt(r['diversity_ratio'], '.2f')} "
                  f"| {_fmt(r['seconds_per_image'])} | {calls_text(r['calls'])} |")
    floors = {r["n"]: r for r in rows}  # the real-data floor depends on n (FID_fm is biased upward at small n)
    for n, floor in sorted(floors.items()):
        md.append(f"| real data (training images, n = {n}) | | {n} | {_fmt(floor.get('judge_accuracy_real'))} "
                  f"| {_fmt(floor.get('fid_fm_floor'), '.2f')} | 1.00 | | |")
    busy = [r["id"] for r in rows if r.get("cpu_seconds_per_image")
            and r["seconds_per_image"] > 1.25 * r["cpu_seconds_per_image"]]
    if busy:
        md += ["", f"**The machine was busy**: wall time exceeded the lane's CPU time by more than 25% on "
                   f"{', '.join(busy)} (results.json has both): the time ratios below are doubtful."]
    md += ["", "Goals (issue 16):", ""]
    for g in result["goals"]:
        md.append(f"{g['goal']}. **{'met' if g['met'] else 'not met'}**: {g['title']}. {g['text']}.")
    md += ["", "Recommended defaults (from these rows):", ""]
    for rec in result["recommendations"]:
        opts = ", ".join(f"{k}={v}" for k, v in rec["options"].items())
        md.append(f"- {rec['family']}: `{rec['method']}` scale {rec['scale']:g}{f' ({opts})' if opts else ''}: "
                  f"judge {rec['judge_accuracy']:.3f}, FID_fm {rec['fid_fm']:.2f}, "
                  f"{rec['seconds_per_image']:.3f} s/image ({rec['why']})")
    md += ["", "Samples (4 of each class, one row per class): "
           + " ".join(f"[{r['id']}]({grid_prefix}{r['id']}.png)" for r in rows), ""]
    return "\n".join(md)


def build_result(rows: list[dict], settings: dict) -> dict:
    return {"settings": settings, "rows": rows, "goals": check_goals(rows, settings.get("timing")),
            "recommendations": recommend(rows)}


def load_timing(path: str) -> dict:
    """The per-row numbers of ``benchmarks/guidance_timing.py --json PATH``."""
    try:
        return json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise CondiffError(f"--timing {path}: not a guidance_timing.py --json file ({e})") from None


def merge_rows(new: list[dict], old: list[dict], order: list[str]) -> list[dict]:
    """A subset run's rows in place of the same ids of an earlier results.json; the other old rows kept; in
    ``order`` (the default rows), then any others."""
    kept = {r["id"]: r for r in old}
    kept.update({r["id"]: r for r in new})
    return [kept[i] for i in order if i in kept] + [r for i, r in kept.items() if i not in order]


# ------------------------------------------------------------------------------------------- driver
_LANE: Lane | None = None


def _init_lane(kwargs: dict) -> None:
    global _LANE
    torch.set_num_threads(1)
    _LANE = Lane(**kwargs)


def _run_one(row: Row, n: int, out: str) -> dict:
    t0 = time.perf_counter()
    e = _LANE.run(row, n, Path(out))
    print(f"[{datetime.datetime.now():%H:%M:%S}] {row.id} n {n}: judge {e['judge_accuracy']:.3f}, FID_fm "
          f"{e['fid_fm']:.2f}, div/real {e['diversity_ratio']:.2f}, {e['seconds_per_image']:.3f} s/image, "
          f"{calls_text(e['calls'])} ({time.perf_counter() - t0:.0f} s with scoring)", flush=True)
    return e


def row_n(row: Row, args) -> int:
    return args.n_goal if row.goal else args.n


def select_rows(args) -> list[Row]:
    rows = default_rows(tuple(int(v) for v in args.interval.split(",")))
    if args.rows:
        import fnmatch

        pats = args.rows.split(",")
        rows = [r for r in rows if any(fnmatch.fnmatch(r.id, p) for p in pats)]
        if not rows:
            raise CondiffError(f"--rows {args.rows} matches no row")
    if args.skip_missing:
        for role in sorted({role for r in rows for _, role in r.models}):
            try:
                resolve_models(args, [Row("", "", "", 0.0, models=(("", role),))])
            except CondiffError as e:
                dropped = [r.id for r in rows if role in dict(r.models).values()]
                rows = [r for r in rows if r.id not in dropped]
                print(f"skipping {', '.join(dropped)}: {str(e).split(':')[0]}", file=sys.stderr)
        if not rows:
            raise CondiffError("no rows left to run")
    return rows


def estimate(args, rows: list[Row], models: dict) -> None:
    """Time every row on ``--probe`` images (one batch) and print the projected time of the full table."""
    lane = Lane(models, args.steps, args.eta_cfg, args.eta_grad, args.seed, args.batch_size)
    lane.probe(rows[0], min(args.probe, 10))  # warm-up
    costs = []
    for r in rows:
        p = lane.probe(r, args.probe)
        n = row_n(r, args)
        costs.append(p["cpu_seconds_per_image"] * n)
        print(f"{r.id:12s} {p['cpu_seconds_per_image']:.3f} CPU s/image ({p['seconds_per_image']:.3f} wall) x {n:5d} "
              f"= {costs[-1]:6.0f} s  calls/image {calls_text(p['calls'])}", flush=True)
    x, labels = p["x"], p["labels"]
    reps = -(-args.n_goal // len(x))
    c0 = time.process_time()
    lane.evaluator.evaluate(torch.cat([x] * reps)[: args.n_goal], torch.cat([labels] * reps)[: args.n_goal])
    score = (time.process_time() - c0) * len(rows)
    lanes = _lpt(costs, args.jobs)
    print(f"sampling {sum(costs):.0f} CPU s + scoring ~{score:.0f} CPU s; with {args.jobs} lane(s) of one thread on an "
          f"idle machine: ~{(max(lanes) + score / args.jobs) / 60:.1f} min (rows: {len(rows)}; process CPU time, so "
          f"the machine's load does not inflate it; probes of {args.probe} images in one batch overstate the "
          f"per-image time of batches of {args.batch_size})")


def _lpt(costs: list[float], jobs: int) -> list[float]:
    lanes = [0.0] * max(1, jobs)
    for c in sorted(costs, reverse=True):
        lanes[lanes.index(min(lanes))] += c
    return lanes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="samples per row (default 500)")
    p.add_argument("--n-goal", type=int, default=1000, help="samples per row a goal is judged on (default 1000)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of every row (default 25)")
    p.add_argument("--eta-cfg", type=float, default=0.0, help="DDIM eta of the CFG family and unguided (default 0)")
    p.add_argument("--eta-grad", type=float, default=1.0, help="DDIM eta of gradient guidance (default 1)")
    p.add_argument("--interval", default=f"{INTERVAL[0]},{INTERVAL[1]}",
                   help="LO,HI timesteps of the cfg-interval rows (default %(default)s: 12 of the 25 DDIM steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--jobs", type=int, default=1, help="parallel lanes, one thread each (the machine has 2 cores)")
    p.add_argument("--rows", default="", help="only the rows whose id matches one of these comma-separated globs; "
                                              "the other rows of an existing --out results.json are kept")
    p.add_argument("--out", default=str(ROOT / "runs" / "guidance-table"))
    p.add_argument("--docs", default="", help="also copy table.md and the grids into this folder")
    for role, (folder, flag) in ROLES.items():
        p.add_argument(flag, dest=role.replace("-", "_"), default=None,
                       help=f"the {role} checkpoint (default src/condiff/models/{folder})")
    p.add_argument("--skip-missing", action="store_true", help="drop the rows whose model is missing (one line each)")
    p.add_argument("--estimate", action="store_true", help="time each row on --probe images and print the total")
    p.add_argument("--probe", type=int, default=20, help="images per row of --estimate (default 20)")
    p.add_argument("--report", action="store_true", help="only re-render table.md from results.json")
    p.add_argument("--timing", default="", help="goal 3's time ratios from benchmarks/guidance_timing.py --json FILE "
                                                "(the settings timed side by side) instead of the rows' own times")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except CondiffError as e:
        print(f"guidance_table: error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    out = Path(args.out)
    if args.report:
        path = out / "results.json"
        if not path.is_file():
            raise CondiffError(f"{path} not found: run the table first")
        result = json.loads(path.read_text())
        if args.timing:
            result["settings"]["timing"] = load_timing(args.timing)
        result = build_result(result["rows"], result["settings"])
        _write(result, out, args)
        return 0
    if args.n < 6 or args.n_goal < 6:
        raise CondiffError("--n and --n-goal must be at least 6 (the evaluator's 5 neighbours and one more)")
    torch.set_num_threads(1)
    rows = select_rows(args)
    if min(args.n, args.n_goal) < 20:
        print(f"note: n = {min(args.n, args.n_goal)} is under two samples per class: such rows use the first n // 2 "
              "classes only (a test run)", file=sys.stderr)
    models = resolve_models(args, rows)
    if args.estimate:
        estimate(args, rows, models)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    lane_args = dict(models=models, steps=args.steps, eta_cfg=args.eta_cfg, eta_grad=args.eta_grad, seed=args.seed,
                     batch_size=args.batch_size)
    # the dearest rows first (goal rows, gradient rows, recurrence), so the lanes end together
    order = sorted(rows, key=lambda r: -row_n(r, args) * (1 + r.grad + (("recurrence", "2") in r.options)))
    done: dict[str, dict] = {}
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_lane,
                                 initargs=(lane_args,)) as pool:
            futures = {r.id: pool.submit(_run_one, r, row_n(r, args), str(out)) for r in order}
            done = {k: f.result() for k, f in futures.items()}
    else:
        _init_lane(lane_args)
        done = {r.id: _run_one(r, row_n(r, args), str(out)) for r in order}
    settings = {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "steps": args.steps,
                "sampler": "ddim", "eta_cfg": args.eta_cfg, "eta_grad": args.eta_grad, "seed": args.seed, "n": args.n,
                "n_goal": args.n_goal, "jobs": args.jobs, "batch_size": args.batch_size, "interval": args.interval,
                "models": models, "fingerprints": {k: fingerprint(v) for k, v in models.items()}}
    if args.timing:
        settings["timing"] = load_timing(args.timing)
    new = [done[r.id] for r in rows]
    previous = out / "results.json"
    if args.rows and previous.is_file():  # a subset run: the table keeps the earlier run's other rows
        old = json.loads(previous.read_text())
        order = [r.id for r in default_rows(tuple(int(v) for v in args.interval.split(",")))]
        new = merge_rows(new, old["rows"], order)
        settings = dict(old["settings"], updated=settings["date"], updated_rows=[r.id for r in rows],
                        **({"timing": settings["timing"]} if "timing" in settings else {}))
    result = build_result(new, settings)
    _write(result, out, args)
    return 0


def _write(result: dict, out: Path, args) -> None:
    from condiff.checkpoints import atomic_write_text
    from condiff.evaluation import to_json

    atomic_write_text(out / "results.json", to_json(result))
    prefix = "grids/"
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for r in result["rows"]:
            src = out / "grids" / f"{r['id']}.png"
            if src.is_file():
                shutil.copyfile(src, docs / src.name)
        prefix = f"{docs.name}/"
    md = table_md(result, prefix)
    atomic_write_text(out / "table.md", md)
    if args.docs:
        atomic_write_text(Path(args.docs) / "table.md", md)
    print(md)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
