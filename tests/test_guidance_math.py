"""Guidance mathematics on an analytic Gaussian mixture (exact score, exact classifier, exact
conditional eps): classifier guidance (eqs 3-10, 18-19) and classifier-free guidance (eqs 20-24).

Statistical tolerances: with n samples the std error of a sample mean is std / sqrt(n), of a sample
covariance entry std((x_i - m_i)(x_j - m_j)) / sqrt(n); every comparison allows 5 standard errors,
plus the sampler's own discretisation allowance, relative to the scale sqrt(C_ii C_jj).  Those were
measured exactly on Gaussians of the same scales (see test_samplers.gaussian_output_law):
DDPM-1000 within 1.2% of the data, deterministic DDIM-100 within 4.4% (linear schedule).
"""

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from condiff.errors import CondiffError
from condiff.guidance import (ClassifierFree, ClassifierTerm, GradientTerm, MeanShift, NullBranch, ScoreGuided,
                              scaled_grad)
from condiff.samplers import noise, sample, sample_ddim, sample_ddpm
from condiff.schedule import cosine_schedule, linear_schedule
from condiff.toy import GaussianMixture
from helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)

F64 = torch.float64
LIN = linear_schedule()
N = 3000  # 1000 per class in the three-class runs
ALLOW_DDPM1000, ALLOW_DDIM100 = 0.02, 0.06

MEANS = [[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]]
COVS = [[[1.0, 0.0], [0.0, 0.5]], [[1.0, 0.3], [0.3, 0.6]], [[0.7, 0.0], [0.0, 0.7]]]


def separated(schedule=LIN):
    """Three well-separated anisotropic classes: true samples are assigned to their own class > 99.9%."""
    return GaussianMixture(MEANS, COVS, [0.5, 0.3, 0.2], schedule=schedule)


def overlapping(schedule=LIN):
    """Two overlapping classes, where guidance visibly changes p(x | y)."""
    return GaussianMixture([[-1.0, 0.0], [1.0, 0.0]], schedule=schedule)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def x_T(n=N, seed=1):
    return noise((n, 2), gen(seed), dtype=F64)


def labels(n=N):
    return torch.arange(n) % 3


def assert_moments(x, mean, cov, rel_allow=0.0):
    n = x.shape[0]
    c = x - x.mean(0)
    prod = c[:, :, None] * c[:, None, :]
    sd = cov.diagonal().sqrt()
    tol_m = 5 * c.std(0) / math.sqrt(n) + rel_allow * sd
    tol_c = 5 * prod.std(0) / math.sqrt(n) + rel_allow * sd[:, None] * sd[None]
    assert ((x.mean(0) - mean).abs() <= tol_m).all(), (x.mean(0), mean, tol_m)
    assert ((prod.mean(0) * n / (n - 1) - cov).abs() <= tol_c).all(), (torch.cov(x.T), cov, tol_c)


def assert_samples_class(gm, x, y, allow):
    """>= 99% of samples in the requested component, and per-class moments match that component."""
    assert float((gm.component_of(x) == y).double().mean()) >= 0.99
    for k in range(gm.K):
        assert_moments(x[y == k], *gm.moments(k), rel_allow=allow)


def mean_log_p_y(gm, x, y):
    """Mean of the exact clean-data log p(y | x_0) over samples."""
    return float(gm.class_log_prob(x).gather(1, torch.as_tensor(y).expand(x.shape[0])[:, None]).mean())


def random_points(n=64, seed=0):
    g = gen(seed)
    x = 4 * torch.randn(n, 2, generator=g, dtype=F64)
    t = torch.randint(0, LIN.T, (n,), generator=g)
    return x, t


# --- the toy itself is exact ----------------------------------------------------------------------------------------

