"""Issue 19 items 1-3: export destroys nothing, every loaded weight is verified, configs are checked first.

* ``export`` refuses a non-empty destination that is not an earlier export and any
  destination in (or around) the source run, and swaps an earlier export whole.
* The shipped models and every export carry SHA256SUMS, checked on load; a folder
  without it loads only with an :class:`UnverifiedWarning`.
* A config's sizes are bounded and its image shape and the weights' dtypes must
  fit the network, all before the network is built.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import shutil
import sys
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import condiff.atomic as atomic
import condiff.zoo as zoo
from condiff.atomic import replace_dir
from condiff.checkpoints import load_checkpoint, load_model, save_checkpoint
from condiff.errors import CondiffError
from condiff.integrity import MANIFEST, UnverifiedWarning, verify_folder, write_manifest
from condiff.nets import UNet
from condiff.schedule import cosine_schedule
from helpers import assert_one_line_error, run_cli_inprocess

SRC = Path(zoo.__file__).parent


class _Proc:  # assert_one_line_error takes a CompletedProcess-like object
    def __init__(self, rc, err):
        self.returncode, self.stderr = rc, err


def _one_line_error(argv, *needles) -> str:
    rc, _, err = run_cli_inprocess(argv)
    assert_one_line_error(_Proc(rc, err))  # (argparse's usage block above it is issue 19 item 7's)
    for needle in needles:
        assert needle in err, err
    return [ln for ln in err.splitlines() if "error" in ln][0]


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) -> SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny class-conditional run: run/checkpoints/step-0000002 (with training state) + metrics.jsonl."""
    root = tmp_path_factory.mktemp("integrity") / "run"
    torch.manual_seed(0)
    model = UNet(in_channels=1, image_size=8, channels=[4, 8], blocks=1, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    config = {"network": model.config, "task": "diffusion", "schedule": cosine_schedule(50).config(),
              "class_names": ["left", "top"], "image_shape": [1, 8, 8], "p_uncond": 0.1}
    save_checkpoint(root / "checkpoints" / "step-0000002", model, config, optimizer=opt, step=2)
    (root / "metrics.jsonl").write_text('{"step": 2, "loss": 0.5, "wall_s": 1.0}\n')
    return root


def _step(run: Path) -> Path:
    return run / "checkpoints" / "step-0000002"


# --------------------------------------------------------------------------------------------- 1. export
def test_export_refuses_a_foreign_folder_and_the_source_run_and_writes_nothing(run, tmp_path, record_property):
    tried = []
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my thesis")
    (foreign / "model.safetensors").write_text("not from condiff")  # export-like names do not make it an export
    cases = {
        "a folder holding other files": (foreign, "is not empty and is not an earlier export"),
        "the run itself": (run, "is inside the source"),
        "a folder inside the run": (run / "exported", "is inside the source"),
        "the checkpoint folder": (_step(run), "is inside the source"),
        "a folder holding the run": (run.parent, "contains the source"),
    }
    before_run, before_foreign = _tree(run), _tree(foreign)
    listing = sorted(p.name for p in tmp_path.iterdir())
    for label, (out, needle) in cases.items():
        for ckpt in (run, _step(run), _step(run) / "model.safetensors"):
            _one_line_error(["export", "--ckpt", ckpt, "--out", out], needle)
            tried.append(f"export --out {label} (--ckpt {ckpt.name})")
    assert _tree(run) == before_run and _tree(foreign) == before_foreign  # nothing written, nothing deleted
    assert not (run / "exported").exists() and sorted(p.name for p in tmp_path.iterdir()) == listing
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no temp folder left beside them
    with pytest.raises(CondiffError, match="is not empty"):  # the library call refuses the same way
        zoo.export_model(run, foreign)
    record_property("bad_inputs", len(tried))


def test_export_writes_a_verified_folder_and_replaces_an_earlier_one_whole(run, tmp_path, monkeypatch):
    dest = tmp_path / "models" / "tiny"
    zoo.export_model(run, dest, metrics={"accuracy": "0.5"})
    assert sorted(p.name for p in dest.iterdir()) == sorted(zoo.EXPORT_FILES)
    assert (dest / MANIFEST).read_text().split()[1::2] == ["config.json", "model.safetensors"]  # not the card
    assert verify_folder(dest) is True
    model, config = load_model(dest)
    assert config["task"] == "diffusion" and not model.training
    same = load_file(str(_step(run) / "model.safetensors"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in same.items())
    assert "accuracy: 0.5" in (dest / "README.md").read_text()
    # an earlier export (a shipped model folder is one) is replaced: same files, the new card
    rc, out, err = run_cli_inprocess(["export", "--ckpt", run, "--out", dest, "--metric", "accuracy=0.75"])
    assert rc == 0, err
    assert "accuracy: 0.75" in (dest / "README.md").read_text() and verify_folder(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]  # no temp or old folder left
    # a failure while the new export is assembled leaves the earlier one complete and no temp folder
    before = _tree(dest)

    def disk_full(folder):
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr(zoo, "write_manifest", disk_full)
    rc, _, err = run_cli_inprocess(["export", "--ckpt", run, "--out", dest, "--metric", "accuracy=0.9"])
    assert rc == 2 and "No space left on device" in err, err
    assert _tree(dest) == before and sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]


def test_replace_dir_swaps_whole_folders(tmp_path, monkeypatch):
    """dest is the whole old folder or the whole new one; the old one is gone afterwards."""
    for exists in (False, True):
        dest, new = tmp_path / f"dest{exists}", tmp_path / f".new{exists}"
        if exists:
            dest.mkdir()
            (dest / "a").write_text("old a")
            (dest / "b").write_text("old b")
        new.mkdir()
        (new / "a").write_text("new a")
        replace_dir(new, dest)
        assert _tree(dest) == {"a": hashlib.sha256(b"new a").hexdigest()} and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["destFalse", "destTrue"]
    if sys.platform == "linux":  # one renameat2 exchange: no moment without a complete dest, no rename aside
        new = tmp_path / ".again"
        new.mkdir()
        (new / "a").write_text("newer a")

        def no_rename(*args):
            raise AssertionError(f"os.replace{args}: the folder was renamed aside, not swapped")

        monkeypatch.setattr(atomic.os, "replace", no_rename)
        replace_dir(new, tmp_path / "destTrue")
        assert (tmp_path / "destTrue" / "a").read_text() == "newer a" and not new.exists()


# --------------------------------------------------------------------------------------------- 2. checksums
def test_every_shipped_model_carries_checksums_that_verify_and_ship_in_the_package():
    folders = [zoo.models_dir() / name for name in zoo.SHIPPED.values()]
    assert len(folders) == len(zoo.SHIPPED) == 9
    for folder in folders:
        listed = (folder / MANIFEST).read_text().split()[1::2]
        assert listed == ["config.json", "model.safetensors"], folder
        assert verify_folder(folder) is True
    # every file under models/ matches a package-data glob (setuptools' ** spans folders, as fnmatch's * does)
    section = (SRC.parent.parent / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    globs = re.findall(r'"([^"]+)"', re.search(r"condiff\s*=\s*\[([^\]]*)\]", section).group(1))
    files = [p.relative_to(SRC).as_posix() for p in (SRC / "models").rglob("*") if p.is_file()]
    assert any(f.endswith(MANIFEST) for f in files)
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not unshipped


def test_a_shipped_model_is_named_by_its_folder_and_a_local_path_wins(tmp_path, monkeypatch):
    from condiff.checkpoints import read_config, resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("fashion-judge") == zoo.models_dir() / "fashion-judge"
    assert read_config(resolve_checkpoint("fashion-text-attr-encoder"))["network"]["kind"] == "similarity-encoder"
    local = shutil.copytree(zoo.models_dir() / "fashion-judge", tmp_path / "fashion-judge")
    assert resolve_checkpoint("fashion-judge") == Path("fashion-judge") and local.is_dir()
    with pytest.raises(CondiffError, match=r"checkpoint not found: fashion-jugde \(.*shipped model's name: "
                                           r"fashion-cfg, .*fashion-text-cfg"):
        resolve_checkpoint("fashion-jugde")


def test_a_flipped_byte_in_a_shipped_model_is_an_error(tmp_path):
    folder = shutil.copytree(zoo.models_dir() / zoo.SHIPPED["judge"], tmp_path / "judge")
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x10  # tensor data: safetensors itself would load this silently
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CondiffError, match="corrupt or truncated: its SHA-256 does not match"):
        load_model(folder)
    (folder / "README.md").write_text("an edited model card\n")  # the card is documentation: not checked
    (folder / "model.safetensors").write_bytes((zoo.models_dir() / "fashion-judge" / "model.safetensors").read_bytes())
    load_model(folder)


def test_a_checkpoint_without_its_checksums_never_loads_silently(run, tmp_path):
    ck = shutil.copytree(_step(run), tmp_path / "step")
    (ck / MANIFEST).unlink()
    with pytest.warns(UnverifiedWarning, match=r"has no SHA256SUMS.*sha256sum config.json model.safetensors "
                                               r"training.json training.safetensors > SHA256SUMS"):
        load_checkpoint(ck)
    ck2 = shutil.copytree(ck, tmp_path / "step2")  # one warning per folder and process, like Python's own filter
    argv = ["sample", "--ckpt", ck2, "--n", "1", "--steps", "2", "--class", "top", "--out", tmp_path / "x.png",
            "--no-progress", "--device", "cpu"]
    with warnings.catch_warnings():  # what `python -W "error:unverified weights" -m condiff` does: one-line error
        warnings.filterwarnings("error", "unverified weights")
        _one_line_error(argv, "unverified weights: ", "has no SHA256SUMS")
    assert not (tmp_path / "x.png").exists()
    with pytest.warns(UnverifiedWarning, match="^unverified weights: "):
        rc, _, err = run_cli_inprocess(argv)
    assert rc == 0, err
    write_manifest(ck)  # what the warning says to do: then it loads verified and silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(ck)
        assert verify_folder(ck) is True


# --------------------------------------------------------------------------------------------- 3. configs
def _edited(run: Path, dest: Path, edit, manifest: bool = True) -> Path:
    """A copy of the run's checkpoint with its config edited and SHA256SUMS rewritten: only validation can object."""
    ck = shutil.copytree(_step(run), dest)
    config = json.loads((ck / "config.json").read_text())
    edit(config)
    (ck / "config.json").write_text(json.dumps(config))
    (ck / MANIFEST).unlink()
    if manifest:
        write_manifest(ck)
    return ck


BAD_CONFIGS = {
    "blocks 100000": (lambda c: c["network"].update(blocks=100000), "blocks must be an integer in [1, 64]"),
    "channels 2^31-1": (lambda c: c["network"].update(channels=[2147483647, 8]), "channels must be 1 to 8 integers"),
    "nine levels": (lambda c: c["network"].update(channels=[4] * 9), "channels must be 1 to 8 integers"),
    "blocks true": (lambda c: c["network"].update(blocks=True), "blocks must be an integer"),
    "huge class count": (lambda c: c["network"].update(num_classes=10**9), "num_classes must be an integer"),
    "dropout 2": (lambda c: c["network"].update(dropout=2), "dropout must be a number in [0, 1)"),
    "3-channel image_shape, 1-channel model": (lambda c: c.update(image_shape=[3, 8, 8]),
                                               "image_shape [3, 8, 8] does not match the network"),
    "image_size 16, 8-pixel weights": (lambda c: c["network"].update(image_size=16),
                                       "image_shape [1, 8, 8] does not match the network, which takes [1, 16, 16]"),
    "image_shape of two entries": (lambda c: c.update(image_shape=[8, 8]), "image_shape must be [C, H, W]"),
    "schedule T 10^9": (lambda c: c["schedule"].update(T=10**9), "schedule must name cosine or linear with T in"),
}


@pytest.mark.parametrize("label", list(BAD_CONFIGS))
def test_bad_configs_are_one_line_errors_before_anything_is_built(run, tmp_path, label, record_property):
    edit, needle = BAD_CONFIGS[label]
    ck = _edited(run, tmp_path / "ck", edit)
    t0 = time.perf_counter()
    with pytest.raises(CondiffError, match="config.json: ") as e:
        load_model(ck)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 1.0  # blocks: 100000 took over 40 s to build
    _one_line_error(["sample", "--ckpt", ck, "--n", "1", "--steps", "2", "--out", tmp_path / "x.png",
                     "--no-progress", "--device", "cpu"], needle)
    assert not (tmp_path / "x.png").exists()
    record_property("bad_inputs", 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_weights_of_a_non_float_dtype_are_refused(run, tmp_path, dtype):
    ck = shutil.copytree(_step(run), tmp_path / "ck")
    weights = load_file(str(ck / "model.safetensors"))
    weights = {k: v.to(dtype) for k, v in weights.items()}  # same names and shapes: only the dtype is wrong
    save_file(weights, str(ck / "model.safetensors"))
    write_manifest(ck)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(CondiffError, match=rf"weight \S+ is {name}, the network expects float32"):
        load_model(ck)
    _one_line_error(["sample", "--ckpt", ck, "--n", "1", "--steps", "2", "--out", tmp_path / "x.png",
                     "--no-progress", "--device", "cpu"], f"is {name}")


def test_float_weights_of_another_precision_still_load(run, tmp_path):
    ck = shutil.copytree(_step(run), tmp_path / "ck")
    weights = {k: v.double() for k, v in load_file(str(ck / "model.safetensors")).items()}
    save_file(weights, str(ck / "model.safetensors"))
    write_manifest(ck)
    model, _ = load_model(ck)
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in weights.items())


@pytest.mark.parametrize("cmd", ["train", "train-classifier", "train-judge"])
@pytest.mark.parametrize("value", ["2147483647", "4097", "4,4,4,4,4,4,4,4,4", "0", "8,-1"])
def test_train_channels_are_bounded(tmp_path, cmd, value):
    line = _one_line_error([cmd, "--data", tmp_path / "none.npz", "--out", tmp_path / "run", "--channels", value],
                           "--channels")
    assert "widths in [1, 4096]" in line or "positive" in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- 4. import cycle
def _imports(module: Path) -> set[str]:
    """condiff modules that ``module`` imports anywhere (top level or inside functions)."""
    pkg = "condiff." + ".".join(module.relative_to(SRC).with_suffix("").parts)
    base = pkg.rsplit(".", 1)[0] if module.name != "__init__.py" else pkg.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{root}.{node.module}" if node.module else root
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("condiff")}


def test_checkpoints_and_integrity_do_not_import_each_other():
    graph = {}
    for path in SRC.rglob("*.py"):
        name = "condiff." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        graph[name.removesuffix(".__init__")] = _imports(path)
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}

    def reaches(a, b):
        seen, todo = set(), [a]
        while todo:
            for m in graph[todo.pop()]:
                if m == b:
                    return True
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return False

    assert "condiff.integrity" in graph["condiff.checkpoints"]  # the check below is not vacuous
    for low in ("condiff.integrity", "condiff.atomic"):
        assert not reaches(low, "condiff.checkpoints"), low
    assert not reaches("condiff.atomic", "condiff.integrity")
