"""Evaluation (issue 6): the judge / FID_fm feature network on real Fashion-MNIST, the Evaluator's
reference statistics, guidance-scale sweeps and the evaluate / sweep / train-judge commands."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from condiff.checkpoints import save_checkpoint
from condiff.data import load_fashion_mnist
from condiff.evaluation import Evaluator, judge_outputs, load_judge, read_samples, train_judge
from condiff.metrics import fid_from_features
from condiff.nets import EncoderNet, JudgeNet, UNet
from condiff.pipeline import generate, load_diffusion
from condiff.schedule import cosine_schedule
from condiff.compose import Sampling
from condiff.sweep import METHODS, SweepContext, run_sweep, sweep_labels, weights_digest
from condiff.training import ClassifierTask, DiffusionTask, TrainConfig, train
from helpers import assert_one_line_error, run_cli, shapes_dataset, write_npz


# ------------------------------------------------------------------------------ real Fashion-MNIST
@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist(None, "train"), load_fashion_mnist(None, "test")


@pytest.fixture(scope="module")
def small_judge(fmnist, tmp_path_factory):
    """A small judge trained for a few seconds on 6000 real training images, through train_judge."""
    train, test = fmnist
    out = tmp_path_factory.mktemp("judge")
    cfg = TrainConfig(steps=120, batch_size=64, lr=3e-3, warmup=10, ema_decay=0.9, seed=1234, ckpt_every=120,
                      log_every=40)
    final, report = train_judge(train.subset(6000, 1), test.subset(2000, 2), out, cfg, channels=(8, 16, 32),
                                feature_dim=32, progress=False)
    judge, config = load_judge(final)
    return judge, config, report, out


def _blur(x, sigma):
    r = int(3 * sigma + 1)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def test_judge_learns_and_reports_held_out_accuracy(small_judge):
    judge, config, report, out = small_judge
    assert config["task"] == "judge" and config["network"]["kind"] == "judge"
    assert json.loads((out / "judge.json").read_text())["test_accuracy"] == report["test_accuracy"]
    assert report["test_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert len(report["per_class_accuracy"]) == 10


def test_fid_fm_is_zero_for_a_set_with_itself_and_grows_with_noise_and_blur(small_judge, fmnist):
    judge = small_judge[0]
    _, test = fmnist
    x = test.subset(1000, 3).images
    f0, _ = judge_outputs(judge, x)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(x.shape, generator=g)
    assert fid_from_features(f0, f0) < 1e-6 * float(f0.var(0).sum())
    noisy = [fid_from_features(f0, judge_outputs(judge, (x + s * z).clamp(-1, 1))[0]) for s in (0.1, 0.2, 0.4, 0.8)]
    blurred = [fid_from_features(f0, judge_outputs(judge, _blur(x, s))[0]) for s in (0.5, 1.0, 1.5, 2.5)]
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    # other real images (the training split) are closer than any corrupted copy
    floor = fid_from_features(f0, judge_outputs(judge, fmnist[0].subset(1000, 4).images)[0])
    assert floor < min(noisy[1], blurred[1])


def test_evaluator_scores_real_images_like_the_real_floor(small_judge, fmnist):
    judge, config = small_judge[:2]
    train, test = fmnist
    ev = Evaluator(judge, train, test, config["class_names"])
    held = test.subset(600, 5)
    r = ev.evaluate(held.images, held.labels)
    assert r["n"] == 600 and r["labelled"] and r["n_real"] == 600
    # real held-out images: FID_fm near the train-vs-test floor, precision/recall near the real ones
    assert r["fid_fm"] < 3 * r["fid_fm_floor"] + 1e-3
    assert abs(r["precision"] - r["real"]["precision"]) < 0.1 and abs(r["recall"] - r["real"]["recall"]) < 0.1
    assert abs(r["diversity"] / r["diversity_real"] - 1) < 0.15
    assert r["judge_accuracy"] == pytest.approx(
        float((judge_outputs(judge, held.images)[1].argmax(1) == held.labels).double().mean()))
    assert set(r["per_class"]) == set(config["class_names"])
    # one image repeated: no diversity, no recall
    same = held.images[:1].expand(50, -1, -1, -1)
    s = ev.evaluate(same, torch.full((50,), int(held.labels[0])))
    assert s["diversity"] < 1e-6 and s["recall"] < r["recall"]
    # unlabelled samples: predicted-class histogram instead of accuracy
    u = ev.evaluate(held.images[:100])
    assert not u["labelled"] and abs(sum(u["judge_predicted_fraction"].values()) - 1) < 1e-9


# ------------------------------------------------------------------------------ tiny models for sweeps
NAMES = ["left", "top"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny class-conditional eps-model (null class) and classifier trained for a second or two on
    8x8 shapes, and a random-weight tiny judge."""
    root = tmp_path_factory.mktemp("tiny")
    shapes = shapes_dataset(256)
    data = write_npz(root / "shapes.npz", shapes)
    schedule = cosine_schedule(100)
    torch.manual_seed(0)
    meta = {"schedule": schedule.config(), "class_names": NAMES, "image_shape": [1, 8, 8]}
    cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=5, ema_decay=0.9, ckpt_every=40, log_every=40)
    train(UNet(1, 8, (8, 16), blocks=1, num_classes=2), DiffusionTask(schedule, 0.2), shapes, cfg, root / "model",
          meta=meta, progress=False)
    train(EncoderNet(1, 8, (8, 16), blocks=1, out_dim=2), ClassifierTask(schedule), shapes, cfg, root / "clf",
          meta=meta, progress=False)
    judge = JudgeNet(1, 8, (4, 8, 8), feature_dim=8, num_classes=2)
    save_checkpoint(root / "judge", judge, {"task": "judge", "class_names": NAMES, "image_shape": [1, 8, 8],
                                            "data": str(data), "network": judge.config})
    return root


