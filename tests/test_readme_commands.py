"""Every shell command of README.md, run as a user would from a folder outside the clone (issue 21).

The README is parsed at test time, so a command added later is covered or the test fails: each
command is run (at a tiny size, by the overrides of SMALLER) or named in EXCLUDED with its reason.
Placeholders for a user's own files (``ref.png``, a downloaded diffusers model under ``~``) are
small fixtures written before the run; nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import bash_commands, one_thread, run_cli, run_condiff_module  # noqa: F401 (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: README commands not run here, matched by a regex on the command (its words joined by spaces), with why.
EXCLUDED = {
    r"^bash scripts/setup\.sh$": "the setup itself: .ci/run runs it on a fresh clone before the tests",
    r"^\.venv/bin/python -m pytest -q tests$": "the test suite itself: .ci/run runs exactly this command",
    r"^condiff serve\b": "a server that runs until stopped: tests/test_serve.py starts it and drives its page",
    r"^torchrun --nproc_per_node=4 -m condiff train ": "4 processes of a 2-core machine (~12 s of interpreter start-up): "
                                                      "tests/test_distributed.py trains under torchrun with 2 and "
                                                      "compares the weights with one process",
    r"^torchrun --nnodes=2 ": "two machines (a master at 10.0.0.1): not reachable from one test",
}

SMALL_FASHION = "fashion-mnist-500"  # the first 1000 training and 500 held-out Fashion-MNIST images, as IDX
_TRAIN = ["--steps", "2", "--batch-size", "8", "--limit", "64", "--warmup", "1"]
#: size-reducing overrides, appended to every command whose words match the regex (argparse: the last wins).
SMALLER = [
    (r"^condiff demo\b", ["--steps", "2", "--per-class", "1"], "the full demo samples every grid at 15 steps (~20 s)"),
    (r"^condiff sample\b", ["--steps", "2", "--n", "2"], "8 images per class at 15 (or 250) steps: a few seconds each"),
    (r"^condiff sample .*--npz", ["--n", "8"], "its samples are evaluated: more than 5 needed"),
    (r"^condiff (train|train-classifier|train-judge) ", _TRAIN, "thousands of steps on Fashion-MNIST: minutes to hours"),
    (r"^condiff train-encoder\b", _TRAIN + ["--clean-steps", "2"], "1500 + 600 steps: minutes"),
    (r"^condiff sweep\b", ["--n", "20", "--steps", "2", "--batch-size", "20"],
     "500 samples per scale at 15 steps: minutes"),
    (r"^torchrun .*-m condiff sample\b", ["--per-class", "4", "--steps", "2", "--batch-size", "2"],
     "64 images at 15 steps; 2 batches of 2 still give each of the 2 processes one"),
    (r"^condiff (evaluate|sweep)\b", ["--data", SMALL_FASHION],
     "the judge's features of all 10,000 held-out images: ~5 s of CPU a command (the same files, cut)"),
]

#: a user's own files the README names; each is written by the fixture ``own_files`` before the run.
PLACEHOLDERS = {
    "ref.png": "a reference image of the user's own (RGB, 40x30: not the model's size or mode)",
    "~/models/ddpm-cifar10-32": "a downloaded diffusers DDPM folder: a tiny random UNet2DModel (3x32x32) "
                                "and DDPM's linear scheduler (T 1000), under a temporary HOME",
    "runs/clf32": "the user's classifier for that model: 2 steps on a tiny RGB 32x32 .npz, --schedule linear",
}


def words(args: list[str]) -> str:
    return " ".join(args)


def option(args: list[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` (or ``flag=VALUE``) in args, else None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def expand(args: list[str]) -> list[str]:
    """``~`` and ``$VAR`` as bash expands them (HOME is the test's); an unset variable is an error."""
    args = [os.path.expandvars(os.path.expanduser(a)) for a in args]
    unset = [a for a in args if re.search(r"\$\w|\$\{", a)]
    if unset:
        raise ValueError(f"unset variable in {unset}: export it in the test or name the README's value")
    return args


def condiff_part(args: list[str]) -> list[str] | None:
    """``condiff SUB ...`` of a command: itself, or what ``torchrun ... -m condiff`` runs; None for others."""
    if args[0] == "torchrun" and "-m" in args:
        args = args[args.index("-m") + 1:]
    return args if args[0] == "condiff" and len(args) > 1 else None


def promised(args: list[str]) -> list[str] | None:
    """The output files a condiff command promises (globs relative to its working folder), None if unknown."""
    args = condiff_part(args)
    if args is None:
        return None
    sub, out = args[1], option(args, "--out")
    if sub == "sample":
        return [out or "samples.png"] + ([option(args, "--npz")] if option(args, "--npz") else [])
    if sub == "demo":
        return [f"{out or 'demo'}/index.html", f"{out or 'demo'}/*.png"]
    if sub in ("train", "train-classifier", "train-encoder", "train-judge") and out:
        return [f"{out}/checkpoints/**/*.safetensors", f"{out}/metrics.jsonl"]
    if sub == "evaluate":
        return [out or str(Path(option(args, "--samples") or "").with_suffix(".eval.json"))]
    if sub == "sweep" and out:
        return [f"{out}/results.md", f"{out}/results.csv", f"{out}/sweep.png"]
    if sub == "export" and out:
        return [f"{out}/model.safetensors", f"{out}/config.json", f"{out}/SHA256SUMS"]
    return None


def plan(commands: list[list[str]]) -> tuple[list[tuple[list[str], list[str]]], list[str]]:
    """(the commands to run, each with its overrides appended, and its promised outputs; the uncovered ones).

    A command is run when it is ``condiff SUB ...`` with known promised outputs, skipped when EXCLUDED
    matches it, and uncovered otherwise."""
    runs, uncovered = [], []
    for args in commands:
        line = words(args)
        if any(re.search(p, line) for p in EXCLUDED):
            continue
        outputs = promised(args)
        if outputs is None:
            uncovered.append(line)
            continue
        extra = [a for pattern, more, _ in SMALLER if re.search(pattern, line) for a in more]
        runs.append((args + extra, outputs))
    return runs, uncovered


# ----------------------------------------------------------------------------- the tables themselves
def test_every_readme_command_is_run_or_excluded_with_a_reason():
    commands = bash_commands(README)
    runs, uncovered = plan(commands)
    assert not uncovered, f"README commands neither run nor in EXCLUDED: {uncovered}"
    run_subcommands = {condiff_part(a)[1] for a, _ in runs}
    assert len(runs) >= 20 and run_subcommands >= {"demo", "sample", "train", "train-classifier", "train-encoder",
                                                   "train-judge", "evaluate", "sweep", "export"}
    lines = [words(a) for a in commands]
    for pattern, reason in EXCLUDED.items():  # no stale entries
        assert reason and any(re.search(pattern, ln) for ln in lines), pattern
    for pattern, _, reason in SMALLER:
        assert reason and any(re.search(pattern, ln) for ln in lines), pattern
    for name in PLACEHOLDERS:
        assert any(name in a for a in sum(commands, [])), name


def test_a_new_command_nobody_covered_fails_the_check():
    runs, uncovered = plan([["condiff", "sample", "--class", "bag"], ["make", "all"],
                            ["condiff", "frobnicate", "--out", "x"], ["condiff", "serve", "--port", "1"]])
    assert uncovered == ["make all", "condiff frobnicate --out x"]
    assert runs == [(["condiff", "sample", "--class", "bag", "--steps", "2", "--n", "2"], ["samples.png"])]


def test_commands_are_parsed_like_bash(tmp_path, monkeypatch):
    md = tmp_path / "x.md"
    md.write_text("```bash\nbash a.sh && .venv/bin/condiff demo --out d   # a comment\n# only a comment\n"
                  "condiff sample --text \"a # b\" \\\n    --class bag\n```\n```python\ncondiff = 1\n```\n")
    assert bash_commands(md) == [["bash", "a.sh"], ["condiff", "demo", "--out", "d"],
                                 ["condiff", "sample", "--text", "a # b", "--class", "bag"]]
    assert option(["condiff", "sample", "--steps", "250", "--steps", "2"], "--steps") == "2"
    monkeypatch.setenv("HOME", "/h")
    monkeypatch.setenv("RUNS", "/r")
    assert expand(["~/m", "$RUNS/cfg", "${RUNS}x", "a$"]) == ["/h/m", "/r/cfg", "/rx", "a$"]
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ValueError, match="unset variable"):
        expand(["$NOT_SET_ANYWHERE/cfg"])


