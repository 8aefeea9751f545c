"""Issue 8: a diffusers UNet2DModel + DDPMScheduler folder as condiff's unconditional eps-model.

A tiny randomly initialised UNet2DModel is saved locally with its scheduler
config; nothing is downloaded.
"""

import json
import shutil
import sys

import diffusers
import numpy as np
import pytest
import torch

from condiff import cli
from condiff.checkpoints import load_model
from condiff.errors import CondiffError
from condiff.guidance import ClassifierTerm, ScoreGuided
from condiff.interop import DiffusersEps, check_classifier_schedule, load_diffusers
from condiff.nets import EncoderNet
from condiff.pipeline import generate
from condiff.samplers import SAMPLERS
from condiff.schedule import cosine_schedule, linear_schedule, respace
from condiff.training import ClassifierTask, TrainConfig, train
from helpers import shapes_dataset

T = 50


def run(*args) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """A diffusers pipeline-style folder: unet/ (safetensors) and scheduler/ (linear betas, T = 50)."""
    root = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(root / "unet")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    scheduler.save_pretrained(root / "scheduler")
    return root, unet.eval(), scheduler


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A noise-aware classifier of the two shapes (left / top bright), briefly trained on the DDPM's linear schedule."""
    torch.manual_seed(1)
    clf = EncoderNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1, out_dim=2)
    run_dir = tmp_path_factory.mktemp("clf")
    cfg = TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup=5, log_every=60, ckpt_every=60)
    final = train(clf, ClassifierTask(linear_schedule(T)), shapes_dataset(256, size=8), cfg, run_dir,
                  meta={"schedule": linear_schedule(T).config(), "class_names": ["left", "top"],
                        "image_shape": [1, 8, 8]}, progress=False)
    return final, load_model(final)[0]


def test_eps_equals_diffusers_own_call_and_schedule_is_converted_once(ddpm):
    root, unet, scheduler = ddpm
    model, schedule, config = load_diffusers(root)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 7, 30, 49])
    with torch.no_grad():
        assert torch.equal(model(x, t, None), unet(x, t).sample)
    # abar_t = sqrt(alphas_cumprod): the only conversion, and it round-trips
    assert torch.allclose(schedule.alphas_cumprod(), scheduler.alphas_cumprod.double(), rtol=1e-6)
    assert torch.allclose(schedule.abar, scheduler.alphas_cumprod.double().sqrt(), rtol=1e-6)
    assert torch.allclose(schedule.abar, linear_schedule(T).abar, rtol=1e-5)  # DDPM's linear betas
    assert config["image_shape"] == [1, 8, 8] and not model.conditional
    with pytest.raises(CondiffError, match="unconditionally"):
        model(x, t, torch.zeros(4, dtype=torch.long))


def test_flat_folder_and_pickle_policy(ddpm, tmp_path):
    """The layout of google/ddpm-cifar10-32 (files side by side); a .bin loads only with trust_pickle."""
    root, unet, _ = ddpm
    unet.save_pretrained(tmp_path, safe_serialization=False)
    shutil.copy(root / "scheduler" / "scheduler_config.json", tmp_path)
    with pytest.raises(CondiffError, match="--trust-pickle"):
        load_diffusers(tmp_path)
    model, _, _ = load_diffusers(tmp_path, trust_pickle=True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.equal(model(x, t, None), unet(x, t).sample)


def _with_prediction_type(ddpm, folder, prediction_type):
    root, _, _ = ddpm
    shutil.copytree(root / "unet", folder / "unet")
    conf = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(conf, prediction_type=prediction_type)))
    return folder


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_prediction_models_become_eps_models(ddpm, tmp_path, prediction_type):
    """eps from diffusers' own definitions (its DDIMScheduler.step): v_prediction eps = sqrt(a) v + sqrt(1 - a) x_t,
    sample eps = (x_t - sqrt(a) x0) / sqrt(1 - a), a = alphas_cumprod[t]."""
    _, unet, scheduler = ddpm
    model, schedule, config = load_diffusers(_with_prediction_type(ddpm, tmp_path, prediction_type))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 7, 30, 49])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        out = unet(x, t).sample
        want = a.sqrt() * out + (1 - a).sqrt() * x if prediction_type == "v_prediction" else \
            (x - a.sqrt() * out) / (1 - a).sqrt()
        assert torch.allclose(model(x, t, None), want, rtol=1e-4, atol=1e-5)
    assert config["prediction"] == {"v_prediction": "v", "sample": "x0"}[prediction_type]
    assert not model.conditional and model.image_shape == (1, 8, 8)  # the UNet's attributes, through the wrapper
    x0 = generate(model, schedule, 2, shape=(1, 8, 8), steps=3, seed=0)
    assert torch.isfinite(x0).all()


