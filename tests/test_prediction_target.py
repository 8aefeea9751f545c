"""condiff.prediction: networks that predict v or x_0, turned into eps in one place (issue 17, lever "prediction").

Ground truth: the exact-score Gaussian mixture of condiff.toy.  Its posterior means E[x_0 | x_t] and
E[eps | x_t] are computed here by Gaussian conditioning, independently of the toy's score formula, so a
network that outputs the exact v or x_0 must convert to the toy's exact eps.
"""

from __future__ import annotations

import pytest
import torch

from condiff.checkpoints import latest_checkpoint, load_model, read_config, save_checkpoint
from condiff.compose import Guidance, Sampling, compose
from condiff.errors import CondiffError
from condiff.guidance import ClassifierTerm
from condiff.nets import UNet
from condiff.pipeline import guided_generate, load_diffusion
from condiff.prediction import (PREDICTION_KEY, PREDICTIONS, EpsFromPrediction, as_eps_model, eps_from_prediction,
                                prediction_of, regression_target, x0_error_scale)
from condiff.samplers import sample_ddim, sample_dpmpp_2m
from condiff.schedule import Schedule, cosine_schedule, linear_schedule
from condiff.toy import GaussianMixture
from condiff.training import DiffusionTask, TrainConfig, min_snr_weight, train
from helpers import one_thread, run_cli_inprocess, shapes_dataset, write_npz  # noqa: F401

S = cosine_schedule(100)
GM = GaussianMixture([[-2.0, 0.5], [2.0, 0.0], [0.0, 3.0]],
                     [[[0.5, 0.2], [0.2, 0.3]], [[0.2, 0.0], [0.0, 0.6]], [[0.4, -0.1], [-0.1, 0.4]]],
                     [0.5, 0.3, 0.2], schedule=S)


def _coeffs(schedule, t, like):
    return schedule.gather(t, like)


def _error_lines(err: str) -> int:
    """Lines of a CLI's stderr that are errors (train prints its banner before it looks at --out)."""
    assert "Traceback" not in err
    return sum("error" in line for line in err.strip().splitlines())


