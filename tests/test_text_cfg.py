"""condiff.text_cfg: the caption-conditional eps-model of the article's second text route (eqs 20-24)."""

import warnings

import pytest
import torch

from condiff.captions import CaptionBank, attribute_codes, caption_table, split_captions
from condiff.compose import Guidance, Sampling, compose
from condiff.data import ImageDataset
from condiff.nets import UNet, build
from condiff.schedule import make_schedule
from condiff.similarity import text as text_mod
from condiff.text_cfg import (TEXT_KEY, CaptionDiffusionTask, attribute_rule, caption_dataset, init_from_class_model,
                              is_text_conditional, prompt_condition)
from condiff.training import TrainConfig, train

from helpers import assert_one_line_error, one_thread, run_cli_inprocess, write_npz  # noqa: F401

S = make_schedule("cosine", 100)
NAMES = ["Dress", "Coat"]
D = 384


class FakeText:
    """A stand-in for MiniLM: a fixed random unit vector per text (deterministic), 384-d."""

    name, dim = text_mod.TEXT_MODEL, D

    def encode(self, texts):
        out = [torch.randn(D, generator=torch.Generator().manual_seed(hash_text(t))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def hash_text(t):
    h = 0
    for ch in t:
        h = (h * 131 + ord(ch)) % 2**31
    return h


def tiny_data(n=64, size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1, size, size), -1.0)
    labels = torch.arange(n) % 2
    for i in range(n):
        w = 2 + int(torch.randint(0, 4, (1,), generator=g))
        x[i, :, 1:7, 4 - w // 2:4 - w // 2 + w] = float(torch.rand(1, generator=g)) * 1.6 - 0.6
    return ImageDataset(x, labels, list(NAMES))


def tiny_unet(**kw):
    return UNet(image_size=8, channels=(8, 8), blocks=1, stem=1, **kw)


def test_vector_condition_shapes_and_learned_null():
    torch.manual_seed(0)
    net = tiny_unet(cond_dim=D)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 90])
    y = torch.randn(3, D)
    assert net(x, t, y).shape == x.shape
    with torch.no_grad():
        net.null_emb.normal_()
    null = net.null_cond(3)
    assert null.shape == (3, D) and null.isnan().all()
    emb = net.cond_embedding(torch.cat([y[:1], null[:1]]), 2, "cpu")
    # a batched and a one-row linear layer may round differently: equal to float32 precision
    assert torch.allclose(emb[1], net.null_emb) and torch.allclose(emb[0], net.cond_proj(y[0]), rtol=1e-5, atol=1e-5)
    assert "null_emb" in dict(net.named_parameters())  # learned


def _task(p_uncond, data=None):
    caps = split_captions(NAMES, "train")
    bank = CaptionBank.build([c.text for c in caps], FakeText())
    table, counts = caption_table(caps, 2)
    return CaptionDiffusionTask(S, bank.embeddings, table, counts, p_uncond=p_uncond), caps, bank