def _evaluator(root):
    judge, config = load_judge(root / "judge")
    shapes = shapes_dataset(256)
    return Evaluator(judge, shapes, shapes, config["class_names"])


def test_sweep_writes_every_promised_file_with_the_right_contents(tiny, tmp_path):
    model, schedule, config = load_diffusion(tiny / "model")
    ctx = SweepContext(model, schedule, (1, 8, 8), NAMES, "cpu", {})
    out = tmp_path / "sweep"
    result = run_sweep(ctx, "cfg", [0, 1.5, 3], 12, out, _evaluator(tiny), sampling=Sampling(steps=4), batch_size=5, seed=3)
    scales = [0, 1.5, 3]
    assert [r["scale"] for r in result["rows"]] == scales
    for s in ("0", "1.5", "3"):
        z = np.load(out / f"samples-scale-{s}.npz")
        assert z["images"].shape == (12, 8, 8, 1) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [0, 1] * 6
        grid = Image.open(out / f"grid-scale-{s}.png")
        assert grid.size == (2 * (6 * 10 + 2), 2 * (2 * 10 + 2))  # 6 per class, one row per class, upscale 2
    # w = 0 is plain conditional sampling with the same noise (batches of 5 reproduce one call)
    y = sweep_labels(12, [0, 1])
    x = generate(model, schedule, 12, shape=(1, 8, 8), cond=y, steps=4, seed=3, batch_size=5)
    x0, _, _ = read_samples(out / "samples-scale-0.npz")
    assert torch.allclose(x0, x.clamp(-1, 1), atol=1 / 127.5 + 1e-6)
    assert not torch.equal(x0, read_samples(out / "samples-scale-3.npz")[0])

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["scale"]) for r in rows] == scales
    for r, res in zip(rows, result["rows"]):
        assert float(r["fid_fm"]) == pytest.approx(res["fid_fm"], rel=1e-5)
        assert float(r["judge_accuracy"]) == pytest.approx(res["judge_accuracy"], rel=1e-5)
        assert float(r["judge_accuracy[top]"]) == pytest.approx(res["per_class"]["top"]["judge_accuracy"], rel=1e-5)
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["method"] == "cfg" and len(saved["rows"]) == 3
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["fid_fm"] >= 0 for r in saved["rows"])
    md = (out / "results.md").read_text()
    assert "| scale | judge acc |" in md and "| real data |" in md and "w (eq 24" in md
    for s in ("| 0 |", "| 1.5 |", "| 3 |"):
        assert md.count(s) == 2  # main table and per-class table
    png = Image.open(out / "sweep.png")
    assert png.format == "PNG" and png.size == (3 * 380, 320)
    assert len(np.unique(np.asarray(png.convert("L")))) > 2  # something was drawn

    # a rerun with the same settings reuses the samples; other settings resample
    before = (out / "samples-scale-3.npz").stat().st_mtime_ns
    again = run_sweep(ctx, "cfg", [3], 12, out, _evaluator(tiny), sampling=Sampling(steps=4), batch_size=5, seed=3)
    assert (out / "samples-scale-3.npz").stat().st_mtime_ns == before
    assert again["rows"][0]["fid_fm"] == pytest.approx(result["rows"][2]["fid_fm"])
    run_sweep(ctx, "cfg", [3], 12, out, _evaluator(tiny), sampling=Sampling(steps=4), batch_size=5, seed=4)
    assert (out / "samples-scale-3.npz").stat().st_mtime_ns != before


