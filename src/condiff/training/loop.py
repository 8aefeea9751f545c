"""The training loop, built from PyTorch's parts and small steps.

:func:`train` runs any task (:mod:`condiff.training.tasks`): AdamW, a
``torch.optim.lr_scheduler.LambdaLR`` warm-up with an optional cosine or
inverse-square-root decay, gradient clipping, weight averages from
``torch.optim.swa_utils.AveragedModel`` (the classic EMA and EDM2's power-function
profiles for post-hoc EMA, :mod:`condiff.training.ema`), crash-safe checkpoints
every N steps (resume is bit-identical on CPU: data order, noise, RNG, scheduler
and the open log window are all restored), a JSONL metrics log, tqdm progress,
an optional periodic callback (sample grids), data parallelism over torchrun ranks
(:mod:`condiff.distributed`: the global batch split across ranks, rank 0 writes),
one trainer per run folder (:class:`~condiff.training.guard.RunLock`), and a
checkpoint before exiting on SIGTERM / SIGINT (:class:`~condiff.training.guard.StopSignals`).

The parts: :func:`lr_lambda` (the schedule), :func:`restore` (state from a checkpoint),
:func:`train_step` (one optimizer step), :func:`save` (a checkpoint), :class:`MetricsLog`.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..accel import autocast
from ..checkpoints import atomic_write_text, latest_checkpoint, load_latest_checkpoint, load_state_strict, save_checkpoint
from ..data import ImageDataset
from ..distributed import Shard, all_true, barrier, merge_sums, same_on_all_ranks
from ..errors import CondiffError, NonFiniteError
from ..prediction import prediction_of
from .ema import EMA, SNAPSHOT_DIR, sigma_rel_to_gamma
from .guard import RunLock, StopSignals, TrainingStopped
from .tasks import unwrap

__all__ = ["TrainConfig", "TrainState", "LR_SCHEDULES", "lr_lambda", "train", "restore", "train_step", "save",
           "MetricsLog", "ema_model"]

LR_SCHEDULES = ("constant", "cosine", "rsqrt")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every task.

    ``batch_size`` is the global batch of one optimizer step: with several
    processes (torchrun) each of the N ranks trains on batch_size / N of its rows.
    ``bf16`` runs the task's forward pass under bfloat16 autocast.
    ``lr_schedule``: after ``warmup`` linear steps, "constant", "cosine" (down to
    ``min_lr`` x lr at ``steps``) or "rsqrt" (lr sqrt(warmup / step)); see :func:`lr_lambda`.
    ``ema_profiles``: sigma_rel of each power-function EMA profile kept for post-hoc EMA.
    ``channels_last``: the network and its inputs in NHWC memory layout (a CPU/GPU speed lever).
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
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    ema_profiles: tuple = field(default_factory=tuple)
    channels_last: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "keep", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise CondiffError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "min_lr"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise CondiffError(f"{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.lr == 0 or self.ema_decay >= 1:
            raise CondiffError("lr must be > 0 and ema-decay < 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise CondiffError(f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.min_lr > 1:
            raise CondiffError(f"min-lr is a fraction of --lr in [0, 1], got {self.min_lr}")
        if len(set(self.ema_profiles)) != len(self.ema_profiles):
            raise CondiffError(f"ema-profiles must differ, got {list(self.ema_profiles)}")
        for s in self.ema_profiles:
            sigma_rel_to_gamma(float(s))  # raises on a value outside [0.001, 0.289)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The factor on ``cfg.lr`` for the optimizer step with index s = 0, 1, ... (LambdaLR's lr_lambda).

    min(1, (s + 1) / warmup) times 1 ("constant"), or
    min_lr + (1 - min_lr) (1 + cos(pi p)) / 2 with p = (s - warmup) / (steps - warmup) in [0, 1] ("cosine"), or
    sqrt(warmup / max(s + 1, warmup)) ("rsqrt", EDM2's decay).
    """
    warm, total, kind, floor = max(cfg.warmup, 1), cfg.steps, cfg.lr_schedule, cfg.min_lr

    def factor(s: int) -> float:
        w = min(1.0, (s + 1) / warm)
        if kind == "cosine":
            p = min(max((s - warm) / max(total - warm, 1), 0.0), 1.0)
            return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        if kind == "rsqrt":
            return w * math.sqrt(warm / max(s + 1, warm))
        return w
    return factor


def ema_model(model: torch.nn.Module, ema: dict) -> torch.nn.Module:
    """A copy of ``model`` carrying the EMA weights ``ema``, in eval mode."""
    m = copy.deepcopy(unwrap(model))
    m.load_state_dict(ema)
    return m.eval()