# ----------------------------------------------------------------------------- the conversions
@pytest.mark.parametrize("schedule", [cosine_schedule(1000), linear_schedule(1000)], ids=["cosine", "linear"])
def test_conversions_are_exact_inverses_at_every_t(schedule):
    g = torch.Generator().manual_seed(0)
    T = schedule.T
    t = torch.arange(T)
    x0 = torch.randn(T, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(T, 1, 3, 3, generator=g, dtype=torch.float64)
    a, b = _coeffs(schedule, t, x0)
    x_t = schedule.add_noise(x0, t, eps)
    # eps -> v -> eps and eps -> x0 -> eps, every t, float64
    v = regression_target("v", x0, eps, a, b)
    assert torch.allclose(v, a * eps - b * x0, atol=0, rtol=0)
    assert (eps_from_prediction("v", v, x_t, a, b) - eps).abs().max() < 1e-12
    assert (a * x_t - b * v - x0).abs().max() < 1e-12  # x_0 = abar x_t - bbar v, the other half of the rotation
    assert (eps_from_prediction("x0", regression_target("x0", x0, eps, a, b), x_t, a, b) - eps).abs().max() < 1e-9
    # the same in float32: v everywhere, x0 where bbar_t is not tiny (its error grows as 1/bbar_t)
    x0f, epsf, x_tf = x0.float(), eps.float(), x_t.float()
    af, bf = _coeffs(schedule, t, x0f)
    assert (eps_from_prediction("v", regression_target("v", x0f, epsf, af, bf), x_tf, af, bf) - epsf).abs().max() < 1e-5
    well = b.flatten() > 0.1
    back = eps_from_prediction("x0", x0f, x_tf, af, bf)
    assert (back[well] - epsf[well]).abs().max() < 1e-5
    assert (back - epsf).abs().max() < 1e-3 / float(b.min())  # at t = 0 too, no blow-up beyond the 1/bbar factor
    # eps is the identity: the very tensor, so the default target is bit-identical
    assert regression_target("eps", x0, eps, a, b) is eps and eps_from_prediction("eps", eps, x_t, a, b) is eps


def _posterior_means(gm: GaussianMixture, x: torch.Tensor, t: int, cond=None):
    """E[x_0 | x_t] and E[eps | x_t] by Gaussian conditioning, per component then mixed by p(k | x_t).

    Component k: x_t ~ N(abar m_k, S_k), S_k = abar^2 C_k + bbar^2 I, Cov(x_0, x_t) = abar C_k, Cov(eps, x_t) = bbar I.
    """
    a, b = gm.schedule.coefficients(t)
    d = gm.d
    x0_k, eps_k = [], []
    for k in range(gm.K):
        Sk = a * a * gm.covs[k] + b * b * torch.eye(d, dtype=torch.float64)
        r = torch.linalg.solve(Sk, (x - a * gm.means[k]).T)  # (d, B)
        x0_k.append(gm.means[k] + (a * gm.covs[k] @ r).T)
        eps_k.append((b * r).T)
    x0_k, eps_k = torch.stack(x0_k), torch.stack(eps_k)  # (K, B, d)
    if cond is not None and cond != gm.K:
        return x0_k[cond], eps_k[cond]
    p = gm.class_log_prob(x, t).exp().T[:, :, None]  # (K, B, 1)
    return (p * x0_k).sum(0), (p * eps_k).sum(0)


class ExactNet(torch.nn.Module):
    """The network a perfect training with target ``prediction`` converges to on the toy mixture."""

    def __init__(self, gm, prediction):
        super().__init__()
        self.gm, self.prediction = gm, prediction

    @property
    def conditional(self):
        return True

    def null_cond(self, batch, device=None):
        return self.gm.null_cond(batch, device)

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t).expand(x.shape[0])
        c = torch.as_tensor(self.gm.K if cond is None else cond).expand(x.shape[0])
        out = torch.empty_like(x)
        for tv in t.unique().tolist():
            for cv in c.unique().tolist():
                rows = (t == tv) & (c == cv)
                x0, eps = _posterior_means(self.gm, x[rows], tv, cv)
                a, b = self.gm.schedule.coefficients(tv)
                out[rows] = {"x0": x0, "v": a * eps - b * x0, "eps": eps}[self.prediction]
        return out


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_exact_v_or_x0_of_the_toy_converts_to_its_exact_eps(prediction):
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    net = as_eps_model(ExactNet(GM, prediction), S, prediction)
    assert isinstance(net, EpsFromPrediction)
    for t in (0, 1, 10, 50, 99):
        tt = torch.full((6,), t)
        assert torch.allclose(net(x, tt), GM.eps(x, tt), rtol=1e-7, atol=1e-9), t  # unconditional (null)
        for k in range(GM.K):
            assert torch.allclose(net(x, tt, torch.full((6,), k)), GM.eps(x, tt, k), rtol=1e-7, atol=1e-9), (t, k)
    # the exact eps network as a check of the check: the posterior mean of eps is the toy's eps
    assert torch.allclose(ExactNet(GM, "eps")(x, torch.full((6,), 30)), GM.eps(x, torch.full((6,), 30)), rtol=1e-9)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_samplers_and_guidance_see_the_same_eps(prediction):
    """CFG (null condition), a classifier term (eq 19) and two solvers on the converted network equal them on
    the toy's own eps."""
    net = as_eps_model(ExactNet(GM, prediction), S, prediction)
    xT = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(6) % 3
    guidance = Guidance(cfg_w=1.5, terms=[ClassifierTerm(GM.classifier, None, 2.0)])
    ours, _ = compose(net, S, guidance)
    exact, _ = compose(GM, S, guidance)
    cond = {"y": y}
    for solver in (sample_ddim, sample_dpmpp_2m):
        a = solver(ours, xT.clone(), S, 8, cond=cond, generator=torch.Generator().manual_seed(0))
        b = solver(exact, xT.clone(), S, 8, cond=cond, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), solver.__name__


