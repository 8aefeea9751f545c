"""Similarity guidance (issue 5, article eqs 11-15): image, text and style terms, their encoders,
the pretrained text encoder, and the CLI.

Ground truth for the guided samplers is the exact eps of a two-component Gaussian mixture in
R^64 whose means are the two 8x8 shapes of ``helpers.shapes_dataset`` (left bar, top block),
so only the encoders are learned; they are trained for a few seconds on shapes_dataset.
Effects are compared against unguided sampling from the same x_T (deterministic DDIM).
"""

import socket
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from condiff import cli
from condiff.checkpoints import load_checkpoint, save_checkpoint
from condiff.data import load_dataset
from condiff.errors import CondiffError
from condiff.guidance import MeanShift, ScoreGuided, SimilarityTerm
from condiff.images import save_grid
from condiff.nets import EncoderNet, SimilarityEncoder, UNet
from condiff.samplers import noise, sample_ddim, sample_ddpm
from condiff.schedule import cosine_schedule
from condiff.similarity import (ImageSimilarity, StyleSimilarity, TextSimilarity, gram_distance, load_encoder,
                                train_image_encoder, train_text_encoder)
from condiff.similarity import text as text_mod
from condiff.similarity.terms import DEFAULT_IMAGE_PRIOR, DEFAULT_TEXT_PRIOR, prototype_prior, text_target
from condiff.similarity.captions import (FRESH_PROMPTS, HELD_OUT_PROMPTS, SYNONYMS, caption_prior, centre, class_centroids,
                                        training_captions)
from condiff.similarity.tasks import TextAlignTask, caption_bank, random_shift
from condiff.toy import GaussianMixture
from condiff.training import TrainConfig
from helpers import one_thread, shapes_dataset, write_npz  # noqa: F401  (one_thread: autouse, one intra-op thread)

S = cosine_schedule(100)
NAMES = ["Trouser", "Bag"]  # shapes_dataset's classes: a bright left bar, a bright top block
ARCH = dict(channels=(8, 16), blocks=1, stem=2)
CFG = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=5, log_every=20, ckpt_every=40, ema_decay=0.9)
N = 48  # samples per comparison


@pytest.fixture(scope="module")
def data():
    d = shapes_dataset(512)
    d.class_names = list(NAMES)
    return d


@pytest.fixture(scope="module")
def gm(data):
    """Exact model of the shapes: means = class means of the data, isotropic std 0.05."""
    means = torch.stack([data.images[data.labels == k].mean(0).flatten() for k in range(2)])
    return GaussianMixture(means, schedule=S, scale=0.05**2)


@pytest.fixture(scope="module")
def model(gm):
    return lambda x, t, cond=None: gm.eps(x.flatten(1), t).view_as(x)


@pytest.fixture(scope="module")
def image_encoder(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc-image")
    final = train_image_encoder(data, out, S, arch=ARCH, dim=16, clean_cfg=CFG, cfg=CFG, progress=False)
    enc, _ = load_encoder(final, "image")
    return enc, out, final


@pytest.fixture(scope="module")
def text_encoder():
    """all-MiniLM-L6-v2 loaded with HF_HUB_OFFLINE=1 while every network connection is refused."""
    def refuse(*a, **k):
        raise OSError("network access attempted during offline text-encoder load")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        text_mod._LOADED.clear()
        te = text_mod.load_text_encoder("cpu")
        first = te.encode(["a pair of trousers", "long pants", "a leather handbag", "a pair of trousers"])
    return te, first


@pytest.fixture(scope="module")
def text_image_encoder(data, text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc-text")
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 60})
    # align 1: in 60 steps at lr 3e-3 the default weight 10 leaves the contrastive term undertrained
    final = train_text_encoder(data, out, S, text_encoder[0], arch=ARCH, dim=16, cfg=cfg, align=1.0,
                               progress=False)
    enc, _ = load_encoder(final, "text")
    return enc, out, final


def x_T(seed=1, n=N):
    return noise((n, 1, 8, 8), torch.Generator().manual_seed(seed))


def ddim(model, terms=(), steps=20):
    return sample_ddim(ScoreGuided(model, S, list(terms)) if terms else model, x_T(), S, steps)


def share_of(gm, x, k):
    return float((gm.component_of(x.flatten(1)) == k).double().mean())


def reference(data, k, i=0):
    return data.images[(data.labels == k).nonzero()[i, 0]]


T0 = torch.zeros(1, dtype=torch.long)