# ----------------------------------------------------------------------------- the run
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_small_fashion_mnist(out: Path, train: int, test: int) -> None:
    """The first images of Debian's Fashion-MNIST as an IDX folder of the same layout (--data reads it)."""
    from condiff.data import DEFAULT_FASHION_MNIST, read_idx

    out.mkdir()
    for stem, n in (("train-images-idx3-ubyte", train), ("train-labels-idx1-ubyte", train),
                    ("t10k-images-idx3-ubyte", test), ("t10k-labels-idx1-ubyte", test)):
        a = read_idx(DEFAULT_FASHION_MNIST / f"{stem}.gz")[:n]
        (out / stem).write_bytes(bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes())


@pytest.fixture
def own_files(tmp_path, monkeypatch):
    """A working folder outside the clone holding the user's own files of PLACEHOLDERS; HOME in tmp_path."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    stripes = np.zeros((30, 40, 3), np.uint8)
    stripes[:, ::4] = (230, 200, 40)
    Image.fromarray(stripes).save(work / "ref.png")
    write_small_fashion_mnist(work / SMALL_FASHION, train=1000, test=500)

    import diffusers
    import torch

    torch.manual_seed(0)
    root = home / "models" / "ddpm-cifar10-32"
    diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4).save_pretrained(root / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "rgb32.npz", images=g.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(40) % 10)
    assert run_condiff_module(["train-classifier", "--data", tmp_path / "rgb32.npz", "--out", "runs/clf32",
                               "--schedule", "linear", "--T", "1000", "--channels", "8,16", "--steps", "2",
                               "--batch-size", "8", "--no-progress"]) == 0
    return work


@pytest.mark.filterwarnings("ignore:.*saturated")  # models trained 2 steps, sampled in 2: expected, and warned of
def test_every_readme_command_runs_outside_the_clone(own_files, monkeypatch, capsys):
    """Each run command, in the README's order, from a folder outside the clone: exit code 0 and its outputs.

    The first runs in a fresh interpreter (``python -m condiff``, PYTHONPATH the checkout's src), the rest
    through the same module entry in this process (one interpreter start-up instead of twenty)."""
    work = own_files
    assert ROOT not in work.parents and all(Path(expand([name])[0]).exists() for name in PLACEHOLDERS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    runs, uncovered = plan(bash_commands(README))
    assert not uncovered
    for i, (args, outputs) in enumerate(runs):
        args = expand(args)
        for pattern in outputs:  # a file of an earlier command (samples.png) must not pass for this one's
            for old in work.glob(pattern):
                old.unlink()
        if args[0] == "torchrun":  # torchrun is `python -m torch.distributed.run`; on this machine's loopback
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--master_addr=127.0.0.1",
                                   f"--master_port={free_port()}", *args[1:]], capture_output=True, text=True,
                                  timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"))
            assert proc.returncode == 0, (args, proc.stderr[-3000:])
        elif i == 0:
            proc = run_cli(*args[1:], cwd=work)
            assert proc.returncode == 0, (args, proc.stderr[-3000:])
        else:
            assert run_condiff_module(args[1:]) == 0, (args, capsys.readouterr().err[-3000:])
        for pattern in outputs:
            assert list(work.glob(pattern)), (args, pattern, "not written")
