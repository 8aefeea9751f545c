"""Schedules in the article's notation (abar_t, bbar_t) and step respacing."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condiff.errors import CondiffError
from condiff.schedule import SPACINGS, Schedule, cosine_schedule, linear_schedule, make_schedule, respace

SCHEDULES = [linear_schedule(), cosine_schedule(), linear_schedule(50, 1e-3, 0.05), cosine_schedule(20)]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"{s.name}-{s.T}")
def test_abar_bbar_alpha_beta_identities(s):
    assert s.abar.dtype == torch.float64
    assert torch.allclose(s.abar**2 + s.bbar**2, torch.ones(s.T, dtype=torch.float64), atol=1e-15, rtol=0)
    assert torch.allclose(s.alpha**2 + s.beta**2, torch.ones(s.T, dtype=torch.float64), atol=1e-15, rtol=0)
    # strictly decreasing abar, increasing bbar, all inside (0, 1)
    assert (s.abar[1:] < s.abar[:-1]).all() and (s.bbar[1:] > s.bbar[:-1]).all()
    assert (s.abar > 0).all() and (s.abar < 1).all() and (s.bbar > 0).all()
    # one step at a time: x_t = alpha_t x_{t-1} + beta_t eps_t composes to abar_t
    assert torch.allclose(torch.cumprod(s.alpha, 0), s.abar, rtol=1e-12, atol=0)
    # coefficients(-1) is the clean image, coefficients(t) matches the tensors
    assert s.coefficients(-1) == (1.0, 0.0)
    for t in (0, s.T // 2, s.T - 1):
        a, b = s.coefficients(t)
        assert a == pytest.approx(float(s.abar[t]), rel=1e-15)
        assert b == pytest.approx(float(s.bbar[t]), rel=1e-12)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"{s.name}-{s.T}")
def test_alphas_cumprod_round_trip(s):
    ac = s.alphas_cumprod()
    assert torch.allclose(ac, s.abar**2, rtol=1e-15, atol=0)
    back = Schedule.from_alphas_cumprod(ac.numpy())  # also accepts numpy
    assert torch.allclose(back.abar, s.abar, rtol=1e-14, atol=0)
    # diffusers' betas are the article's beta_t^2: 1 - ac_t / ac_{t-1}
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    assert torch.allclose(s.beta**2, betas, rtol=1e-9, atol=1e-15)
    assert torch.allclose(s.betas(), betas, rtol=1e-9, atol=1e-15)  # the conversion diffusers schedulers take
    assert torch.allclose(Schedule.from_betas(betas).abar, s.abar, rtol=1e-12, atol=0)


def test_linear_schedule_closed_form():
    # DDPM (Ho et al. 2020): betas = linspace(1e-4, 0.02, T), alphas_cumprod = cumprod(1 - betas)
    for T, b0, b1 in [(1000, 1e-4, 0.02), (10, 1e-3, 0.2)]:
        ac = np.cumprod(1 - np.linspace(b0, b1, T))
        s = linear_schedule(T, b0, b1)
        np.testing.assert_allclose(s.alphas_cumprod().numpy(), ac, rtol=1e-13)
        np.testing.assert_allclose(s.abar.numpy(), np.sqrt(ac), rtol=1e-13)
    s = linear_schedule()
    assert float(s.abar[-1] ** 2) == pytest.approx(4.04e-5, rel=0.01)  # the well-known abar_T^2 of DDPM


def test_cosine_schedule_closed_form():
    # Nichol & Dhariwal: alphas_cumprod[t] = f(t + 1) / f(0), f(u) = cos^2((u/T + s)/(1 + s) pi/2),
    # with each beta clipped at 0.999 (only the last step, where f(T) = 0, is clipped).
    T, s0 = 1000, 0.008
    f = lambda u: math.cos((u / T + s0) / (1 + s0) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    ac = cosine_schedule(T).alphas_cumprod().numpy()
    np.testing.assert_allclose(ac[:-1], expected[:-1], rtol=1e-12)
    assert ac[-1] == pytest.approx(ac[-2] * (1 - 0.999), rel=1e-12)
    # without clipping the last beta would be 1 and abar_T = 0, outside (0, 1)
    assert expected[-1] < 1e-30


def test_make_schedule_and_config_round_trip():
    for s in SCHEDULES:
        c = s.config()
        again = make_schedule(c["name"], c["T"], c["params"])
        assert torch.equal(again.abar, s.abar)
    with pytest.raises(CondiffError):
        make_schedule("sigmoid")


@pytest.mark.parametrize("abar", [[], [0.9, 0.95], [1.0, 0.5], [0.9, 0.0], [0.9, float("nan")], [0.5, -0.1]])
def test_bad_schedules_raise(abar):
    with pytest.raises(CondiffError):
        Schedule(torch.tensor(abar, dtype=torch.float64))


@pytest.mark.parametrize("T", [0, -3, 2.5])
def test_bad_T_raises(T):
    with pytest.raises(CondiffError):
        linear_schedule(T)
    with pytest.raises(CondiffError):
        cosine_schedule(T)


@settings(max_examples=150, deadline=None)
@given(T=st.integers(2, 1000), data=st.data())
def test_respace_count(T, data):
    s = linear_schedule(T)
    K = data.draw(st.integers(2, T))
    ts = respace(s, K)
    assert len(ts) == K
    assert ts[0] == T - 1 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    # evenly spaced: gaps differ by at most one (rounding of linspace)
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    assert max(gaps) - min(gaps) <= 1


def test_respace_edge_counts():
    s = linear_schedule(100)
    assert respace(s) == list(range(99, -1, -1))
    assert respace(s, 100) == list(range(99, -1, -1))
    assert respace(s, 1) == [99]
    assert respace(s, 2) == [99, 0]
    # evenly spaced over [0, T-1] and rounded to the nearest step (not truncated)
    big = linear_schedule(1000)
    assert respace(big, 4) == [999, 666, 333, 0]
    assert respace(big, 3) == [999, 500, 0]  # 499.5 -> 500
    assert respace(big, 7) == [999, 832, 666, 500, 333, 166, 0]  # 166.5 -> 166 and 832.5 -> 832 (half to even)
    for bad in (0, -1, 101):
        with pytest.raises(CondiffError):
            respace(s, bad)


def test_respace_explicit_lists():
    s = linear_schedule(100)
    assert respace(s, [0, 50, 99, 10]) == [99, 50, 10, 0]
    assert respace(s, (5,)) == [5]
    for bad in ([], [100], [-1, 5], [3, 3], [0, 50, 50], list(range(101))):
        with pytest.raises(CondiffError):
            respace(s, bad)


@pytest.mark.parametrize("s", SCHEDULES[:2], ids=lambda s: s.name)
@pytest.mark.parametrize("steps", [1, 7, 50, [999, 500, 3], [640, 0]])
def test_respacing_keeps_the_marginals(s, steps):
    """Chaining the respaced forward steps x_t = alpha_{t|s} x_s + beta_{t|s} eps from x_0
    (alpha_{t|s} = abar_t / abar_s, beta^2 = 1 - alpha^2) reproduces q(x_t | x_0) = N(abar_t x_0, bbar_t^2)
    at every kept t: the mean coefficient is abar_t and the accumulated noise variance bbar_t^2."""
    ts = respace(s, steps)
    chain = [-1] + ts[::-1]  # forward order, starting from the clean image
    mean_coef, noise_var = 1.0, 0.0
    for u, t in zip(chain, chain[1:]):
        alpha = s.coefficients(t)[0] / s.coefficients(u)[0]
        mean_coef, noise_var = alpha * mean_coef, alpha**2 * noise_var + (1 - alpha**2)
        assert mean_coef == pytest.approx(float(s.abar[t]), rel=1e-12)
        assert noise_var == pytest.approx(float(s.bbar[t]) ** 2, rel=1e-10)
    # and by simulation through Schedule.add_noise at the first kept step
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 2.0, dtype=torch.float64)
    x = x0
    for u, t in zip(chain, chain[1:]):
        alpha = s.coefficients(t)[0] / s.coefficients(u)[0]
        x = alpha * x + math.sqrt(1 - alpha**2) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = ts[0]
    direct = s.add_noise(x0, torch.full((20000,), t), torch.randn(x.shape, generator=g, dtype=torch.float64))
    # n = 20000: the sample mean has std error bbar_t / sqrt(n) < 0.0071; allow 5 of them
    for z in (x, direct):
        assert float(z.mean()) == pytest.approx(2 * float(s.abar[t]), abs=5 * float(s.bbar[t]) / math.sqrt(2e4))
        assert float(z.var()) == pytest.approx(float(s.bbar[t]) ** 2, abs=5 * math.sqrt(2 / 2e4) * float(s.bbar[t]) ** 2)


# --- step spacings (issue 15) ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(T=st.integers(2, 400), spacing=st.sampled_from(SPACINGS), cosine=st.booleans(), data=st.data())
def test_every_spacing_gives_k_distinct_decreasing_steps(T, spacing, cosine, data):
    s = cosine_schedule(T) if cosine else linear_schedule(T)
    K = data.draw(st.integers(1, T))
    ts = respace(s, K, spacing)
    assert len(ts) == K and all(a > b for a, b in zip(ts, ts[1:]))
    assert 0 <= ts[-1] and ts[0] <= T - 1
    if spacing in ("linspace", "trailing", "lambda", "karras"):
        assert ts[0] == T - 1  # they start from the noisiest step
    if spacing in ("linspace", "leading", "lambda", "karras") and K > 1:
        assert ts[-1] == 0  # and end at the least noisy one before the clean image


def test_leading_and_trailing_values():
    s = linear_schedule(1000)
    assert respace(s, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert respace(s, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert respace(s, 3, "trailing") == [999, 666, 332]  # round(1000 - i * 1000/3) - 1
    assert respace(s, 1, "leading") == [0] and respace(s, 1, "trailing") == [999]


@pytest.mark.parametrize("spacing", ["lambda", "karras"])
def test_continuous_spacings_hit_their_targets(spacing):
    """Uniform in lambda_t = log(abar_t / bbar_t), or Karras' rho = 7 ramp in sigma_t = bbar_t / abar_t: each
    kept step is the integer timestep nearest to its target (nearest in lambda = -log sigma)."""
    s = linear_schedule(1000)
    K = 12
    ts = respace(s, K, spacing)
    lam = s.lambdas
    assert torch.allclose(lam, (s.abar / s.bbar).log()) and (lam[1:] < lam[:-1]).all()
    lo, hi = float(lam[-1]), float(lam[0])
    if spacing == "lambda":
        targets = [lo + (hi - lo) * i / (K - 1) for i in range(K)]
    else:
        smax, smin = math.exp(-lo), math.exp(-hi)
        targets = [-7 * math.log(smax ** (1 / 7) + i / (K - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) for i in range(K)]
    for t, target in zip(ts, targets):
        best = float((lam - target).abs().min())
        assert abs(float(lam[t]) - target) == pytest.approx(best, abs=1e-12)
    gaps = [float(lam[b] - lam[a]) for a, b in zip(ts, ts[1:])]
    if spacing == "lambda":  # uniform: every gap (hi - lo)/(K - 1) up to the snapping
        assert max(abs(g - (hi - lo) / (K - 1)) for g in gaps) < 0.1 * (hi - lo) / (K - 1)


def test_snapping_keeps_the_count_where_targets_collide():
    """The cosine schedule's clipped last beta puts lambda_{T-1} far below lambda_{T-2}: uniform-lambda targets
    crowd at t = T-1 and snap to the same step; the clash moves to the next free timestep."""
    s = cosine_schedule(1000)
    ts = respace(s, 30, "lambda")
    assert len(ts) == 30 and ts[:3] == [999, 998, 997]


def test_unknown_spacing_raises_and_lists_ignore_it():
    s = linear_schedule(100)
    with pytest.raises(CondiffError, match="unknown step spacing"):
        respace(s, 10, "cosine")
    assert respace(s, [0, 50, 99], "karras") == [99, 50, 0]
