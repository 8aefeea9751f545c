"""A user's first hour: defaults from the measured sweeps, shipped things by name, references the
encoder can read, and the tutorial's commands (docs/tutorial.md) run at a tiny size."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.compose import DEFAULT_SCALES, SCALE_RANGES
from condiff import zoo
from condiff.errors import CondiffError
from condiff.images import load_image
import condiff.similarity.terms as terms

from helpers import bash_commands, one_thread, run_cli  # noqa: F401  (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- defaults (item 1)
def test_every_default_scale_lives_in_compose_and_help_gives_its_range():
    assert terms.DEFAULT_SCALES is DEFAULT_SCALES  # one place
    assert set(SCALE_RANGES) == set(DEFAULT_SCALES)
    help_text = " ".join(run_cli("sample", "--help").stdout.split())
    for kind in ("text", "image", "style", "classifier", "text-cfg"):
        assert " ".join(SCALE_RANGES[kind].split()) in help_text, kind
    assert f"default {DEFAULT_SCALES['classifier']:g}" in help_text
    assert " ".join(SCALE_RANGES["cfg"].split()) in help_text


# ----------------------------------------------------------------------------- shipped by name (item 4)
def test_shipped_references_by_name_and_by_file(tmp_path):
    assert zoo.reference("stripes").name == "stripes.png" and zoo.reference("stripes").is_file()
    assert zoo.image_path("sneaker") == zoo.reference("sneaker")
    own = tmp_path / "sneaker"  # a file of that name wins over the shipped one
    Image.new("L", (5, 5)).save(own, format="PNG")
    assert zoo.image_path(own) == own
    with pytest.raises(CondiffError, match="shipped: dress, sneaker, stripes"):
        zoo.reference("zebra")
    with pytest.raises(CondiffError, match="image not found: nope.png .*dress, sneaker, stripes"):
        zoo.image_path("nope.png")


def test_shipped_encoders_default_where_the_image_size_matches():
    assert Path(terms.shipped_encoder("image-encoder", (1, 28, 28), "--image", "--image-encoder", "x")) == \
        zoo.shipped("image-encoder")
    with pytest.raises(CondiffError, match=r"--text needs --text-encoder CKPT: the shipped text-encoder "
                                           r"\(fashion-text-encoder\) takes 1x28x28 images, this model makes 3x32x32"):
        terms.shipped_encoder("text-encoder", (3, 32, 32), "--text", "--text-encoder CKPT", "condiff train-encoder")


def test_sweep_defaults_to_the_shipped_models_and_measured_scales(tmp_path):
    from condiff.compose import Sampling
    from condiff.sweep import SWEEP_SCALES, sweep_checkpoint

    result = sweep_checkpoint(None, "classifier", None, 20, tmp_path / "sweep", sampling=Sampling("ddim", 2),
                              batch_size=20, log=None)
    assert [r["scale"] for r in result["rows"]] == SWEEP_SCALES["classifier"]
    assert "fashion-classifier" in result["settings"]["options"]["classifier"]
    assert "fashion-cfg" in result["settings"]["model"]


# ----------------------------------------------------------------------------- references (item 6)
def test_a_wide_reference_keeps_its_aspect_ratio(tmp_path):
    arr = np.zeros((20, 40), np.uint8)  # H 20, W 40: a 10x10 white square in the middle of a black field
    arr[5:15, 15:25] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 20)[0]
    bright = (x > 0).nonzero()
    height = int(bright[:, 0].max() - bright[:, 0].min() + 1)
    width = int(bright[:, 1].max() - bright[:, 1].min() + 1)
    assert abs(height - width) <= 1 and height <= 6  # a square stays square (stretched: 10 high, 5 wide)
    assert torch.all(x[:5] == -1) and torch.all(x[-5:] == -1)  # padded with the border's colour


def test_the_encoder_names_what_it_sees_and_warns_on_an_inverted_reference():
    enc, config = terms.load_encoder(zoo.shipped("image-encoder"), "image")
    ref = load_image(zoo.reference("sneaker"), 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a typical reference: no warning
        line = terms.describe_reference(enc, ref, "sneaker", config["class_names"])
    assert line.startswith("sneaker: the image encoder sees Sneaker (p = ")
    with pytest.warns(UserWarning, match="looks inverted"):
        terms.describe_reference(enc, -ref, "drawn", config["class_names"])


# ----------------------------------------------------------------------------- tutorial (item 8)
def tutorial_commands() -> list[list[str]]:
    """The ```bash blocks of docs/tutorial.md, one argv list per command."""
    return bash_commands(ROOT / "docs" / "tutorial.md")


TINY = {"--per-class": "12", "--steps": "3", "--n": "20", "--batch-size": "8", "--scales": "0,4"}


def tinier(cmd: list[str]) -> list[str]:
    """A tutorial command at a tiny size: the same flags, with the sizes replaced by TINY."""
    args = list(cmd)
    for i, a in enumerate(args[:-1]):
        if a in TINY:
            args[i + 1] = TINY[a]
    return args


def test_the_tutorial_runs_at_a_tiny_size(tmp_path, monkeypatch, capsys):
    """Every command of docs/tutorial.md, in order, in a fresh folder: the doc and this test cannot drift.

    In this process (condiff.cli.main, the script by runpy): the commands, not the interpreter start-up."""
    import runpy
    import sys

    from condiff.cli import main

    commands = tutorial_commands()
    assert {c[1] for c in commands if c[0] == "condiff"} >= {"train", "train-classifier", "sample",
                                                                           "train-judge", "sweep"}
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        args = tinier(cmd)
        if args[0] == "condiff":
            code = main(args[1:] + ["--no-progress"])
            assert code == 0, (cmd, capsys.readouterr().err[-2000:])
        else:
            assert args[0] == "python", cmd  # a script of the repository
            monkeypatch.setattr(sys, "argv", [str(ROOT / args[1])] + args[2:])
            runpy.run_path(str(ROOT / args[1]), run_name="__main__")
    assert (tmp_path / "tutorial" / "sweep" / "results.md").is_file()
    assert (tmp_path / "tutorial" / "cfg.png").is_file() and (tmp_path / "tutorial" / "classifier.png").is_file()


def test_the_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's Python blocks, in order and in one namespace, with every step count cut to 2 (the text
    example needs the extra condiff[text], which scripts/setup.sh installs)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    code = "\n".join(blocks)
    code = re.sub(r"schedule, (15|25|50|250),", "schedule, 2,", code)
    code = re.sub(r"steps=\d+", "steps=2", code)
    assert ", 50," not in code and "steps=100" not in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    assert (tmp_path / "sneakers.png").is_file() and (tmp_path / "image.png").is_file()
    assert namespace["x"].shape[1:] == (1, 28, 28) and namespace["x"].abs().max() <= 1
