"""Small shared fixtures for the tests: tiny synthetic datasets and models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from condiff.data import ImageDataset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Autouse in the modules that import it: tiny tensors, so intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shapes_dataset(n: int = 256, size: int = 8, seed: int = 0) -> ImageDataset:
    """Two easy classes at size x size: a bright left quarter (0) or bright top three quarters (1), plus noise."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    x = np.full((n, 1, size, size), -0.8, dtype=np.float32)
    for i in range(n):
        if y[i] == 0:
            x[i, :, :, : size // 4] = 0.8
        else:
            x[i, :, : 3 * size // 4, :] = 0.8
    x += 0.05 * g.standard_normal(x.shape).astype(np.float32)
    return ImageDataset(torch.from_numpy(x).clamp(-1, 1), torch.from_numpy(y), ["left", "top"])


def write_npz(path: Path, data: ImageDataset) -> Path:
    imgs = ((data.images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    np.savez(path, images=imgs, labels=data.labels.numpy(), class_names=np.array(data.class_names))
    return path


def run_cli(*args, cwd=None, timeout=180):
    """Run ``python -m condiff ARGS``; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "condiff", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_one_line_error(proc) -> None:
    """Exit code 2, a single 'condiff ...: error: ...' line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) >= 1 and "error" in lines[-1], proc.stderr
    err_lines = [ln for ln in lines if "error" in ln]
    assert len(err_lines) == 1, proc.stderr


def run_cli_inprocess(argv) -> tuple[int, str, str]:
    """``condiff.cli.main(argv)`` in this process: (exit code, stdout, stderr); argparse exits become codes.

    Any other exception propagates: for the CLI that is a Python traceback, i.e. a bug.
    """
    import contextlib
    import io

    from condiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc, out.getvalue(), err.getvalue()


def bash_commands(markdown: Path) -> list[list[str]]:
    """Every command of a Markdown file's ```bash blocks as an argv list, in order.

    Line continuations are joined, ``# comments`` dropped (shlex, so a ``#`` inside quotes stays),
    ``a && b`` split into two commands, and ``.venv/bin/condiff`` written ``condiff``.
    """
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", Path(markdown).read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args: list[str] = []
            for tok in shlex.split(line, comments=True) + ["&&"]:
                if tok != "&&":
                    args.append("condiff" if tok == ".venv/bin/condiff" else tok)
                elif args:
                    commands.append(args)
                    args = []
    return commands


def run_condiff_module(argv) -> int:
    """``python -m condiff ARGV`` in this process (runpy: the module entry a user runs); its exit code."""
    import runpy

    old = sys.argv
    sys.argv = ["condiff", *map(str, argv)]
    try:
        runpy.run_module("condiff", run_name="__main__", alter_sys=False)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0