# ----------------------------------------------------------------------------- gradients
def test_gradients_reach_x_only_and_leave_encoders_unchanged(image_encoder, data):
    enc = image_encoder[0]
    for p in enc.parameters():  # as a user's freshly built encoder would be
        p.requires_grad_(True)
    text_enc = SimilarityEncoder(in_channels=1, image_size=8, channels=(8, 16), dim=16, clean=False, text_dim=384)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    before_t = {k: v.clone() for k, v in text_enc.state_dict().items()}
    terms = [ImageSimilarity.from_encoder(enc, reference(data, 1), 2.0),
             StyleSimilarity.from_encoder(enc, reference(data, 0), 50.0, S),
             TextSimilarity(lambda x, t: text_enc(x, t, "text"), F.normalize(torch.randn(384), dim=0), 3.0)]
    x, t = x_T(2, 6), torch.full((6,), 40)
    with torch.no_grad():  # as inside a sampler
        grads = [term.grad(x, t) for term in terms]
    for g in grads:
        assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
        assert not g.requires_grad
    for net, ref in ((enc, before), (text_enc, before_t)):
        assert all(p.grad is None for p in net.parameters())
        assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())


def test_image_similarity_is_the_cosine_of_eq_15_and_its_gradient(image_encoder, data):
    enc = image_encoder[0]
    ref = reference(data, 1)
    term = ImageSimilarity.from_encoder(enc, ref, 1.0, prior=0.0)  # eq 15 as written: E2(y) itself
    x, t = x_T(3, 4), torch.full((4,), 30)
    with torch.no_grad():
        want = F.cosine_similarity(enc.e1(x, t), enc.e2(ref[None]), dim=-1)
    assert torch.allclose(term.objective(x, t), want, atol=1e-6)
    assert float(want.abs().max()) <= 1 + 1e-6
    # the directional derivative of the cosine matches the gradient (central difference in float32)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    h = 1e-2
    with torch.no_grad():
        fd = (term.objective(x + h * v, t) - term.objective(x - h * v, t)) / (2 * h)
    assert torch.allclose((term.grad(x, t) * v).flatten(1).sum(1), fd, rtol=2e-2, atol=2e-4)


def test_scale_zero_equals_unguided_sampling_exactly(image_encoder, data, model):
    enc = image_encoder[0]
    zero = [ImageSimilarity.from_encoder(enc, reference(data, 1), 0.0),
            StyleSimilarity.from_encoder(enc, reference(data, 0), 0.0, S),
            SimilarityTerm(lambda x, t, cond: x.flatten(1).sum(1), 0.0)]
    assert torch.equal(ddim(model, zero), ddim(model))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = sample_ddpm(model, x_T(), S, 20, generator=g1, mean_shift=MeanShift(zero))
    b = sample_ddpm(model, x_T(), S, 20, generator=g2)
    assert torch.equal(a, b)


def test_composition_of_two_terms_is_the_sum_of_their_gradients(image_encoder, data, model):
    enc = image_encoder[0]
    img = ImageSimilarity.from_encoder(enc, reference(data, 1), 3.0)
    sty = StyleSimilarity.from_encoder(enc, reference(data, 0), 40.0, S)
    x, t = x_T(4, 5), torch.full((5,), 55)
    g_img, g_sty = img.grad(x, t), sty.grad(x, t)
    # gamma is linear: scale 3 is three times scale 1 (eq 8/14)
    assert torch.allclose(g_img, 3 * ImageSimilarity.from_encoder(enc, reference(data, 1), 1.0).grad(x, t),
                          rtol=1e-5, atol=1e-7)
    mu = torch.randn_like(x)
    assert torch.allclose(MeanShift([img, sty])(x, t, mu), g_img + g_sty, rtol=1e-5, atol=1e-7)
    _, bbar = S.gather(t, x)
    guided = ScoreGuided(model, S, [img, sty])(x, t)
    assert torch.allclose(guided, model(x, t) - bbar * (g_img + g_sty), rtol=1e-5, atol=1e-6)


def test_prototype_prior_pulls_the_reference_toward_the_classes_E2_ranks_nearest():
    protos = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]])  # any norm: the prior uses their directions
    e = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8]]) * 5  # any norm for E2(y) too
    unit = F.normalize(e, dim=-1)
    assert torch.allclose(prototype_prior(e, protos, 0.0), unit)
    w = torch.softmax(unit @ torch.eye(3) / 0.1, dim=-1)  # E2's class posterior at its training temperature
    want = F.normalize(unit + 2.0 * w @ torch.eye(3), dim=-1)
    assert torch.allclose(prototype_prior(e, protos, 2.0), want, atol=1e-6)
    # a larger weight turns the target toward the most likely class: e[0] is closest to prototype 0, e[1] to 2
    for k, row in ((0, 0), (2, 1)):
        cos = [float(prototype_prior(e, protos, wt)[row, k]) for wt in (0.0, 1.0, 100.0)]
        assert cos[0] < cos[1] < cos[2] and cos[2] > 0.99
    with pytest.raises(CondiffError, match="weight must be >= 0"):
        prototype_prior(e, protos, -1.0)


