"""Issue 16's guidance family on the exact Gaussian mixture: x0-guidance (DPS / Universal Guidance / TFG),
APG, CFG++, autoguidance, the guidance interval of gradient terms and self-recurrence.

Ground truth: condiff.toy.GaussianMixture has the exact eps, the exact conditional eps, the exact
noise-aware classifier log p(y|x_t) and the exact clean one log p(y|x_0) (``class_log_prob(x, None)``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from condiff.cfg_family import APG, AutoGuided, CFGPlusPlus, ProjectedGuidance
from condiff.compose import Guidance, Recurrent, Sampling, compose
from condiff.errors import CondiffError
from condiff.guidance import ClassifierFree, ClassifierTerm, Conditioned, NullBranch, ScoreGuided
from condiff.pipeline import generate
from condiff.samplers import SAMPLERS, nfe, noise, sample_ddim
from condiff.schedule import linear_schedule
from condiff.toy import GaussianMixture
from condiff.x0guidance import X0Term, clean_classifier
from helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)

F64 = torch.float64
S = linear_schedule(1000)
GM = GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], [[[0.5, 0.0], [0.0, 0.5]]] * 3, schedule=S)
CLEAN = clean_classifier(lambda x: GM.class_log_prob(x, None))  # the exact clean classifier log p(y | x_0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def noisy_points(t: int, n: int = 600, seed: int = 0):
    """x_t of data points (forward process at t) and each row's target class."""
    g = gen(seed)
    x0 = GM.sample(n, g)
    tt = torch.full((n,), t)
    return S.add_noise(x0, tt, torch.randn(n, 2, generator=g, dtype=F64)), tt, torch.arange(n) % 3


def x0_vs_exact(t: int, path: str):
    """(x0-guidance gradient, exact grad log p(y | x_t)) at gamma = 1 on the null branch of the mixture."""
    x, tt, y = noisy_points(t)
    term = X0Term(CLEAN, path=path).bind(NullBranch(GM), S)
    return term.grad(x, tt, {"y": y}), ClassifierTerm(GM.classifier).grad(x, tt, {"y": y})


def rel_err(g, ref):
    return float((g - ref).norm(dim=1).mean() / ref.norm(dim=1).mean())


# ----------------------------------------------------------------------------- x0-guidance
@pytest.mark.parametrize("path", ["model", "fixed"])
def test_x0_guidance_is_exact_as_t_goes_to_0(path):
    """x0_hat(x_t) -> x_t and abar_t -> 1, so grad log p(y | x0_hat) -> grad log p(y | x_t): the error
    vanishes with t (measured: path model 4e-5, 9e-5, 4e-4 at t = 0, 1, 5; path fixed 2e-4, 5e-4, 2e-3)."""
    errs = [rel_err(*x0_vs_exact(t, path)) for t in (0, 1, 5, 20)]
    assert errs[0] < 1e-3 and errs[1] < 2e-3 and errs[2] < 5e-3
    assert errs == sorted(errs) and errs[3] > 2 * errs[0]  # it grows with t: the limit is not a coincidence


def test_x0_guidance_bias_at_large_t_overshoots_in_the_right_direction():
    """At large t the exact p(y|x_t) is flat (classes overlap), but the clean classifier at x0_hat, near the
    data mean between the classes, is steep: x0-guidance points the right way (positive projection on the
    exact gradient in nearly every row) and overshoots.  Measured (median projection ratio <g, g*>/|g*|^2):
    path model 4.8 at t = 500, 6.6 at t = 900; path fixed 29 and 8e3 (its 1/abar_t is not damped by the
    Jacobian of eps, which shrinks x0_hat's response to x_t)."""
    ratios = {}
    for path in ("model", "fixed"):
        for t in (500, 900):
            g, ref = x0_vs_exact(t, path)
            proj = (g * ref).sum(1) / (ref * ref).sum(1)
            assert float((proj > 0).double().mean()) > 0.95  # the sign: toward the class
            ratios[path, t] = float(proj.median())
    assert 3.5 < ratios["model", 500] < 6.5 and 5.0 < ratios["model", 900] < 8.5  # the size: 5x to 7x too strong
    assert 20 < ratios["fixed", 500] < 40 and ratios["fixed", 900] > 1e3
    # a moderate t is in between: the bias grows with t
    assert 1.0 < float(((lambda g, r: (g * r).sum(1) / (r * r).sum(1))(*x0_vs_exact(300, "model"))).median()) \
        < ratios["model", 500]