def test_captions_are_true_of_each_row_and_dropped_at_rate_p_uncond():
    task, caps, bank = _task(0.25)
    codes = attribute_codes(torch.tensor([0, 1, 0, 1] * 500), torch.tensor([[1, 0, 1], [0, 1, 0]] * 1000), 2)
    idx = task.captions_for(codes, torch.Generator().manual_seed(0))
    for i, code in zip(idx.tolist(), codes.tolist()):
        c = caps[i]
        assert c.label == code % 2
        assert all(v in (-1, (code // 2 >> a) & 1) for a, v in enumerate(c.attrs))
    assert len(set(idx.tolist())) > 100  # many phrasings, not one caption per code

    seen = []

    class Spy(torch.nn.Module):
        conditional, cond_dim = True, D

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def null_cond(self, b, device=None):
            return torch.full((b, D), float("nan"))

        def forward(self, x, t, cond):
            seen.append(cond)
            return x * self.w

    task.loss(Spy(), torch.zeros(4000, 1, 2, 2), codes.repeat(2), torch.Generator().manual_seed(1))
    dropped = seen[0].isnan().all(1)
    assert abs(float(dropped.float().mean()) - 0.25) < 0.03  # binomial sd 0.007
    kept = seen[0][~dropped]
    assert not kept.isnan().any() and (kept.norm(dim=1) - 1).abs().max() < 1e-5  # caption embeddings


def test_training_run_round_trips_and_samples(tmp_path):
    data, rule = caption_dataset(tiny_data())
    assert data.labels.max() < 2 * 8 and (data.labels % 2 == tiny_data().labels).all()
    task, caps, bank = _task(0.1)
    model = tiny_unet(cond_dim=D)
    meta = {"schedule": S.config(), "class_names": NAMES, "image_shape": [1, 8, 8],
            TEXT_KEY: {"encoder": FakeText.name, "dim": D, "captions": "attributes", "rule": rule.config()}}
    cfg = TrainConfig(steps=4, batch_size=16, lr=1e-3, warmup=1, ckpt_every=4, log_every=2)
    final = train(model, task, data, cfg, tmp_path / "run", meta=meta, progress=False)
    from condiff.pipeline import load_diffusion

    net, schedule, config = load_diffusion(final)
    assert is_text_conditional(config) and config["captions"] == "attributes"
    assert net.cond_dim == D and build(net.config).cond_dim == D
    assert torch.equal(attribute_rule(config).thresholds, rule.thresholds)
    from condiff.text_cfg import sample_prompts

    with warnings.catch_warnings():  # 4 steps of training: saturated samples are expected
        warnings.simplefilter("ignore")
        x = sample_prompts(net, schedule, config, ["a dark dress", "a wide coat"], n=2, cfg_w=2.0,
                           encoder=FakeText(), sampling=Sampling("ddim", 3))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(Exception, match="needs a text-conditional"):
        prompt_condition(["a dress"], {"network": {}}, encoder=FakeText())


def test_cfg_at_w0_is_the_conditional_model_and_mixes_with_the_learned_null():
    torch.manual_seed(0)
    net = tiny_unet(cond_dim=D).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised outputs would make every branch equal
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([30, 70]), FakeText().encode(["a dark dress", "a coat"])
    with torch.no_grad():
        e_c = net(x, t, y)
        e_u = net(x, t, net.null_cond(2))
        g0, _ = compose(net, S, Guidance(cfg_w=0.0))
        g2, _ = compose(net, S, Guidance(cfg_w=2.0))
        assert torch.allclose(g0(x, t, {"y": y}), e_c, atol=1e-6)
        assert torch.allclose(g2(x, t, {"y": y}), 3 * e_c - 2 * e_u, atol=1e-5)
        assert not torch.allclose(e_c, e_u, atol=1e-4)


def test_init_from_class_model(tmp_path):
    from condiff.checkpoints import save_checkpoint

    cls_net = tiny_unet(num_classes=2)
    with torch.no_grad():
        cls_net.class_emb.weight.normal_()
    save_checkpoint(tmp_path / "cls", cls_net, {"network": cls_net.config, "task": "diffusion"})
    net = tiny_unet(cond_dim=D)
    caps = split_captions(NAMES, "train")
    bank = CaptionBank.build([c.text for c in caps], FakeText())
    skipped = init_from_class_model(net, tmp_path / "cls", bank, [c.label for c in caps])
    assert skipped == ["cond_proj.bias", "cond_proj.weight", "null_emb"]
    assert torch.equal(net.conv_in.weight, cls_net.conv_in.weight)
    assert torch.equal(net.null_emb.detach(), cls_net.class_emb.weight[2])
    # the projection is the ridge least-squares map: X^T (X W - Y) + ridge W = 0 (normal equations)
    labels = torch.tensor([c.label for c in caps])
    X = torch.cat([bank.embeddings, torch.ones(len(bank), 1)], 1).double()
    W = torch.cat([net.cond_proj.weight.detach().T, net.cond_proj.bias.detach()[None]]).double()
    Y = cls_net.class_emb.weight[labels].detach().double()
    assert (X.T @ (X @ W - Y) + 1e-2 * W).abs().max() < 1e-3 * (X.T @ Y).abs().max()
    # captions whose embeddings carry their class (as MiniLM's do) land near their class's embedding
    dirs = torch.nn.functional.normalize(torch.randn(2, D, generator=torch.Generator().manual_seed(3)), dim=-1)
    emb = torch.nn.functional.normalize(dirs[labels] + 0.3 * bank.embeddings, dim=-1)
    init_from_class_model(net, tmp_path / "cls", CaptionBank(bank.texts, emb), labels.tolist())
    with torch.no_grad():
        err = (net.cond_proj(emb) - Y.float()).norm(dim=1) / Y.float().norm(dim=1)
    assert float(err.mean()) < 0.2
    other = tiny_unet(cond_dim=D, emb_dim=16)
    with pytest.raises(Exception, match="differs"):
        init_from_class_model(other, tmp_path / "cls")


@pytest.fixture
def fake_minilm(monkeypatch):
    monkeypatch.setattr(text_mod, "_LOADED", {"cpu": FakeText()})


def test_cli_train_text_with_init_then_sample_prompt(tmp_path, fake_minilm):
    npz = write_npz(tmp_path / "d.npz", tiny_data())
    common = ["--data", npz, "--steps", "2", "--batch-size", "16", "--channels", "8,8", "--stem", "1",
              "--T", "100", "--no-progress", "--device", "cpu", "--warmup", "1"]
    rc, _, err = run_cli_inprocess(["train", "--out", tmp_path / "cls", *common])
    assert rc == 0, err
    rc, _, err = run_cli_inprocess(["train", "--cond", "text", "--init", tmp_path / "cls", "--out",
                                    tmp_path / "txt", *common])
    assert rc == 0, err
    assert (tmp_path / "txt" / "captions.safetensors").is_file()
    from condiff.checkpoints import latest_checkpoint, read_config

    config = read_config(latest_checkpoint(tmp_path / "txt"))  # the basic training vocabulary by default
    assert config["text_condition"]["captions"] == config["captions"] == "attributes"
    assert len(CaptionBank.load(tmp_path / "txt" / "captions.safetensors")) == \
        len(split_captions(tiny_data().class_names, "train"))
    rc, out, err = run_cli_inprocess(["sample", "--ckpt", tmp_path / "txt", "--prompt", "a dark dress",
                                      "--prompt", "a wide coat", "--cfg-w", "2", "--steps", "3", "--n", "2",
                                      "--out", tmp_path / "g.png", "--no-progress", "--device", "cpu"])
    assert rc == 0, err
    assert (tmp_path / "g.png").is_file()
    for argv, msg in [(["--ckpt", tmp_path / "cls", "--prompt", "a dress"], "text-conditional"),
                      (["--ckpt", tmp_path / "txt", "--class", "Dress"], "give --prompt"),
                      (["--ckpt", tmp_path / "txt", "--prompt", "a dress", "--class", "Dress"], "--class"),
                      (["--ckpt", tmp_path / "txt", "--prompt", "a dress", "--unconditional"], "--unconditional")]:
        rc, _, err = run_cli_inprocess(["sample", *argv, "--steps", "2", "--n", "1", "--out", tmp_path / "e.png",
                                        "--device", "cpu"])
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = run_cli_inprocess(["train", "--init", tmp_path / "cls", "--out", tmp_path / "bad", *common])
    assert rc == 2 and "--init applies to --cond text" in err
    rc, _, err = run_cli_inprocess(["train", "--captions", "rich", "--out", tmp_path / "bad", *common])
    assert rc == 2 and "--captions applies to --cond text" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_cli_text_model_predicts_what_its_init_predicts(tmp_path, fake_minilm):
    from condiff.checkpoints import latest_checkpoint, read_config
    from condiff.prediction import prediction_of

    npz = write_npz(tmp_path / "d.npz", tiny_data())
    common = ["--data", npz, "--steps", "1", "--batch-size", "16", "--channels", "8,8", "--stem", "1",
              "--T", "100", "--no-progress", "--device", "cpu", "--warmup", "1"]
    rc, _, err = run_cli_inprocess(["train", "--out", tmp_path / "cls", "--prediction", "v", *common])
    assert rc == 0, err
    rc, _, err = run_cli_inprocess(["train", "--cond", "text", "--init", tmp_path / "cls", "--out",
                                    tmp_path / "txt", "--captions", "rich", *common])  # no --prediction: the init's
    assert rc == 0, err
    config = read_config(latest_checkpoint(tmp_path / "txt"))
    assert prediction_of(config) == "v"
    assert config["text_condition"]["captions"] == config["captions"] == "attributes-rich"
    assert len(CaptionBank.load(tmp_path / "txt" / "captions.safetensors")) == \
        len(split_captions(tiny_data().class_names, "train", "rich"))
    rc, _, err = run_cli_inprocess(["train", "--cond", "text", "--init", tmp_path / "cls", "--out",
                                    tmp_path / "eps", "--prediction", "eps", *common])
    assert rc == 2 and "predicts v: train from it with --prediction v" in err, err


def test_text_cfg_sweep_scores_attributes_on_heldout_prompts(tmp_path):
    from condiff.captions import AttributeRule
    from condiff.evaluation import Evaluator, read_samples
    from condiff.nets import JudgeNet
    from condiff.pipeline import generate
    from condiff.sweep import SweepContext, run_sweep, sweep_labels

    torch.manual_seed(0)
    net = tiny_unet(cond_dim=D).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = tiny_data()
    rule = AttributeRule.fit(data.images, data.labels, NAMES)
    ctx = SweepContext(net, S, (1, 8, 8), NAMES, "cpu", {}, rule=rule)
    ctx.cache["minilm"] = FakeText()
    ev = Evaluator(JudgeNet(1, 8, (4, 8, 8), feature_dim=8, num_classes=2), data, data, NAMES)
    out = tmp_path / "sweep"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_sweep(ctx, "text-cfg", [0, 2], 12, out, ev, sampling=Sampling("ddim", 3), batch_size=5, seed=2)
    assert result["settings"]["prompts"] == "heldout"
    rows = ctx.prompts
    labels = sweep_labels(12, [0, 1])
    assert [p.label for p in rows] == labels.tolist()
    from condiff.captions import heldout_prompts, split_captions

    held = {p.text for p in heldout_prompts(NAMES)}
    train_texts = {c.text for c in split_captions(NAMES, "train")}
    assert all(p.text in held and p.text not in train_texts for p in rows)
    assert len({p.text for p in rows if p.label == 0}) == 6  # 12 rows, 6 per class, each a different prompt
    # w = 0 is the conditional model on each row's prompt embedding, with the sweep's noise
    emb = FakeText().encode([p.text for p in rows])
    x = generate(net, S, 12, shape=(1, 8, 8), cond=emb, sampler="ddim", steps=3, seed=2, batch_size=5)
    x0 = read_samples(out / "samples-scale-0.npz")[0]
    assert torch.allclose(x0, x.clamp(-1, 1), atol=1 / 127.5 + 1e-6)
    # each attribute column is the rule's accuracy on the stored samples against the prompts' targets
    targets = torch.tensor([p.attrs for p in rows])
    for r, tag in zip(result["rows"], ("0", "2")):
        xs = read_samples(out / f"samples-scale-{tag}.npz")[0]
        want = rule.accuracy(xs, labels, targets)
        for a in ("brightness", "texture", "shape"):
            assert r[f"attr_{a}"] == pytest.approx(want[a])
        assert r["attr_shape"] is not None and 0 <= r["attr_brightness"] <= 1
    md = (out / "results.md").read_text()
    assert "| judge acc | brightness | texture | shape |" in md and "Prompts: `heldout`" in md
    header = next(line for line in md.splitlines() if line.startswith("| scale | judge acc"))
    row0 = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert header.count("|") == row0.count("|")
    assert "attr_texture" in (out / "results.csv").read_text().splitlines()[0]
    # a class model is refused
    ctx2 = SweepContext(tiny_unet(num_classes=2), S, (1, 8, 8), NAMES, "cpu", {}, rule=rule)
    with pytest.raises(Exception, match="text-conditional"):
        run_sweep(ctx2, "text-cfg", [0], 12, tmp_path / "bad", ev, sampling=Sampling("ddim", 3))


def test_text_similarity_sweep_runs_on_the_same_prompts(tmp_path, fake_minilm):
    """--method text (the SDG route) on --prompts heldout: each row's own prompt as its target, attribute columns."""
    from condiff.captions import AttributeRule
    from condiff.evaluation import Evaluator
    from condiff.nets import JudgeNet
    from condiff.similarity import train_text_encoder
    from condiff.similarity.terms import load_encoder, text_target
    from condiff.sweep import METHODS, SweepContext, get_method, run_sweep

    data = tiny_data()
    cfg = TrainConfig(steps=2, batch_size=16, lr=1e-3, warmup=1, ckpt_every=2, log_every=2)
    enc_ckpt = train_text_encoder(data, tmp_path / "enc", S, FakeText(), arch=dict(channels=[8], blocks=1, stem=1),
                                  dim=8, cfg=cfg, progress=False)
    rule = AttributeRule.fit(data.images, data.labels, NAMES)
    net = tiny_unet()  # unconditional
    ctx = SweepContext(net, S, (1, 8, 8), NAMES, "cpu", {"text_encoder": str(enc_ckpt), "prompts": "heldout",
                                                         "text_prior": "0"}, rule=rule)
    ev = Evaluator(JudgeNet(1, 8, (4, 8, 8), feature_dim=8, num_classes=2), data, data, NAMES)
    seen = []
    builder = get_method("text")

    def spy(ctx, scale, labels):
        guidance, cond = builder(ctx, scale, labels)
        seen.append(cond["text"])
        return guidance, cond

    spy.option_keys = builder.option_keys
    METHODS["text"] = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_sweep(ctx, "text", [1.0], 12, tmp_path / "sweep", ev, sampling=Sampling("ddim", 2))
    finally:
        del METHODS["text"]
    assert "attr_brightness" in result["rows"][0] and result["settings"]["prompts"] == "heldout"
    enc, _ = load_encoder(enc_ckpt, "text")
    want = text_target(enc, FakeText().encode([p.text for p in ctx.prompts]), 0.0)
    assert torch.allclose(seen[-1], want)  # every row steered to its own held-out prompt


@pytest.mark.parametrize("captions", ["attributes", "attributes-rich"])
def test_text_encoder_aligned_with_attribute_captions(tmp_path, captions):
    """train-encoder --kind text --captions attributes: the bank holds captions of (class, attributes)
    combinations, each image's target is its own combination, and a prompt maps onto combinations;
    attributes-rich adds the rich vocabulary's captions of each combination to the bank."""
    from condiff.captions import attribute_combos, combo_captions
    from condiff.similarity import train_text_encoder
    from condiff.similarity.captions import caption_prior, centre, class_centroids
    from condiff.similarity.tasks import attribute_dataset
    from condiff.similarity.terms import load_encoder, text_target

    data = tiny_data()
    coded, rule = attribute_dataset(data)
    combos = attribute_combos(NAMES)
    assert len(combos) == 16 and all(combos[int(c)][0] == int(k) for c, k in zip(coded.labels, data.labels))
    got = rule.attributes(data.images, data.labels)
    assert all(list(combos[int(c)][1]) == row for c, row in zip(coded.labels, got.tolist()))
    cfg = TrainConfig(steps=2, batch_size=16, lr=1e-3, warmup=1, ckpt_every=2, log_every=2)
    final = train_text_encoder(data, tmp_path / "enc", S, FakeText(), arch=dict(channels=[8], blocks=1, stem=1),
                               dim=8, cfg=cfg, progress=False, captions=captions)
    enc, config = load_encoder(final, "text")
    texts, labels = combo_captions(NAMES, "train", "rich" if captions == "attributes-rich" else "basic")
    basic = combo_captions(NAMES)
    assert texts[:len(basic[0])] == basic[0] and len(texts) == len(basic[0]) + (16 * 24 if "rich" in captions else 0)
    assert config["caption_set"] == captions and enc.captions == len(texts)
    assert enc.caption_labels.tolist() == labels
    assert torch.allclose(enc.caption_bank, FakeText().encode(texts), atol=1e-6)
    # a prompt equal to a bank caption maps (at a low prior temperature) onto its own combination's direction
    i = 37
    target = text_target(enc, FakeText().encode([texts[i]]), 0.01)
    cents = class_centroids(centre(enc.caption_bank, enc.caption_bank.mean(0)), enc.caption_labels, 16)
    assert torch.allclose(target[0], cents[labels[i]], atol=1e-3)
    assert torch.allclose(target, caption_prior(FakeText().encode([texts[i]]), enc.caption_bank,
                                                enc.caption_labels, 0.01))


def test_unknown_classes_are_one_line_errors(tmp_path, fake_minilm):
    from condiff.captions import combo_captions, heldout_prompts, split_captions
    from condiff.errors import CondiffError

    for fn in (split_captions, heldout_prompts, combo_captions):
        with pytest.raises(CondiffError, match="no caption nouns for class 'left'"):
            fn(["left", "top"])
    data = ImageDataset(tiny_data().images, tiny_data().labels, ["left", "top"])
    npz = write_npz(tmp_path / "d.npz", data)
    rc, _, err = run_cli_inprocess(["train", "--cond", "text", "--data", npz, "--out", tmp_path / "r", "--steps", "1",
                                    "--batch-size", "8", "--channels", "8", "--stem", "1", "--device", "cpu"])
    assert rc == 2 and "no caption nouns" in err and len(err.strip().splitlines()) == 1, err


def test_demo_adds_text_to_image_sections(tmp_path, fake_minilm):
    """condiff.demo with a text-conditional model: one grid per w, one row per prompt, its sample command."""
    from condiff.demo import DemoConfig, run_demo

    npz = write_npz(tmp_path / "d.npz", tiny_data())
    common = ["--data", npz, "--steps", "2", "--batch-size", "16", "--channels", "8,8", "--stem", "1",
              "--no-progress", "--device", "cpu", "--warmup", "1"]
    for out, extra in (("cls", ["--T", "100"]), ("txt", ["--T", "100", "--cond", "text"]),
                       ("txt50", ["--T", "50", "--cond", "text"])):
        rc, _, err = run_cli_inprocess(["train", "--out", tmp_path / out, *common, *extra])
        assert rc == 0, err
    prompts = ("a dark dress", "a wide coat", "a light plain dress")
    cfg = DemoConfig(diffusion=tmp_path / "cls", text_diffusion=tmp_path / "txt", text_cfg_prompts=prompts,
                     text_cfg_ws=(0.0, 3.0), per_class=2, steps=2, cfg_ws=(1.0,), classes=(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_demo(cfg, tmp_path / "demo", progress=False)
    report = (tmp_path / "demo" / "report.md").read_text()
    from PIL import Image

    for w in ("0", "3"):
        grid = Image.open(tmp_path / "demo" / f"text-cfg-w{w}.png")
        assert grid.size[1] > grid.size[0]  # 3 prompt rows of 2 samples: taller than wide
        assert f"--ckpt {tmp_path / 'txt'} --prompt 'a dark dress' --prompt 'a wide coat' " \
               f"--prompt 'a light plain dress' --cfg-w {w} --n 2" in report
    for bad, msg in ((tmp_path / "cls", "not a text-conditional"), (tmp_path / "txt50", "schedule differs")):
        with pytest.raises(Exception, match=msg):
            run_demo(DemoConfig(diffusion=tmp_path / "cls", text_diffusion=bad, per_class=1, steps=2),
                     tmp_path / "demo2", progress=False)
        assert not (tmp_path / "demo2").exists()  # checked before anything is written