def test_image_prior_defaults_on_for_encoders_with_prototypes(image_encoder, data):
    enc = image_encoder[0]
    ref = reference(data, 1)
    with torch.no_grad():
        e2 = enc.e2(ref[None])
    assert enc.prototypes is not None
    assert torch.allclose(ImageSimilarity.from_encoder(enc, ref).target,
                          prototype_prior(e2, enc.prototypes.detach(), DEFAULT_IMAGE_PRIOR), atol=1e-6)
    assert torch.allclose(ImageSimilarity.from_encoder(enc, ref, prior=0.0).target, e2)
    # E2 classifies the reference: the prior raises the cosine of the target with the reference's prototype
    p1 = F.normalize(enc.prototypes[1].detach(), dim=0)
    cos = [float(F.normalize(ImageSimilarity.from_encoder(enc, ref, prior=w).target, dim=-1)[0] @ p1)
           for w in (0.0, 1.0)]
    assert cos[0] < cos[1]
    # without prototypes the default is E2(y) itself, and asking for the prior is an error
    bare = SimilarityEncoder(in_channels=1, image_size=8, channels=(8, 16), dim=16, clean=True, num_classes=0)
    with torch.no_grad():
        assert torch.allclose(ImageSimilarity.from_encoder(bare, ref).target, bare.e2(ref[None]))
    with pytest.raises(CondiffError, match="no class prototypes"):
        ImageSimilarity.from_encoder(bare, ref, prior=1.0)


def test_user_defined_similarity_is_a_guidance_term(model, gm, data):
    target = reference(data, 0)
    sim = lambda x, t, cond: -(x - target).pow(2).flatten(1).sum(1)  # noqa: E731
    term = SimilarityTerm(sim, scale=0.5)
    x, t = x_T(6, 4), torch.full((4,), 10)
    assert torch.allclose(term.grad(x, t), -2 * 0.5 * (x - target), atol=1e-6)  # analytic gradient
    guided, plain = ddim(model, [SimilarityTerm(sim, 2.0)]), ddim(model)
    dist = lambda z: (z - target).pow(2).flatten(1).sum(1).mean()  # noqa: E731
    assert dist(guided) < 0.5 * dist(plain)
    assert share_of(gm, guided, 0) > 0.9 > share_of(gm, plain, 0)


def test_a_sim_with_the_wrong_shape_is_a_one_line_error():
    with pytest.raises(CondiffError, match=r"shape \(4,\)"):
        SimilarityTerm(lambda x, t, cond: x.sum(), 1.0).grad(x_T(0, 4), torch.full((4,), 3))


# ----------------------------------------------------------------------------- effects on samples
@pytest.mark.parametrize("prior", [0.0, None])  # eq 15 as written, and the default prototype prior
def test_image_guidance_brings_samples_closer_to_the_reference_in_E2_space(image_encoder, data, model, gm, prior):
    enc = image_encoder[0]
    for k in (0, 1):
        ref = reference(data, k)
        with torch.no_grad():
            e_ref = enc(ref[None], None, "e2")
            closeness = lambda x: F.cosine_similarity(enc(x, None, "e2"), e_ref, dim=-1).mean()  # noqa: E731
        plain, guided = ddim(model), ddim(model, [ImageSimilarity.from_encoder(enc, ref, 3.0, prior=prior)])
        assert closeness(guided) > closeness(plain) + 0.2
        assert share_of(gm, guided, k) >= 0.95 and 0.2 < share_of(gm, plain, k) < 0.8


def test_style_guidance_lowers_the_gram_distance(image_encoder, data, model):
    enc = image_encoder[0]
    style = reference(data, 1, 3)
    with torch.no_grad():
        target = enc.features(style[None], T0)
        gram_to_style = lambda x: gram_distance(enc.features(x, T0.expand(len(x))), target).mean()  # noqa: E731
    plain = ddim(model)
    guided = ddim(model, [StyleSimilarity.from_encoder(enc, style, 1.0, S)])
    assert gram_to_style(guided) < 0.5 * gram_to_style(plain)
    # the clean-target variant (no schedule) lowers it too
    assert gram_to_style(ddim(model, [StyleSimilarity.from_encoder(enc, style, 1.0)])) < 0.5 * gram_to_style(plain)