def test_sweep_samples_again_when_the_weights_at_the_same_path_change(tiny, tmp_path):
    """The sample cache is keyed by the weights' digest as well as the settings: a re-export or retrained run at the
    same path is sampled again; a cache from before digests (settings only) is reused once and pinned."""
    import shutil

    from safetensors.torch import load_file, save_file

    from condiff.checkpoints import latest_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(tiny / "model"), ckpt)
    model, schedule, _ = load_diffusion(ckpt)
    ctx = SweepContext(model, schedule, (1, 8, 8), NAMES, "cpu", {})
    out, npz = tmp_path / "sweep", tmp_path / "sweep" / "samples-scale-1.npz"

    def sweep():
        run_sweep(ctx, "cfg", [1], 12, out, _evaluator(tiny), sampling=Sampling(steps=3), batch_size=6, source=str(ckpt))
        with np.load(npz) as z:
            return json.loads(str(z["meta"])), z["images"].copy(), npz.stat().st_mtime_ns

    meta, images, t0 = sweep()
    assert set(meta["weights"]) == {str(ckpt)} and len(meta["weights"][str(ckpt)]) == 64
    assert sweep()[2] == t0  # same weights: reused
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, ckpt / "model.safetensors")
    meta2, _, t1 = sweep()  # new weights at the same path: sampled again
    assert t1 != t0 and meta2["weights"] != meta["weights"]
    # a cache written before digests: the same settings without "weights" are trusted once, then pinned
    legacy = {k: v for k, v in meta2.items() if k != "weights"}
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(npz, **dict(arrays, meta=np.array(json.dumps(legacy, sort_keys=True))))
    meta3, images3, _ = sweep()
    assert meta3 == meta2 and np.array_equal(images3, arrays["images"])
    assert weights_digest(["", str(tmp_path / "missing"), str(ckpt)]) == {str(ckpt): meta2["weights"][str(ckpt)]}


def test_sweep_methods_are_pluggable_and_classifier_gamma_zero_is_unguided(tiny, tmp_path, monkeypatch):
    model, schedule, _ = load_diffusion(tiny / "model")
    ctx = SweepContext(model, schedule, (1, 8, 8), NAMES, "cpu", {"classifier": str(tiny / "clf")})
    ev = _evaluator(tiny)
    run_sweep(ctx, "classifier", [0, 5], 8, tmp_path / "clf", ev, sampling=Sampling(steps=3), seed=1)
    x0 = read_samples(tmp_path / "clf" / "samples-scale-0.npz")[0]
    null = generate(lambda x, t, c: model(x, t, model.null_cond(x.shape[0])), schedule, 8, shape=(1, 8, 8),
                    steps=3, seed=1, batch_size=250)
    assert torch.allclose(x0, null.clamp(-1, 1), atol=1 / 127.5 + 1e-6)
    assert not torch.equal(x0, read_samples(tmp_path / "clf" / "samples-scale-5.npz")[0])

    seen = []

    def text_like(ctx, scale, labels):  # what similarity guidance plugs in: (guidance, per-row cond)
        seen.append((scale, labels.tolist()))
        return METHODS["cfg"](ctx, scale, labels)

    monkeypatch.setitem(METHODS, "text", text_like)
    run_sweep(ctx, "text", [2], 8, tmp_path / "text", ev, sampling=Sampling(steps=3), batch_size=4)
    assert seen == [(2, [0]), (2, [0, 1, 0, 1, 0, 1, 0, 1])]  # a check before any output, then every row at once
    assert (tmp_path / "text" / "results.md").read_text().startswith("# Guidance sweep: method `text`")