def test_toy_densities_match_scipy():
    gm = separated()
    x, t = random_points(16)
    lp = gm.log_prob(x, t)
    lcp = gm.class_log_prob(x, t)
    for i in range(16):
        a, b = LIN.coefficients(int(t[i]))
        joint = [math.log(w) + scipy.stats.multivariate_normal(a * np.array(m), a * a * np.array(C)
                                                               + b * b * np.eye(2)).logpdf(x[i].numpy())
                 for w, m, C in zip([0.5, 0.3, 0.2], MEANS, COVS)]
        ref = scipy.special.logsumexp(joint)
        assert float(lp[i]) == pytest.approx(ref, rel=1e-10, abs=1e-10)
        assert torch.allclose(lcp[i], torch.tensor(joint, dtype=F64) - ref, atol=1e-9)
    # clean data: t = None uses the data density itself
    assert float(gm.log_prob(x[:1])) == pytest.approx(scipy.special.logsumexp(
        [math.log(w) + scipy.stats.multivariate_normal(m, C).logpdf(x[0].numpy())
         for w, m, C in zip([0.5, 0.3, 0.2], MEANS, COVS)]), rel=1e-10)


def test_toy_score_and_eps():
    gm = separated()
    x, t = random_points()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gm.log_prob(xg, t).sum(), xg)
    score = gm.score(x, t)
    assert torch.allclose(score, g, rtol=1e-9, atol=1e-12)
    bbar = LIN.bbar[t][:, None]
    eps = gm.eps(x, t)
    assert torch.allclose(eps, -bbar * score, rtol=1e-12, atol=1e-15)  # eq 18: score = -eps / bbar
    assert torch.equal(gm.eps(x, t, None), gm(x, t))
    assert torch.allclose(gm.eps(x, t, gm.null_cond(64)), eps, rtol=1e-12, atol=0)  # null class = unconditional
    # conditional eps: -bbar * grad log p_t(x | y) = -bbar * (score + grad log p(y | x_t)) (Bayes)
    for k in range(3):
        (gk,) = torch.autograd.grad(gm.class_log_prob(xg, t)[:, k].sum(), xg)
        assert torch.allclose(gm.eps(x, t, k), -bbar * (g + gk), rtol=1e-8, atol=1e-10)
    # a (B,) class tensor mixing classes and the null class picks row by row
    c = torch.tensor([0, 1, 2, 3] * 16)
    mixed = gm.eps(x, t, c)
    for k in range(4):
        assert torch.allclose(mixed[c == k], gm.eps(x[c == k], t[c == k], k if k < 3 else None), atol=1e-15)
    # one scalar t broadcasts over the batch
    assert torch.allclose(gm.eps(x, 500), gm.eps(x, torch.full((64,), 500)))


def test_toy_classifier_is_bayes():
    gm = separated()
    x, t = random_points()
    lcp = gm.class_log_prob(x, t)
    assert torch.allclose(lcp.exp().sum(1), torch.ones(64, dtype=F64), atol=1e-12)
    assert torch.equal(gm.classifier(x, t), lcp)
    # at t = T - 1 abar_t ~ 0.006: x_t ~ N(0, I) carries almost no information, p(y | x_t) ~ the prior weights
    # (log-odds change by ~ abar_t |m_k| |x| < 0.1); near t = 0 the data points are classified with certainty
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    far = gm.class_log_prob(torch.randn(64, 2, generator=gen(1), dtype=F64), LIN.T - 1).exp()
    assert ((far / w).log().abs() < 0.1).all()
    x0 = gm.sample(64, gen(2))
    assert (gm.class_log_prob(x0, 0).exp().max(1).values > 0.99).all()


def test_toy_sampling_and_assignment():
    gm = separated()
    x = gm.sample(20000, gen(0))
    # 20000 draws: 5 std errors
    assert_moments(x, *gm.moments())
    k = gm.component_of(x)
    counts = torch.bincount(k, minlength=3).double() / 20000
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    assert ((counts - w).abs() <= 5 * (w * (1 - w) / 20000).sqrt()).all()
    for c in range(3):
        xc = gm.sample(5000, gen(c + 1), component=c)
        assert_moments(xc, *gm.moments(c))
        assert float((gm.component_of(xc) == c).double().mean()) > 0.999
    assert torch.equal(gm.sample(5, gen(3)), gm.sample(5, gen(3)))