def test_text_guidance_raises_text_image_cosine(text_image_encoder, text_encoder, model, gm):
    enc = text_image_encoder[0]
    te = text_encoder[0]
    for prompt, k in (("long pants with two legs", 0), ("something to carry your belongings in", 1)):
        assert prompt not in training_captions(NAMES)[0]
        term = TextSimilarity.from_prompt(enc, prompt, 5.0, te)
        with torch.no_grad():
            cos = lambda x: term.similarity(x, T0.expand(len(x))).mean()  # noqa: E731
        plain, guided = ddim(model), ddim(model, [term])
        assert cos(guided) > cos(plain) + 0.05
        assert share_of(gm, guided, k) >= 0.9


# ----------------------------------------------------------------------------- encoders and training
def test_image_encoder_training_keeps_E2_frozen_and_starts_E1_from_it(image_encoder):
    enc, out, final = image_encoder
    clean = load_checkpoint(sorted((out / "clean" / "checkpoints").iterdir())[-1])["weights"]
    trained = load_checkpoint(final)
    assert trained["config"]["task"] == "encoder" and trained["config"]["schedule"]["T"] == 100
    for k, v in clean.items():
        if k.startswith("e2.") or k == "prototypes":
            assert torch.equal(trained["weights"][k], v), k  # E2 frozen while E1 trains
    changed = [k for k in clean if k.startswith("e1.") and k.replace("e1.", "e2.", 1) in clean and not
               torch.equal(trained["weights"][k], clean[k.replace("e1.", "e2.", 1)])]
    assert changed  # E1 moved away from its E2 initialisation


def test_text_align_logits_are_log_mean_exp_over_each_class_captions():
    bank = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 2])
    task = TextAlignTask(S, bank, labels, tau=0.5)
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    s = F.normalize(z, dim=-1) @ bank.T / 0.5
    want = torch.stack([torch.logsumexp(s[:, labels == k], 1) - np.log(int((labels == k).sum())) for k in range(3)], 1)
    assert torch.allclose(task.class_logits(z), want, atol=1e-6)
    with pytest.raises(CondiffError, match="caption"):
        TextAlignTask(S, bank, torch.tensor([0, 2, 0, 2, 2]))
    # the alignment term adds align * mean(1 - cos(z, c_y)), c_y the class's mean caption direction
    x0, y, g = torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 2]), lambda: torch.Generator().manual_seed(0)
    stub = lambda xt, t, branch: z  # noqa: E731
    plain = TextAlignTask(S, bank, labels, tau=0.5, align=0.0).loss(stub, x0, y, g())[0]
    aligned = TextAlignTask(S, bank, labels, tau=0.5, align=2.0).loss(stub, x0, y, g())[0]
    c = F.normalize(torch.stack([bank[labels == k].mean(0) for k in range(3)]), dim=-1)
    assert torch.allclose(aligned - plain, 2 * (1 - F.cosine_similarity(z, c[y], dim=-1)).mean(), atol=1e-6)
    on_centroids = lambda xt, t, branch: 3 * c[y]  # noqa: E731
    assert torch.allclose(TextAlignTask(S, bank, labels, tau=0.5, align=2.0).loss(on_centroids, x0, y, g())[0],
                          TextAlignTask(S, bank, labels, tau=0.5, align=0.0).loss(on_centroids, x0, y, g())[0])


def test_caption_prior_is_the_class_direction_mixture_the_text_encoder_ranks_nearest():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    shared, classes = torch.tensor([3.0, 0, 0, 0, 0, 0]), torch.eye(6)[1:4]  # one common part, one part per class
    bank = F.normalize(shared + classes[labels] + 0.3 * torch.randn(9, 6, generator=g), dim=-1)
    cents = class_centroids(centre(bank, bank.mean(0)), labels, 3)
    assert torch.allclose(cents.norm(dim=-1), torch.ones(3))
    # centring removes the shared component: the class directions spread apart
    raw = class_centroids(bank, labels, 3)
    off = ~torch.eye(3, dtype=torch.bool)
    assert (cents @ cents.T)[off].max() < 0.1 < 0.8 < (raw @ raw.T)[off].min()
    # a caption of class 1 as the prompt: a cold prior is class 1's direction, a hot one the even blend
    prompt = bank[4:5]
    assert torch.allclose(caption_prior(prompt, bank, labels, 1e-3), cents[1:2], atol=1e-5)
    w = torch.softmax(TextAlignTask(S, bank, labels, tau=0.07).class_logits(prompt) / 0.5, dim=-1)
    assert torch.allclose(caption_prior(prompt, bank, labels, 0.5), F.normalize(w @ cents, dim=-1), atol=1e-6)
    assert torch.allclose(caption_prior(prompt, bank, labels, 1e6), F.normalize(cents.sum(0, keepdim=True), dim=-1),
                          atol=1e-4)
    with pytest.raises(ValueError):
        caption_prior(prompt, bank, labels, 0.0)