# ----------------------------------------------------------------------------- min-SNR per target
def test_min_snr_weights_per_target_on_known_snrs():
    snr = torch.tensor([100.0, 5.0, 1.0, 0.25], dtype=torch.float64)
    sched = Schedule((snr / (1 + snr)).sqrt())  # abar^2 / bbar^2 = snr exactly
    t = torch.arange(4)
    expect = {"eps": [0.05, 1.0, 1.0, 1.0], "v": [5 / 101, 5 / 6, 0.5, 0.2], "x0": [5.0, 5.0, 1.0, 0.25]}
    for prediction, want in expect.items():
        w = min_snr_weight(sched, t, 5.0, prediction)
        assert torch.allclose(w.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6), prediction
    assert torch.allclose(x0_error_scale("v", snr), 1 / sched.bbar**2)  # SNR + 1 = 1 / bbar^2


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_min_snr_loss_of_each_target_is_the_eps_loss_of_its_converted_network(prediction):
    """Min-SNR weights a target's MSE so that it equals the min-SNR eps-loss of the same network seen as eps:
    the three targets differ in parameterisation only, not in what the loss asks for."""
    torch.manual_seed(0)
    net = UNet(image_size=8, channels=(8, 8), blocks=1, stem=1, num_classes=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, y = shapes_dataset(16).images, torch.arange(16) % 2
    for gamma in (None, 2.0):
        ours, m = DiffusionTask(S, 0.3, min_snr_gamma=gamma, prediction=prediction).loss(
            net, x0, y, torch.Generator().manual_seed(3))
        if gamma is None:  # plain MSE to the target, by hand with the same draws
            g = torch.Generator().manual_seed(3)
            t = torch.randint(S.T, (16,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            cond = DiffusionTask(S, 0.3).drop_condition(net, y, g)
            a, b = S.gather(t, x0)
            want = (net(S.add_noise(x0, t, eps), t, cond) - regression_target(prediction, x0, eps, a, b)).pow(2).mean()
            assert torch.allclose(ours, want, rtol=1e-5) and m == {}
            continue
        as_eps, _ = DiffusionTask(S, 0.3, min_snr_gamma=gamma).loss(as_eps_model(net, S, prediction), x0, y,
                                                                     torch.Generator().manual_seed(3))
        assert torch.allclose(ours, as_eps, rtol=1e-4), (prediction, float(ours), float(as_eps))


# ----------------------------------------------------------------------------- checkpoints and the CLI
def test_config_key_round_trips_and_old_configs_are_eps(tmp_path):
    assert PREDICTIONS == ("eps", "v", "x0") and PREDICTION_KEY == "prediction"
    assert PREDICTION_KEY not in DiffusionTask(S).config()  # eps checkpoints keep their old config
    assert DiffusionTask(S, prediction="x0").config()[PREDICTION_KEY] == "x0"
    assert prediction_of({}) == "eps" and prediction_of({"prediction": "v"}) == "v"
    net = UNet(image_size=8, channels=(4, 4), blocks=1, stem=1)
    base = {"network": net.config, "task": "diffusion", "schedule": S.config(), "image_shape": [1, 8, 8]}
    for prediction in PREDICTIONS:
        config = dict(base, **DiffusionTask(S, prediction=prediction).config())
        save_checkpoint(tmp_path / prediction, net, config)
        assert prediction_of(read_config(tmp_path / prediction)) == prediction
        model, _, _ = load_diffusion(tmp_path / prediction)
        assert isinstance(model, EpsFromPrediction) == (prediction != "eps")
    save_checkpoint(tmp_path / "old", net, base)  # a checkpoint from before the key: the plain network
    model, _, config = load_diffusion(tmp_path / "old")
    assert type(model) is UNet and PREDICTION_KEY not in config


def test_shipped_models_predict_v_and_load_as_eps_models():
    """Recipe v3's eps-model and its weak snapshot predict v; loaded, they give eps = abar_t v + bbar_t x_t."""
    from condiff.zoo import shipped

    for role in ("diffusion", "weak-diffusion"):
        model, schedule, config = load_diffusion(shipped(role))
        assert prediction_of(config) == "v" and isinstance(model, EpsFromPrediction) and type(model.net) is UNet
        x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([5, 400, 990]), torch.tensor([0, 5, 10])  # 10: the null class
        with torch.no_grad():
            v, eps = model.net(x, t, y), model(x, t, y)
        abar, bbar = schedule.gather(t, x)
        assert torch.allclose(eps, abar * v + bbar * x, atol=1e-5)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_tiny_cli_run_saves_reloads_and_samples(tmp_path, prediction):
    shapes = shapes_dataset(64)
    data = write_npz(tmp_path / "d.npz", type(shapes)(shapes.images, shapes.labels, ["Dress", "Coat"]))
    run = tmp_path / "run"
    rc, _, err = run_cli_inprocess(["train", "--data", data, "--out", run, "--steps", "3", "--batch-size", "16",
                                    "--channels", "4,8", "--image-size", "8", "--T", "50", "--ckpt-every", "3",
                                    "--prediction", prediction, "--min-snr-gamma", "5", "--sample-every", "3",
                                    "--no-progress", "--device", "cpu"])
    assert rc == 0, err
    assert (run / "samples" / "step-0000003.png").is_file()  # the training grids sample the eps of the network
    ckpt = latest_checkpoint(run)
    model, schedule, config = load_diffusion(ckpt)
    assert config[PREDICTION_KEY] == prediction and isinstance(model, EpsFromPrediction)
    assert model.conditional and model.num_classes == 2  # the network's attributes, through the wrapper
    raw, _ = load_model(ckpt)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 30, 49]), torch.tensor([0, 1, 2, 1])  # 2 = null phi
    a, b = schedule.gather(t, x)
    with torch.no_grad():
        out = raw(x, t, y)
        want = a * out + b * x if prediction == "v" else (x - a * out) / b
        assert torch.allclose(model(x, t, y), want, atol=1e-6)
    rc, _, err = run_cli_inprocess(["sample", "--ckpt", run, "--class", "Coat", "--cfg-w", "2", "--steps", "3",
                                    "--n", "2", "--out", tmp_path / "g.png", "--no-progress", "--device", "cpu"])
    assert rc == 0, err
    assert (tmp_path / "g.png").is_file()
    rc, _, err = run_cli_inprocess(["export", "--ckpt", run, "--out", tmp_path / "m"])
    assert rc == 0, err
    assert f"- prediction target: {prediction} (converted to eps when loaded" in (tmp_path / "m" / "README.md").read_text()
    # resuming the run with another target is refused
    rc, _, err = run_cli_inprocess(["train", "--data", data, "--out", run, "--steps", "4", "--batch-size", "16",
                                    "--channels", "4,8", "--image-size", "8", "--T", "50", "--no-progress",
                                    "--device", "cpu"])
    assert rc == 2 and f"predicts {prediction}" in err and _error_lines(err) == 1, err
    # so is a text model started (--init) from it with another target (without --prediction it takes the init's)
    rc, _, err = run_cli_inprocess(["train", "--data", data, "--out", tmp_path / "txt", "--cond", "text", "--init",
                                    run, "--steps", "1", "--batch-size", "16", "--channels", "4,8", "--image-size",
                                    "8", "--T", "50", "--no-progress", "--device", "cpu", "--prediction", "eps"])
    assert rc == 2 and f"--prediction {prediction}" in err and _error_lines(err) == 1, err


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_text_conditional_model_with_each_target(tmp_path, prediction):
    """A caption-conditional network (vector condition, learned null embedding) trained to predict v or x_0
    reloads as eps and samples under CFG."""
    from condiff.captions import caption_table, split_captions
    from condiff.text_cfg import CaptionDiffusionTask

    names, D = ["Dress", "Coat"], 384
    caps = split_captions(names, "train")
    emb = torch.nn.functional.normalize(torch.randn(len(caps), D, generator=torch.Generator().manual_seed(0)), dim=-1)
    table, counts = caption_table(caps, 2)
    task = CaptionDiffusionTask(S, emb, table, counts, p_uncond=0.2, min_snr_gamma=5.0, prediction=prediction)
    assert task.config()[PREDICTION_KEY] == prediction and task.config()["captions"] == "attributes"
    data = shapes_dataset(32)
    data = type(data)(data.images, data.labels * 8, names)  # (class, no attributes) codes
    torch.manual_seed(0)
    net = UNet(image_size=8, channels=(8, 8), blocks=1, stem=1, cond_dim=D)
    meta = {"schedule": S.config(), "class_names": names, "image_shape": [1, 8, 8]}
    cfg = TrainConfig(steps=3, batch_size=16, lr=1e-3, warmup=1, ckpt_every=3, log_every=3)
    final = train(net, task, data, cfg, tmp_path / "run", meta=meta, progress=False)
    model, schedule, config = load_diffusion(final)
    assert isinstance(model, EpsFromPrediction) and model.cond_dim == D and config[PREDICTION_KEY] == prediction
    x = torch.randn(2, 1, 8, 8)
    null = model.null_cond(2)
    with torch.no_grad():  # the null embedding phi through the wrapper
        assert torch.isfinite(model(x, torch.tensor([5, 60]), null)).all()
    import warnings

    with warnings.catch_warnings():  # 3 steps of training: saturated samples are expected
        warnings.simplefilter("ignore")
        out = guided_generate(model, schedule, 2, Guidance(cfg_w=2.0), Sampling("ddim", 3), shape=(1, 8, 8),
                              cond={"y": emb[:2]}, seed=0)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_unknown_target_is_a_one_line_error(tmp_path):
    with pytest.raises(CondiffError, match="unknown prediction target 'w'"):
        DiffusionTask(S, prediction="w")
    with pytest.raises(CondiffError, match="choose eps, v, x0"):
        as_eps_model(GM, S, "epsilon")
    with pytest.raises(CondiffError):
        min_snr_weight(S, torch.arange(3), 5.0, "sample")
    net = UNet(image_size=8, channels=(4, 4), blocks=1, stem=1)
    save_checkpoint(tmp_path / "bad", net, {"network": net.config, "task": "diffusion", "schedule": S.config(),
                                            "image_shape": [1, 8, 8], "prediction": "w"})
    with pytest.raises(CondiffError, match="bad.*unknown prediction target") as e:
        load_diffusion(tmp_path / "bad")
    assert "\n" not in str(e.value)
    rc, _, err = run_cli_inprocess(["sample", "--ckpt", tmp_path / "bad", "--steps", "2", "--n", "1",
                                    "--out", tmp_path / "e.png", "--device", "cpu"])
    assert rc == 2 and "unknown prediction target" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "e.png").exists()
    rc, _, err = run_cli_inprocess(["train", "--data", "x.npz", "--out", tmp_path / "r", "--prediction", "w"])
    assert rc == 2 and "--prediction" in err and len(err.strip().splitlines()) == 1, err
