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