def test_text_encoder_stores_its_caption_bank_and_maps_prompts_onto_it(text_image_encoder, text_encoder, data):
    enc, out, final = text_image_encoder
    te = text_encoder[0]
    texts, labels = training_captions(NAMES)
    assert enc.captions == len(texts) and enc.caption_labels.tolist() == labels
    assert torch.allclose(enc.caption_bank, te.encode(texts), atol=1e-5)  # saved with the weights, reloaded
    p = te.encode("long pants with two legs")
    assert torch.allclose(text_target(enc, p, 0.0), centre(p, enc.caption_bank.mean(0)))
    assert torch.allclose(text_target(enc, p), caption_prior(p, enc.caption_bank, enc.caption_labels,
                                                             DEFAULT_TEXT_PRIOR))
    assert torch.allclose(TextSimilarity.from_prompt(enc, "long pants with two legs", 1.0, te).target,
                          text_target(enc, p))
    # the prior points the prompt at the Trouser class direction (class 0 of NAMES)
    cents = class_centroids(centre(enc.caption_bank, enc.text_mean), enc.caption_labels, 2)
    assert int((text_target(enc, p, 0.01) @ cents.T).argmax()) == 0
    # an encoder without a bank (an earlier condiff's) keeps the plain embedding; asking for the prior is an error
    old = SimilarityEncoder(in_channels=1, image_size=8, channels=(8, 16), dim=16, clean=False, text_dim=384)
    assert "captions" not in old.config and old.text_mean is None
    assert torch.allclose(text_target(old, p), p)
    with pytest.raises(CondiffError, match="no caption bank"):
        text_target(old, p, 0.25)
    with pytest.raises(CondiffError, match="caption bank of shape"):
        enc.set_captions(enc.caption_bank[:3], enc.caption_labels[:3])


def test_random_shift_translates_with_replicated_edges():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(3, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_shift(x, 0, g), x)
    y = random_shift(x, 1, g)
    assert y.shape == x.shape
    for i in range(3):  # each output is a window of the edge-replicated input
        padded = F.pad(x[i:i + 1], (1, 1, 1, 1), mode="replicate")[0, 0]
        assert any(torch.equal(y[i, 0], padded[a:a + 4, b:b + 4]) for a in range(3) for b in range(3))


def test_text_encoder_is_offline_deterministic_normalised_384d(text_encoder):
    te, first = text_encoder
    assert first.shape == (4, 384) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(first[0], first[3])
    te._memo.clear()  # recompute from scratch
    again = te.encode(["a pair of trousers", "long pants", "a leather handbag"])
    assert torch.allclose(again, first[:3], atol=1e-6)
    cos = first @ first.T
    assert cos[0, 1] > cos[0, 2] + 0.1  # a paraphrase is closer than an unrelated prompt
    feet = te.encode(["something to wear on your feet", "a sneaker", "an ankle boot", "a handbag", "a dress"])
    assert (feet[0] @ feet[1:3].T).min() > (feet[0] @ feet[3:].T).max()


def test_caption_bank_is_cached_per_run(text_encoder, tmp_path):
    te = text_encoder[0]
    texts, emb, lab = caption_bank(NAMES, te, tmp_path / "captions.safetensors")
    assert emb.shape == (len(texts), 384) and lab.tolist() == training_captions(NAMES)[1]
    calls = []

    class Counting:
        name, dim = te.name, te.dim

        def encode(self, t):
            calls.append(len(t))
            return te.encode(t)

    _, emb2, _ = caption_bank(NAMES, Counting(), tmp_path / "captions.safetensors")
    assert calls == [] and torch.equal(emb, emb2)
    caption_bank(NAMES + ["Sneaker"], Counting(), tmp_path / "captions.safetensors")  # other captions: recomputed
    assert calls


def test_held_out_prompts_are_not_training_captions():
    train = set(training_captions(list(SYNONYMS))[0])
    for prompts in (HELD_OUT_PROMPTS, FRESH_PROMPTS):
        assert len(prompts) >= 10
        assert all(p not in train for p, _ in prompts)
        assert all(set(classes) <= set(SYNONYMS) for _, classes in prompts)
    assert not {p for p, _ in HELD_OUT_PROMPTS} & {p for p, _ in FRESH_PROMPTS}


