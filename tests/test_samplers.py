"""Samplers against ground truth: exact scores of Gaussians and Gaussian mixtures (d = 2).

Statistical tolerances: with n samples the std error of a sample mean is std / sqrt(n), and of a
sample covariance entry std((x_i - m_i)(x_j - m_j)) / sqrt(n) (estimated from the samples); every
comparison allows 5 standard errors (a two-sided 5-sigma event has probability ~6e-7), plus, where
stated, an allowance for the sampler's own discretisation error, measured exactly on a Gaussian.
"""

import math

import pytest
import torch

from condiff.errors import CondiffError
from condiff.samplers import noise, sample, sample_ddim, sample_ddpm
from condiff.schedule import cosine_schedule, linear_schedule, respace
from condiff.toy import GaussianMixture
from helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)

F64 = torch.float64
LIN = linear_schedule()
COS = cosine_schedule()
N = 4000


def mixture(schedule):
    """Two overlapping, anisotropic, unequally weighted components."""
    return GaussianMixture([[-2.0, 0.5], [1.5, -1.0]], [[[0.5, 0.2], [0.2, 0.3]], [[0.8, -0.3], [-0.3, 0.6]]],
                           [0.3, 0.7], schedule=schedule)


def gaussian(schedule):
    return GaussianMixture([[1.0, -0.5]], [[[0.6, 0.25], [0.25, 0.4]]], schedule=schedule)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def x_T(n=N, seed=1):
    return noise((n, 2), gen(seed), dtype=F64)


def assert_moments(x, mean, cov, rel_allow=0.0):
    """Sample mean/covariance within 5 std errors (+ rel_allow * the scale sqrt(C_ii C_jj)) of (mean, cov)."""
    n = x.shape[0]
    m_hat = x.mean(0)
    c = x - m_hat
    prod = c[:, :, None] * c[:, None, :]
    c_hat = prod.mean(0) * n / (n - 1)
    scale = torch.sqrt(torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :])
    tol_m = 5 * c.std(0) / math.sqrt(n) + rel_allow * torch.diagonal(cov).sqrt()
    tol_c = 5 * prod.std(0) / math.sqrt(n) + rel_allow * scale
    assert ((m_hat - mean).abs() <= tol_m).all(), f"mean {m_hat.tolist()} vs {mean.tolist()} (tol {tol_m.tolist()})"
    assert ((c_hat - cov).abs() <= tol_c).all(), f"cov {c_hat.tolist()} vs {cov.tolist()} (tol {tol_c.tolist()})"


def gaussian_output_law(gm, schedule, steps, variance, eta=0.0):
    """Exact law of the sampler's output for Gaussian data N(m, C) and x_T ~ N(0, I).

    With the exact eps the reverse step is affine in z = x - abar m along each eigenvector of C
    (eigenvalue c): eps = bbar z / (abar^2 c + bbar^2), so z_s = k z_t + sigma xi, with k from the
    article's formulas: eq 21 mean (x_t - beta^2/bbar_t eps)/alpha for DDPM, and DDIM's
    abar_s x0 + sqrt(bbar_s^2 - sigma^2) eps.  Mean and variance follow the recursion exactly.
    """
    m, C = gm.moments()
    lam, Q = torch.linalg.eigh(C)
    a_T = schedule.coefficients(respace(schedule, steps)[0])[0]
    mean_z, var_z = -a_T * (Q.T @ m), torch.ones(2, dtype=F64)  # z_T = x_T - abar_T m in eigen-coordinates
    ts = respace(schedule, steps)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, b_t = schedule.coefficients(t)
        a_s, b_s = schedule.coefficients(s)
        alpha2 = (a_t / a_s) ** 2
        beta2 = 1 - alpha2
        e = b_t / (a_t**2 * lam + b_t**2)  # eps = e * z
        post = beta2 * b_s**2 / b_t**2
        if variance == "ddim":
            sig2 = eta**2 * post
            k = a_s * (1 - b_t * e) / a_t + math.sqrt(max(b_s**2 - sig2, 0.0)) * e
        else:
            sig2 = post if variance == "ddpm" else (beta2 if b_s > 0 else 0.0)
            k = (1 - beta2 / b_t * e) / math.sqrt(alpha2)  # eq 21
        mean_z, var_z = k * mean_z, k**2 * var_z + sig2
    return m + Q @ mean_z, Q @ torch.diag(var_z) @ Q.T