@dataclass
class TrainState:
    """Everything that changes during a run; a checkpoint stores all of it."""

    model: torch.nn.Module  # as trained (maybe DDP / compiled)
    net: torch.nn.Module  # the plain network inside
    opt: torch.optim.Optimizer
    ema: EMA
    gen: torch.Generator
    step: int = 0
    wall_before: float = 0.0  # wall seconds of earlier invocations
    window: dict = field(default_factory=lambda: {"loss": [0.0, 0]})  # the open log window's sums
    sched: torch.optim.lr_scheduler.LRScheduler | None = None


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


def _move_aside(out: Path) -> None:
    """Starting over (resume=False): keep the old run's checkpoints and EMA snapshots, out of the way."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for name in ("checkpoints", SNAPSHOT_DIR):
        if not (out / name).exists():
            continue
        aside = out / f"{name}.replaced-{stamp}"
        while aside.exists():
            aside = aside.with_name(aside.name + "+")
        (out / name).rename(aside)
        warnings.warn(f"not resuming: moved the previous {name} to {aside}")


def restore(state: TrainState, out: Path, ck: dict, where: Path) -> None:
    """Restore ``state`` from a loaded training checkpoint ``ck`` (:func:`condiff.checkpoints.load_checkpoint`).

    Checkpoints of the earlier loop (no scheduler or log window in ``extra``) load
    too: the schedule is a function of the step, and their log windows were empty.
    """
    if "raw" not in ck:
        raise CondiffError(f"{where}: not a training checkpoint (no optimizer state)")
    load_state_strict(state.net, ck["raw"], str(where))
    step = ck["step"]
    state.ema.load(ck["weights"], state.ema.load_snapshots(out, step) if state.ema.profiles else None, step)
    state.opt.load_state_dict(ck["optimizer"])
    state.gen.set_state(ck["rng"]["generator"])
    torch.set_rng_state(ck["rng"]["torch"])
    extra = ck.get("extra", {})
    state.step, state.wall_before = step, float(extra.get("wall_s", 0.0))
    state.window = {k: list(v) for k, v in extra.get("log_window", {"loss": [0.0, 0]}).items()}


def train_step(state: TrainState, task, x0, y, cfg: TrainConfig, shard: dict, device, world_size: int):
    """One optimizer step on the batch (x0, y); returns (loss, metrics, grad-norm), or None when the loss
    is non-finite on some rank (the step is then skipped: no update, no EMA)."""
    with autocast(device, cfg.bf16):
        loss, metrics = task.loss(state.model, x0, y, state.gen, **shard)
    if not all_true(torch.isfinite(loss), world_size):
        return None
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e12)
    state.opt.step()
    state.sched.step()
    state.ema.update(state.net, state.step + 1)
    return loss, metrics, gnorm


def save(state: TrainState, out: Path, config: dict, started: float) -> Path:
    """Checkpoint ``state`` at its step: the EMA snapshots first, then the checkpoint (written atomically)."""
    state.ema.save_snapshots(out, state.step, config)
    return save_checkpoint(out / "checkpoints" / f"step-{state.step:07d}", state.net, config,
                           ema=state.ema.state_dict(), optimizer=state.opt, step=state.step,
                           extra={"wall_s": state.wall_before + time.time() - started,
                                  "log_window": state.window},
                           rng={"generator": state.gen.get_state(), "torch": torch.get_rng_state()})


class MetricsLog:
    """The JSONL metrics log: one record per ``log_every`` steps, sums merged over ranks."""

    def __init__(self, path: Path, main: bool, world_size: int):
        self.path, self.main, self.world_size = path, main, world_size
        self.t0, self.images = time.time(), 0  # speed: images of this process since t0

    def add(self, state: TrainState, loss, metrics: dict, n: int) -> None:
        self.images += n
        state.window["loss"][0] += float(loss.detach()) * n
        state.window["loss"][1] += n
        for k, (num, den) in metrics.items():
            acc = state.window.setdefault(k, [0.0, 0])
            acc[0] += num
            acc[1] += den

    def write(self, state: TrainState, gnorm, lr: float, wall_s: float) -> dict:
        dt = time.time() - self.t0
        window = merge_sums(state.window, self.world_size)
        rec = {"step": state.step, "wall_s": round(wall_s, 2), "lr": lr, "grad_norm": float(gnorm),
               "images_per_s": self.images * self.world_size / max(dt, 1e-9)}
        rec.update({k: num / max(den, 1) for k, (num, den) in window.items()})
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        state.window, self.t0, self.images = {"loss": [0.0, 0]}, time.time(), 0
        return rec


def _check_args(task, cfg: TrainConfig, rank: int, world_size: int) -> bool:
    cfg.validate()
    if not 0 <= rank < world_size:
        raise CondiffError(f"rank {rank} outside world size {world_size}")
    if cfg.batch_size % world_size:
        raise CondiffError(f"batch size {cfg.batch_size} is not divisible by the {world_size} processes; "
                           "--batch-size is the global batch")
    sharded = "shard" in inspect.signature(task.loss).parameters
    if world_size > 1 and not sharded:
        raise CondiffError(f"{task.name} training does not support several processes")
    return sharded


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
    Raises:
        RunLocked: another live trainer holds ``out_dir``.
        TrainingStopped: SIGTERM or SIGINT arrived; the step in progress was finished and
            checkpointed first (``exit_code`` 0 or 130).
    """
    sharded = _check_args(task, cfg, rank, world_size)
    out, main = Path(out_dir), rank == 0
    lock = RunLock(out).acquire() if main else None
    try:
        with StopSignals() as stop:
            return _run(model, task, data, cfg, out, meta, device, resume, progress, callback, rank, world_size,
                        sharded, stop)
    finally:
        if lock is not None:
            lock.release()