def test_toy_rejects_bad_input():
    with pytest.raises(CondiffError):
        GaussianMixture([1.0, 2.0], schedule=LIN)
    with pytest.raises(CondiffError):
        GaussianMixture([[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]], schedule=LIN)  # not positive definite
    with pytest.raises(CondiffError):
        GaussianMixture([[0.0, 0.0], [1.0, 1.0]], weights=[1.0, -1.0], schedule=LIN)
    gm = separated()
    x, t = random_points(4)
    for bad in (4, -1, torch.tensor([0, 1, 5, 2])):
        with pytest.raises(CondiffError):
            gm.eps(x, t, bad)
    assert torch.equal(gm.null_cond(3), torch.tensor([3, 3, 3]))


# --- classifier guidance (eqs 6-8, 18-19) ---------------------------------------------------------------------------

def test_score_guidance_with_exact_classifier_is_the_conditional_model():
    """eq 19 at gamma = 1: eps - bbar grad log p(y | x_t) = -bbar grad log p(x_t | y), exactly."""
    gm = separated()
    x, t = random_points()
    y = labels(64)
    guided = ScoreGuided(gm.eps, LIN, ClassifierTerm(gm.classifier, y))
    # ClassifierTerm evaluates log_softmax in float32: agreement to ~1e-7 relative
    assert torch.allclose(guided(x, t), gm.eps(x, t, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("at", ["x_t", "mu"])
def test_ddpm_mean_shift_samples_p_x_given_y(at):
    gm = separated()
    y = labels()
    xT = x_T()
    x = sample_ddpm(gm.eps, xT, LIN, 1000, generator=gen(2), mean_shift=MeanShift(ClassifierTerm(gm.classifier, y), at))
    assert_samples_class(gm, x, y, ALLOW_DDPM1000)
    # the mean shift (eq 6 / eq 7) is a first-order approximation of the exact conditional step; with the same
    # noise its trajectories end close to those of the exact conditional model
    exact = sample_ddpm(gm.eps, xT, LIN, 1000, generator=gen(2), cond=y)
    assert float((x - exact).abs().mean()) < 0.01 and float((x - exact).abs().max()) < 0.2


def test_ddim_score_guided_samples_p_x_given_y():
    gm = separated()
    y = labels()
    xT = x_T()
    x = sample_ddim(ScoreGuided(gm.eps, LIN, ClassifierTerm(gm.classifier, y)), xT, LIN, 100)
    assert_samples_class(gm, x, y, ALLOW_DDIM100)
    # deterministic and exact (eq 19): the same trajectories as the exact conditional model
    assert torch.allclose(x, sample_ddim(gm.eps, xT, LIN, 100, cond=y), atol=1e-5)


def test_unguided_sampling_does_not_hit_one_class():
    """Contrast for the tests above: without guidance the classes follow the weights 0.5/0.3/0.2."""
    gm = separated()
    x = sample_ddim(gm.eps, x_T(), LIN, 100)
    frac = torch.bincount(gm.component_of(x), minlength=3).double() / N
    assert ((frac - torch.tensor([0.5, 0.3, 0.2], dtype=F64)).abs() < 0.05).all()


@pytest.mark.parametrize("sharpen", [False, True])
def test_gamma_zero_is_unguided_sampling_exactly(sharpen):
    gm = separated()
    xT = x_T(256)
    term = ClassifierTerm(gm.classifier, 1, scale=0.0, sharpen=sharpen)
    plain = sample_ddpm(gm.eps, xT, LIN, 200, generator=gen(4))
    assert torch.equal(sample_ddpm(gm.eps, xT, LIN, 200, generator=gen(4), mean_shift=MeanShift(term)), plain)
    plain = sample_ddim(gm.eps, xT, LIN, 50, eta=0.5, generator=gen(4))
    assert torch.equal(sample_ddim(ScoreGuided(gm.eps, LIN, term), xT, LIN, 50, eta=0.5, generator=gen(4)), plain)


def _concentration(samples, gm, y):
    x = samples
    return mean_log_p_y(gm, x, y), float(torch.cov(x.T).trace())


@pytest.mark.parametrize("form", ["score-ddim50", "meanshift-ddpm200"])
def test_larger_gamma_concentrates_samples(form):
    """eq 8: p(x | y)^gamma-style sharpening: mean log p(y | x_0) rises and the spread falls with gamma."""
    gm = overlapping()
    xT = x_T(2000)
    stats = []
    for gamma in (1.0, 2.0, 4.0):
        term = ClassifierTerm(gm.classifier, 1, scale=gamma)
        if form == "score-ddim50":
            x = sample_ddim(ScoreGuided(gm.eps, LIN, term), xT, LIN, 50)
        else:
            x = sample_ddpm(gm.eps, xT, LIN, 200, generator=gen(3), mean_shift=MeanShift(term))
        stats.append(_concentration(x, gm, 1))
    lp, spread = zip(*stats)
    # measured: lp ~ -0.35, -0.1, -0.03 and spread ~ 1.8, 1.5, 1.3; the steps are many std errors wide
    assert lp[0] < lp[1] - 0.03 < lp[2] - 0.04, lp
    assert spread[0] > spread[1] + 0.1 > spread[2] + 0.2, spread


def _grads_log_p(gm, x, t):
    """Exact grad log p(k | x_t) = s_k - s for every k: (B, K, d), from per-component scores (no autograd)."""
    bbar = LIN.bbar[t][:, None]
    s_k = torch.stack([-gm.eps(x, t, k) / bbar for k in range(gm.K)], 1)
    return s_k - gm.score(x, t)[:, None]


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_sharpened_classifier_gradient_eq_10(gamma):
    """grad log softmax(gamma logits)_y = gamma grad log p(y|x) - grad log Z, Z = sum_k p(k|x)^gamma (eq 10)."""
    gm = overlapping()
    x = torch.randn(256, 2, generator=gen(0), dtype=F64)
    t = torch.randint(0, 400, (256,), generator=gen(1))
    y = 1
    sharp = ClassifierTerm(gm.classifier, y, scale=gamma, sharpen=True).grad(x, t)
    plain = ClassifierTerm(gm.classifier, y, scale=gamma).grad(x, t)
    G = _grads_log_p(gm, x, t)  # (B, K, d)
    q = torch.softmax(gamma * gm.class_log_prob(x, t), -1)  # the sharpened classifier p^gamma / Z
    grad_log_Z = (q[:, :, None] * gamma * G).sum(1)
    assert torch.allclose(plain, gamma * G[:, y], rtol=1e-5, atol=1e-6)
    assert torch.allclose(sharp, gamma * G[:, y] - grad_log_Z, rtol=1e-5, atol=1e-6)
    # and by autograd of log softmax(gamma * logits)_y in float64
    xg = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(torch.log_softmax(gamma * gm.classifier(xg, t), -1)[:, y].sum(), xg)
    assert torch.allclose(sharp, ref, rtol=1e-5, atol=1e-6)
    if gamma == 1.0:  # sum_k p(k|x) grad log p(k|x) = grad sum_k p(k|x) = 0: both forms agree
        assert torch.allclose(sharp, plain, rtol=1e-5, atol=1e-6)
    else:
        assert (sharp - plain).norm(dim=1).max() > 0.1


def test_mean_shift_gradient_location():
    """at='x_t' differentiates at x_t (eq 6), at='mu' at mu(x_t) (eq 7)."""
    c = torch.tensor([1.0, -2.0], dtype=F64)
    term = GradientTerm(lambda x, t, cond: -0.5 * ((x - c) ** 2).sum(1), scale=3.0)  # grad = 3 (c - x)
    x_t, mu = torch.randn(8, 2, generator=gen(0), dtype=F64), torch.randn(8, 2, generator=gen(1), dtype=F64)
    t = torch.full((8,), 10)
    assert torch.allclose(MeanShift(term)(x_t, t, mu), 3 * (c - x_t))
    assert torch.allclose(MeanShift(term, at="mu")(x_t, t, mu), 3 * (c - mu))
    assert torch.allclose(MeanShift([term, term], at="mu")(x_t, t, mu), 6 * (c - mu))
    with pytest.raises(CondiffError):
        MeanShift(term, at="x0")
    with pytest.raises(CondiffError):
        GradientTerm(lambda x, t, cond: x.sum(1), scale=-1.0)


# --- scaled_grad: the one gradient helper --------------------------------------------------------------------------

class TinyClassifier(torch.nn.Module):
    """logits = W [x, t/T] + b."""

    def __init__(self, K=3):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, K).double()

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None].to(x.dtype) / 1000], 1))