def test_x0_weight_abar2_moves_x0_hat_by_gamma_bbar2_grad_and_keeps_the_bias_bounded():
    """Path fixed under eq 19: eps~ = eps - bbar_t g with g = gamma w_t grad_{x0} f / abar_t moves x0_hat by
    gamma w_t (bbar_t / abar_t)^2 grad_{x0} f; weight abar2 (w_t = abar_t^2) makes that gamma bbar_t^2 grad_{x0} f,
    bounded at every t.  On the mixture its median projection on the exact grad log p(y | x_t) stays in
    [1, 3] from t = 100 to 900 (measured 1.10, 1.63, 2.24, 2.21), while weight abar's grows like 1/abar_t
    (2.6 at t = 300, 8.0 at 500, 135 at 900)."""
    gamma = 1.7
    x, tt, y = noisy_points(700, n=16)
    eps, _ = compose(GM, S, Guidance(unconditional=True, terms=[X0Term(CLEAN, gamma, path="fixed", weight="abar2")]))
    a, b = S.gather(tt, x)
    e0 = GM.eps(x, tt, None)
    x0 = ((x - b * e0) / a).requires_grad_(True)
    (g0,) = torch.autograd.grad(CLEAN(x0, tt * 0, {"y": y}).sum(), x0)
    moved = (x - b * eps(x, tt, {"y": y})) / a - x0.detach()
    assert torch.allclose(moved, gamma * b ** 2 * g0, rtol=1e-9, atol=1e-12)
    ratios = {}
    for weight in ("abar", "abar2"):
        for t in (100, 300, 500, 900):
            x, tt, y = noisy_points(t)
            g = X0Term(CLEAN, path="fixed", weight=weight).bind(NullBranch(GM), S).grad(x, tt, {"y": y})
            ref = ClassifierTerm(GM.classifier).grad(x, tt, {"y": y})
            ratios[weight, t] = float(((g * ref).sum(1) / (ref * ref).sum(1)).median())
    assert all(1.0 < ratios["abar2", t] < 3.0 for t in (100, 300, 500, 900))
    assert ratios["abar", 500] > 3 * ratios["abar2", 500] and ratios["abar", 900] > 30 * ratios["abar2", 900]


