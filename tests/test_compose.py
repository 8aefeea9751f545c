"""The one composition path (condiff.compose): Guidance and Sampling, compose(), per-row conditions.

Ground truth is the exact-score Gaussian mixture of condiff.toy: its eps is optimal and its
classifier exact, so guided samples must land in the requested class, row by row.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from condiff.compose import (DEFAULT_SCALES, Guidance, Sampling, class_guidance, compose, saturated_images, saturation_warning,
                             solver_options)
from condiff.errors import CondiffError
from condiff.guidance import (ClassifierFree, ClassifierTerm, GradientTerm, MeanShift, NullBranch, ScoreGuided,
                              batch_cond, slice_cond)
from condiff.pipeline import GuidanceWarning, generate, guided_generate
from condiff.schedule import linear_schedule
from condiff.toy import GaussianMixture
from helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)

S = linear_schedule(200)
GM = GaussianMixture([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], [[[0.3, 0.0], [0.0, 0.3]]] * 3, schedule=S)


def xt(n=8, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_guidance_config_round_trips_through_json():
    clf = ClassifierTerm(GM.classifier, None, 3.0, sharpen=True)
    sim = GradientTerm(lambda x, t, cond: -x.pow(2).sum(1), 0.5, name="custom")
    g = Guidance(cfg_w=2.0, cfg_interval=(10, 150), cfg_rescale=0.7, terms=[clf, sim], form="mean", grad_at="mu")
    config = json.loads(json.dumps(g.config()))
    back = Guidance.from_config(config, terms=[ClassifierTerm(GM.classifier), GradientTerm(sim.fn, name="custom")])
    assert back.config() == g.config()
    assert back.cfg_interval == (10, 150) and back.terms[0].scale == 3.0 and back.terms[0].sharpen
    s = Sampling("ddpm", 30, clip_x0=None, options={"variance": "ddpm-beta"})
    assert Sampling.from_config(json.loads(json.dumps(s.config()))) == s
    with pytest.raises(CondiffError, match=r"2 term\(s\), 1 given"):
        Guidance.from_config(config, terms=[clf])
    with pytest.raises(CondiffError, match="unknown guidance settings: w"):
        Guidance.from_config({"w": 1})


def test_compose_builds_the_article_wrappers():
    x, t, y = xt(), torch.full((8,), 120), torch.arange(8) % 3
    eps, shift = compose(GM, S, Guidance(cfg_w=2.0))
    assert shift is None and torch.equal(eps(x, t, {"y": y}), ClassifierFree(GM, 2.0)(x, t, y))  # eq 24
    term = ClassifierTerm(GM.classifier, None, 2.0)  # the class of each row comes from cond["y"]
    eps, shift = compose(GM, S, Guidance(unconditional=True, terms=[term]))
    by_hand = ScoreGuided(NullBranch(GM), S, ClassifierTerm(GM.classifier, y, 2.0))  # eq 19, fixed targets
    assert shift is None and torch.equal(eps(x, t, {"y": y}), by_hand(x, t))
    eps, shift = compose(GM, S, Guidance(unconditional=True, terms=[term], form="mean", grad_at="mu"),
                         Sampling("ddpm"))
    assert isinstance(shift, MeanShift) and shift.at == "mu" and isinstance(eps, NullBranch)


def test_per_row_classes_travel_with_the_batch_at_any_batch_size():
    """Exact classifier at gamma = 1 on the unconditional model = the conditional model (eq 3): every row
    lands in its own class although the 7-row batches cut across the classes."""
    n = 210
    y = torch.arange(n) % 3
    g = Guidance(unconditional=True, terms=[ClassifierTerm(GM.classifier)])
    eps, _ = compose(GM, S, g, Sampling("ddim", 50, clip_x0=None))
    x = generate(eps, S, n, shape=(2,), cond={"y": y}, steps=50, clip_x0=None, batch_size=7)
    assert float((GM.component_of(x.double()) == y).double().mean()) >= 0.99  # exact: 1 - 1e-10
    # the same images as terms with the targets fixed, batch by batch (one batch holding every row)
    a = generate(eps, S, 12, shape=(2,), cond={"y": y[:12]}, steps=10, clip_x0=None, batch_size=12)
    b = generate(ScoreGuided(NullBranch(GM), S, ClassifierTerm(GM.classifier, y[:12])), S, 12, shape=(2,),
                 steps=10, clip_x0=None, batch_size=12)
    assert torch.equal(a, b)


def test_batch_cond_repeats_single_rows_and_slices_every_entry():
    cond = batch_cond({"y": 2, "text": torch.ones(1, 4), "image": torch.arange(10.0)[:, None]}, 10)
    assert cond["y"].tolist() == [2] * 10 and cond["text"].shape == (10, 4)
    part = slice_cond(cond, 3, 5)
    assert part["image"].flatten().tolist() == [3.0, 4.0] and part["y"].shape == (2,)
    assert batch_cond(torch.ones(3), 4).shape == (4, 3)  # one condition vector for every row
    with pytest.raises(CondiffError, match=r"cond\['image'\] has 10 rows for 4 samples"):
        batch_cond({"image": torch.zeros(10, 2)}, 4)


def test_solver_options_are_read_from_the_solver():
    assert solver_options("ddim") == {"eta": 0.0}
    assert solver_options("ddpm") == {"variance": "ddpm"}


BAD = [  # (guidance, sampling, what the one-line error says): each was silently ignored before
    (dict(form="mean", terms="clf"), dict(sampler="ddim"), "needs sigma_t > 0"),
    (dict(grad_at="mu", terms="clf"), {}, "applies to the mean form"),
    (dict(form="mean"), dict(sampler="ddpm"), "form mean applies to gradient terms"),
    (dict(cfg_interval=(0, 10)), {}, "CFG interval applies to classifier-free guidance"),
    (dict(cfg_rescale=0.5), {}, "rescale applies to classifier-free guidance"),
    (dict(cfg_w=1.0, cfg_interval=(150, 200)), {}, "0 <= lo <= hi <= 199"),
    (dict(cfg_w=1.0, cfg_rescale=2.0), {}, "rescale must lie in [0, 1]"),
    (dict(cfg_w=1.0, unconditional=True), {}, "exclude each other"),
    ({}, dict(sampler="ddpm", options={"eta": 0.5}), "sampler ddpm does not take eta"),
    ({}, dict(sampler="ddim", options={"variance": "ddpm"}), "sampler ddim does not take variance"),
    ({}, dict(sampler="ddim", options={"eta": 3.0}), "eta must lie in [0, 1]"),
    ({}, dict(options={"eta": 0.5}), "need a solver that takes them"),
    ({}, dict(sampler="heun2"), "unknown sampler 'heun2'"),
    ({}, dict(spacing="cosine"), "unknown step spacing"),
    ({}, dict(steps=500), "steps must be between 1 and T=200"),
]


@pytest.mark.parametrize("guidance, sampling, needle", BAD, ids=[b[2] for b in BAD])
def test_meaningless_combinations_are_one_line_errors(guidance, sampling, needle):
    if guidance.get("terms") == "clf":
        guidance["terms"] = [ClassifierTerm(GM.classifier)]
    with pytest.raises(CondiffError, match=None) as e:
        compose(GM, S, Guidance(**guidance), Sampling(**sampling))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_class_guidance_decides_how_classes_are_met():
    class Net:
        conditional = True

        def null_cond(self, b, device=None):
            return torch.zeros(b)

    net = Net()
    assert class_guidance(net, classes=True) == {"cfg_w": DEFAULT_SCALES["cfg"], "unconditional": False}  # default w
    assert class_guidance(net, classes=True, cfg_w=0.0) == {"cfg_w": 0.0, "unconditional": False}  # plain conditional
    assert class_guidance(net, classes=True, classifier=True) == {"cfg_w": None, "unconditional": True}
    assert class_guidance(net, classes=False) == {"cfg_w": None, "unconditional": True}
    with pytest.raises(CondiffError, match="ignores the class"):
        class_guidance(net, classes=True, unconditional=True)
    with pytest.raises(CondiffError, match="this model is unconditional"):
        class_guidance(object(), classes=True)


def test_absurd_scales_warn_that_the_images_saturated():
    """Issue 19 item 8: a scale of 1e6 drives every x0 prediction to the clip range; condiff warns."""
    small = GaussianMixture([[-0.3, 0.2], [0.3, -0.2]], [[[0.01, 0], [0, 0.01]]] * 2, schedule=S)
    n = 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unguided and the sanely guided samples give no warning
        for scale in (0.0, 1.0):
            guided_generate(small, S, n, Guidance(terms=[ClassifierTerm(small.classifier, 1, scale)]),
                            Sampling("ddim", 20), shape=(2,))
    brighter = GradientTerm(lambda x, t, cond: x.sum(1), 1e6)  # a similarity whose gradient never fades
    with pytest.warns(GuidanceWarning, match=f"{n} of {n} images are saturated"):
        guided_generate(small, S, n, Guidance(terms=[brighter]), Sampling("ddim", 20), shape=(2,))
    images = torch.zeros(3, 1, 4, 4)
    images[0] = 1.0  # all white
    images[1, :, :2] = -1.0
    images[1, :, 2:] = 1.0  # black and white, no mid-tones
    images[2].uniform_(-1, 1)
    assert saturated_images(images) == 2 and "2 of 3 images" in saturation_warning(images)
    assert saturation_warning(images[2:]) is None


def test_an_unconditional_network_never_sees_the_classes_meant_for_its_classifier():
    seen = []

    class Unconditional:
        conditional = False

        def __call__(self, x, t, cond=None):
            seen.append(cond)
            return GM.eps(x, t)

    term = ClassifierTerm(GM.classifier, None, 1.0)
    eps, _ = compose(Unconditional(), S, Guidance(terms=[term]))
    x, t, y = xt(), torch.full((8,), 50), torch.arange(8) % 3
    by_hand = ScoreGuided(GM.eps, S, ClassifierTerm(GM.classifier, y, 1.0))(x, t)
    assert torch.equal(eps(x, t, {"y": y}), by_hand) and seen == [None]
