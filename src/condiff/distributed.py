"""Beyond one process: torchrun process groups, data-parallel training, sharded sampling.

``torchrun --nproc_per_node=N -m condiff train ...`` starts N copies of the
command; each finds RANK, WORLD_SIZE and LOCAL_RANK in its environment.
:func:`launch` turns that environment into a process group (NCCL on CUDA, gloo
on CPU), pins the rank to its GPU and tears the group down at the end; the
command asks :func:`current` for its :class:`Dist` (rank 0 of 1 outside
torchrun) and wraps its model with :meth:`Dist.wrap`.

Semantics that make N processes equal to one:

* ``--batch-size`` is the *global* batch B; it must be divisible by N and rank r
  trains on rows r, r + N, r + 2N, ... of the single-process batch.  Each rank's
  loss is the mean over its B/N rows, DistributedDataParallel averages the
  gradients, so the update is the full-batch update.
* the noise of a step (t, eps, the condition dropout) is drawn for the whole
  global batch from the same generator on every rank and sliced the same way
  (:class:`Shard`), so the union of the ranks' draws is the single-process draw.
* sampling splits whole batches across ranks (:func:`shard_range`); batch b's
  noise depends only on (seed, b), so the gathered images equal one process's.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as td

from .errors import CondiffError

__all__ = ["Dist", "Shard", "current", "launch", "torchrun_env", "shard_range", "generate_sharded",
           "all_true", "merge_sums", "same_on_all_ranks", "barrier"]


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s rows [rank::world_size] of a global batch, and noise drawn to match.

    Every draw is made for the global batch (local rows x world_size) from the
    shared generator and then sliced, so all ranks advance the generator alike and
    the rows a rank keeps are exactly the rows one process would give them.
    With world_size = 1 each draw is the plain draw.
    """

    rank: int = 0
    world_size: int = 1

    def _rows(self, draw: torch.Tensor) -> torch.Tensor:
        return draw[self.rank::self.world_size] if self.world_size > 1 else draw

    def randint(self, high: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) integers uniform in [0, high): this rank's slice of a global (n * world_size,) draw."""
        return self._rows(torch.randint(0, high, (n * self.world_size,), generator=generator))

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        """Standard normal of ``shape`` (rows first), sliced from the global draw."""
        shape = tuple(shape)
        return self._rows(torch.randn((shape[0] * self.world_size, *shape[1:]), generator=generator))

    def rand(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) uniform in [0, 1), sliced from the global draw."""
        return self._rows(torch.rand(n * self.world_size, generator=generator))


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank ``rank`` of ``world_size``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only one that writes checkpoints, logs and images."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel when several processes run, else unchanged."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def train_kwargs(self) -> dict:
        """``rank`` and ``world_size`` for :func:`condiff.training.train`."""
        return {"rank": self.rank, "world_size": self.world_size}


_CURRENT = Dist()


def current() -> Dist:
    """The running process's :class:`Dist` (rank 0 of 1 outside :func:`launch`)."""
    return _CURRENT