# --- Gaussian data: the sampler's output law is known exactly -------------------------------------

@pytest.mark.parametrize("schedule", [LIN, COS], ids=["linear", "cosine"])
@pytest.mark.parametrize("steps,variance", [(1000, "ddpm"), (1000, "ddpm-beta"), (50, "ddim")])
def test_gaussian_exact_output_law(schedule, steps, variance):
    gm = gaussian(schedule)
    mean, cov = gaussian_output_law(gm, schedule, steps, variance)
    x = sample(gm.eps, x_T(), schedule, steps, variance=variance, generator=gen(2))
    assert x.dtype == F64 and x.shape == (N, 2)
    assert_moments(x, mean, cov)  # no allowance: this is the sampler's exact law
    # the law itself is close to the data, relative to the scale sqrt(C_ii C_jj): DDPM-1000 within 2%
    # (measured: 1.3% linear, 0.7% cosine), deterministic DDIM-50 within 10% (measured: 9.1%, 5.4%)
    m, C = gm.moments()
    sd = C.diagonal().sqrt()
    allow = 0.02 if steps == 1000 else 0.10
    assert ((mean - m).abs() / sd).max() < allow and ((cov - C).abs() / (sd[:, None] * sd[None])).max() < allow


def test_ddim_discretisation_error_shrinks_with_steps():
    gm = gaussian(LIN)
    _, C = gm.moments()
    errs = [float((gaussian_output_law(gm, LIN, k, "ddim")[1] - C).abs().max()) for k in (25, 50, 100, 250, 1000)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01


# --- mixtures -----------------------------------------------------------------------------------

# Discretisation allowances, justified by the exact Gaussian laws above (same schedule, same scales):
# DDPM-1000 is within 2% of the data, deterministic DDIM-50 shrinks variances by up to 10%.
@pytest.mark.parametrize("steps,variance,allow", [(1000, "ddpm", 0.02), (1000, "ddpm-beta", 0.02), (50, "ddim", 0.10)])
def test_mixture_moments(steps, variance, allow):
    gm = mixture(LIN)
    x = sample(gm.eps, x_T(), LIN, steps, variance=variance, generator=gen(2))
    mean, cov = gm.moments()
    assert_moments(x, mean, cov, rel_allow=allow)
    # the mixture weights are reproduced: the fraction assigned to component 0 by maximum posterior
    # matches that of 200000 exact data draws (binomial std error sqrt(p(1 - p) / n) for both)
    frac = float((gm.component_of(x) == 0).double().mean())
    ref = float((gm.component_of(gm.sample(200_000, gen(8))) == 0).double().mean())
    assert abs(ref - 0.3) < 0.02  # the components overlap a little: ~1% of data lies across the boundary
    assert abs(frac - ref) < 5 * math.sqrt(ref * (1 - ref) * (1 / N + 1 / 200_000))


def test_mixture_moments_wrong_score_fails():
    """Sanity of the tolerance: the same check rejects a model with a 10% wrong score."""
    gm = mixture(LIN)
    x = sample(lambda x, t, c: 1.1 * gm.eps(x, t), x_T(), LIN, 50, generator=gen(2))
    mean, cov = gm.moments()
    with pytest.raises(AssertionError):
        assert_moments(x, mean, cov, rel_allow=0.10)


def test_wrappers_match_sample():
    gm = mixture(COS)
    xT = x_T(64)
    a = sample_ddpm(gm.eps, xT, COS, 100, generator=gen(3))
    b = sample(gm.eps, xT, COS, 100, variance="ddpm", generator=gen(3))
    assert torch.equal(a, b)
    a = sample_ddim(gm.eps, xT, COS, 20, eta=0.5, generator=gen(3))
    b = sample(gm.eps, xT, COS, 20, variance="ddim", eta=0.5, generator=gen(3))
    assert torch.equal(a, b)


# --- determinism and equivalences --------------------------------------------------------------------

def test_ddim_eta0_is_deterministic():
    gm = mixture(LIN)
    xT = x_T(256)
    a = sample_ddim(gm.eps, xT, LIN, 50, generator=gen(0))
    b = sample_ddim(gm.eps, xT.clone(), LIN, 50, generator=gen(123))  # no noise is drawn at eta = 0
    c = sample_ddim(gm.eps, xT, LIN, 50)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, sample_ddim(gm.eps, x_T(256, seed=9), LIN, 50))


