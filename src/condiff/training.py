"""Training: the losses of condiff's networks and one training loop.

* :class:`DiffusionTask`  eps-MSE of eq 22, with condition dropout to the learned
  null phi (the classifier-free hook of eq 24).
* :class:`ClassifierTask` cross-entropy of a noise-aware classifier p(y|x_t) on
  x_t = abar_t x_0 + bbar_t eps (classifier guidance, eqs 1-8).

:func:`train` runs any task: AdamW with warm-up, gradient clipping, EMA weights,
crash-safe checkpoints every N steps (resume is bit-identical on CPU: data order,
noise and RNG state are all restored), a JSONL metrics log, tqdm progress, an
optional periodic callback (sample grids), and data parallelism over torchrun ranks
(see :mod:`condiff.distributed`: the global batch split across ranks, rank 0 writes).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .accel import autocast
from .checkpoints import (atomic_write_text, latest_checkpoint, load_latest_checkpoint, load_state_strict,
                          save_checkpoint)
from .data import ImageDataset
from .distributed import Shard, all_true, barrier, merge_sums, same_on_all_ranks
from .errors import CondiffError, NonFiniteError
from .schedule import Schedule

__all__ = ["TrainConfig", "DiffusionTask", "ClassifierTask", "train", "ema_model", "classifier_accuracy_by_t"]

# t-ranges (fractions of T) in which classifier accuracy is reported
T_RANGES = {"clean": (0.0, 0.1), "mid": (0.1, 0.6), "noisy": (0.6, 1.0)}


@dataclass
class TrainConfig:
    """Optimisation settings shared by every task.

    ``batch_size`` is the global batch of one optimizer step: with several
    processes (torchrun) each of the N ranks trains on batch_size / N of its rows.
    ``bf16`` runs the task's forward pass under bfloat16 autocast.
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 250
    keep: int = 3
    log_every: int = 25
    sample_every: int = 0
    max_nonfinite: int = 5
    bf16: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "keep", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise CondiffError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise CondiffError(f"{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.lr == 0 or self.ema_decay >= 1:
            raise CondiffError("lr must be > 0 and ema-decay < 1")


class DiffusionTask:
    """Eq 22: E || eps - eps_theta(abar_t x_0 + bbar_t eps, y, t) ||^2, y -> phi with prob. p_uncond."""

    name = "diffusion"

    def __init__(self, schedule: Schedule, p_uncond: float = 0.1):
        if not 0 <= p_uncond <= 1:
            raise CondiffError(f"p-uncond must lie in [0, 1], got {p_uncond}")
        self.schedule, self.p_uncond = schedule, float(p_uncond)

    def config(self) -> dict:
        return {"task": self.name, "p_uncond": self.p_uncond}

    def drop_condition(self, model, y: torch.Tensor, generator: torch.Generator,
                       shard: Shard = Shard()) -> torch.Tensor:
        """Replace each condition by the null phi with probability p_uncond (eq 24's training side)."""
        drop = shard.rand(y.shape[0], generator) < self.p_uncond
        null = model.null_cond(y.shape[0], y.device)
        mask = drop.to(y.device).view((-1,) + (1,) * (y.dim() - 1))
        return torch.where(mask, null, y.to(null.dtype))

    def loss(self, model, x0, y, generator, shard: Shard = Shard()):
        B = x0.shape[0]
        t = shard.randint(self.schedule.T, B, generator).to(x0.device)
        eps = shard.randn(x0.shape, generator).to(x0.device)
        cond = self.drop_condition(_unwrap(model), y, generator, shard) if _unwrap(model).conditional else None
        pred = model(self.schedule.add_noise(x0, t, eps), t, cond)
        return F.mse_loss(pred.float(), eps), {}


class ClassifierTask:
    """Cross-entropy of p(y | x_t, t) on noisy inputs, t uniform in [0, t_max).

    ``clean=True``: a clean classifier p(y | x_0) for x0-guidance (:mod:`condiff.x0guidance`), trained on the
    data itself at t = 0 (no noise at all; call it as ``net(x, 0)``, :func:`condiff.x0guidance.at_t0`).
    """

    name = "classifier"

    def __init__(self, schedule: Schedule, t_max: int | None = None, clean: bool = False):
        if clean and t_max is not None:
            raise CondiffError("a clean classifier trains on t = 0 only: drop --t-max")
        t_max = schedule.T if t_max is None else int(t_max)
        if not 1 <= t_max <= schedule.T:
            raise CondiffError(f"t-max must lie in [1, {schedule.T}], got {t_max}")
        self.schedule, self.t_max, self.clean = schedule, t_max, bool(clean)

    def config(self) -> dict:
        return {"task": self.name, "t_max": 1 if self.clean else self.t_max, "clean": self.clean}

    def loss(self, model, x0, y, generator, shard: Shard = Shard()):
        B = x0.shape[0]
        if self.clean:
            t = torch.zeros(B, dtype=torch.long, device=x0.device)
            logits = model(x0, t).float()
        else:
            t = shard.randint(self.t_max, B, generator).to(x0.device)
            eps = shard.randn(x0.shape, generator).to(x0.device)
            logits = model(self.schedule.add_noise(x0, t, eps), t).float()
        correct = (logits.argmax(1) == y).float()
        metrics = {}
        for name, (lo, hi) in T_RANGES.items():
            m = (t >= lo * self.schedule.T) & (t < hi * self.schedule.T)
            if m.any():
                metrics[f"acc_{name}"] = (float(correct[m].sum()), int(m.sum()))
        return F.cross_entropy(logits, y), metrics


def _unwrap(model):
    """The network inside torch.compile and/or DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def classifier_accuracy_by_t(model, schedule: Schedule, data: ImageDataset, n: int = 1000, seed: int = 0,
                             device="cpu", batch_size: int = 500) -> dict:
    """Accuracy of a noise-aware classifier on held-out data in each t-range of T_RANGES."""
    g = torch.Generator().manual_seed(seed)
    sub = data.subset(min(n, len(data)), seed)
    out = {}
    for name, (lo, hi) in T_RANGES.items():
        correct = 0
        for i in range(0, len(sub), batch_size):
            x0 = sub.images[i:i + batch_size].to(device)
            y = sub.labels[i:i + batch_size].to(device)
            t = torch.randint(int(lo * schedule.T), max(int(hi * schedule.T), int(lo * schedule.T) + 1),
                              (len(x0),), generator=g).to(device)
            eps = torch.randn(x0.shape, generator=g).to(device)
            correct += int((model(schedule.add_noise(x0, t, eps), t).argmax(1) == y).sum())
        out[name] = correct / len(sub)
    return out


def ema_model(model: torch.nn.Module, ema: dict) -> torch.nn.Module:
    """A copy of ``model`` carrying the EMA weights, in eval mode."""
    m = copy.deepcopy(_unwrap(model))
    m.load_state_dict(ema)
    return m.eval()


class _BatchOrder:
    """Epoch permutations derived from (seed, epoch): any step's batch is reproducible."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise CondiffError(f"batch size {batch_size} is larger than the dataset ({n} images)")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[j * self.bs:(j + 1) * self.bs]


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))  # a kill here must not lose the log


