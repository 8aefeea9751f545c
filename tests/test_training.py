"""Training loop, checkpoints and resume (issue 2): behaviour on a tiny model and tiny data."""

import json

import pytest
import torch

from condiff.checkpoints import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from condiff.nets import EncoderNet, UNet
from condiff.schedule import cosine_schedule
from condiff.training import ClassifierTask, DiffusionTask, TrainConfig, classifier_accuracy_by_t, train
from helpers import shapes_dataset

SCHED = cosine_schedule(100)


def tiny_unet(**kw):
    torch.manual_seed(0)
    return UNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1, stem=2, **kw)


def losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_lowers_its_loss(tmp_path):
    data = shapes_dataset(256)
    cfg = TrainConfig(steps=120, batch_size=32, lr=3e-3, warmup=10, log_every=20, ckpt_every=120)
    train(tiny_unet(), DiffusionTask(SCHED, 0.0), data, cfg, tmp_path, progress=False)
    ls = losses(tmp_path)
    assert ls[-1] < 0.6 * ls[0], ls


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    model = tiny_unet(num_classes=2)
    ema = {k: v + 0.01 if v.dtype.is_floating_point else v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ck", model, {"network": model.config, "task": "diffusion"}, ema=ema)
    loaded, config = load_model(tmp_path / "ck")
    ref = tiny_unet(num_classes=2)
    ref.load_state_dict(ema)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), ref.eval()(x, t, y))
    assert config["network"] == model.config


def test_resume_continues_the_same_run_exactly(tmp_path):
    data = shapes_dataset(128)
    cfg = TrainConfig(steps=12, batch_size=16, lr=1e-3, warmup=3, log_every=1, ckpt_every=4, keep=10)
    task = DiffusionTask(SCHED, 0.3)
    train(tiny_unet(num_classes=2), task, data, cfg, tmp_path / "full", progress=False)
    # interrupted after 8 steps, then resumed in a fresh model
    cfg8 = TrainConfig(**{**cfg.__dict__, "steps": 8})
    train(tiny_unet(num_classes=2), task, data, cfg8, tmp_path / "cut", progress=False)
    torch.manual_seed(123)  # global RNG disturbed between runs: resume must restore it
    train(tiny_unet(num_classes=2), task, data, cfg, tmp_path / "cut", progress=False)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
        assert torch.equal(a["raw"][k], b["raw"][k]), k