@pytest.mark.parametrize("variance,eta", [("ddpm", 0.0), ("ddpm-beta", 0.0), ("ddim", 0.3)])
def test_same_seed_same_samples(variance, eta):
    gm = mixture(LIN)
    xT = x_T(128)
    a = sample(gm.eps, xT, LIN, 100, variance=variance, eta=eta, generator=gen(5))
    b = sample(gm.eps, xT, LIN, 100, variance=variance, eta=eta, generator=gen(5))
    c = sample(gm.eps, xT, LIN, 100, variance=variance, eta=eta, generator=gen(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("schedule", [LIN, COS], ids=["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 37, [999, 700, 350, 20, 3, 0]], ids=["1000", "37", "list"])
def test_ddim_eta1_equals_ddpm_posterior_variance(schedule, steps):
    """DDIM with eta = 1 (abar_s x0 + sqrt(bbar_s^2 - sigma^2) eps) and DDPM's posterior mean
    (q(x_s | x_t, x0)) are different formulas for the same step; same noise draws, same samples."""
    gm = mixture(schedule)
    xT = x_T(64)
    a = sample_ddim(gm.eps, xT, schedule, steps, eta=1.0, generator=gen(7))
    b = sample_ddpm(gm.eps, xT, schedule, steps, variance="ddpm", generator=gen(7))
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    # and they differ from DDPM with sigma^2 = beta^2 (a different reverse variance)
    c = sample_ddpm(gm.eps, xT, schedule, steps, variance="ddpm-beta", generator=gen(7))
    assert not torch.allclose(a, c, atol=1e-3)


# --- one reverse step, by the article's formulas -------------------------------------------------------

def _one_step(model, x, schedule, t, s, variance, eta=0.0, seed=11):
    """x after the first step t -> s of a chain [t, s], and the noise z that step drew."""
    seen = []
    sample(model, x, schedule, [t, s], variance=variance, eta=eta, generator=gen(seed),
           callback=lambda d: seen.append(d["x"].clone()))
    z = torch.randn(x.shape, generator=gen(seed), dtype=x.dtype)
    return seen[0], z


@pytest.mark.parametrize("t,s", [(500, 499), (10, 9), (1, 0), (999, 600), (300, 17)])
@pytest.mark.parametrize("variance,eta", [("ddpm", 0.0), ("ddpm-beta", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_one_step_mean_and_variance(t, s, variance, eta):
    gm = mixture(COS)
    x = 1.5 * x_T(32)
    tt = torch.full((32,), t)
    eps = gm.eps(x, tt)
    a_t, b_t = COS.coefficients(t)
    a_s, b_s = COS.coefficients(s)
    alpha = a_t / a_s  # the (respaced) step's alpha_{t|s}
    beta2 = 1 - alpha**2
    x_s, z = _one_step(gm.eps, x, COS, t, s, variance, eta)
    post = beta2 * b_s**2 / b_t**2  # variance of q(x_s | x_t, x_0)
    if variance == "ddim":
        sig2 = eta**2 * post
        x0 = (x - b_t * eps) / a_t
        mu = a_s * x0 + math.sqrt(b_s**2 - sig2) * eps
    else:
        sig2 = post if variance == "ddpm" else beta2
        mu = (x - beta2 / b_t * eps) / alpha  # eq 21
    assert torch.allclose(x_s, mu + math.sqrt(sig2) * z, rtol=1e-10, atol=1e-10)


def test_mean_shift_adds_sigma2_times_g():
    """The mean-shift hook (eqs 6-8): mu + sigma_t^2 g, with the posterior sigma_t^2 of the step."""
    gm = mixture(LIN)
    x = x_T(16)
    g = torch.tensor([[0.7, -2.0]], dtype=F64)
    calls = []

    def shift(x_t, t, mu, cond):
        calls.append((x_t, t, mu, cond))
        return g.expand_as(x_t)

    out = []
    for ms in (None, shift):
        seen = []
        sample(lambda x, t, c: gm.eps(x, t), x, LIN, [400, 390], variance="ddpm", generator=gen(0), mean_shift=ms, cond="c",
               callback=lambda d: seen.append(d["x"]))
        out.append(seen[0])
    a_t, b_t = LIN.coefficients(400)
    a_s, b_s = LIN.coefficients(390)
    sig2 = (1 - (a_t / a_s) ** 2) * b_s**2 / b_t**2
    assert torch.allclose(out[1] - out[0], sig2 * g.expand_as(x), rtol=1e-9, atol=1e-15)
    assert len(calls) == 1  # the final step (sigma = 0) applies no shift
    x_t, t, mu, cond = calls[0]
    assert torch.equal(x_t, x) and (t == 400).all() and cond == "c"
    assert torch.allclose(mu, (x - (1 - (a_t / a_s) ** 2) / b_t * gm.eps(x, t)) / (a_t / a_s))  # eq 21


# --- options and errors -------------------------------------------------------------------------------------

def test_clip_x0():
    x = x_T(64) * 3
    wild = lambda x, t, c: -5.0 * x  # noqa: E731  predicts |x0| far above 1
    seen = []
    out = sample(wild, x, LIN, 20, clip_x0=1.0, callback=seen.append)
    prev = x
    for d in seen:
        a, b = LIN.coefficients(d["t"])
        assert d["x0"].abs().max() <= 1.0
        assert torch.allclose(prev, a * d["x0"] + b * d["eps"])  # eps recomputed from the clipped x0
        prev = d["x"]
    assert out.abs().max() <= 1.0 and torch.equal(out, seen[-1]["x0"])
    assert sample(wild, x, LIN, 20).abs().max() > 10  # without clipping it explodes


def test_callback_keys_and_order():
    gm = mixture(LIN)
    seen = []
    out = sample(gm.eps, x_T(8), LIN, 25, variance="ddpm", generator=gen(0), callback=seen.append)
    assert all(set(d) == {"i", "t", "x", "x0", "eps"} for d in seen)
    assert [d["i"] for d in seen] == list(range(25))
    assert [d["t"] for d in seen] == respace(LIN, 25)
    assert all(d["x"].shape == (8, 2) and d["eps"].shape == (8, 2) for d in seen)
    assert torch.equal(seen[-1]["x"], out)


def test_cond_is_passed_to_the_model():
    gm = mixture(LIN)
    xT = x_T(16)
    a = sample_ddim(gm.eps, xT, LIN, 10, cond=1)
    b = sample_ddim(lambda x, t, c: gm.eps(x, t, 1), xT, LIN, 10)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(variance="ddpm2"), dict(variance=None), dict(eta=-0.1),
                                dict(eta=float("nan")), dict(eta=float("inf"))])
def test_bad_arguments_raise(kw):
    gm = mixture(LIN)
    with pytest.raises(CondiffError):
        sample(gm.eps, x_T(4), LIN, 10, **kw)


def test_bad_wrapper_arguments_raise():
    gm = mixture(LIN)
    with pytest.raises(CondiffError):
        sample_ddpm(gm.eps, x_T(4), LIN, 10, variance="ddim")
    with pytest.raises(CondiffError):
        sample_ddim(gm.eps, x_T(4), LIN, 10, eta=-1)
    with pytest.raises(CondiffError):
        sample(gm.eps, x_T(4), LIN, 1001)


def test_noise_is_reproducible():
    a = noise((3, 2), gen(4), dtype=F64)
    assert torch.equal(a, noise((3, 2), gen(4), dtype=F64)) and a.dtype == F64
    assert not torch.equal(a, noise((3, 2), gen(5), dtype=F64))


# --- seeded regression: DDPM and DDIM outputs pinned before the solver refactor (issue 15) ------------------

# Computed with the sampler of commit 5716f4c (one generic loop) on the mixture above, x_T from seed 5,
# step noise from seed 17; printed with 12 significant digits.  DDIM(eta = 1) equals DDPM (posterior).
PINNED = {
    "linear": {
        "ddpm": [[1.57939072664, -0.306754949903], [-1.63550979545, 0.761837045827], [0.657031680582, -1.66737273933]],
        "ddpm-beta": [[1.59647832624, -0.111158191239], [-1.52201318005, 0.702842524834],
                      [0.391435198229, -2.17830510437]],
        "ddim-eta0": [[0.549117922508, -0.959324320792], [-1.38429280105, 0.637977716773],
                      [-1.1262674135, 1.29336816422]],
        "ddim-eta1": [[1.57939072664, -0.306754949903], [-1.63550979545, 0.761837045827],
                      [0.657031680582, -1.66737273933]],
        "ddim-eta0-clip": [[0.494079449089, -0.5], [-0.5, 0.418163581596], [-0.499185971604, 0.5]],
        "ddpm-clip": [[0.120429072283, 0.362488786434], [0.5, -0.486043554354], [0.450047308579, -0.48957470217]],
    },
    "cosine": {
        "ddpm": [[1.19377610829, 0.0345975528848], [1.14495255473, -0.337813435151], [1.37712724186, -1.82617772327]],
        "ddpm-beta": [[1.25087363826, 0.177793287205], [1.15648862591, -0.283088864451],
                      [1.21197207591, -2.12408857743]],
        "ddim-eta0": [[0.544974180293, -0.987730944464], [-1.36813457899, 0.641903042439],
                      [-1.09552188409, 1.33843550572]],
        "ddim-eta1": [[1.19377610829, 0.0345975528848], [1.14495255473, -0.337813435151],
                      [1.37712724186, -1.82617772327]],
        "ddim-eta0-clip": [[0.441576834214, -0.5], [-0.5, 0.458420899763], [-0.497905553132, 0.5]],
        "ddpm-clip": [[-0.30101578334, 0.5], [0.5, -0.478401758869], [0.439400833507, -0.483838017327]],
    },
}


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_ddim_outputs_are_pinned(name):
    sched = LIN if name == "linear" else cosine_schedule(200)
    gm = mixture(sched)
    xT = noise((3, 2), gen(5), dtype=F64)
    runs = {
        "ddpm": sample_ddpm(gm.eps, xT, sched, 20, variance="ddpm", generator=gen(17)),
        "ddpm-beta": sample_ddpm(gm.eps, xT, sched, 20, variance="ddpm-beta", generator=gen(17)),
        "ddim-eta0": sample_ddim(gm.eps, xT, sched, 20, generator=gen(17)),
        "ddim-eta1": sample_ddim(gm.eps, xT, sched, 20, eta=1.0, generator=gen(17)),
        "ddim-eta0-clip": sample_ddim(gm.eps, xT, sched, 7, clip_x0=0.5, generator=gen(17)),
        "ddpm-clip": sample_ddpm(gm.eps, 3 * xT, sched, 7, clip_x0=0.5, generator=gen(17)),
    }
    for key, x in runs.items():
        assert torch.allclose(x, torch.tensor(PINNED[name][key], dtype=F64), rtol=0, atol=1e-10), key