def test_scaled_grad_per_sample_no_parameter_grads_and_no_grad_mode():
    net = TinyClassifier()
    x = torch.randn(16, 2, generator=gen(0), dtype=F64)
    t = torch.randint(0, 1000, (16,), generator=gen(1))
    y = torch.arange(16) % 3
    fn = lambda x, t, cond=None: torch.log_softmax(net(x, t), -1).gather(1, y[:, None])[:, 0]  # noqa: E731
    g = scaled_grad(fn, x, t, 2.5)
    assert all(p.grad is None for p in net.parameters())
    assert not g.requires_grad and not x.requires_grad
    # per-sample: each row is that sample's own gradient (the batch sum separates)
    for i in range(16):
        xi = x[i:i + 1].clone().requires_grad_(True)
        lp = torch.log_softmax(net(xi, t[i:i + 1]), -1)[0, y[i]]
        (gi,) = torch.autograd.grad(lp, xi)
        assert torch.allclose(g[i], 2.5 * gi[0], rtol=1e-12, atol=1e-14)
    # analytic: grad_x log softmax(W x + ...)_y = W_y - sum_k softmax_k W_k (x-columns of W)
    W = net.lin.weight.detach()[:, :2]
    p = torch.softmax(net(x, t), -1).detach()
    assert torch.allclose(g, 2.5 * (W[y] - p @ W), rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        assert torch.equal(scaled_grad(fn, x, t, 2.5), g)
        # the classifier term inside a no_grad sampling loop
        term = ClassifierTerm(net, y, scale=2.5)
        assert torch.allclose(term.grad(x, t), g, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(CondiffError):
        scaled_grad(lambda x, t, cond: x, x, t)  # an objective must be one number per sample


def test_guided_sampling_leaves_no_parameter_grads():
    net = TinyClassifier(K=2)
    gm = overlapping()
    xT = x_T(32)
    sample_ddpm(gm.eps, xT, LIN, 20, generator=gen(0), mean_shift=MeanShift(ClassifierTerm(net, 1, scale=2.0)))
    sample_ddim(ScoreGuided(gm.eps, LIN, ClassifierTerm(net, 1, scale=2.0)), xT, LIN, 20)
    assert all(p.grad is None for p in net.parameters())


# --- classifier-free guidance (eqs 20-24) ---------------------------------------------------------------------------

def test_cfg_w0_samples_p_x_given_y():
    gm = separated()
    y = labels()
    x = sample_ddpm(ClassifierFree(gm, 0.0), x_T(), LIN, 1000, generator=gen(2), cond=y)
    assert_samples_class(gm, x, y, ALLOW_DDPM1000)


def test_cfg_w0_is_plain_conditional_sampling_exactly():
    gm = separated()
    xT = x_T(256)
    y = labels(256)
    for kw in (dict(variance="ddpm", steps=100), dict(variance="ddim", steps=30, eta=0.0)):
        a = sample(ClassifierFree(gm, 0.0), xT, LIN, cond=y, generator=gen(9), **kw)
        b = sample(gm.eps, xT, LIN, cond=y, generator=gen(9), **kw)
        assert torch.equal(a, b)
    spy = Spy(gm)
    ClassifierFree(spy, 0.0)(xT, torch.full((256,), 10), y)
    assert spy.calls == [256]  # w = 0 skips the null forward


@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
def test_cfg_is_classifier_guidance_with_gamma_1_plus_w(w):
    """eq 23-24 with the exact models: (1+w) eps(y) - w eps(phi) = eps - bbar (1+w) grad log p(y | x_t)."""
    gm = overlapping()
    x, t = random_points()
    y = torch.arange(64) % 2
    cfg = ClassifierFree(gm, w)(x, t, y)
    cg = ScoreGuided(gm.eps, LIN, ClassifierTerm(gm.classifier, y, scale=1 + w))(x, t)
    assert torch.allclose(cfg, cg, rtol=1e-5, atol=1e-6)


def test_larger_w_concentrates_samples():
    gm = overlapping()
    xT = x_T(2000)
    stats = [_concentration(sample_ddim(ClassifierFree(gm, w), xT, LIN, 50, cond=1), gm, 1) for w in (0.0, 1.0, 3.0)]
    lp, spread = zip(*stats)
    assert lp[0] < lp[1] - 0.03 < lp[2] - 0.04, lp
    assert spread[0] > spread[1] + 0.1 > spread[2] + 0.2, spread


class Spy:
    """Wraps the toy model, records batch sizes of its forwards; keeps null_cond."""

    def __init__(self, gm):
        self.gm, self.calls = gm, []

    def __call__(self, x, t, cond=None):
        self.calls.append(x.shape[0])
        return self.gm.eps(x, t, cond)

    def null_cond(self, batch, device=None):
        return self.gm.null_cond(batch, device)


def test_cfg_one_batched_forward_equals_two_separate():
    gm = separated()
    x, t = random_points()
    y = labels(64)
    spy = Spy(gm)
    w = 2.5
    out = ClassifierFree(spy, w)(x, t, y)
    assert spy.calls == [128]
    e_c, e_u = gm.eps(x, t, y), gm.eps(x, t, None)
    assert torch.allclose(out, (1 + w) * e_c - w * e_u, rtol=1e-12, atol=1e-12)
    # an int condition is broadcast
    assert torch.allclose(ClassifierFree(gm, w)(x, t, 2), (1 + w) * gm.eps(x, t, 2) - w * e_u, rtol=1e-12, atol=1e-12)


def test_cfg_interval():
    gm = separated()
    x, t = random_points()
    y = labels(64)
    lo, hi = 200, 700
    out = ClassifierFree(gm, 2.0, interval=(lo, hi))(x, t, y)
    full = ClassifierFree(gm, 2.0)(x, t, y)
    e_c = gm.eps(x, t, y)
    inside = (t >= lo) & (t <= hi)
    assert 0 < int(inside.sum()) < 64
    assert torch.allclose(out[~inside], e_c[~inside], rtol=1e-12, atol=1e-12)
    assert torch.allclose(out[inside], full[inside], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[inside], e_c[inside])
    # entirely outside: the null forward is skipped
    spy = Spy(gm)
    t_out = torch.full((64,), 900)
    assert torch.allclose(ClassifierFree(spy, 2.0, interval=(lo, hi))(x, t_out, y), gm.eps(x, t_out, y))
    assert spy.calls == [64]


def test_cfg_rescale():
    gm = separated()
    x, t = random_points()
    y = labels(64)
    w = 3.0
    plain = ClassifierFree(gm, w)(x, t, y)
    assert torch.equal(ClassifierFree(gm, w, rescale=0.0)(x, t, y), plain)
    full = ClassifierFree(gm, w, rescale=1.0)(x, t, y)
    e_c = gm.eps(x, t, y)
    # phi = 1: the guided eps rescaled to the per-sample std of the conditional eps, same direction
    assert torch.allclose(full.std(1), e_c.std(1), rtol=1e-10)
    assert torch.allclose(full * plain.std(1, keepdim=True), plain * e_c.std(1, keepdim=True), rtol=1e-9, atol=1e-12)
    half = ClassifierFree(gm, w, rescale=0.3)(x, t, y)
    assert torch.allclose(half, 0.3 * full + 0.7 * plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(w=-0.5), dict(w=float("nan")), dict(w=float("inf")), dict(w="two"),
                                dict(w=1.0, rescale=1.5), dict(w=1.0, rescale=-0.1), dict(w=1.0, interval=(700, 200))])
def test_cfg_bad_arguments_raise(kw):
    with pytest.raises(CondiffError):
        ClassifierFree(separated(), **kw)


def test_cfg_needs_condition_and_null():
    gm = separated()
    x, t = random_points(4)
    with pytest.raises(CondiffError):
        ClassifierFree(gm, 1.0)(x, t, None)
    with pytest.raises(CondiffError):
        ClassifierFree(gm.eps, 1.0)  # a bare function has no null condition
    with pytest.raises(CondiffError):
        NullBranch(lambda x, t, c: x)


def test_null_branch_is_the_unconditional_model():
    gm = separated(cosine_schedule())
    x, t = random_points()
    assert torch.allclose(NullBranch(gm)(x, t, 1), gm.eps(x, t), rtol=1e-12, atol=0)