def torchrun_env(environ=None) -> Dist | None:
    """The Dist described by torchrun's RANK, WORLD_SIZE, LOCAL_RANK, or None when not under torchrun."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise CondiffError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise CondiffError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Dist(rank, world, local)


@contextmanager
def launch(device: torch.device | str = "auto", command: str = "this command", supported: bool = True):
    """Run a block as one rank of a torchrun job; a no-op outside torchrun or with one process.

    Inits the default process group from the environment (NCCL when ``device``
    resolves to CUDA, gloo otherwise; ``"auto"`` is CUDA when present), refuses
    commands that are not ``supported`` for several processes, pins CUDA ranks to GPU LOCAL_RANK (so ``"cuda"`` means
    that GPU), makes :func:`current` return this rank's :class:`Dist`, and
    destroys the group on exit.
    """
    global _CURRENT
    d = torchrun_env()
    if d is None or not d.active:
        yield _CURRENT
        return
    if not supported:
        raise CondiffError(f"condiff {command} does not run as several processes; run it without torchrun "
                           "or with --nproc_per_node=1")
    if not td.is_available():
        raise CondiffError("this PyTorch build has no torch.distributed")
    from .pipeline import resolve_device

    cuda = resolve_device(device).type == "cuda"
    if cuda:
        if d.local_rank >= torch.cuda.device_count():
            raise CondiffError(f"LOCAL_RANK {d.local_rank} but only {torch.cuda.device_count()} GPUs on this node")
        torch.cuda.set_device(d.local_rank)
    own = not td.is_initialized()
    if own:
        td.init_process_group("nccl" if cuda else "gloo", rank=d.rank, world_size=d.world_size,
                              **({"device_id": torch.device("cuda", d.local_rank)} if cuda else {}))
    previous, _CURRENT = _CURRENT, d
    try:
        yield d
    finally:
        _CURRENT = previous
        if own and td.is_initialized():
            td.destroy_process_group()


# ----------------------------------------------------------------------------- collectives
def _ready(world_size: int) -> bool:
    return world_size > 1 and td.is_available() and td.is_initialized()


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def all_true(flag, world_size: int) -> bool:
    """True when ``flag`` holds on every rank (one tiny all-reduce; just ``flag`` for one process)."""
    flag = bool(flag)
    if not _ready(world_size):
        return flag
    v = torch.tensor([1 if flag else 0], device=_flag_device())
    td.all_reduce(v, op=td.ReduceOp.MIN)
    return bool(v.item())


def merge_sums(sums: dict, world_size: int) -> dict:
    """Add up ``{name: [numerator, denominator]}`` over all ranks (keys may differ between ranks)."""
    if not _ready(world_size):
        return sums
    parts = [None] * world_size
    td.all_gather_object(parts, sums)
    out: dict = {}
    for part in parts:
        for k, (num, den) in part.items():
            acc = out.setdefault(k, [0.0, 0])
            acc[0] += num
            acc[1] += den
    return out


def same_on_all_ranks(value, world_size: int, what: str):
    """``value`` after checking every rank holds the same one (one-line error otherwise)."""
    if not _ready(world_size):
        return value
    parts = [None] * world_size
    td.all_gather_object(parts, value)
    if any(p != parts[0] for p in parts):
        raise CondiffError(f"ranks disagree on {what}: {parts}; put --out on a filesystem every node shares")
    return value


def barrier(world_size: int) -> None:
    """Wait for every rank (no-op for one process)."""
    if _ready(world_size):
        td.barrier()


# ----------------------------------------------------------------------------- sharded sampling
def shard_range(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of the samples rank ``rank`` generates: a contiguous run of whole batches.

    Batches are split as evenly as possible; a rank may get none (count 0) when
    there are fewer batches than ranks.
    """
    nb = math.ceil(n / batch_size)
    b0, b1 = nb * rank // world_size, nb * (rank + 1) // world_size
    start = min(b0 * batch_size, n)
    return start, min(b1 * batch_size, n) - start


def generate_sharded(model, schedule, n: int, *, shape, cond=None, batch_size: int = 256, dist: Dist | None = None,
                     **kw) -> torch.Tensor | None:
    """:func:`condiff.pipeline.generate` with its batches split across the ranks of :func:`current`.

    Every rank samples its :func:`shard_range` (``start`` keeps each batch's noise
    seeded by (seed, b)), rank 0 gathers: it returns all ``n`` images, identical to
    one process with the same arguments; the other ranks return None.  Outside
    torchrun this is ``generate``.
    """
    from .pipeline import generate

    d = dist or current()
    if not d.active:
        return generate(model, schedule, n, shape=shape, cond=cond, batch_size=batch_size, **kw)
    if n < 1 or batch_size < 1:  # same checks, same message, on every rank
        return generate(model, schedule, n, shape=shape, cond=cond, batch_size=batch_size, **kw)
    from .guidance import batch_cond, slice_cond

    start, count = shard_range(n, batch_size, d.rank, d.world_size)
    cond = slice_cond(batch_cond(cond, n), start, start + count)  # per-row entries follow their rows
    part = torch.zeros((0, *shape))
    if count:
        part = generate(model, schedule, count, shape=shape, cond=cond, batch_size=batch_size, start=start, **kw)
    parts = [None] * d.world_size if d.main else None
    td.gather_object(part.cpu(), parts, dst=0)
    return torch.cat(parts) if d.main else None
