"""The condiff CLI end to end on tiny data, and its one-line errors (issues 2-4)."""

import json
import os

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli, shapes_dataset, write_npz

TINY = ["--channels", "8,16", "--blocks", "1", "--T", "100", "--image-size", "8", "--no-progress",
        "--device", "cpu", "--log-every", "10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny class-conditional eps-model and a tiny noise-aware classifier, trained through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = write_npz(root / "shapes.npz", shapes_dataset(256))
    p = run_cli("train", "--data", data, "--out", root / "model", "--steps", "30", "--batch-size", "32",
                "--ckpt-every", "10", "--sample-every", "30", *TINY)
    assert p.returncode == 0, p.stderr
    p = run_cli("train-classifier", "--data", data, "--out", root / "clf", "--steps", "30", "--batch-size", "32",
                *TINY)
    assert p.returncode == 0, p.stderr
    assert "held-out accuracy by t-range" in p.stdout
    return root


def test_train_writes_checkpoints_log_and_grid(trained):
    run = trained / "model"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000010", "step-0000020", "step-0000030"]
    cfg = json.loads((run / "checkpoints" / "step-0000030" / "config.json").read_text())
    assert cfg["task"] == "diffusion" and cfg["class_names"] == ["left", "top"]
    assert cfg["network"]["num_classes"] == 2 and cfg["p_uncond"] == 0.1
    assert (run / "samples" / "step-0000030.png").is_file()
    log = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30] and all(r["images_per_s"] > 0 for r in log)


@pytest.mark.parametrize("extra", [
    ["--class", "top", "--cfg-w", "2"],
    ["--class", "LEFT", "--class", "1", "--cfg-scale", "3", "--cfg-interval", "10,80", "--cfg-rescale", "0.7"],
    ["--unconditional"],
    ["--class", "top", "--classifier", "CLF", "--scale", "2", "--unconditional"],
    ["--class", "top", "--classifier", "CLF", "--scale", "2", "--sampler", "ddpm", "--form", "mean",
     "--grad-at", "mu", "--steps", "20"],
    ["--class", "top", "--classifier", "CLF", "--scale", "2", "--sharpen", "--cfg-w", "1"],
    ["--sampler", "ddpm", "--variance", "ddpm-beta", "--steps", "20", "--unconditional"],
    ["--sampler", "ddim", "--eta", "0.5", "--class", "0", "--clip-x0", "1"],
])
def test_sample_variants_write_grid_and_npz(trained, tmp_path, extra):
    extra = [str(trained / "clf") if a == "CLF" else a for a in extra]
    p = run_cli("sample", "--ckpt", trained / "model", "--n", "3", "--steps", "10", "--out", tmp_path / "g.png",
                "--npz", tmp_path / "s.npz", "--no-progress", "--device", "cpu", *extra)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "g.png").is_file()
    z = np.load(tmp_path / "s.npz")
    rows = max(1, extra.count("--class"))
    assert z["images"].shape == (3 * rows, 8, 8, 1) and z["images"].dtype == np.uint8