def test_other_prediction_types_are_refused(ddpm, tmp_path):
    folder = _with_prediction_type(ddpm, tmp_path, "flow")
    with pytest.raises(CondiffError, match="prediction_type 'flow' is not supported; condiff loads epsilon, "
                                           "v_prediction, sample"):
        load_diffusers(folder)
    with pytest.raises(CondiffError, match="no scheduler_config.json"):
        load_diffusers(folder / "unet")


def test_cli_samples_unguided_and_with_classifier_guidance(ddpm, classifier, tmp_path, capsys):
    root, _, _ = ddpm
    clf_path, clf = classifier
    common = ["sample", "--diffusers-model", root, "--per-class", "8", "--steps", "10", "--no-progress",
              "--device", "cpu", "--seed", "2"]
    assert run(*common, "--out", tmp_path / "u.png", "--npz", tmp_path / "u.npz") == 0
    for name in ("left", "top"):
        assert run(*common, "--classifier", clf_path, "--class", name, "--scale", "3",
                   "--out", tmp_path / f"{name}.png", "--npz", tmp_path / f"{name}.npz") == 0
    assert "warning" not in capsys.readouterr().err  # same schedule: no mismatch warning
    u, left, top = (np.load(tmp_path / f"{n}.npz") for n in ("u", "left", "top"))
    assert u["images"].shape == top["images"].shape == (8, 8, 8, 1)
    assert left["labels"].tolist() == [0] * 8 and top["labels"].tolist() == [1] * 8
    # the CLI's guided samples are the library's: score-form classifier guidance (eq 19) on the diffusers eps
    model, schedule, _ = load_diffusers(root)
    term = ClassifierTerm(clf, torch.ones(8, dtype=torch.long), 3.0)
    x = generate(ScoreGuided(model, schedule, term), schedule, 8, shape=(1, 8, 8), steps=10, seed=2)
    assert np.array_equal(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
                          top["images"])

    # guidance steers the random model's samples to the asked class, as judged by the classifier at t = 0
    def p_top(a):
        x0 = torch.from_numpy(a["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            return clf(x0, torch.zeros(len(x0), dtype=torch.long)).softmax(-1)[:, 1].mean().item()

    assert p_top(left) < p_top(u) < p_top(top)
    assert p_top(top) - p_top(left) > 0.5


def test_classifier_on_another_schedule_is_warned_about(classifier):
    _, clf = classifier
    cosine = {"network": clf.config, "task": "classifier", "schedule": cosine_schedule(T).config()}
    msg = check_classifier_schedule(linear_schedule(T), cosine)
    assert msg and "cosine schedule with T=50" in msg
    assert check_classifier_schedule(linear_schedule(T), dict(cosine, schedule=linear_schedule(T).config())) is None


def test_cli_errors_are_one_line(ddpm, tmp_path, capsys, monkeypatch):
    root, _, _ = ddpm
    assert run("sample", "--ckpt", root, "--diffusers-model", root, "--out", tmp_path / "x.png") == 2
    assert "not both" in capsys.readouterr().err
    assert run("sample", "--diffusers-model", tmp_path / "missing", "--out", tmp_path / "x.png") == 2
    assert "diffusers model folder not found" in capsys.readouterr().err
    assert run("sample", "--diffusers-model", root, "--class", "1", "--out", tmp_path / "x.png") == 2
    assert "unconditional: pass --classifier" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if condiff[diffusers] were not installed
    assert run("sample", "--diffusers-model", root, "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'condiff[diffusers]'" in err[0]


def test_wrapper_reports_image_shape_of_rectangular_models():
    unet = diffusers.UNet2DModel(sample_size=(8, 16), in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    eps = DiffusersEps(unet)
    assert eps.image_shape == (3, 8, 16)
    x = torch.randn(2, 3, 8, 16)
    with torch.no_grad():
        assert eps(x, torch.tensor(5), None).shape == x.shape


def test_similarity_guidance_works_on_the_diffusers_model(ddpm):
    """Eqs 11-14 on a diffusers eps: gamma * grad cos(x_t, target) pulls the samples towards a target image."""
    from condiff.guidance import SimilarityTerm

    root, _, _ = ddpm
    model, schedule, _ = load_diffusers(root)
    target = -torch.ones(1, 1, 8, 8)
    target[..., :4, :] = 1  # top half bright
    cos = lambda x, t, cond=None: torch.nn.functional.cosine_similarity(x.flatten(1), target.flatten(1))  # noqa: E731
    plain = generate(model, schedule, 6, shape=(1, 8, 8), steps=10, seed=4)
    guided = generate(ScoreGuided(model, schedule, SimilarityTerm(cos, scale=200.0)), schedule, 6, shape=(1, 8, 8),
                      steps=10, seed=4)
    assert cos(guided, None).mean() > cos(plain, None).mean() + 0.3


# --- issue 15: condiff's solvers and step schedules against diffusers' schedulers --------------------------------

def diffusers_scheduler(cls, schedule, **config):
    """A diffusers scheduler on condiff's schedule, converted through Schedule.betas() / alphas_cumprod()."""
    sched = cls(num_train_timesteps=schedule.T, trained_betas=schedule.betas().numpy(), **config)
    assert torch.allclose(sched.alphas_cumprod.double(), schedule.alphas_cumprod(), rtol=1e-5)  # the same schedule (float32 there)
    return sched


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "lambda", "karras"])
@pytest.mark.parametrize("steps", [5, 12, 20])
def test_dpm_solver_pp_2m_matches_diffusers(ddpm, spacing, steps):
    """DPM-Solver++(2M) equals diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, final sigma zero:
    first-order first and last steps) on the same eps-model, x_T and timesteps.

    The DDPM's linear schedule (T = 50) keeps abar_t >= 0.6, so diffusers' float32 coefficients cost ~1e-6.
    (On the cosine schedule, abar_{T-1} ~ 5e-5, diffusers' float32 bbar_t = 1 - 1e-9 rounds to 1 and its x0
    then differs from the exact one by ~1e-3; condiff computes the coefficients in float64.)
    """
    root, _, _ = ddpm
    model, schedule, _ = load_diffusers(root)
    sched = diffusers_scheduler(diffusers.DPMSolverMultistepScheduler, schedule, algorithm_type="dpmsolver++",
                                solver_order=2)
    ts = respace(schedule, steps, spacing)
    sched.set_timesteps(timesteps=ts)
    assert sched.timesteps.tolist() == ts
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = x_T
        for t in sched.timesteps:
            x = sched.step(model(x, torch.full((4,), int(t)), None), t, x).prev_sample
        ours = SAMPLERS["dpm++2m"](model, x_T, schedule, steps, spacing=spacing)
    print(f"max |condiff - diffusers| {float((ours - x).abs().max()):.2e}")
    assert (ours - x).abs().max() < 1e-4
    ddim = SAMPLERS["ddim"](model, x_T, schedule, steps, spacing=spacing)
    assert (ours - ddim).abs().max() > 1e-3  # not DDIM: the comparison has power


@pytest.mark.parametrize("steps", [3, 5, 12, 20])
def test_unipc_matches_diffusers(ddpm, steps):
    """UniPC equals diffusers' UniPCMultistepScheduler (bh2, order 2, data prediction, lower-order final steps)
    on the same eps-model and x_T; its set_timesteps takes no list, so both use the trailing spacing."""
    root, _, _ = ddpm
    model, schedule, _ = load_diffusers(root)
    sched = diffusers_scheduler(diffusers.UniPCMultistepScheduler, schedule, solver_order=2, solver_type="bh2",
                                predict_x0=True, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == respace(schedule, steps, "trailing")
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = x_T
        for t in sched.timesteps:
            x = sched.step(model(x, torch.full((4,), int(t)), None), t, x).prev_sample
        ours = SAMPLERS["unipc"](model, x_T, schedule, steps, spacing="trailing")
        dpm = SAMPLERS["dpm++2m"](model, x_T, schedule, steps, spacing="trailing")
    print(f"max |condiff - diffusers| {float((ours - x).abs().max()):.2e}")
    assert (ours - x).abs().max() < 1e-4
    assert (ours - dpm).abs().max() > 5e-4  # the corrector changes the result (measured 1e-3 .. 6e-3)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("T,steps", [(1000, 1), (1000, 7), (1000, 10), (1000, 333), (50, 50), (50, 3), (50, 12),
                                     (1000, 24)])
def test_leading_and_trailing_are_diffusers_spacings(spacing, T, steps):
    """Diffusers' DDIMScheduler(timestep_spacing=...) visits the same timesteps (steps_offset 0).  Checked for every
    K at T = 10, 50, 100, 1000: equal wherever diffusers returns K steps (its trailing list has K + 1, ending at
    -1, for 69 of those, e.g. T = 1000, K = 985; condiff keeps K distinct steps there)."""
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == respace(linear_schedule(T), steps, spacing)
