"""Issue 9: every command, any arguments -> exit 0 or 2, never a Python traceback.

A property-based test (hypothesis) draws a command of ``condiff`` and a random
set of its flags (read from the argparse parser itself, so commands added later
are covered too), each with a good value, a nasty one (negative, zero, NaN, inf,
huge, not a number, empty) or a path that is missing, corrupt, a file where a
folder is expected, a pickle, a checkpoint of the wrong kind.  The CLI runs in
this process (``condiff.cli.main``) so hundreds of examples take seconds.

Work is capped, not skipped: every training run stops after at most 2 steps
(``TrainConfig.validate`` still checks the requested values first) and every
sampler visits at most 2 timesteps (``steps`` is still validated against T).
``--compile`` is never drawn (compiling takes minutes).
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from condiff.checkpoints import latest_checkpoint
from helpers import run_cli_inprocess, shapes_dataset, write_npz

TINY = ["--channels", "4,8", "--blocks", "1", "--T", "100", "--image-size", "8", "--no-progress", "--device", "cpu",
        "--batch-size", "16", "--steps", "4", "--ckpt-every", "4", "--log-every", "2"]

NASTY = ["", " ", "-1", "0", "-0", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "2147483648", "4294967296",
         "99999999999999999999999999", "-99999999999999999999", "1e30", "abc", "1,2", ",", "1,,2", "-", "--", "0x10",
         "1.5", "\u0661", "\u00e9t\u00e9", "../", "/", "3,", "1e-300"]
EXCLUDED = {"compile", "help", "version"}  # --compile: minutes of compiling; the others just print


def _png_claiming(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels (the body is tiny): a decompression bomb for size checks."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models and good and bad inputs of every kind, made once."""
    root = tmp_path_factory.mktemp("fuzz")
    data = shapes_dataset(64)
    npz = write_npz(root / "shapes.npz", data)
    for cmd, out, extra in [("train", "model", []), ("train", "uncond", ["--cond", "none"]),
                            ("train-classifier", "clf", [])]:
        rc, _, err = run_cli_inprocess([cmd, "--data", npz, "--out", root / out, *TINY, *extra])
        assert rc == 0, err
    rc, _, err = run_cli_inprocess(["train-judge", "--data", npz, "--out", root / "judge", "--steps", "4",
                                    "--batch-size", "16", "--channels", "4,8,8", "--no-progress", "--device", "cpu"])
    assert rc == 0, err
    rc, _, err = run_cli_inprocess(["sample", "--ckpt", root / "model", "--n", "4", "--steps", "3", "--class", "top",
                                    "--class", "left",
                                    "--out", root / "s.png", "--npz", root / "samples.npz", "--no-progress"])
    assert rc == 0, err
    p = {"NPZ": npz, "MODEL": root / "model", "UNCOND": root / "uncond", "CLF": root / "clf",
         "SAMPLES": root / "samples.npz", "JUDGE": root / "judge", "MISSING": root / "does-not-exist", "FILE": root / "plain.txt"}
    p["FILE"].write_text("not a checkpoint, not data\n")
    p["STEP"] = sorted((root / "model" / "checkpoints").iterdir())[-1]
    p["WEIGHTS"] = p["STEP"] / "model.safetensors"
    p["BADNPZ"] = root / "bad.npz"
    p["BADNPZ"].write_bytes(b"PK\x03\x04 this is not a zip")
    p["NANNPZ"] = root / "nan.npz"
    np.savez(p["NANNPZ"], images=np.full((32, 8, 8), np.nan, np.float32), labels=np.zeros(32, np.int64))
    p["LABELNPZ"] = root / "labels.npz"
    np.savez(p["LABELNPZ"], images=np.zeros((32, 8, 8), np.uint8), labels=np.arange(32) - 3,
             class_names=np.array(["a", "b"]))
    p["RECTNPZ"] = root / "rect.npz"
    np.savez(p["RECTNPZ"], images=np.zeros((32, 8, 6), np.uint8))
    p["TINYNPZ"] = root / "one.npz"
    np.savez(p["TINYNPZ"], images=np.zeros((1, 8, 8), np.uint8))
    # image folders: mixed sizes and modes (fine, resized), a corrupt file, a bomb, empty ones
    p["FOLDER"] = root / "folder"
    modes = [("L", (8, 8)), ("RGB", (12, 10)), ("RGBA", (5, 9)), ("P", (16, 16)), ("1", (8, 8)), ("I;16", (8, 8)),
             ("CMYK", (7, 7)), ("F", (8, 8)), ("LA", (3, 30))]
    for cls in ("cat", "dog"):
        (p["FOLDER"] / cls).mkdir(parents=True)
        for i, (mode, size) in enumerate(modes):
            suffix = "tif" if mode in ("F", "I;16", "CMYK") else "png"
            Image.new(mode, size).save(p["FOLDER"] / cls / f"{i}.{suffix}")
    p["CORRUPTFOLDER"] = root / "corrupt-folder"
    shutil.copytree(p["FOLDER"], p["CORRUPTFOLDER"])
    (p["CORRUPTFOLDER"] / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    p["BOMBFOLDER"] = root / "bomb-folder"
    (p["BOMBFOLDER"] / "a").mkdir(parents=True)
    _png_claiming(p["BOMBFOLDER"] / "a" / "bomb.png", 60000, 60000)
    p["BOMB"] = p["BOMBFOLDER"] / "a" / "bomb.png"
    p["IMAGE"] = p["FOLDER"] / "dog" / "1.png"
    p["EMPTYDIR"] = root / "empty"
    p["EMPTYDIR"].mkdir()
    p["EMPTYCLASSES"] = root / "empty-classes"
    (p["EMPTYCLASSES"] / "a").mkdir(parents=True)
    # checkpoints: pickle, a malicious pickle, flipped bytes, corrupt config
    p["PICKLE"] = root / "model.pt"
    torch.save({"w": torch.zeros(2)}, p["PICKLE"])
    p["EVIL"] = root / "evil.pth"
    p["EVIL"].write_bytes(b"cos\nsystem\n(S'touch " + str(root / "PWNED").encode() + b"'\ntR.")
    p["CORRUPT"] = root / "corrupt"
    shutil.copytree(p["STEP"], p["CORRUPT"])
    raw = bytearray((p["CORRUPT"] / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (p["CORRUPT"] / "model.safetensors").write_bytes(bytes(raw))
    p["BADCONFIG"] = root / "bad-config"
    shutil.copytree(p["STEP"], p["BADCONFIG"])
    (p["BADCONFIG"] / "config.json").write_text('{"network": {"kind": "unet", "channels": ["x"]}}')
    (p["BADCONFIG"] / "SHA256SUMS").unlink()
    p["ROOT"] = root
    return p


def _options(sub: argparse.ArgumentParser):
    return [a for a in sub._actions if a.option_strings and a.dest not in EXCLUDED
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def _commands():
    from condiff.cli import build_parser

    parser = build_parser()
    return parser, dict(parser._subparsers._group_actions[0].choices)


PATHS = ["MODEL", "UNCOND", "CLF", "JUDGE", "STEP", "WEIGHTS", "PICKLE", "EVIL", "CORRUPT", "BADCONFIG", "MISSING", "FILE",
         "NPZ", "EMPTYDIR"]
DATAS = ["FOLDER", "CORRUPTFOLDER", "BOMBFOLDER", "EMPTYDIR", "EMPTYCLASSES", "BADNPZ", "NANNPZ", "LABELNPZ",
         "RECTNPZ", "TINYNPZ", "MISSING", "FILE", "MODEL"]
GOOD = {  # by dest: values that make sense for the tiny models of `world`
    "steps": ["1", "2", "5", "20"], "T": ["10", "20"], "image_size": ["8"], "batch_size": ["1", "4", "16", "64"],
    "n": ["1", "2", "3"], "channels": ["4,8", "4", "8,8"], "stem": ["1", "2"], "blocks": ["1"],
    "t_max": ["5", "20"], "limit": ["16", "40"], "lr": ["1e-3", "1e9"], "ema_decay": ["0.9", "1", "0.5"],
    "p_uncond": ["0", "0.1", "1", "2"], "cfg_w": ["0", "1", "3"], "cfg_scale": ["1", "2", "0.5"],
    "cfg_interval": ["0,10", "5,5", "90,200"], "cfg_rescale": ["0", "0.5", "1", "2"], "eta": ["0", "1", "3"],
    "scale": ["0", "1", "3", "1e30"], "clip_x0": ["1", "0"], "seed": ["0", "1", "4294967295"],
    "device": ["cpu", "auto", "cpu:0"], "classes": ["left", "TOP", "0", "1"], "class_": ["left", "top", "1"], "sample_every": ["0", "1"], "warmup": ["1", "3"],
    "keep": ["1", "2"], "ckpt_every": ["1", "2"], "log_every": ["1"], "per_class": ["1", "2"],
    "dim": ["4", "8"], "clean_steps": ["1", "2"], "feature_dim": ["4"], "dropout": ["0", "0.5", "1", "2"],
    "scales": ["0,1", "0.5", "1,1"], "method": ["cfg", "classifier", "text", "image", "nope"],
    "options": ["a=b", "x"], "image_index": ["0", "3", "-1", "99999"], "text": ["a top bright shape", ""],
    "tau": ["0.1", "0", "-1"], "shift": ["0", "2", "-2"], "kind": ["image", "text", "other"],
    "ckpt": ["MODEL", "STEP", "UNCOND"], "classifier": ["CLF"], "judge": ["JUDGE"], "data": ["NPZ", "NPZ", "FOLDER"],
    "ref_data": ["NPZ", "FOLDER"], "samples": ["SAMPLES"], "image": ["IMAGE"], "style": ["IMAGE"],
    "out": ["NEW", "DEEP"], "npz": ["NEW", "DEEP"],
}
BAD = {"device": ["cuda", "cuda:7", "mps", "meta", "gpu", "cpu,cuda", "-1"],
       "classes": ["2", "-1", "hat", "left/top", "1e3", ""], "class_": ["9", "-1", "shoe"]}
NASTY_PATHS = {"data": DATAS, "ref_data": DATAS, "samples": ["BADNPZ", "NPZ", "MISSING", "FILE", "NANNPZ"],
               "image": ["BOMB", "FILE", "MISSING", "WEIGHTS", "EMPTYDIR"], "out": ["UNDERFILE", "EXISTINGDIR", "FILE", ""]}
NASTY_PATHS.update(style=NASTY_PATHS["image"], npz=NASTY_PATHS["out"])
ALWAYS = {"ckpt", "data", "samples", "judge"}  # still drawn bad 1 time in 15 (shipped defaults are slow)
INCLUDE = {"diffusers_model": 2, "text": 5, "image": 5, "style": 5, "text_encoder": 5, "image_encoder": 5,
           "style_encoder": 5, "ref_data": 5, "init": 5, "text_scale": 5, "image_scale": 5, "style_scale": 5,
           "image_index": 5, "classes": 60, "device": 50, "batch_size": 80}  # percent, default 20
WORLD_KEYS = set(PATHS) | set(DATAS) | {"SAMPLES", "IMAGE", "BOMB", "NANNPZ", "JUDGE"}


def _is_path(action) -> bool:
    dest = action.dest
    return action.type is None and (dest in ("ckpt", "classifier", "judge", "init", "diffusers_model")
                                    or dest.endswith("encoder") or dest in NASTY_PATHS)


def _value_strategy(action, world):
    """(good values, nasty values) for one flag."""
    dest = action.dest
    resolve = (lambda k: str(world[k]) if k in WORLD_KEYS else k)
    if action.choices:
        return st.sampled_from([str(c) for c in action.choices]), st.sampled_from(NASTY)
    if _is_path(action):
        good = GOOD.get(dest, PATHS)
        return st.sampled_from(good).map(resolve), st.sampled_from(NASTY_PATHS.get(dest, PATHS)).map(resolve)
    nasty = st.sampled_from(NASTY + BAD.get(dest, []))
    if dest in GOOD:
        return st.sampled_from(GOOD[dest]), nasty
    if action.type is None:
        return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12), nasty
    return st.sampled_from(["1", "2", "0.5"]), nasty


OUT_KINDS = ("NEW", "DEEP", "UNDERFILE", "EXISTINGDIR", "FILE", "")


def _out_path(kind: str, fresh: Path, suffix: str) -> str:
    """An output path of a kind, inside the example's own folder (``fresh/dir`` and ``fresh/file.txt`` exist)."""
    return {"NEW": str(fresh / f"out{suffix}"), "DEEP": str(fresh / "a" / "b" / f"out{suffix}"),
            "UNDERFILE": str(fresh / "file.txt" / f"out{suffix}"), "EXISTINGDIR": str(fresh / "dir"),
            "FILE": str(fresh / "file.txt"), "": ""}[kind]


@st.composite
def argv_strategy(draw, world):
    parser, commands = _commands()
    names = sorted(commands)
    weights = ["sample", "train", "train-classifier"]
    name = draw(st.sampled_from(names + weights * 2))
    sub = commands[name]
    argv = [name]
    for action in _options(sub):
        include = action.required or action.dest in ALWAYS or draw(st.integers(1, 100)) <= INCLUDE.get(action.dest, 20)
        if not include:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true
            argv.append(flag)
            continue
        repeats = draw(st.integers(1, 3)) if isinstance(action, argparse._AppendAction) else 1
        good, nasty = _value_strategy(action, world)
        for _ in range(repeats):
            value = draw(nasty if draw(st.integers(0, 14)) == 0 else good)
            if draw(st.booleans()):
                argv.append(f"{flag}={value}")
            else:
                argv += [flag, value]
    return argv


@pytest.fixture
def capped(monkeypatch, tmp_path):
    """At most 2 training steps and 2 sampler timesteps per run, after the real validation; default
    outputs (samples.png, demo/) land in a temporary working folder."""
    monkeypatch.chdir(tmp_path)
    import condiff.samplers as samplers
    import condiff.training as training

    validate = training.TrainConfig.validate

    def capped_validate(self):
        validate(self)
        self.steps = min(self.steps, 2)

    real_respace = samplers.respace

    def capped_respace(schedule, steps=None, spacing="linspace"):
        ts = real_respace(schedule, steps, spacing)
        return ts if len(ts) <= 2 else [ts[0], ts[-1]]

    monkeypatch.setattr(training.TrainConfig, "validate", capped_validate)
    monkeypatch.setattr(samplers, "respace", capped_respace)
    import condiff.serve.app as serve_app

    monkeypatch.setattr(serve_app, "serve", lambda *a, **k: None)  # condiff serve: check and load, never listen


def test_any_arguments_exit_0_or_2_without_traceback(world, capped, tmp_path, record_property):
    stats = {"examples": 0, 0: 0, 2: 0, "commands": set()}

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        argv = data.draw(argv_strategy(world))
        fresh = Path(tempfile.mkdtemp(dir=tmp_path))
        (fresh / "dir").mkdir()
        (fresh / "file.txt").write_text("keep me")
        fixed, prev = [], None
        for a in argv:  # output placeholders -> paths in a fresh folder
            flag, eq, val = a.partition("=")
            suffix = ".npz" if "--npz" in (flag, prev) else ".png"
            if eq and flag in ("--out", "--npz") and val in OUT_KINDS:
                a = f"{flag}={_out_path(val, fresh, suffix)}"
            elif prev in ("--out", "--npz") and a in OUT_KINDS:
                a = _out_path(a, fresh, suffix)
            fixed.append(a)
            prev = a
        with warnings.catch_warnings():  # "non-finite loss, step skipped" and the like: expected here
            warnings.simplefilter("ignore")
            rc, out, err = run_cli_inprocess(fixed)  # an exception here is a traceback: the test fails
        assert "Traceback" not in err, (fixed, err)
        assert rc in (0, 2), (fixed, rc, err)
        if rc == 2:
            lines = [ln for ln in err.strip().splitlines() if "error" in ln]
            assert len(lines) == 1 and f"condiff {fixed[0]}: error: " in lines[0], (fixed, err)  # (after a bar)
            written = [p for p in fresh.rglob("*") if p.is_file() and p != fresh / "file.txt"]
            assert (fresh / "file.txt").read_text() == "keep me", fixed  # a failed command overwrote a file
            if written:  # only a training run that got going may leave files: its log, complete checkpoints
                outs = [a.partition("=")[2] if a.startswith("--out=") else b
                        for a, b in zip(fixed, fixed[1:] + [""]) if a.startswith("--out")]
                started = outs and (latest_checkpoint(outs[-1]) or (Path(outs[-1]) / "metrics.jsonl").is_file())
                assert started, (fixed, err, written)
        assert not (world["ROOT"] / "PWNED").exists(), fixed
        stats["examples"] += 1
        stats[rc] += 1
        stats["commands"].add(fixed[0])

    check()
    record_property("bad_inputs", stats[2])
    record_property("figures", f"CLI fuzzing (hypothesis): {stats['examples']} random command lines over "
                               f"{len(stats['commands'])} commands: {stats[0]} exit 0, {stats[2]} exit 2 with one "
                               f"error line, 0 tracebacks, 0 partial outputs")


# --------------------------------------------------------------------------------------------- explicit cases
SAMPLE = ["sample", "--ckpt", "MODEL", "--n", "2", "--steps", "3", "--out", "NEW", "--npz", "NEWNPZ", "--no-progress"]
TRAIN = ["--data", "NPZ", "--out", "NEWRUN", "--channels", "4,8", "--blocks", "1", "--T", "100", "--steps", "2",
         "--batch-size", "16", "--no-progress", "--device", "cpu"]
CASES = [  # (argv, what the one-line error must say)
    (SAMPLE + ["--scale", "-1"], "argument --scale"),
    (SAMPLE + ["--scale", "nan"], "finite"),
    (SAMPLE + ["--class", "top", "--cfg-w", "inf"], "finite"),
    (SAMPLE + ["--class", "top", "--cfg-scale", "inf"], "finite"),
    (SAMPLE + ["--class", "top", "--cfg-scale", "nan"], "finite"),
    (SAMPLE + ["--class", "top", "--cfg-w", "1", "--cfg-rescale", "2"], "rescale"),
    (SAMPLE + ["--eta", "nan"], "finite"),
    (SAMPLE + ["--class", "top", "--cfg-w", "1", "--cfg-interval", "5,2"], "LO <= HI"),
    (SAMPLE + ["--class", ""], "unknown class"),
    (SAMPLE + ["--class", "2"], "out of range"),
    (SAMPLE + ["--class", "-1"], "out of range"),
    (SAMPLE + ["--class", "top left"], "unknown class"),
    (SAMPLE + ["--steps", "2147483648"], "argument --steps"),
    (SAMPLE + ["--batch-size", "0"], "argument --batch-size"),
    (SAMPLE + ["--batch-size=--"], "argument --batch-size: expected one argument"),  # argparse gives [] untyped
    (SAMPLE + ["--class=--"], "argument --class: expected one argument"),
    (SAMPLE + ["--n", "100001"], "argument --n"),
    (SAMPLE + ["--seed", "-1"], "argument --seed"),
    (SAMPLE + ["--seed", "4294967296"], "argument --seed"),
    (SAMPLE + ["--device", "mps"], "unsupported device"),
    (SAMPLE + ["--device", ""], "device"),
    (SAMPLE + ["--device", "cuda:99"], "cuda"),
    (SAMPLE + ["--out", "UNDERFILE"], "is not a folder"),
    (SAMPLE + ["--out", "EXISTINGDIR"], "is a folder"),
    (SAMPLE + ["--npz", "UNDERFILE"], "is not a folder"),
    (SAMPLE + ["--out", ""], "--out must name a file"),
    (SAMPLE + ["--classifier", "JUDGE", "--class", "top"], "not a classifier checkpoint"),
    (SAMPLE + ["--classifier", "CLF", "--class", "top", "--scale", "1e300", "--clip-x0", "0"],
     "non-finite sample at step 0 (t=99)"),
    (SAMPLE + ["--classifier", "CLF", "--class", "top", "--scale", "1e300", "--form", "mean", "--sampler", "ddpm"],
     "non-finite sample at step 0 (t=99)"),
    # issue 19 item 6: flags that did nothing are one-line errors
    (SAMPLE + ["--sharpen"], "--sharpen applies to classifier guidance"),
    (SAMPLE + ["--scale", "2"], "--scale applies to classifier guidance"),
    (SAMPLE + ["--classifier", "CLF", "--class", "top", "--grad-at", "mu"], "applies to the mean form"),
    (SAMPLE + ["--sampler", "ddpm", "--eta", "0.5"], "sampler ddpm does not take eta"),
    (SAMPLE + ["--variance", "ddpm-beta"], "need a solver that takes them"),
    (SAMPLE + ["--variance", "ddpm-beta", "--sampler", "ddim"], "sampler ddim does not take variance"),
    (SAMPLE + ["--cfg-interval", "1,5"], "--cfg-interval applies to classifier-free guidance"),
    (SAMPLE + ["--cfg-rescale", "0.5"], "--cfg-rescale applies to classifier-free guidance"),
    (SAMPLE + ["--class", "top", "--cfg-w", "1", "--cfg-interval", "90,200"], "0 <= lo <= hi <= 99"),
    (SAMPLE + ["--class", "top", "--unconditional"], "ignores the class"),
    (SAMPLE + ["--npz", "NEW"], "--npz and --out name the same file"),
    (SAMPLE + ["--eta", "3"], "argument --eta"),
    (SAMPLE + ["--classifier", "CLF", "--class", "top", "--form", "mean", "--sampler", "ddim"], "needs sigma_t > 0"),
    (SAMPLE + ["--classifier", "CLF", "--class", "top", "--form", "mean", "--sampler", "unipc"],
     "needs an ancestral sampler"),
    (SAMPLE + ["--bogus"], "unrecognized arguments: --bogus"),
    (["sweep", "--ckpt", "MODEL", "--method", "cfg", "--judge", "JUDGE", "--data", "NPZ", "--out", "NEWRUN",
      "--option", "bogus=1"], "method cfg has no option bogus"),
    (["sweep", "--ckpt", "MODEL", "--method", "cfg", "--judge", "JUDGE", "--data", "NPZ", "--out", "NEWRUN",
      "--form", "mean"], "--form applies to gradient guidance"),
    # issue 19 item 7: sweep and demo check everything before they make their output folder
    (["sweep", "--ckpt", "MODEL", "--method", "cfg", "--judge", "JUDGE", "--data", "NPZ", "--out", "NEWRUN",
      "--steps", "5000"], "steps must be between 1 and T=100"),
    (["sweep", "--ckpt", "MODEL", "--method", "cfg", "--judge", "JUDGE", "--data", "NPZ", "--out", "NEWRUN",
      "--n", "3"], "too small"),
    (["sweep", "--ckpt", "MODEL", "--method", "classifier", "--judge", "JUDGE", "--data", "NPZ", "--out", "NEWRUN",
      "--n", "20", "--no-progress"], "needs a noise-aware classifier"),
    (["demo", "--ckpt", "MODEL", "--out", "NEWRUN", "--steps", "5000"], "steps must be between 1 and T=100"),
    (["train", *TRAIN, "--data", "EMPTYDIR"], "no class subfolders"),
    (["train", *TRAIN, "--data", "EMPTYCLASSES"], "no images found"),
    (["train", *TRAIN, "--data", "CORRUPTFOLDER"], "not a readable image"),
    (["train", *TRAIN, "--data", "BOMBFOLDER"], "image too large"),
    (["train", *TRAIN, "--data", "NANNPZ"], "NaN"),
    (["train", *TRAIN, "--data", "LABELNPZ"], "labels must lie in [0, 1]"),
    (["train", *TRAIN, "--data", "RECTNPZ"], "must be square"),
    (["train", *TRAIN, "--data", "FILE"], "unsupported data file"),
    (["train", *TRAIN, "--data", "TINYNPZ"], "larger than the data (1 images)"),
    (["train", *TRAIN, "--batch-size", "65"], "larger than the data (64 images)"),
    (["train-encoder", "--kind", "text", *TRAIN, "--batch-size=--"], "argument --batch-size: expected one argument"),
    (["train-encoder", "--kind", "text", *TRAIN, "--init", "FILE"], "not a checkpoint"),  # no caption cache
    (["train-encoder", "--kind", "text", *TRAIN, "--lr", "1e9", "--steps", "6", "--t-max", "5", "--batch-size", "4"], "non-finite"),  # the cache is removed
    (["evaluate", "--samples", "SAMPLES", "--judge", "JUDGE", "--out", "EXISTINGDIR"], "is a folder"),
    (["evaluate", "--samples", "BADNPZ", "--judge", "JUDGE"], "cannot read .npz"),  # BadZipFile, not OSError
    (["train", *TRAIN, "--image-size", "12"], "not --image-size 12"),
    (["train", *TRAIN, "--T", "0"], "argument --T"),
    (["train", *TRAIN, "--T", "100001"], "argument --T"),
    (["train", *TRAIN, "--image-size", "5000"], "argument --image-size"),
    (["train", *TRAIN, "--blocks", "65"], "argument --blocks"),
    (["train", *TRAIN, "--channels", "0"], "argument --channels"),
    (["train", *TRAIN, "--channels", "4,8,16,32"], "divisible"),
    (["train", *TRAIN, "--sample-every", "-1"], "argument --sample-every"),
    (["train", *TRAIN, "--p-uncond", "1.5"], "p-uncond"),
    (["train", *TRAIN, "--ema-decay", "1"], "ema-decay"),
    (["train", *TRAIN, "--lr", "nan"], "argument --lr"),
    (["train", *TRAIN, "--seed", "99999999999999999999"], "argument --seed"),
    (["train", *TRAIN, "--out", "FILE"], "is a file, not a folder"),
    (["train", *TRAIN, "--out", "UNDERFILE"], "is not a folder"),
    (["train", *TRAIN, "--device", "cuda:99"], "cuda"),
    (["train-classifier", *TRAIN, "--t-max", "101"], "t-max must lie in [1, 100]"),
    (["train-classifier", *TRAIN, "--t-max", "0"], "argument --t-max"),
    (["train-classifier", *TRAIN, "--data", "LABELNPZ"], "labels must lie in [0, 1]"),
]


def _fill(argv, world, fresh: Path):
    subs = {"NEW": fresh / "x.png", "NEWNPZ": fresh / "x.npz", "NEWRUN": fresh / "run",
            "UNDERFILE": world["FILE"] / "x", "EXISTINGDIR": world["EMPTYDIR"]}
    out = [str(subs[a]) if a in subs else str(world[a]) if a in WORLD_KEYS else a for a in argv]
    if "--image-size" not in argv and "RECTNPZ" not in argv and out[0].startswith("train"):
        out += ["--image-size", "8"]
    return out


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a[len(SAMPLE) if a[0] == "sample" else len(TRAIN) + 1:])
                                                    or a[0] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path, monkeypatch, record_property, argv,
                                                        needle):
    monkeypatch.chdir(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    rc, out, err = run_cli_inprocess(_fill(argv, world, fresh))
    assert rc == 2, (rc, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and len([ln for ln in lines if "error" in ln]) == 1, err
    assert needle in lines[-1], err
    assert not any(fresh.rglob("*")), list(fresh.rglob("*"))  # no partial output, not even a folder
    record_property("bad_inputs", 1)


def test_usage_errors_are_one_line_and_help_keeps_the_usage(capsys):
    """Issue 19 item 7: argparse's usage block only for --help; a usage error is one line."""
    rc, out, err = run_cli_inprocess(["sample", "--steps", "x"])
    assert rc == 2 and err == "condiff sample: error: argument --steps: expected an integer, got 'x'\n", err
    rc, out, err = run_cli_inprocess(["nope"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "usage" not in err, err
    rc, out, err = run_cli_inprocess(["sample", "--help"])
    assert rc == 0 and out.startswith("usage: condiff sample")
    from condiff.samplers import SAMPLERS
    from condiff.schedule import SPACINGS

    flat = " ".join(out.split())
    assert all(name in flat for name in (*SAMPLERS, *SPACINGS)) and "stochastic" in flat and "--threshold" in flat


def test_absurd_scales_warn_on_one_line(world, tmp_path):
    """Issue 19 item 8: a scale that saturates the images still writes them, with a one-line warning."""
    rc, out, err = run_cli_inprocess(["sample", "--ckpt", world["MODEL"], "--classifier", world["CLF"], "--class", "top",
                                      "--scale", "1e30", "--n", "4", "--steps", "3", "--no-progress",
                                      "--out", tmp_path / "x.png"])
    assert rc == 0 and (tmp_path / "x.png").is_file(), err
    warning = [ln for ln in err.splitlines() if "warning" in ln]
    assert warning and "condiff sample: warning: 4 of 4 images are saturated" in warning[-1], err


def test_mixed_image_sizes_and_modes_are_resized_and_train(world, tmp_path):
    """A folder of PNG/TIFF images in nine modes and sizes (1-bit to 16-bit, palette, CMYK, alpha): sensible."""
    rc, out, err = run_cli_inprocess(["train", *_fill(TRAIN, world, tmp_path), "--data", world["FOLDER"],
                                      "--image-size", "8", "--batch-size", "8"])
    assert rc == 0, err
    import json

    config = json.loads((latest_checkpoint(tmp_path / "run") / "config.json").read_text())
    assert config["class_names"] == ["cat", "dog"] and config["image_shape"] == [1, 8, 8]


@pytest.mark.parametrize("cmd", ["train", "train-classifier"])
def test_a_run_whose_every_step_diverges_is_a_one_line_error(world, tmp_path, cmd, record_property):
    """Found by the fuzzer: with every loss non-finite no checkpoint was written and the command crashed."""
    rc, _, err = run_cli_inprocess([cmd, *_fill(TRAIN, world, tmp_path), "--lr", "1e30", "--weight-decay", "2"])
    assert rc == 2 and "Traceback" not in err, err
    assert f"condiff {cmd}: error: no checkpoint: the losses of the last steps up to 2 were non-finite" in err
    record_property("bad_inputs", 1)


def test_sample_grids_during_training_fit_a_short_schedule(world, tmp_path):
    """Found by the fuzzer: --sample-every with T < 25 failed mid-run (the grid used 25 sampling steps)."""
    rc, _, err = run_cli_inprocess(["train", *_fill(TRAIN, world, tmp_path), "--T", "10", "--sample-every", "2"])
    assert rc == 0, err
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


@pytest.mark.parametrize("kind, text, ok", [
    ((0.0,), "0", 0.0), ((0.0,), "2.5", 2.5), ((0.0,), "-1", "expected a finite number >= 0"),
    ((0.0,), "inf", "expected a finite number, got 'inf'"), ((0.0,), "nan", "finite"), ((0.0,), "x", "a number"),
    ((0.0, 10.0, "a temperature"), "10", 10.0), ((0.0, 10.0, "a temperature"), "0", 0.0),
    ((0.0, 10.0, "a temperature", True), "0", "expected a temperature in (0, 10], got '0'"),
    ((0.0, 10.0, "a temperature", True), "10.5", "in (0, 10]"), ((), "-3e5", -3e5),
])
def test_float_range_is_the_one_float_parser(kind, text, ok):
    from condiff.validation import float_range

    lo_hi, rest = kind[:2], kind[2:]
    parse = float_range(*lo_hi, *rest[:1], open_lo=bool(rest[1:] and rest[1]))
    if isinstance(ok, float):
        assert parse(text) == ok
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(ok)):
            parse(text)
