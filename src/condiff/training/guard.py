"""One trainer per run folder, and a clean stop on SIGTERM / SIGINT.

* :class:`RunLock`  an exclusive ``fcntl.flock`` on ``run_dir/.lock``; the file names
  its holder (pid, host, start time) and is removed on release. The kernel drops
  the lock when its holder dies, so a lock file left by a killed trainer is
  *stale* and simply taken over.
* :class:`StopSignals`  while training, SIGTERM and SIGINT only set a flag; the
  loop finishes its step, writes a checkpoint and raises :class:`TrainingStopped`
  (the CLI exits 0 for SIGTERM, 130 for SIGINT). Resume then loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from ..errors import CondiffError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, trainers are trusted to keep apart
    fcntl = None

__all__ = ["RunLock", "RunLocked", "StopSignals", "TrainingStopped"]


class RunLocked(CondiffError):
    """Another live process trains in this run folder."""


class TrainingStopped(SystemExit):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 0 (SIGTERM) or 130 (SIGINT).

    A SystemExit carrying that code, so a caller that does not catch it (train-judge,
    train-encoder) still ends the process quietly with the right status.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 130 if signum == signal.SIGINT else 0
        super().__init__(self.exit_code)

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} after step {self.step}; checkpoint "
                f"{self.checkpoint}; rerun the same command to resume")


class RunLock:
    """Exclusive lock on a run folder; a second holder fails with a one-line error naming the first."""

    NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale holder's record, when one was replaced

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                h = self.holder() or {}
                raise RunLocked(f"{self.path.parent} is in use by another trainer (pid {h.get('pid', '?')} on "
                                f"{h.get('host', '?')}, since {h.get('started', '?')}); wait for it, stop it, "
                                "or use another --out") from None
            try:  # the holder may have released and removed the file between our open and flock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.took_over = self.holder()  # a record nobody holds: its trainer died (stale), take over
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock: a finished run leaves no .lock behind."""
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class StopSignals:
    """Within the block, SIGTERM and SIGINT set ``self.signum`` instead of killing the process.

    A second signal of the same kind restores the default behaviour (a user pressing
    Ctrl-C twice gets out at once). Outside the main thread it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second one: give up waiting for the step
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