def _run(model, task, data, cfg, out, meta, device, resume_, progress, callback, rank, world_size, sharded, stop):
    main = rank == 0
    net = unwrap(model)
    config = dict(meta or {}, network=net.config, train=asdict(cfg), **task.config())
    if main and not resume_:
        _move_aside(out)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    state = TrainState(model, net, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
                       EMA(net, cfg.ema_decay, cfg.ema_profiles), torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    started = time.time()
    latest, ck = load_latest_checkpoint(out) if resume_ else (None, None)  # skips an unreadable newest one
    latest = same_on_all_ranks(latest, world_size, "the checkpoint to resume from")
    if latest is not None:
        if ck["config"].get("network") != net.config:
            raise CondiffError(f"{latest}: its network config differs from this run's; use another --out")
        theirs, ours = prediction_of(ck["config"], str(latest)), prediction_of(config)
        if theirs != ours:
            raise CondiffError(f"{latest}: its network predicts {theirs}, this run's {ours}; use another --out "
                               "or the same --prediction")
        restore(state, out, ck, latest)
    if main:
        _truncate_log(out / "metrics.jsonl", state.step)  # also drops lines of a start killed before its first checkpoint
    for group in state.opt.param_groups:  # the schedule is a function of the step: rebuilt, not trusted
        group["initial_lr"] = cfg.lr
    state.sched = torch.optim.lr_scheduler.LambdaLR(state.opt, lr_lambda(cfg), last_epoch=state.step - 1)
    order = _BatchOrder(len(data), cfg.batch_size, cfg.seed)
    shard = {"shard": Shard(rank, world_size)} if sharded else {}
    log = MetricsLog(out / "metrics.jsonl", main, world_size)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (progress and main), desc=f"train {task.name}",
               dynamic_ncols=True)
    bad_in_row, final = 0, None
    try:  # the bar is closed on errors too, so a failed run leaves a clean terminal
        model.train()
        while state.step < cfg.steps:
            idx = order.indices(state.step)[rank::world_size]
            x0, y = data.images[idx].to(device), data.labels[idx].to(device)
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            lr = state.opt.param_groups[0]["lr"]
            result = train_step(state, task, x0, y, cfg, shard, device, world_size)
            if result is None:
                bad_in_row += 1
                warnings.warn(f"non-finite loss at step {state.step}; step skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_nonfinite:
                    raise NonFiniteError(f"{bad_in_row} non-finite losses in a row at step {state.step}; "
                                         "lower --lr or check the data")
                state.step += 1
                with warnings.catch_warnings():  # the lr still follows the step count (no optimizer step ran)
                    warnings.simplefilter("ignore", UserWarning)
                    state.sched.step()
                continue
            bad_in_row = 0
            loss, metrics, gnorm = result
            state.step += 1
            log.add(state, loss, metrics, len(x0))
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                rec = log.write(state, gnorm, lr, state.wall_before + time.time() - started)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ips=f"{rec['images_per_s']:.0f}")
            stopping = not all_true(stop.signum is None, world_size)
            if state.step % cfg.ckpt_every == 0 or state.step == cfg.steps or stopping:
                if main:
                    final = save(state, out, config, started)
                    _prune(out, cfg.keep)
            if stopping:
                barrier(world_size)
                raise TrainingStopped(stop.signum or 15, state.step, final or latest_checkpoint(out))
            if callback is not None and main and cfg.sample_every and state.step % cfg.sample_every == 0:
                callback(ema_model(net, state.ema.state_dict()), state.step)
                model.train()
    finally:
        bar.close()
    barrier(world_size)  # rank 0's last checkpoint is complete before any rank returns
    final = final if final is not None else latest_checkpoint(out)
    if final is None:  # every step was skipped, the last one included: there is nothing to return
        raise NonFiniteError(f"no checkpoint: the losses of the last steps up to {cfg.steps} were non-finite; "
                             "lower --lr or check the data")
    return final