def test_same_seed_same_images(trained, tmp_path):
    outs = []
    for i in range(2):
        p = run_cli("sample", "--ckpt", trained / "model", "--class", "top", "--cfg-w", "1", "--n", "4",
                    "--steps", "8", "--seed", "5", "--out", tmp_path / f"{i}.png", "--npz", tmp_path / f"{i}.npz",
                    "--no-progress", "--device", "cpu")
        assert p.returncode == 0, p.stderr
        outs.append(np.load(tmp_path / f"{i}.npz")["images"])
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("args", [
    ["sample", "--ckpt", "MISSING"],
    ["sample", "--ckpt", "MODEL", "--steps", "101"],
    ["sample", "--ckpt", "MODEL", "--class", "hat"],
    ["sample", "--ckpt", "MODEL", "--class", "7"],
    ["sample", "--ckpt", "MODEL", "--class", "top", "--cfg-w", "-1"],
    ["sample", "--ckpt", "MODEL", "--class", "top", "--cfg-w", "nan"],
    ["sample", "--ckpt", "MODEL", "--class", "top", "--cfg-w", "1", "--cfg-scale", "2"],
    ["sample", "--ckpt", "MODEL", "--class", "top", "--cfg-scale", "0.5"],
    ["sample", "--ckpt", "MODEL", "--classifier", "CLF"],
    ["sample", "--ckpt", "CLF"],
    ["sample", "--ckpt", "MODEL", "--class", "top", "--classifier", "MODEL"],
    ["sample", "--ckpt", "MODEL", "--class", "top", "--classifier", "CLF", "--form", "mean", "--sampler", "unipc"],
    ["sample", "--ckpt", "MODEL", "--device", "cuda:0"] ,
    ["sample", "--ckpt", "MODEL", "--n", "0"],
    ["sample", "--ckpt", "MODEL", "--sampler", "euler-maruyama"],
    ["sample", "--ckpt", "PICKLE"],
    ["sample", "--ckpt", "CORRUPT"],
    ["train", "--out", "OUT", "--data", "MISSING"],
    ["train", "--out", "OUT", "--data", "BADNPZ"],
    ["train", "--out", "OUT", "--data", "NPZ", "--batch-size", "100000"],
    ["train", "--out", "OUT", "--data", "NPZ", "--image-size", "10"],
    ["train", "--out", "OUT", "--data", "NPZ", "--lr", "-1"],
    ["nonsense-command"],
])
def test_bad_input_gives_one_line_error_and_exit_2(trained, tmp_path, args):
    import torch

    pickle_file = tmp_path / "model.pt"
    torch.save({"a": 1}, pickle_file)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((trained / "model" / "checkpoints" / "step-0000030" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"not a zip")
    subs = {"MISSING": tmp_path / "nope", "MODEL": trained / "model", "CLF": trained / "clf",
            "PICKLE": pickle_file, "CORRUPT": corrupt, "OUT": tmp_path / "out", "BADNPZ": bad_npz,
            "NPZ": trained / "shapes.npz"}
    args = [str(subs.get(a, a)) for a in args]
    if args[0] == "sample":
        args += ["--out", str(tmp_path / "x.png"), "--no-progress"]
    p = run_cli(*args)
    assert_one_line_error(p)
    assert not (tmp_path / "x.png").exists()  # nothing half-written


def test_truncated_checkpoint_is_a_one_line_error(trained, tmp_path):
    import shutil

    ck = tmp_path / "trunc"
    shutil.copytree(trained / "model" / "checkpoints" / "step-0000030", ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    p = run_cli("sample", "--ckpt", ck, "--out", tmp_path / "x.png")
    assert_one_line_error(p)
    assert "corrupt or truncated" in p.stderr


@pytest.mark.parametrize("cmd", ["train", "train-classifier", "sample"])
def test_help_explains_every_command(cmd):
    p = run_cli(cmd, "--help")
    assert p.returncode == 0 and "--device" in p.stdout and "--seed" in p.stdout


def test_demo_writes_every_section_and_an_index(trained, tmp_path):
    p = run_cli("demo", "--ckpt", trained / "model", "--classifier", trained / "clf", "--out", tmp_path / "demo",
                "--steps", "5", "--per-class", "2", "--no-progress", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    files = sorted(f.name for f in (tmp_path / "demo").iterdir())
    grids = [f for f in files if f.endswith(".png")]
    assert "index.html" in files and "report.md" in files
    from condiff.compose import DEFAULT_SCALES

    assert {"unguided.png", "cfg-w0.png", f"cfg-w{DEFAULT_SCALES['cfg']:g}.png", "cfg-w2.png", "classifier-g0.png",
            "classifier-g16.png"} <= set(grids)
    page = (tmp_path / "demo" / "index.html").read_text()
    report = (tmp_path / "demo" / "report.md").read_text()
    for g in grids:  # every grid is laid out and labelled in both
        assert f"src='{g}'" in page and f"({g})" in report
    assert "gamma = 16" in page and f"w = {DEFAULT_SCALES['cfg']:g} (s = {1 + DEFAULT_SCALES['cfg']:g})" in page
    assert "grid 1 of" not in p.stderr  # --no-progress: silent
    assert "auto (unipc, or dpm++2m-sde with gradient terms), 5 steps" in page and "condiff sample --ckpt" in report and f"--cfg-w {DEFAULT_SCALES['cfg']:g}" in report


def test_demo_shows_progress_unless_told_not_to(trained, tmp_path):
    p = run_cli("demo", "--ckpt", trained / "model", "--out", tmp_path / "demo", "--steps", "2", "--per-class", "1",
                "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "grid 1 of 4" in p.stderr and "grid 4 of 4" in p.stderr  # unguided + three CFG weights


def test_demo_without_shipped_models_is_a_one_line_error(tmp_path, monkeypatch):
    import condiff.zoo as zoo

    p = run_cli("demo", "--out", tmp_path / "d", "--device", "cpu") if not (zoo.models_dir() / zoo.SHIPPED[
        "diffusion"] / "model.safetensors").is_file() else run_cli("demo", "--ckpt", tmp_path / "missing")
    assert_one_line_error(p)


def test_export_writes_model_card(trained, tmp_path):
    p = run_cli("export", "--ckpt", trained / "model", "--out", tmp_path / "m", "--command", "condiff train ...",
                "--metric", "judge accuracy at w=2 = 0.95", "--metric", "wall time=about 7 min")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "m").iterdir()) == ["README.md", "SHA256SUMS", "config.json",
                                                                   "model.safetensors"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "steps: 30" in card and "condiff train ..." in card and "p_uncond: 0.1" in card
    assert "## Measured" in card and "- judge accuracy at w=2: 0.95" in card
    assert "wall time: about 7 min on the machine" in card
    p = run_cli("export", "--ckpt", trained / "model", "--out", tmp_path / "m2", "--metric", "no-equals-sign")
    assert_one_line_error(p)
    assert not (tmp_path / "m2").exists()
    p = run_cli("sample", "--ckpt", tmp_path / "m", "--class", "top", "--n", "2", "--steps", "4",
                "--out", tmp_path / "x.png", "--no-progress")
    assert p.returncode == 0, p.stderr


def test_sample_defaults_to_the_shipped_models(tmp_path):
    """No --ckpt: the shipped eps-model; --classifier alone: the shipped classifier; class names any case."""
    base = ["sample", "--n", "2", "--steps", "4", "--no-progress", "--device", "cpu"]
    p = run_cli(*base, "--class", "ankle BOOT", "--class", "Sneaker", "--cfg-w", "1", "--out", tmp_path / "a.png",
                "--npz", tmp_path / "a.npz")
    assert p.returncode == 0, p.stderr
    z = np.load(tmp_path / "a.npz")
    assert z["images"].shape == (4, 28, 28, 1) and z["labels"].tolist() == [9, 9, 7, 7]
    p = run_cli(*base, "--class", "bag", "--classifier", "--unconditional", "--scale", "2",
                "--out", tmp_path / "b.png", "--npz", tmp_path / "b.npz")
    assert p.returncode == 0, p.stderr
    assert np.load(tmp_path / "b.npz")["images"].shape == (2, 28, 28, 1)
    p = run_cli(*base, "--text", "a warm top for winter", "--image-index", "0", "--out", tmp_path / "c.png",
                "--npz", tmp_path / "c.npz", "--sampler", "ddim", "--eta", "1", "--ref-data", write_npz(tmp_path / "r.npz", _refs()))
    assert p.returncode == 0, p.stderr  # the shipped text and image encoders are the defaults


def _refs():
    """A two-image 28x28 reference set for --image-index."""
    import torch

    from condiff.data import ImageDataset

    return ImageDataset(torch.linspace(-1, 1, 2 * 28 * 28).view(2, 1, 28, 28), torch.tensor([0, 1]), ["a", "b"])


def test_training_recipe_rejects_an_unknown_stage():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_shipped.sh"
    p = subprocess.run(["bash", str(script), "nope"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "train_shipped.sh: unknown stage 'nope' (cfg, cfg-v1, clf, clean, judge, enc-image, enc-text, export, "
        "export-cfg, export-clf, text-cfg, export-text-cfg, enc-text-attr, export-enc-text-attr)"]


def test_training_recipe_gives_the_eps_model_both_threads_once_lane_b_is_done(tmp_path):
    """The recipe's lanes with a stand-in for condiff: the eps-model starts on THREADS threads beside lane B,
    is stopped by SIGTERM when lane B ends (a real run checkpoints and exits 0), and resumes on twice as many."""
    import subprocess
    from pathlib import Path

    calls = tmp_path / "calls"
    fake = tmp_path / "fake-condiff"
    fake.write_text(f"""#!/usr/bin/env bash
out=; prev=; for a in "$@"; do [ "$prev" = --out ] && out=${{a##*/}}; prev=$a; done
echo "$1 $OMP_NUM_THREADS $out" >> {calls}
if [ "$1" = train ] && [ "$out" = cfg ] && [ "$OMP_NUM_THREADS" = 1 ]; then
  trap 'echo stopped >> {calls}; exit 0' TERM
  for i in $(seq 300); do sleep 0.1; done
  echo "not stopped" >> {calls}
fi
""")
    fake.chmod(0o755)
    (tmp_path / "dest").mkdir()  # what the real export makes
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_shipped.sh"
    env = {**os.environ, "RUNS": str(tmp_path / "runs"), "DEST": str(tmp_path / "dest"), "CONDIFF": str(fake),
           "THREADS": "1"}
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    lines = calls.read_text().splitlines()
    assert lines.index("train 1 cfg") < lines.index("stopped") < lines.index("train 2 cfg")
    assert lines.index("train-encoder 1 enc-text") < lines.index("stopped") and "not stopped" not in lines
    assert "lane B done: the eps-model resumes with 2 threads" in p.stdout
    exports = [line.split()[-1] for line in lines if line.startswith("export")]
    assert lines.index("train 2 cfg") < lines.index(next(x for x in lines if x.startswith("export")))
    assert exports[:4] == ["fashion-cfg", "fashion-classifier", "fashion-clean-classifier", "fashion-cfg-weak"]