def _prune(run_dir: Path, keep: int) -> None:
    ckdir = run_dir / "checkpoints"
    steps = sorted((int(p.name.split("-")[1]), p) for p in ckdir.glob("step-*") if p.name.split("-")[1].isdigit())
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckdir.glob(".step-*"):  # leftovers of a killed write
        shutil.rmtree(p, ignore_errors=True)


def train(model: torch.nn.Module, task, data: ImageDataset, cfg: TrainConfig, out_dir: str | Path, *,
          meta: dict | None = None, device="cpu", resume: bool = True, progress: bool = True,
          callback: Callable[[torch.nn.Module, int], None] | None = None, rank: int = 0,
          world_size: int = 1) -> Path:
    """Train ``model`` on ``data`` with ``task``; checkpoints go to ``out_dir/checkpoints/step-N``.

    Args:
        model: the network (a UNet for diffusion, an EncoderNet for a classifier); may be
            wrapped in DistributedDataParallel (and torch.compile), in which case rank
            ``rank`` of ``world_size`` trains on rows [rank::world_size] of the same
            global batch of ``cfg.batch_size`` (which world_size must divide) and draws
            its noise as that slice of the global draw (:class:`condiff.distributed.Shard`),
            so N processes follow the single-process run; only rank 0 writes.
        task: DiffusionTask or ClassifierTask (anything with ``loss`` and ``config``; for
            several processes its ``loss`` must take ``shard=``).
        meta: extra JSON-able config (schedule, class names) stored with each checkpoint.
        resume: continue from the newest complete checkpoint in ``out_dir`` if any.
        callback: called as ``callback(ema_model, step)`` every ``cfg.sample_every`` steps.
    Returns:
        the folder of the final checkpoint.
    """
    cfg.validate()
    if not 0 <= rank < world_size:
        raise CondiffError(f"rank {rank} outside world size {world_size}")
    if cfg.batch_size % world_size:
        raise CondiffError(f"batch size {cfg.batch_size} is not divisible by the {world_size} processes; "
                           "--batch-size is the global batch")
    sharded = "shard" in inspect.signature(task.loss).parameters
    if world_size > 1 and not sharded:
        raise CondiffError(f"{task.name} training does not support several processes")
    out = Path(out_dir)
    net = _unwrap(model)
    config = dict(meta or {}, network=net.config, train=asdict(cfg), **task.config())
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and latest_checkpoint(out) is not None:  # starting over: keep the old run, out of the way
            aside = out / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            while aside.exists():
                aside = aside.with_name(aside.name + "+")
            (out / "checkpoints").rename(aside)
            warnings.warn(f"not resuming: moved the previous checkpoints to {aside}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    step, wall_before, started = 0, 0.0, time.time()
    latest, ck = load_latest_checkpoint(out) if resume else (None, None)  # skips an unreadable newest one
    latest = same_on_all_ranks(latest, world_size, "the checkpoint to resume from")
    if latest is not None:
        if ck["config"].get("network") != net.config:
            raise CondiffError(f"{latest}: its network config differs from this run's; use another --out")
        if "raw" not in ck:
            raise CondiffError(f"{latest}: not a training checkpoint (no optimizer state)")
        load_state_strict(net, ck["raw"], str(latest))
        ema = {k: v.to(next(net.parameters()).device) for k, v in ck["weights"].items()}
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"]["generator"])
        torch.set_rng_state(ck["rng"]["torch"])
        step = ck["step"]
        wall_before = float(ck.get("extra", {}).get("wall_s", 0.0))
        if main:
            _truncate_log(out / "metrics.jsonl", step)
    elif main:
        _truncate_log(out / "metrics.jsonl", 0)  # lines of a start killed before its first checkpoint
    order = _BatchOrder(len(data), cfg.batch_size, cfg.seed)
    shard = {"shard": Shard(rank, world_size)} if sharded else {}
    log_path = out / "metrics.jsonl"
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and main), desc=f"train {task.name}",
               dynamic_ncols=True)
    window, t0, bad_in_row, final = {"loss": [0.0, 0]}, time.time(), 0, None
    try:  # the bar is closed on errors too, so a failed run leaves a clean terminal
        model.train()
        while step < cfg.steps:
            idx = order.indices(step)[rank::world_size]
            x0, y = data.images[idx].to(device), data.labels[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            with autocast(device, cfg.bf16):
                loss, metrics = task.loss(model, x0, y, gen, **shard)
            if not all_true(torch.isfinite(loss), world_size):
                bad_in_row += 1
                warnings.warn(f"non-finite loss at step {step}; step skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_nonfinite:
                    raise NonFiniteError(f"{bad_in_row} non-finite losses in a row at step {step}; "
                                         "lower --lr or check the data")
                step += 1
                continue
            bad_in_row = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e12)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].lerp_(v, 1 - decay)
                    else:
                        ema[k].copy_(v)
            window["loss"][0] += float(loss.detach()) * len(x0)
            window["loss"][1] += len(x0)
            for k, (num, den) in metrics.items():
                acc = window.setdefault(k, [0.0, 0])
                acc[0] += num
                acc[1] += den
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.time() - t0
                window = merge_sums(window, world_size)
                rec = {"step": step, "wall_s": round(wall_before + time.time() - started, 2),
                       "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                       "images_per_s": window["loss"][1] / max(dt, 1e-9)}
                rec.update({k: num / max(den, 1) for k, (num, den) in window.items()})
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ips=f"{rec['images_per_s']:.0f}")
                if main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                window, t0 = {"loss": [0.0, 0]}, time.time()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                if main:
                    final = save_checkpoint(out / "checkpoints" / f"step-{step:07d}", net, config, ema=ema,
                                            optimizer=opt, step=step,
                                            extra={"wall_s": wall_before + time.time() - started},
                                            rng={"generator": gen.get_state(), "torch": torch.get_rng_state()})
                    _prune(out, cfg.keep)
            if callback is not None and main and cfg.sample_every and step % cfg.sample_every == 0:
                callback(ema_model(net, ema), step)
                model.train()
    finally:
        bar.close()
    barrier(world_size)  # rank 0's last checkpoint is complete before any rank returns
    final = final if final is not None else latest_checkpoint(out)
    if final is None:  # every step was skipped, the last one included: there is nothing to return
        raise NonFiniteError(f"no checkpoint: the losses of the last steps up to {cfg.steps} were non-finite; "
                             "lower --lr or check the data")
    return final