# ------------------------------------------------------------------------------ CLI
def cli(*args):
    """Run condiff's main() in-process (no interpreter start-up); returns (returncode, stdout, stderr)."""
    import contextlib
    import io
    import subprocess

    from condiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_evaluate_and_sweep_commands(tiny, tmp_path):
    data = tiny / "shapes.npz"
    p = run_cli("evaluate", "--samples", data, "--judge", tiny / "judge", "--out", tmp_path / "e.json")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["n"] == 256 and r["labelled"] and "FID_fm" in p.stdout
    assert r["fid_fm"] == pytest.approx(0, abs=1e-6)  # the real data set itself is the reference
    p = cli("evaluate", "--samples", data, "--judge", tiny / "judge", "--no-labels")
    assert p.returncode == 0, p.stderr
    assert not json.loads((tiny / "shapes.eval.json").read_text())["labelled"]

    out = tmp_path / "sw"
    p = run_cli("sweep", "--ckpt", tiny / "model", "--method", "classifier", "--classifier", tiny / "clf",
                "--judge", tiny / "judge", "--scales", "0,2", "--n", "6", "--steps", "3", "--out", out,
                "--no-progress", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "| real data |" in p.stdout
    # samples are keyed by the resolved checkpoint, not the run folder (which may gain checkpoints)
    assert json.loads((out / "results.json").read_text())["settings"]["model"].endswith("step-0000040")
    assert {f.name for f in out.iterdir()} == {"results.json", "results.csv", "results.md", "sweep.png",
                                               "grid-scale-0.png", "grid-scale-2.png", "samples-scale-0.npz",
                                               "samples-scale-2.npz"}


def test_train_judge_command(tmp_path):
    data = write_npz(tmp_path / "shapes.npz", shapes_dataset(128))
    p = cli("train-judge", "--data", data, "--out", tmp_path / "j", "--steps", "5", "--batch-size", "32",
                "--channels", "4,8,8", "--feature-dim", "8", "--no-progress", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "judge test accuracy" in p.stdout
    assert json.loads((tmp_path / "j" / "judge.json").read_text())["steps"] == 5


def _npz(path, shape, labels=True):
    arrays = {"images": np.zeros(shape, dtype=np.uint8)}
    if labels:
        arrays["labels"] = np.zeros(shape[0], dtype=np.int64)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["missing", "size", "not-judge", "class", "labels", "corrupt", "both"])
def test_evaluate_errors_are_one_line(tiny, tmp_path, case):
    judge = tiny / "judge"
    args = {
        "missing": ["--samples", tmp_path / "nope.npz"],
        "size": ["--samples", _npz(tmp_path / "s.npz", (20, 10, 10))],
        "not-judge": ["--samples", tiny / "shapes.npz", "--judge", tiny / "clf"],
        "class": ["--samples", tiny / "shapes.npz", "--class", "hat"],
        "labels": ["--samples", _npz(tmp_path / "l.npz", (20, 8, 8))],
        "corrupt": ["--samples", tmp_path / "bad.npz"],
        "both": ["--samples", tiny / "shapes.npz", "--class", "top", "--no-labels"],
    }[case]
    if case == "labels":
        np.savez(tmp_path / "l.npz", images=np.zeros((20, 8, 8), np.uint8), labels=np.full(20, 5))
    if case == "corrupt":
        (tmp_path / "bad.npz").write_bytes(b"not a zip")
    if "--judge" not in args:
        args += ["--judge", judge]
    assert_one_line_error(cli("evaluate", *args))


@pytest.mark.parametrize("extra", [
    ["--method", "text-nope"],
    ["--method", "classifier"],  # no --classifier
    ["--method", "cfg", "--scales", "1,-2"],
    ["--method", "cfg", "--n", "3"],
    ["--method", "cfg", "--class", "hat"],
    ["--method", "cfg", "--option", "novalue"],
])
def test_sweep_errors_are_one_line(tiny, tmp_path, extra):
    p = cli("sweep", "--ckpt", tiny / "model", "--judge", tiny / "judge", "--out", tmp_path / "o",
                "--steps", "2", "--no-progress", *extra)
    assert_one_line_error(p)


def test_default_judge_comes_from_the_environment(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CONDIFF_JUDGE", str(tiny / "judge"))
    p = cli("evaluate", "--samples", tiny / "shapes.npz", "--out", tmp_path / "e.json")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "e.json").read_text())["judge"] == str(tiny / "judge")
    monkeypatch.setenv("CONDIFF_JUDGE", str(tmp_path / "no-judge"))
    assert_one_line_error(cli("evaluate", "--samples", tiny / "shapes.npz"))