def test_keeps_only_last_k_checkpoints(tmp_path):
    data = shapes_dataset(64)
    cfg = TrainConfig(steps=10, batch_size=16, log_every=5, ckpt_every=2, keep=2)
    train(tiny_unet(), DiffusionTask(SCHED, 0.0), data, cfg, tmp_path, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000008", "step-0000010"]


def test_condition_dropout_rate_matches_p_uncond():
    """Observed null rate over many draws matches p_uncond within 5 binomial standard errors."""
    model = tiny_unet(num_classes=2)
    task = DiffusionTask(SCHED, 0.1)
    g = torch.Generator().manual_seed(0)
    n = 20000
    y = torch.zeros(n, dtype=torch.long)
    dropped = (task.drop_condition(model, y, g) == 2).float().mean().item()
    se = (0.1 * 0.9 / n) ** 0.5
    assert abs(dropped - 0.1) < 5 * se


def _perturb(model):
    """Zero-initialised output convolutions block gradients at init; give every weight some noise."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_null_condition_is_learned_and_gets_gradients():
    model = tiny_unet(num_classes=2)
    _perturb(model)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 100, (4,))
    model(x, t, model.null_cond(4)).pow(2).sum().backward()
    assert model.class_emb.weight.grad[2].abs().sum() > 0  # phi's row
    assert model.class_emb.weight.grad[:2].abs().sum() == 0  # no real class was used


def test_vector_condition_null_is_learned():
    torch.manual_seed(0)
    model = UNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1, cond_dim=5)
    _perturb(model)
    x, t = torch.randn(3, 1, 8, 8), torch.randint(0, 100, (3,))
    cond = torch.randn(3, 5)
    cond[1] = float("nan")  # the null row
    out = model(x, t, cond)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert model.null_emb.grad.abs().sum() > 0
    same = model(x[1:2], t[1:2], model.null_cond(1))
    assert torch.allclose(same, out[1:2], atol=1e-6)


def test_classifier_trains_and_beats_chance_on_noisy_inputs(tmp_path):
    data = shapes_dataset(512)
    torch.manual_seed(0)
    clf = EncoderNet(in_channels=1, image_size=8, channels=(8, 16), blocks=1, out_dim=2)
    cfg = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup=10, log_every=50, ckpt_every=150)
    train(clf, ClassifierTask(SCHED), data, cfg, tmp_path, progress=False)
    model, config = load_model(tmp_path)
    acc = classifier_accuracy_by_t(model, SCHED, shapes_dataset(400, seed=1), n=400)
    assert acc["clean"] > 0.95 and acc["mid"] > 0.7, acc
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"acc_clean", "acc_mid", "acc_noisy"} <= set(log[-1])
    assert config["task"] == "classifier"


def test_nonfinite_loss_aborts_after_limit(tmp_path):
    from condiff.errors import NonFiniteError

    data = shapes_dataset(64)
    data.images[:] = float("nan")
    cfg = TrainConfig(steps=20, batch_size=16, max_nonfinite=3, ckpt_every=100)
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(NonFiniteError, match="3 non-finite"):
        train(tiny_unet(), DiffusionTask(SCHED, 0.0), data, cfg, tmp_path, progress=False)


@pytest.mark.parametrize("channels,size,stem", [(3, 32, 2), (3, 16, 1), (1, 28, 2), (1, 12, 2)])
def test_unet_and_encoder_work_at_other_sizes_and_channel_counts(channels, size, stem):
    torch.manual_seed(0)
    net = UNet(in_channels=channels, image_size=size, channels=(8, 16), blocks=1, stem=stem, num_classes=3)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 5]), torch.tensor([1, 3])).shape == x.shape
    enc = EncoderNet(in_channels=channels, image_size=size, channels=(8, 16), blocks=1, stem=stem, out_dim=4)
    assert enc(x, torch.tensor([0, 5])).shape == (2, 4)


def test_unet_rejects_sizes_it_cannot_halve():
    from condiff.errors import CondiffError

    with pytest.raises(CondiffError, match="divisible by 4"):
        UNet(image_size=30, channels=(8, 16), stem=2)


# ----------------------------------------------------------------------------- recipe v2 (issue 17)
def test_min_snr_weight_is_min_snr_gamma_over_snr():
    from condiff.training import min_snr_weight

    t = torch.arange(SCHED.T)
    w = min_snr_weight(SCHED, t, 5.0)
    snr = SCHED.abar.double() ** 2 / SCHED.bbar.double() ** 2
    assert torch.allclose(w.double(), torch.minimum(snr, torch.tensor(5.0)) / snr, rtol=1e-6)
    assert w[0] < 0.01 and w[-1] == 1  # nearly clean steps weigh little, noisy ones fully
    assert ((w[1:] - w[:-1]) >= -1e-7).all()  # SNR falls with t, so the weight rises


def test_min_snr_loss_is_the_weighted_eps_mse():
    from condiff.training import min_snr_weight, sample_t

    model, x0, y = tiny_unet(num_classes=2), shapes_dataset(16).images, torch.zeros(16, dtype=torch.long)
    _perturb(model)
    task = DiffusionTask(SCHED, 0.0, min_snr_gamma=2.0)
    loss, metrics = task.loss(model, x0, y, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws by hand: t, eps, (condition dropout)
    t = sample_t(SCHED.T, 16, g)
    eps = torch.randn(x0.shape, generator=g)
    task.drop_condition(model, y, g)
    with torch.no_grad():
        err = (model(SCHED.add_noise(x0, t, eps), t, y) - eps).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss, (min_snr_weight(SCHED, t, 2.0) * err).mean(), rtol=1e-5)
    assert metrics["mse"][0] / metrics["mse"][1] == pytest.approx(float(err.mean()), rel=1e-5)


def test_stratified_t_covers_every_stratum_and_is_uniform():
    from condiff.training import sample_t

    g = torch.Generator().manual_seed(0)
    t = sample_t(100, 10, g, how="stratified")
    assert [int(v) // 10 for v in t] == list(range(10))  # one t in each tenth of [0, T)
    draws = torch.cat([sample_t(100, 10, g, how="stratified") for _ in range(4000)])
    counts = torch.bincount(draws, minlength=100).double()  # the marginal is still uniform
    assert (counts - 400).abs().max() < 5 * 400 ** 0.5


def test_stratified_t_sharded_over_ranks_equals_one_process():
    from condiff.distributed import Shard
    from condiff.training import sample_t

    whole = sample_t(1000, 12, torch.Generator().manual_seed(1), how="stratified")
    parts = [sample_t(1000, 4, torch.Generator().manual_seed(1), Shard(r, 3), how="stratified") for r in range(3)]
    assert torch.equal(torch.stack(parts, 1).flatten(), whole)


def test_lr_schedules_warm_up_then_decay():
    from condiff.training import lr_lambda

    cos = lr_lambda(TrainConfig(steps=110, warmup=10, lr_schedule="cosine", min_lr=0.1))
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    rs = lr_lambda(TrainConfig(steps=1000, warmup=10, lr_schedule="rsqrt"))
    assert rs(9) == 1.0 and rs(39) == pytest.approx(0.5)  # sqrt(10 / 40)
    const = lr_lambda(TrainConfig(steps=1000, warmup=10))
    assert [const(s) for s in (0, 4, 9, 500)] == [0.1, 0.5, 1.0, 1.0]


def test_lr_schedule_is_followed_by_the_optimizer(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=16, lr=1e-2, warmup=2, log_every=1, ckpt_every=100,
                      lr_schedule="cosine")
    train(tiny_unet(), DiffusionTask(SCHED, 0.0), shapes_dataset(64), cfg, tmp_path, progress=False)
    logged = [json.loads(l)["lr"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    from condiff.training import lr_lambda

    assert logged == pytest.approx([1e-2 * lr_lambda(cfg)(s) for s in range(12)])


def test_sigma_rel_and_gamma_are_inverse():
    from condiff.training import gamma_to_sigma_rel, sigma_rel_to_gamma

    for s in (0.01, 0.05, 0.1, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    assert sigma_rel_to_gamma(0.1) == pytest.approx(6.94, abs=0.01)  # EDM2's table: 0.10 <-> 6.94


def _power_ema(theta, gamma):
    """The power EMA recursion of condiff.training.EMA by hand: beta_t = (1 - 1/t)^(gamma + 1)."""
    out, avg = [], theta[0]
    for t in range(1, len(theta)):
        beta = (1 - 1 / t) ** (gamma + 1)
        avg = beta * avg + (1 - beta) * theta[t]
        out.append(avg)
    return out  # out[t - 1]: the average after step t


def test_ema_profiles_follow_the_power_function_recursion():
    from condiff.training import EMA, sigma_rel_to_gamma

    lin = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(lin, 0.9, profiles=(0.1,))
    theta = [0.0]
    with torch.no_grad():
        for step in range(1, 51):
            lin.weight.fill_(float(torch.sin(torch.tensor(step / 7.0))))
            theta.append(float(lin.weight))
            ema.update(lin, step)
    want = _power_ema(theta, sigma_rel_to_gamma(0.1))[-1]
    assert float(ema.profiles[0.1].module.weight.detach()) == pytest.approx(want, rel=1e-5)


def test_posthoc_ema_reconstructs_an_unstored_profile():
    """Snapshots of sigma_rel 0.05 and 0.15 every 50 steps; the 0.10 profile at step 400 is recovered."""
    from condiff.training import posthoc_weights, sigma_rel_to_gamma

    g = torch.Generator().manual_seed(0)
    theta = torch.cumsum(torch.randn(401, generator=g), 0).tolist()  # a random-walk trajectory
    runs = {s: _power_ema(theta, sigma_rel_to_gamma(s)) for s in (0.05, 0.10, 0.15)}
    snaps = [(t, s) for t in range(50, 401, 50) for s in (0.05, 0.15)]
    x = posthoc_weights(snaps, 400, 0.10)
    got = sum(c * runs[s][t - 1] for c, (t, s) in zip(x, snaps))
    want = runs[0.10][399]
    spread = abs(runs[0.05][399] - runs[0.15][399])
    assert abs(got - want) < 0.1 * spread, (got, want, spread)
    assert sum(x) == pytest.approx(1.0, abs=0.02)  # an average of averages


def test_posthoc_ema_of_a_stored_profile_is_that_profile(tmp_path):
    from condiff.training import posthoc_ema

    cfg = TrainConfig(steps=8, batch_size=16, warmup=2, log_every=4, ckpt_every=4, ema_profiles=(0.05, 0.1))
    train(tiny_unet(), DiffusionTask(SCHED, 0.0), shapes_dataset(64), cfg, tmp_path, progress=False)
    snap = load_checkpoint(tmp_path / "posthoc-ema" / "step-0000008" / "sigma-0.100")["weights"]
    weights, config = posthoc_ema(tmp_path, 0.1)
    for k in snap:
        assert torch.allclose(weights[k], snap[k], atol=1e-5), k
    assert config["ema"]["sigma_rel"] == 0.1


def test_resume_is_bit_identical_with_every_lever_on(tmp_path):
    """Stopped by SIGTERM mid-run (so the cosine schedule keeps its length), resumed in a fresh model."""
    import signal

    from condiff.training import TrainingStopped

    data = shapes_dataset(128)
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-3, warmup=3, log_every=4, ckpt_every=4, keep=10,
                      sample_every=5, lr_schedule="cosine", ema_profiles=(0.05, 0.1))
    task = DiffusionTask(SCHED, 0.3, min_snr_gamma=5.0, t_sampling="stratified")
    train(tiny_unet(num_classes=2), task, data, cfg, tmp_path / "full", progress=False, callback=lambda m, s: None)
    with pytest.raises(TrainingStopped) as stop:  # the signal arrives during step 5's callback
        train(tiny_unet(num_classes=2), task, data, cfg, tmp_path / "cut", progress=False,
              callback=lambda m, s: signal.raise_signal(signal.SIGTERM))
    assert stop.value.step == 6 and stop.value.exit_code == 0  # step 6 finished, then checkpointed
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000006"
    torch.manual_seed(9)
    train(tiny_unet(num_classes=2), task, data, cfg, tmp_path / "cut", progress=False, callback=lambda m, s: None)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")  # the open log window (steps 5-6) was kept too
    for sub in ("checkpoints/step-0000010", "posthoc-ema/step-0000010/sigma-0.050"):
        a, b = load_checkpoint(tmp_path / "full" / sub), load_checkpoint(tmp_path / "cut" / sub)
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), (sub, k)
            if "raw" in a:
                assert torch.equal(a["raw"][k], b["raw"][k]), (sub, k)


def test_attention_unet_runs_and_keeps_old_configs_unchanged():
    from condiff.nets import build

    net = UNet(in_channels=1, image_size=28, channels=(16, 32), blocks=1, num_classes=3, attention=True)
    x = torch.randn(2, 1, 28, 28)
    assert net(x, torch.tensor([1, 900]), torch.tensor([0, 3])).shape == x.shape
    assert build(net.config).config == net.config and net.config["attention"] is True
    assert "attention" not in UNet(channels=(16, 32)).config  # shipped configs still match on resume


def test_cli_trains_with_every_lever_and_posthoc_ema_makes_a_loadable_model(tmp_path):
    from condiff.pipeline import load_diffusion
    from helpers import run_cli_inprocess, write_npz

    data = write_npz(tmp_path / "d.npz", shapes_dataset(64))
    run = tmp_path / "run"
    rc, _, err = run_cli_inprocess(["train", "--data", data, "--out", run, "--steps", "4", "--batch-size", "16",
                                    "--channels", "4,8", "--image-size", "8", "--T", "50", "--ckpt-every", "2",
                                    "--min-snr-gamma", "5", "--t-sampling", "stratified", "--lr-schedule", "cosine",
                                    "--ema-profiles", "0.05,0.1", "--attention", "--channels-last", "--no-progress",
                                    "--device", "cpu"])
    assert rc == 0, err
    config = load_checkpoint(latest_checkpoint(run))["config"]
    assert config["min_snr_gamma"] == 5 and config["t_sampling"] == "stratified"
    assert config["train"]["lr_schedule"] == "cosine" and config["network"]["attention"] is True
    rc, out, err = run_cli_inprocess(["posthoc-ema", "--run", run, "--sigma-rel", "0.07,0.09", "--out", tmp_path / "e"])
    assert rc == 0, err
    model, _, cfg = load_diffusion(tmp_path / "e" / "sigma-0.070")
    assert cfg["ema"]["sigma_rel"] == 0.07 and cfg["ema"]["step"] == 4
    rc, _, err = run_cli_inprocess(["posthoc-ema", "--run", run, "--sigma-rel", "0.5", "--out", tmp_path / "f"])
    assert rc == 2 and "0.28" in err and not (tmp_path / "f").exists()