def test_missing_text_extra_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    with pytest.raises(CondiffError) as e:
        text_mod.TextEncoder("cpu")
    msg = str(e.value)
    assert "pip install 'condiff[text]'" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- CLI
def run_main(capsys, *args):
    """``condiff ARGS`` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code, err, *needles):
    """Exit code 2 and exactly one error line (progress notes before it allowed), no traceback."""
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


TINY = ["--channels", "8,16", "--blocks", "1", "--T", "100", "--image-size", "8", "--no-progress", "--device",
        "cpu", "--batch-size", "32", "--log-every", "10", "--dim", "16"]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, data, image_encoder, text_image_encoder):
    """A tiny unconditional and a tiny class-conditional eps-model, a classifier, data and images."""
    root = tmp_path_factory.mktemp("sim-cli")
    npz = write_npz(root / "shapes.npz", data)
    meta = {"schedule": S.config(), "class_names": NAMES, "image_shape": [1, 8, 8], "task": "diffusion"}
    for name, kw in (("uncond", {}), ("cond", {"num_classes": 2})):
        torch.manual_seed(0)
        net = UNet(image_size=8, channels=(8, 16), blocks=1, **kw)
        save_checkpoint(root / name, net, dict(meta, network=net.config))
    clf = EncoderNet(image_size=8, channels=(8, 16), out_dim=2)
    save_checkpoint(root / "clf", clf, dict(meta, network=clf.config, task="classifier"))
    save_grid(reference(data, 1)[None], root / "ref.png", upscale=5)  # 40x40 with a border: resized on load
    save_grid(reference(data, 0)[None], root / "style.png", upscale=1)
    return {"ROOT": root, "NPZ": npz, "UNCOND": root / "uncond", "COND": root / "cond", "CLF": root / "clf",
            "REF": root / "ref.png", "STYLE": root / "style.png", "IMG": image_encoder[2],
            "TXT": text_image_encoder[2]}


def test_cli_train_encoder_image_writes_a_loadable_encoder(capsys, cli_files, tmp_path):
    code, out, err = run_main(capsys, "train-encoder", "--kind", "image", "--data", cli_files["NPZ"], "--out",
                              tmp_path / "enc", "--steps", "20", "--clean-steps", "20", *TINY)
    assert code == 0, err
    assert "nearest-prototype accuracy by t-range" in out and (tmp_path / "enc" / "clean" / "checkpoints").is_dir()
    enc, config = load_encoder(tmp_path / "enc", "image")
    assert config["task"] == "encoder" and enc.e2 is not None and config["class_names"] == NAMES


def test_cli_train_encoder_text_aligns_with_captions(capsys, cli_files, tmp_path, text_encoder):
    code, out, err = run_main(capsys, "train-encoder", "--kind", "text", "--data", cli_files["NPZ"], "--out",
                              tmp_path / "enc", "--steps", "20", "--init", cli_files["IMG"], *TINY)
    assert code == 0, err
    assert "caption-retrieval accuracy by t-range" in out
    assert (tmp_path / "enc" / "captions.safetensors").is_file()
    enc, config = load_encoder(tmp_path / "enc", "text")
    assert config["text_model"] == text_mod.TEXT_MODEL and enc.text_dim == 384


@pytest.mark.parametrize("extra", [
    ["--ckpt", "UNCOND", "--image", "REF", "--image-encoder", "IMG", "--image-scale", "3"],
    ["--ckpt", "UNCOND", "--image", "REF", "--image-encoder", "IMG", "--image-prior", "0"],
    ["--ckpt", "UNCOND", "--image-index", "5", "--ref-data", "NPZ", "--image-encoder", "IMG", "--style", "STYLE",
     "--style-scale", "1"],
    ["--ckpt", "UNCOND", "--text", "long pants", "--text-encoder", "TXT", "--style", "STYLE",
     "--style-encoder", "IMG", "--sampler", "ddpm", "--form", "mean", "--steps", "10"],
    ["--ckpt", "COND", "--class", "bag", "--cfg-w", "2", "--text", "a handbag", "--text-encoder", "TXT"],
    ["--ckpt", "COND", "--unconditional", "--class", "trouser", "--classifier", "CLF", "--style", "STYLE",
     "--image-encoder", "IMG", "--image", "REF"],
])
def test_cli_sample_with_similarity_guidance(capsys, cli_files, tmp_path, extra):
    args = [str(cli_files.get(a, a)) for a in extra]
    code, out, err = run_main(capsys, "sample", *args, "--n", "3", "--steps", "10", "--out", tmp_path / "g.png",
                              "--npz", tmp_path / "s.npz", "--no-progress", "--device", "cpu")
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 8, 8, 1)


def test_cli_scale_zero_equals_unguided(capsys, cli_files, tmp_path):
    base = ["sample", "--ckpt", cli_files["UNCOND"], "--n", "4", "--steps", "10", "--no-progress", "--device", "cpu"]
    assert run_main(capsys, *base, "--out", tmp_path / "a.png", "--npz", tmp_path / "a.npz")[0] == 0
    assert run_main(capsys, *base, "--out", tmp_path / "b.png", "--npz", tmp_path / "b.npz", "--image",
                    cli_files["REF"], "--image-encoder", cli_files["IMG"], "--image-scale", "0")[0] == 0
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])


@pytest.mark.parametrize("args, needle", [
    (["--image-scale", "2"], "--image-scale needs --image"),
    (["--text-scale", "2"], "--text-scale needs --text"),
    (["--image", "REF", "--image-index", "1", "--image-encoder", "IMG"], "not both"),
    (["--image", "REF"], "--image-encoder"),
    (["--text", "a bag"], "--text-encoder"),
    (["--style", "STYLE"], "--style needs"),
    (["--image-index", "99999", "--ref-data", "NPZ", "--image-encoder", "IMG"], "out of range"),
    (["--ref-data", "NPZ"], "--ref-data applies to --image-index"),
    (["--image", "MISSING", "--image-encoder", "IMG"], "image not found"),
    (["--image", "REF", "--image-encoder", "TXT"], "not an image encoder"),
    (["--text", "a bag", "--text-encoder", "IMG"], "not a text encoder"),
    (["--image", "REF", "--image-encoder", "CLF"], "not an image encoder"),
    (["--image", "REF", "--image-encoder", "IMG", "--image-scale", "-1"], "expected a finite number"),
    (["--text", "  ", "--text-encoder", "TXT"], "non-empty"),
    (["--text-prior", "0.5"], "--text-prior needs --text"),
    (["--text", "a bag", "--text-encoder", "TXT", "--text-prior", "-1"], "expected a finite number"),
    (["--image-prior", "1"], "--image-prior needs --image or --image-index"),
    (["--image", "REF", "--image-encoder", "IMG", "--image-prior", "-1"], "expected a finite number"),
])
def test_cli_similarity_bad_input_is_one_line(capsys, cli_files, tmp_path, args, needle):
    subs = dict(cli_files, MISSING=tmp_path / "nope.png")
    args = [str(subs.get(a, a)) for a in args]
    try:
        code, _, err = run_main(capsys, "sample", "--ckpt", cli_files["UNCOND"], "--out", tmp_path / "x.png",
                                "--no-progress", *args)
    except SystemExit as e:  # argparse rejects a bad number itself (exit 2, usage + one error line)
        code, err = e.code, capsys.readouterr().err.strip().splitlines()[-1]
    assert_one_line(code, err, needle)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["--kind", "image", "--init", "IMG"], "--init applies to --kind text"),
    (["--kind", "text", "--init", "CLF"], "not an image encoder"),
    (["--kind", "image", "--tau", "0"], "temperature"),
    (["--kind", "image", "--shift", "-1"], "shift"),
    (["--kind", "text", "--align", "-1"], "weight"),
])
def test_cli_train_encoder_bad_input_is_one_line(capsys, cli_files, tmp_path, args, needle):
    args = [str(cli_files.get(a, a)) for a in args]
    try:
        code, _, err = run_main(capsys, "train-encoder", "--data", cli_files["NPZ"], "--out", tmp_path / "o",
                                "--steps", "2", *TINY, *args)
    except SystemExit as e:
        code, err = e.code, capsys.readouterr().err.strip().splitlines()[-1]
    assert_one_line(code, err, needle)


def test_cli_without_text_extra_is_one_line(capsys, cli_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    monkeypatch.setattr(text_mod, "_LOADED", {})
    code, _, err = run_main(capsys, "sample", "--ckpt", cli_files["UNCOND"], "--out", tmp_path / "x.png",
                            "--text", "a bag", "--text-encoder", cli_files["TXT"], "--no-progress")
    assert_one_line(code, err, "pip install 'condiff[text]'")
    code, _, err = run_main(capsys, "train-encoder", "--kind", "text", "--data", cli_files["NPZ"], "--out",
                            tmp_path / "o", *TINY)
    assert_one_line(code, err, "pip install 'condiff[text]'")


def test_sweep_methods_text_and_image(cli_files, data, text_encoder, model):
    from condiff.sweep import SweepContext, get_method

    ctx = SweepContext(model=model, schedule=S, shape=(1, 8, 8), class_names=NAMES,
                       options={"image_encoder": str(cli_files["IMG"]), "ref_data": str(cli_files["NPZ"]),
                                "ref1": "7", "text_encoder": str(cli_files["TXT"]), "prompt0": "long pants"})
    labels = torch.tensor([1, 0, 1])
    guidance, cond = get_method("image")(ctx, 2.5, labels)  # per-row targets travel in cond["image"]
    enc, _ = load_encoder(cli_files["IMG"], "image")
    stored = load_dataset(cli_files["NPZ"])  # the references as the .npz stores them (uint8)
    with torch.no_grad():
        refs = enc(torch.stack([reference(stored, 0), stored.images[7]]), None, "e2")
    terms = guidance.terms
    assert guidance.unconditional == bool(getattr(model, "conditional", False)) and terms[0].scale == 2.5
    assert terms[0].target is None and terms[0].key == "image" and torch.equal(cond["y"], labels)
    assert torch.allclose(cond["image"], prototype_prior(refs, enc.prototypes, DEFAULT_IMAGE_PRIOR)[labels],
                          atol=1e-6)
    raw = SweepContext(model=model, schedule=S, shape=(1, 8, 8), class_names=NAMES,
                       options={**ctx.options, "image_prior": "0"})
    assert torch.allclose(get_method("image")(raw, 2.5, labels)[1]["image"], refs[labels], atol=1e-6)
    with pytest.raises(CondiffError, match="image_prior must be a number"):
        get_method("image")(SweepContext(model=model, schedule=S, shape=(1, 8, 8), class_names=NAMES,
                                         options={**ctx.options, "image_prior": "x"}), 1.0, labels)
    guidance, cond = get_method("text")(ctx, 4.0, labels)
    want = text_target(load_encoder(cli_files["TXT"], "text")[0], text_encoder[0].encode(["long pants", "a photo of a bag"]))
    assert guidance.terms[0].scale == 4.0 and guidance.terms[0].target is None
    assert torch.allclose(cond["text"], want[torch.tensor([1, 0, 1])], atol=1e-6)
    with pytest.raises(CondiffError, match="text_encoder"):
        get_method("text")(SweepContext(model=model, schedule=S, shape=(1, 8, 8), class_names=NAMES), 1.0, labels)
    from condiff.sweep import check_options

    check_options("image", {k: v for k, v in ctx.options.items() if k in ("image_encoder", "ref_data", "ref1")})
    check_options("text", {"text_encoder": "x", "prompt0": "long pants", "text_prior": "0"})
    with pytest.raises(CondiffError, match="method text has no option image_encoder, ref1, ref_data"):
        check_options("text", ctx.options)


def test_demo_adds_text_image_and_style_sections(capsys, cli_files, tmp_path):
    """condiff demo with encoders: text, reference-image and style grids, each next to its unguided twin."""
    code, _, err = run_main(capsys, "demo", "--ckpt", cli_files["COND"], "--text-encoder", cli_files["TXT"],
                            "--image-encoder", cli_files["IMG"], "--out", tmp_path / "d", "--steps", "4",
                            "--per-class", "2", "--no-progress", "--device", "cpu")
    assert code == 0, err
    files = {f.name for f in (tmp_path / "d").iterdir()}
    pairs = [("text-s0.png", "text-s100.png"), ("image-s0.png", "image-s100.png"), ("style-s0.png", "style-s10.png")]
    assert {"references.png", *(f for p in pairs for f in p)} <= files
    for plain, guided in pairs:  # same seed: only the guidance term differs
        a, b = (np.asarray(Image.open(tmp_path / "d" / f)) for f in (plain, guided))
        assert a.shape == b.shape and not np.array_equal(a, b)
    report = (tmp_path / "d" / "report.md").read_text()
    assert '"something to wear on your feet"' in report and "stripes.png" in report and "sneaker.png" in report


@pytest.mark.parametrize("flag, key", [("--image-encoder", "CLF"), ("--text-encoder", "IMG")])
def test_demo_with_a_wrong_encoder_fails_before_writing_anything(capsys, cli_files, tmp_path, flag, key):
    code, _, err = run_main(capsys, "demo", "--ckpt", cli_files["COND"], flag, cli_files[key], "--out", tmp_path / "d",
                            "--steps", "4", "--per-class", "2", "--no-progress", "--device", "cpu")
    assert_one_line(code, err, "encoder checkpoint")
    assert not (tmp_path / "d").exists()