class TinyEps(torch.nn.Module):
    """A small time-conditioned MLP eps-network, float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, t[:, None].to(x.dtype) / 1000], 1))


def test_gradient_paths_differ_exactly_by_the_jacobian_of_eps():
    """grad_model - grad_fixed = -(bbar_t / abar_t) J_eps(x_t)^T grad_{x0} f(x0_hat), J from autograd per row."""
    net = TinyEps()
    for p in net.parameters():
        p.requires_grad_(False)
    x, tt, y = noisy_points(400, n=6)
    cond = {"y": y}
    ga = X0Term(CLEAN, 1.5, path="model").bind(net, S).grad(x, tt, cond)
    gb = X0Term(CLEAN, 1.5, path="fixed").bind(net, S).grad(x, tt, cond)
    a, b = S.gather(tt, x)
    x0 = (x - b * net(x, tt)) / a
    x0r = x0.detach().requires_grad_(True)
    (g0,) = torch.autograd.grad(CLEAN(x0r, tt * 0, cond).sum(), x0r)
    for i in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda z: net(z[None], tt[i:i + 1])[0], x[i])  # (2, 2)
        want = -1.5 * (b[i] / a[i]) * (J.T @ g0[i])
        assert torch.allclose(ga[i] - gb[i], want, rtol=1e-9, atol=1e-12)
    assert not any(p.grad is not None for p in net.parameters())
    assert (ga - gb).abs().max() > 1e-3  # the Jacobian term is not negligible here


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_x0_guidance_composes_with_cfg_and_article_terms_on_every_solver(sampler):
    """x0 term + noise-aware classifier term + CFG in one Guidance, per-row classes: every solver runs it,
    and the samples land in their class (the conditional model at w = 0.5 already does; the terms keep it)."""
    n = 24
    y = torch.arange(n) % 3
    terms = [X0Term(CLEAN, 0.5, weight="abar"), ClassifierTerm(GM.classifier, None, 0.5)]
    sampling = Sampling(sampler, 12, clip_x0=None)
    eps, shift = compose(GM, S, Guidance(cfg_w=0.5, terms=terms), sampling)
    assert isinstance(eps, ScoreGuided) and eps.terms[0].model is eps.model  # x0_hat from the CFG model
    x = generate(eps, S, n, shape=(2,), cond={"y": y}, mean_shift=shift, batch_size=n, **sampling.kwargs())
    assert torch.isfinite(x).all() and float((GM.component_of(x.double()) == y).double().mean()) >= 0.9


def test_training_free_clean_classifier_guidance_steers_the_unconditional_model():
    """The unconditional model + the clean classifier through x0_hat (no noise-aware network anywhere): the
    samples land in the requested class far above chance (1/3); path fixed with weight abar as well."""
    n = 90
    y = torch.arange(n) % 3
    for term in (X0Term(CLEAN, 1.0), X0Term(CLEAN, 1.0, path="fixed", weight="abar")):
        eps, _ = compose(GM, S, Guidance(unconditional=True, terms=[term]), Sampling("ddim", 25, clip_x0=None))
        x = generate(eps, S, n, shape=(2,), cond={"y": y}, steps=25, clip_x0=None, batch_size=n)
        assert float((GM.component_of(x.double()) == y).double().mean()) >= 0.9


def test_x0_smoothing_and_weight():
    x, tt, y = noisy_points(50, n=8)
    quad = lambda x0, t, cond: -0.5 * x0.pow(2).sum(1)  # noqa: E731  grad_{x0} = -x0 for any smoothing mean
    base = X0Term(quad, path="fixed").bind(NullBranch(GM), S)
    smooth = X0Term(quad, path="fixed", smoothing=0.3, samples=400).bind(NullBranch(GM), S)
    g0, g1 = base.grad(x, tt), smooth.grad(x, tt)
    # E_n grad f(x0 + rho n) = grad f(x0): within 5 standard errors rho / sqrt(m) / abar_t
    assert (g1 - g0).abs().max() < 5 * 0.3 / 20 / float(S.abar[50])
    assert torch.equal(g1, smooth.grad(x, tt)) and not torch.equal(g1, g0)  # seeded by (seed, t): repeatable
    a, _ = S.gather(tt, x)
    assert torch.allclose(X0Term(quad, path="fixed", weight="abar").bind(NullBranch(GM), S).grad(x, tt), g0 * a)
    half = X0Term(quad, path="fixed", weight=lambda t: 0.5 * torch.ones(len(t))).bind(NullBranch(GM), S)
    assert torch.allclose(half.grad(x, tt), 0.5 * g0)
    assert torch.equal(X0Term(quad, 0.0).bind(GM, S).grad(x, tt), torch.zeros_like(x))


def test_x0_term_built_from_an_article_term():
    term = X0Term.of(ClassifierTerm(lambda x, t: GM.class_log_prob(x, None), None, 2.0), path="fixed")
    assert (term.name, term.key, term.scale, term.path) == ("x0-classifier", "y", 2.0, "fixed")
    x, tt, y = noisy_points(10, n=8)
    want = X0Term(CLEAN, 2.0, path="fixed").bind(NullBranch(GM), S).grad(x, tt, {"y": y})
    assert torch.allclose(term.bind(NullBranch(GM), S).grad(x, tt, {"y": y}), want)


# ----------------------------------------------------------------------------- the CFG family
def test_autoguidance_with_the_model_as_its_weak_model_is_the_conditional_model():
    x, tt, y = noisy_points(300, n=16)
    for w in (0.0, 1.0, 3.0):
        assert torch.allclose(AutoGuided(GM, GM, w)(x, tt, {"y": y}), GM.eps(x, tt, y), rtol=0, atol=1e-12)
    weak = GaussianMixture([[-1.5, 0.0], [1.5, 0.0], [0.0, 2.0]], schedule=S)  # a worse model of the same task
    got = AutoGuided(GM, weak, 2.0)(x, tt, {"y": y})
    assert torch.allclose(got, 3.0 * GM.eps(x, tt, y) - 2.0 * weak.eps(x, tt, y), atol=1e-12)
    eps, _ = compose(GM, S, Guidance(cfg_w=2.0, weak_model=weak, cfg_interval=(0, 200)))
    assert torch.allclose(eps(x, tt, {"y": y}), GM.eps(x, tt, y), atol=1e-12)  # t = 300 is outside the interval
    n = 12
    a = generate(Conditioned(GM), S, n, shape=(2,), cond={"y": torch.arange(n) % 3}, steps=10, clip_x0=None)
    b = generate(compose(GM, S, Guidance(cfg_w=2.0, weak_model=GM))[0], S, n, shape=(2,),
                 cond={"y": torch.arange(n) % 3}, steps=10, clip_x0=None)
    assert torch.allclose(a, b, atol=1e-10)


def test_autoguidance_combined_with_cfg_in_one_call():
    """eps~ = eps_c + cfg_w (eps_c - eps_u) + w (eps_c - eps_weak): cfg_w = 0 is autoguidance alone, the model as
    its own weak model is CFG with weight cfg_w, and the interval applies to both differences."""
    x, tt, y = noisy_points(300, n=16)
    weak = GaussianMixture([[-1.5, 0.0], [1.5, 0.0], [0.0, 2.0]], schedule=S)
    e_c, e_u, e_w = GM.eps(x, tt, y), GM.eps(x, tt, None), weak.eps(x, tt, y)
    both = compose(GM, S, Guidance(cfg_w=1.5, weak_model=weak, weak_w=0.7))[0](x, tt, {"y": y})
    assert torch.allclose(both, e_c + 1.5 * (e_c - e_u) + 0.7 * (e_c - e_w), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(both, e_c + 1.5 * (e_c - e_u), atol=1e-3)  # the weak model's part is not negligible
    alone = compose(GM, S, Guidance(cfg_w=0.0, weak_model=weak, weak_w=0.7))[0](x, tt, {"y": y})
    assert torch.allclose(alone, AutoGuided(GM, weak, 0.7)(x, tt, {"y": y}), rtol=0, atol=1e-12)
    same = compose(GM, S, Guidance(cfg_w=1.5, weak_model=GM, weak_w=2.0))[0](x, tt, {"y": y})
    assert torch.allclose(same, ClassifierFree(GM, 1.5)(x, tt, y), rtol=1e-10, atol=1e-12)
    tt2 = torch.where(torch.arange(16) % 2 == 0, tt, torch.full_like(tt, 800))
    gated = compose(GM, S, Guidance(cfg_w=1.5, weak_model=weak, weak_w=0.7, cfg_interval=(500, 900)))[0]
    got = gated(x, tt2, {"y": y})
    assert torch.allclose(got[0::2], e_c[0::2], atol=1e-12)  # t = 300: outside, the conditional model
    e_c8 = GM.eps(x[1::2], tt2[1::2], y[1::2])
    want = e_c8 + 1.5 * (e_c8 - GM.eps(x[1::2], tt2[1::2], None)) + 0.7 * (e_c8 - weak.eps(x[1::2], tt2[1::2], y[1::2]))
    assert torch.allclose(got[1::2], want, rtol=1e-10, atol=1e-12)
    with pytest.raises(CondiffError, match="weak_w is autoguidance's weight: give the weak model"):
        compose(GM, S, Guidance(cfg_w=1.0, weak_w=1.0))
    with pytest.raises(CondiffError, match="classifier-free guidance needs a model trained with a null condition"):
        compose(TinyEps(), S, Guidance(cfg_w=1.0, weak_model=GM, weak_w=1.0))
    g = Guidance(cfg_w=1.0, weak_model=weak, weak_w=0.5)
    back = Guidance.from_config(json.loads(json.dumps(g.config())), weak_model=weak)
    assert back.weak_w == 0.5 and back.config() == g.config()


def test_apg_keeping_the_parallel_part_without_rescale_or_momentum_is_cfg():
    x, tt, y = noisy_points(400, n=32)
    for w in (0.5, 2.0):
        apg = ProjectedGuidance(GM, S, w, APG(eta=1.0))(x, tt, {"y": y})
        assert torch.allclose(apg, ClassifierFree(GM, w)(x, tt, y), rtol=1e-9, atol=1e-10)
    eps, _ = compose(GM, S, Guidance(cfg_w=2.0, apg=APG(eta=1.0)))
    assert isinstance(eps, ProjectedGuidance)


def _x0s(x, tt, y):
    a, b = S.gather(tt, x)
    return (x - b * GM.eps(x, tt, y)) / a, (x - b * GM.eps(x, tt, None)) / a, a, b


def test_apg_projection_rescale_and_momentum():
    x, tt, y = noisy_points(400, n=32)
    x0_c, x0_u, a, b = _x0s(x, tt, y)
    w = 2.0
    out = ProjectedGuidance(GM, S, w, APG(eta=0.0))(x, tt, {"y": y})
    update = ((x - b * out) / a - x0_c) / w
    assert (update * x0_c).sum(1).abs().max() < 1e-9  # eta = 0: the update is orthogonal to x0_c
    d = x0_c - x0_u
    assert torch.allclose(update, d - (d * x0_c).sum(1, keepdim=True) / (x0_c * x0_c).sum(1, keepdim=True) * x0_c)
    r = 0.05
    capped = ProjectedGuidance(GM, S, w, APG(eta=1.0, rescale=r))(x, tt, {"y": y})
    u = ((x - b * capped) / a - x0_c) / w
    norms = u.norm(dim=1)
    assert norms.max() <= r + 1e-12 and torch.allclose(norms[d.norm(dim=1) > r], torch.full_like(norms, r)[
        d.norm(dim=1) > r])
    # momentum: state of one chain, d_k + beta d_{k-1}; a call at a larger t starts a new chain
    wrap = ProjectedGuidance(GM, S, w, APG(eta=1.0, momentum=-0.5))
    first = wrap(x, tt, {"y": y})
    assert torch.allclose(first, ClassifierFree(GM, w)(x, tt, y), atol=1e-10)
    t2 = tt - 100
    x0_c2, x0_u2, a2, b2 = _x0s(x, t2, y)
    second = wrap(x, t2, {"y": y})
    want = x0_c2 + w * ((x0_c2 - x0_u2) - 0.5 * d)
    assert torch.allclose((x - b2 * second) / a2, want, atol=1e-9)
    assert torch.allclose(wrap(x, tt, {"y": y}), first, atol=1e-12)  # back at the top: reset
    other = ProjectedGuidance(GM, S, w, APG(eta=1.0, momentum=-0.5))
    assert torch.allclose(other(x, t2, {"y": y}), ClassifierFree(GM, w)(x, t2, y), atol=1e-10)  # no shared state


def test_cfgpp_at_its_identity_settings_is_the_plain_solver():
    """lambda = 0: x0 and the re-noising both from eps_u, i.e. plain DDIM on the null branch; and for a model
    whose condition changes nothing (eps_c = eps_u) CFG++ is plain DDIM at any lambda."""
    n, y = 12, torch.arange(12) % 3
    plain = generate(NullBranch(GM), S, n, shape=(2,), sampler="ddim", steps=20, clip_x0=None)
    eps, _ = compose(GM, S, Guidance(cfg_pp=0.0), Sampling("ddim", 20, clip_x0=None))
    assert torch.equal(generate(eps, S, n, shape=(2,), sampler="ddim", cond={"y": y}, steps=20, clip_x0=None), plain)

    class Blind(GaussianMixture):
        def eps(self, x, t, cond=None):
            return super().eps(x, t, None)

        __call__ = eps

    blind = Blind(GM.means, GM.covs, schedule=S)
    ref = generate(Conditioned(blind), S, n, shape=(2,), sampler="ddim", cond={"y": y}, steps=20, clip_x0=None, eta=0.5)
    got = generate(CFGPlusPlus(blind, 0.8), S, n, shape=(2,), sampler="ddim", cond={"y": y}, steps=20, clip_x0=None, eta=0.5)
    assert torch.equal(got, ref)


def test_cfgpp_step_renoises_with_the_unconditional_eps():
    """One DDIM step t -> s: x_s = abar_s x0(eps_u + lam (eps_c - eps_u)) + bbar_s eps_u (Chung et al. 2024)."""
    x, tt, y = noisy_points(600, n=8)
    lam, t, s = 0.7, 600, 300
    steps = []
    out = sample_ddim(CFGPlusPlus(GM, lam), x, S, [t, s], cond={"y": y},
                      callback=lambda d: steps.append(d["x"].clone()))
    (a_t, b_t), (a_s, b_s) = S.coefficients(t), S.coefficients(s)
    e_c, e_u = GM.eps(x, tt, y), GM.eps(x, tt, None)
    x0 = (x - b_t * (e_u + lam * (e_c - e_u))) / a_t
    assert torch.allclose(steps[0], a_s * x0 + b_s * e_u, atol=1e-12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["euler", "ddpm", "dpm++2m"])
def test_cfgpp_is_refused_by_solvers_without_the_hook(sampler):
    with pytest.raises(CondiffError, match=re.escape(f"sampler {sampler} has no such hook")):
        compose(GM, S, Guidance(cfg_pp=0.5), Sampling(sampler, 10))
    with pytest.raises(CondiffError, match="only the ddim sampler supports it"):  # the library path says it too
        SAMPLERS[sampler](CFGPlusPlus(GM, 0.5), noise((4, 2), gen(0), dtype=F64), S, 10, cond={"y": 0},
                          generator=gen(1))


# ----------------------------------------------------------------------------- interval and recurrence
def test_guidance_interval_for_gradient_terms():
    x, _, y = noisy_points(0, n=16)
    term = ClassifierTerm(GM.classifier, None, 2.0)
    eps, _ = compose(GM, S, Guidance(unconditional=True, terms=[term], grad_interval=(100, 500)))
    full, _ = compose(GM, S, Guidance(unconditional=True, terms=[term]))
    for t, inside in ((50, False), (100, True), (300, True), (500, True), (700, False)):
        tt = torch.full((16,), t)
        want = full(x, tt, {"y": y}) if inside else GM.eps(x, tt, None)
        assert torch.equal(eps(x, tt, {"y": y}), want)
    mixed = torch.tensor([50, 300] * 8)
    got, ref = eps(x, mixed, {"y": y}), full(x, mixed, {"y": y})
    assert torch.equal(got[1::2], ref[1::2]) and torch.equal(got[::2], GM.eps(x, mixed, None)[::2])


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.model(x, t, cond)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_self_recurrence_on_every_solver(sampler):
    """k = 1 is the plain solver exactly; k = 3 makes 3 network calls per step, is repeatable, and with the
    exact conditional model keeps every sample in its class (re-noising by q(x_t | x_s) preserves p_t)."""
    n, y = 30, torch.arange(30) % 3
    sampling = Sampling(sampler, 8, clip_x0=None)
    plain = generate(compose(GM, S, Guidance(cfg_w=0.0), sampling)[0], S, n, shape=(2,), cond={"y": y},
                     **sampling.kwargs())
    one = generate(Recurrent(compose(GM, S, Guidance(cfg_w=0.0), sampling)[0], 1), S, n, shape=(2,),
                   cond={"y": y}, **sampling.kwargs())
    assert torch.equal(one, plain)
    counter = Counting(Conditioned(GM))
    eps = Recurrent(counter, 3)
    x = generate(eps, S, n, shape=(2,), cond={"y": y}, batch_size=n, **sampling.kwargs())
    assert counter.calls == 3 * 8 + (nfe(sampler, 8) - 8)  # k calls at each step's start; Heun's corrector once
    assert torch.equal(x, generate(eps, S, n, shape=(2,), cond={"y": y}, batch_size=n, **sampling.kwargs()))
    assert not torch.equal(x, plain)
    assert float((GM.component_of(x.double()) == y).double().mean()) >= 0.95
    assert isinstance(compose(GM, S, Guidance(cfg_w=1.0, recurrence=3), sampling)[0], Recurrent)


# ----------------------------------------------------------------------------- config and errors
def test_guidance_config_round_trips_the_new_fields():
    weak = GaussianMixture([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], schedule=S)
    term = X0Term(CLEAN, 3.0, path="fixed", smoothing=0.1, samples=4)
    g = Guidance(cfg_w=2.0, weak_model=weak, terms=[term], grad_interval=(10, 500), recurrence=2)
    config = json.loads(json.dumps(g.config()))
    back = Guidance.from_config(config, terms=[X0Term(CLEAN)], weak_model=weak)
    assert back.config() == g.config() and back.terms[0].path == "fixed" and back.grad_interval == (10, 500)
    g2 = Guidance(cfg_w=1.0, apg=APG(0.0, 2.0, -0.5))
    assert Guidance.from_config(json.loads(json.dumps(g2.config()))).apg == APG(0.0, 2.0, -0.5)
    assert Guidance.from_config(json.loads(json.dumps(Guidance(cfg_pp=0.6).config()))).cfg_pp == 0.6
    with pytest.raises(CondiffError, match="give its weak model"):
        Guidance.from_config(config, terms=[X0Term(CLEAN)])


BAD = [
    (dict(apg=APG()), "APG applies to classifier-free guidance"),
    (dict(weak_model=GM), "autoguidance needs a guidance weight"),
    (dict(cfg_w=1.0, weak_model=GM, apg=APG()), "autoguidance and APG exclude each other"),
    (dict(cfg_w=1.0, apg=APG(), cfg_rescale=0.5), "rescale applies to plain classifier-free guidance"),
    (dict(cfg_pp=0.5, cfg_w=1.0), "CFG\\+\\+ \\(lambda\\) replaces classifier-free guidance"),
    (dict(cfg_pp=0.5, terms=[ClassifierTerm(GM.classifier)]), "CFG\\+\\+ does not combine with gradient terms"),
    (dict(cfg_pp=-1.0), "CFG\\+\\+ lambda must be a finite number >= 0"),
    (dict(cfg_w=1.0, grad_interval=(0, 10)), "needs gradient terms"),
    (dict(unconditional=True, terms=[ClassifierTerm(GM.classifier)], grad_interval=(0, 1000)), "<= 999"),
    (dict(recurrence=0), "recurrence must be an integer >= 1"),
    (dict(unconditional=True, terms=[ClassifierTerm(GM.classifier)], form="mean", recurrence=2), "use form score"),
]


@pytest.mark.parametrize("kw,message", BAD)
def test_bad_combinations_are_one_line_errors(kw, message):
    with pytest.raises(CondiffError, match=message) as e:
        compose(GM, S, Guidance(**kw), Sampling("ddpm", 10))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,message", [
    (dict(path="dps"), "path must be model or fixed"), (dict(smoothing=-1.0), "smoothing rho"),
    (dict(samples=0), "samples must be an integer >= 1"), (dict(weight="cosine"), "weight must be one of"),
    (dict(scale=-1.0), "x0 scale must be a finite number >= 0")])
def test_x0_term_bad_options(kw, message):
    with pytest.raises(CondiffError, match=message):
        X0Term(CLEAN, **kw)


def test_unbound_x0_term_and_bad_apg_settings():
    x, tt, y = noisy_points(10, n=4)
    with pytest.raises(CondiffError, match="has no eps-model: build it with compose"):
        X0Term(CLEAN).grad(x, tt, {"y": y})
    with pytest.raises(CondiffError, match="no target class"):
        X0Term(CLEAN).bind(NullBranch(GM), S).grad(x, tt, None)
    with pytest.raises(CondiffError, match="momentum must lie in"):
        APG(momentum=1.0)
    with pytest.raises(CondiffError, match="APG rescale must be a finite number >= 0"):
        APG(rescale=-1.0)
    with pytest.raises(CondiffError, match="CFG\\+\\+ needs a model trained with a null condition"):
        CFGPlusPlus(TinyEps(), 0.5)
    with pytest.raises(CondiffError, match="autoguidance needs a weak model"):
        AutoGuided(GM, None, 1.0)


# ----------------------------------------------------------------------------- sweep methods, clean classifier
class CondGM(GaussianMixture):
    conditional = True


def test_sweep_methods_build_every_family_member():
    from types import SimpleNamespace

    from condiff.sweep import METHODS, SweepContext, check_options, sample_at_scale

    model = CondGM(GM.means, GM.covs, schedule=S)
    labels = torch.arange(12) % 3
    cases = {
        "cfg-interval": ({"interval": "0,500"}, {}, lambda g: g.cfg_interval == (0, 500) and g.cfg_w == 1.5),
        "apg": ({"eta": "0", "rescale": "2", "momentum": "-0.5"}, {}, lambda g: g.apg == APG(0.0, 2.0, -0.5)),
        "cfg++": ({}, {}, lambda g: g.cfg_pp == 1.5 and g.cfg_w is None),
        "autoguide": ({"weak": "unused"}, {"weak": GM}, lambda g: g.weak_model is GM and g.cfg_w == 1.5),
        "autoguide+cfg": ({"weak": "unused", "cfg_w": "1"}, {"weak": GM},
                          lambda g: g.weak_model is GM and g.weak_w == 1.5 and g.cfg_w == 1.0),
        "x0-classifier": ({"classifier": "unused", "path": "fixed", "recurrence": "2", "interval": "0,900"},
                          {"x0-classifier": lambda x: GM.class_log_prob(x, None)},
                          lambda g: g.unconditional and g.terms[0].path == "fixed" and g.recurrence == 2
                          and g.grad_interval == (0, 900)),
        "x0-image": ({"image_encoder": "unused", "smoothing": "0.1"},
                     {"image": SimpleNamespace(e2=lambda x: x, target=GM.means)},
                     lambda g: g.terms[0].key == "image" and g.terms[0].samples == 4),
    }
    for case, (options, cache, check) in cases.items():
        method = case.removesuffix("+cfg")  # "autoguide+cfg": method autoguide with option cfg_w
        ctx = SweepContext(model, S, (2,), ["a", "b", "c"], options=options, cache=dict(cache))
        check_options(method, options)
        guidance, cond = METHODS[method](ctx, 1.5, labels)
        assert check(guidance), case
        x = sample_at_scale(ctx, METHODS[method], 1.5, labels, sampling=Sampling("ddim", 8, clip_x0=None),
                            batch_size=12)
        assert x.shape == (12, 2) and torch.isfinite(x).all(), case
    with pytest.raises(CondiffError, match="method apg has no option weak"):
        check_options("apg", {"weak": "x"})
    ctx = SweepContext(model, S, (2,), ["a", "b", "c"], options={})
    with pytest.raises(CondiffError, match="needs --option interval=LO,HI"):
        METHODS["cfg-interval"](ctx, 1.0, labels)
    with pytest.raises(CondiffError, match="needs --option weak=CKPT"):
        METHODS["autoguide"](ctx, 1.0, labels)
    with pytest.raises(CondiffError, match="needs a clean classifier"):
        METHODS["x0-classifier"](ctx, 1.0, labels)
    with pytest.raises(CondiffError, match="needs a conditional model"):
        METHODS["apg"](SweepContext(GM, S, (2,), ["a", "b", "c"]), 1.0, labels)


def test_clean_classifier_task_trains_on_the_data_at_t_0():
    from condiff.training import ClassifierTask

    seen = []

    def net(x, t):
        seen.append((x.clone(), t.clone()))
        return torch.stack([x.sum(1), -x.sum(1)], 1)

    x0, y = torch.randn(6, 2, generator=gen(0)), torch.tensor([0, 1] * 3)
    task = ClassifierTask(S, clean=True)
    loss, _ = task.loss(net, x0, y, gen(1))
    assert torch.equal(seen[0][0], x0) and not seen[0][1].any()  # the data itself, t = 0
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(net(x0, torch.zeros(6)), y))
    assert task.config() == {"task": "classifier", "t_max": 1, "clean": True}
    ClassifierTask(S).loss(net, x0, y, gen(1))
    assert not torch.equal(seen[-1][0], x0)  # the noise-aware task adds noise
    with pytest.raises(CondiffError, match="drop --t-max"):
        ClassifierTask(S, 10, clean=True)


def test_sample_flags_of_the_family(tmp_path):
    """Each flag samples with the shipped models (2 images, 3 steps); misuse is one line with exit code 2."""
    import numpy as np

    from condiff.zoo import shipped
    from helpers import run_cli_inprocess

    clf, cfg = str(shipped("classifier")), str(shipped("diffusion"))
    base = ["sample", "--n", "1", "--steps", "3", "--no-progress", "--device", "cpu", "--class", "bag",
            "--class", "sneaker"]
    runs = {
        "x0": ["--x0-guidance", clf, "--x0-scale", "2", "--x0-path", "fixed", "--x0-weight", "abar",
               "--x0-smoothing", "0.1", "--x0-samples", "2", "--recurrence", "2", "--guidance-interval", "0,900"],
        "apg": ["--cfg-w", "2", "--apg", "--apg-rescale", "5", "--apg-momentum", "-0.5"],
        "cfgpp": ["--cfg-pp", "0.6"],
        "auto": ["--cfg-w", "1", "--autoguide", cfg, "--sampler", "heun"],
        "x0-shipped": ["--x0-guidance", "--x0-scale", "2"],  # the flag alone: the shipped clean classifier
        "auto-shipped": ["--cfg-w", "1", "--autoguide"],  # the flag alone: the shipped weak model
        "auto+cfg": ["--cfg-w", "1", "--autoguide", "--autoguide-w", "1"],  # both in one call
    }
    for name, flags in runs.items():
        code, out, err = run_cli_inprocess(base + flags + ["--out", str(tmp_path / f"{name}.png"),
                                                           "--npz", str(tmp_path / f"{name}.npz")])
        assert code == 0, (name, err)
        assert np.load(tmp_path / f"{name}.npz")["images"].shape == (2, 28, 28, 1)
    bad = {
        ("--cfg-pp", "0.6", "--sampler", "euler"): "--cfg-pp needs --sampler ddim",
        ("--cfg-w", "1", "--apg-eta", "1"): "--apg-eta applies to APG: give --apg",
        ("--apg",): "--apg guides with the weight of --cfg-w",
        ("--x0-path", "fixed"): "--x0-path applies to x0-guidance",
        ("--x0-guidance", clf, "--x0-samples", "3"): "--x0-samples applies to the smoothing",
        ("--cfg-w", "1", "--cfg-pp", "0.5"): "--cfg-pp replaces --cfg-w",
        ("--cfg-w", "1", "--guidance-interval", "0,10"): "needs gradient terms",
        ("--x0-guidance", clf, "--form", "mean", "--sampler", "ddpm", "--recurrence", "2"): "use form score",
        ("--ckpt", cfg, "--cfg-w", "1", "--autoguide"): "give --autoguide CKPT, a weaker model of your own",
        ("--cfg-w", "1", "--autoguide-w", "1"): "--autoguide-w is autoguidance's weight: give --autoguide CKPT",
    }
    for flags, message in bad.items():
        code, out, err = run_cli_inprocess(base + list(flags) + ["--out", str(tmp_path / "bad.png")])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)


def test_x0_guidance_through_the_network_shares_its_forward_with_eps():
    """DPS under ScoreGuided: one network call per step (forward with graph, then backward), and the same
    eps~ as computing the model's eps and the term's gradient separately."""
    x, tt, y = noisy_points(300, n=8)
    counter = Counting(NullBranch(GM))
    term = X0Term(CLEAN, 2.0, weight="bbar").bind(counter, S)
    guided = ScoreGuided(counter, S, [term, ClassifierTerm(GM.classifier, None, 0.5)])
    out = guided(x, tt, {"y": y})
    assert counter.calls == 1
    _, b = S.gather(tt, x)
    g = term.grad(x, tt, {"y": y}) + ClassifierTerm(GM.classifier, None, 0.5).grad(x, tt, {"y": y})
    assert torch.allclose(out, GM.eps(x, tt, None) - b * g, rtol=1e-12, atol=1e-12)
    outside = ScoreGuided(counter, S, [term], interval=(0, 100))
    assert torch.equal(outside(x, tt, {"y": y}), GM.eps(x, tt, None))  # the interval still holds


def test_path_fixed_reuses_eps_only_from_its_own_model():
    x, tt, y = noisy_points(200, n=8)
    counter = Counting(NullBranch(GM))
    own = X0Term(CLEAN, 1.0, path="fixed").bind(counter, S)
    ScoreGuided(counter, S, [own])(x, tt, {"y": y})
    assert counter.calls == 1  # the eps of the step serves the term
    other = Counting(NullBranch(GM))
    foreign = X0Term(CLEAN, 1.0, path="fixed").bind(other, S)
    out = ScoreGuided(Conditioned(GM), S, [foreign])(x, tt, {"y": y})
    assert other.calls == 1  # a term bound to another model computes its own eps
    _, b = S.gather(tt, x)
    assert torch.allclose(out, GM.eps(x, tt, y) - b * foreign.grad(x, tt, {"y": y}), atol=1e-12)
