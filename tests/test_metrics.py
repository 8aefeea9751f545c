"""Mathematical checks of condiff.metrics on simulated feature sets."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist as np_cdist
from scipy.spatial.distance import pdist

from condiff.errors import CondiffError
from condiff.metrics import (
    density_coverage,
    diversity,
    feature_stats,
    fid_from_features,
    frechet_distance,
    judge_accuracy,
    per_class_diversity,
    precision_recall,
)


def rng(seed):
    return np.random.default_rng(seed)


def random_spd(r, d, rank=None):
    a = r.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0.0 if rank else 0.1 * np.eye(d))


def random_rotation(r, d):
    q, _ = np.linalg.qr(r.standard_normal((d, d)))
    return q


def fd_scipy(mu1, s1, mu2, s2):
    """Independent direct formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.allclose(np.asarray(covmean).imag, 0, atol=1e-8)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.asarray(covmean).real))


def real_like(seed, n=1000, d=16, classes=5, sample_seed=None):
    """Simulated 'real' features: a non-Gaussian mixture of anisotropic clusters.

    ``seed`` fixes the distribution, ``sample_seed`` (default: seed) the samples drawn from it.
    """
    r = rng(seed)
    centres = 3.0 * r.standard_normal((classes, d))
    scales = r.uniform(0.3, 1.5, size=(classes, d))
    if sample_seed is not None:
        r = rng(sample_seed)
    y = r.integers(0, classes, size=n)
    return centres[y] + scales[y] * r.standard_normal((n, d)), y


# --- Frechet distance ---------------------------------------------------------------
def test_frechet_distance_of_a_set_with_itself_is_zero():
    x, _ = real_like(0, n=500, d=8)
    assert fid_from_features(x, x) < 1e-9
    assert fid_from_features(x, x[rng(1).permutation(len(x))]) < 1e-9
    mu, s = feature_stats(x)
    assert frechet_distance(mu, s, mu, s) < 1e-9


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so (S1 S2)^(1/2) = Q diag(sqrt(ab)) Q^T and
    # FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    r = rng(2)
    d = 7
    q = random_rotation(r, d)
    a, b = r.uniform(0.1, 4.0, d), r.uniform(0.1, 4.0, d)
    mu1, mu2 = r.standard_normal(d), r.standard_normal(d)
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(analytic, rel=1e-10)


def test_frechet_distance_in_one_dimension_is_mean_and_std_gap():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    got = frechet_distance([1.5], [[4.0]], [-0.5], [[0.25]])
    assert got == pytest.approx(2.0**2 + (2.0 - 0.5) ** 2, rel=1e-12)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_frechet_distance_agrees_with_direct_scipy_formula(seed):
    r = rng(seed)
    d = 6
    mu1, mu2 = r.standard_normal(d), r.standard_normal(d)
    s1, s2 = random_spd(r, d), random_spd(r, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # the non-commuting case
    expected = fd_scipy(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
    # torch inputs, float32 included, give the same value (computed in float64).
    t = [torch.from_numpy(v) for v in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == pytest.approx(expected, rel=1e-9)
    t32 = [v.float() for v in t]
    assert frechet_distance(*t32) == pytest.approx(expected, rel=1e-5)


def test_fid_from_features_estimates_the_analytic_distance_at_large_n():
    r = rng(6)
    d, n = 4, 20000
    q = random_rotation(r, d)
    a, b = np.array([0.5, 1.0, 2.0, 3.0]), np.array([1.5, 0.4, 2.0, 1.0])
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.5])
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    f1 = mu1 + (r.standard_normal((n, d)) * np.sqrt(a)) @ q.T
    f2 = mu2 + (r.standard_normal((n, d)) * np.sqrt(b)) @ q.T
    est = fid_from_features(f1, f2)
    assert est == pytest.approx(analytic, rel=0.05)
    # and with n = 200 the estimate is visibly worse (the test can tell the two apart)
    assert abs(fid_from_features(f1[:200], f2[:200]) - analytic) > abs(est - analytic)


def test_fid_from_features_is_frechet_distance_of_sample_mean_and_covariance():
    x, _ = real_like(7, n=300, d=5)
    y = 0.8 * real_like(8, n=400, d=5)[0] + 0.3
    mu, s = feature_stats(torch.from_numpy(x).float())
    assert np.allclose(mu, x.mean(0), atol=1e-5) and np.allclose(s, np.cov(x, rowvar=False), atol=1e-4)
    mu_x, s_x = feature_stats(x)
    np.testing.assert_allclose(mu_x, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s_x, np.cov(x, rowvar=False), rtol=1e-12)
    expected = fd_scipy(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fid_from_features(x, y) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-9)


def test_fid_grows_monotonically_with_added_noise():
    x, _ = real_like(9, n=1000, d=16)
    z = rng(10).standard_normal(x.shape)
    noise = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    fids = [fid_from_features(x, x + s * z) for s in noise]
    assert fids[0] < 1e-9
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    # against an independent sample of the same distribution, from FID > 0 at no noise
    other, _ = real_like(9, n=1000, d=16, sample_seed=99)
    assert not np.allclose(other, x)
    fids_other = [fid_from_features(other, x + s * z) for s in [0.0, 0.4, 0.8, 1.6, 3.2]]
    assert all(b > a for a, b in zip(fids_other, fids_other[1:])), fids_other


def test_frechet_distance_handles_exactly_singular_covariances():
    # Zero variance along the last axis for both sets: closed form still holds.
    s1, s2 = np.diag([1.0, 4.0, 0.0]), np.diag([4.0, 1.0, 0.0])
    got = frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    assert math.isfinite(got) and got == pytest.approx(2.0, rel=1e-5)
    assert frechet_distance(np.zeros(3), s1, np.zeros(3), s2, eps=0) == pytest.approx(2.0, rel=1e-12)
    # Rank-deficient, non-commuting: agrees with the direct formula on the offset matrices.
    r = rng(11)
    d = 10
    a, b = random_spd(r, d, rank=3), random_spd(r, d, rank=4)
    mu1, mu2 = r.standard_normal(d), r.standard_normal(d)
    lam = max(np.linalg.eigvalsh(a)[-1], np.linalg.eigvalsh(b)[-1])
    off = 1e-6 * lam * np.eye(d)
    expected = fd_scipy(mu1, a + off, mu2, b + off)
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-6)
    # the offset moves the value only by O(d * eps * lam)
    assert abs(frechet_distance(mu1, a, mu2, b, eps=0) - expected) < 1e-3 * lam * d


def test_fid_with_fewer_samples_than_dimensions_is_finite_and_scales_quadratically():
    # n < d: both sample covariances are singular (rank n - 1).
    r = rng(12)
    x, y = r.standard_normal((20, 50)), 1.3 * r.standard_normal((25, 50)) + 0.2
    base = fid_from_features(x, y)
    assert math.isfinite(base) and base > 0
    assert fid_from_features(x, x) < 1e-9 * np.trace(np.cov(x, rowvar=False))
    for c in (1e-3, 1e3):  # the epsilon offset is relative, so FD(cX, cY) = c^2 FD(X, Y)
        assert fid_from_features(c * x, c * y) == pytest.approx(c * c * base, rel=1e-8)


def test_frechet_distance_rejects_bad_inputs():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(CondiffError):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(CondiffError):
        frechet_distance(mu, np.eye(2), mu, s)
    with pytest.raises(CondiffError):
        frechet_distance(np.zeros((3, 1)), s, np.zeros((3, 1)), s)
    with pytest.raises(CondiffError):
        frechet_distance(mu, np.triu(np.ones((3, 3))), mu, s)  # not symmetric
    with pytest.raises(CondiffError):
        frechet_distance([0.0, np.nan, 0.0], s, mu, s)
    with pytest.raises(CondiffError):
        frechet_distance(mu, s, mu, s, eps=-1.0)
    with pytest.raises(CondiffError):
        feature_stats(np.zeros((1, 3)))  # a covariance needs two samples
    with pytest.raises(CondiffError):
        feature_stats(np.zeros(5))  # not (n, d)
    with pytest.raises(CondiffError):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))


# --- precision / recall, density / coverage ----------------------------------------
def prdc_bruteforce(real, fake, k):
    """Direct transcription of the papers' definitions with the full distance matrices."""
    drr, dff, drf = np_cdist(real, real), np_cdist(fake, fake), np_cdist(real, fake)
    r_real = np.sort(drr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(dff, axis=1)[:, k]
    inside = drf <= r_real[:, None]
    precision = inside.any(axis=0).mean()
    recall = (drf <= r_fake[None, :]).any(axis=1).mean()
    density = inside.sum() / (k * len(fake))
    coverage = (drf.min(axis=1) <= r_real).mean()
    return precision, recall, density, coverage


@pytest.mark.parametrize("chunk_size", [None, 1, 50, 1000])
def test_prdc_match_bruteforce_definitions_for_any_chunking(chunk_size):
    r = rng(13)
    real = r.standard_normal((120, 3))
    fake = 0.7 * r.standard_normal((90, 3)) + 0.4
    for k in (1, 3, 5):
        p, rc, dens, cov = prdc_bruteforce(real, fake, k)
        got_pr = precision_recall(real, fake, k=k, chunk_size=chunk_size)
        got_dc = density_coverage(real, fake, k=k, chunk_size=chunk_size)
        assert got_pr == pytest.approx((p, rc), abs=1e-12)
        assert got_dc == pytest.approx((dens, cov), abs=1e-12)
    assert 0 < p < 1 and 0 < rc < 1 and 0 < cov < 1  # the example is not degenerate


def test_precision_recall_of_identical_sets_is_one():
    x, _ = real_like(14, n=800, d=8)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(torch.from_numpy(x).float(), x) == (1.0, 1.0)
    k = 5
    dens, cov = density_coverage(x, x, k=k)
    # sum_j #{i : x_j in B_i} = sum_i #{j : x_j in B_i} >= n (k + 1): each ball holds its centre
    # and its k nearest neighbours, so density >= (k + 1) / k.
    assert cov == 1.0 and dens >= (k + 1) / k - 1e-12


def test_precision_recall_same_distribution_high_and_shift_lowers_both():
    r = rng(15)
    real = r.standard_normal((1000, 4))
    fake = r.standard_normal((1000, 4))
    results = [precision_recall(real, fake + np.array([s, 0, 0, 0])) for s in (0.0, 1.0, 2.0, 4.0, 8.0)]
    p0, r0 = results[0]
    assert p0 > 0.85 and r0 > 0.85
    precisions, recalls = zip(*results)
    assert all(b < a for a, b in zip(precisions, precisions[1:])), precisions
    assert all(b < a for a, b in zip(recalls, recalls[1:])), recalls
    assert precisions[-1] < 0.01 and recalls[-1] < 0.01  # 8 standard deviations apart


def test_fake_set_on_a_small_part_of_the_support_keeps_precision_loses_recall():
    r = rng(16)
    real = r.uniform(0, 1, size=(2000, 2))
    full = r.uniform(0, 1, size=(2000, 2))
    part = full * np.array([0.25, 1.0])  # same number of points on a quarter of the square
    p_full, r_full = precision_recall(real, full)
    p_part, r_part = precision_recall(real, part)
    assert p_full > 0.9 and r_full > 0.9
    assert p_part > 0.9  # every generated point is realistic ...
    assert r_part < 0.4  # ... but three quarters of the real data is never produced
    _, cov_part = density_coverage(real, part)
    assert 0.2 < cov_part < 0.35


def test_density_and_coverage_expectations_for_the_same_distribution():
    # Naeem et al. 2020: E[density] = 1 and E[coverage] -> 1 - 1/2^k (n = m large) when fake ~ real.
    r = rng(17)
    k = 5
    real, fake = r.standard_normal((2000, 3)), r.standard_normal((2000, 3))
    dens, cov = density_coverage(real, fake, k=k)
    assert dens == pytest.approx(1.0, abs=0.08)
    assert cov == pytest.approx(1 - 0.5**k, abs=0.02)


def test_density_and_coverage_separate_fidelity_from_collapse_and_outliers():
    r = rng(18)
    real = r.standard_normal((1500, 2))
    collapsed = 0.1 * r.standard_normal((1500, 2))  # all samples near the mode
    dens, cov = density_coverage(real, collapsed)
    # each collapsed sample is realistic: a point inside the support lies in about k balls
    assert 0.8 < dens < 1.3
    assert cov < 0.15  # but only the balls near the mode are covered
    outliers = r.standard_normal((1500, 2)) + 20.0
    assert density_coverage(real, outliers) == (0.0, 0.0)
    assert precision_recall(real, outliers) == (0.0, 0.0)
    # density is a mean over fake samples: mixing sets averages it, weighted by size
    good = r.standard_normal((500, 2))
    d_good, c_good = density_coverage(real, good)
    d_mix, c_mix = density_coverage(real, np.concatenate([good, outliers]))
    assert d_mix == pytest.approx(d_good * 500 / 2000, rel=1e-12)
    assert c_mix == c_good  # outliers cover no real ball
    d_both, c_both = density_coverage(real, np.concatenate([good, collapsed]))
    assert d_both == pytest.approx((500 * d_good + 1500 * dens) / 2000, rel=1e-12)
    assert max(c_good, cov) <= c_both <= c_good + cov


def test_knn_metrics_reject_bad_inputs():
    x, y = np.zeros((10, 3)), np.ones((10, 3))
    for fn in (precision_recall, density_coverage):
        with pytest.raises(CondiffError):
            fn(x, y, k=10)  # k >= n
        with pytest.raises(CondiffError):
            fn(x, y, k=0)
        with pytest.raises(CondiffError):
            fn(x, np.ones((10, 4)))
        with pytest.raises(CondiffError):
            fn(x[:, 0], y)
        with pytest.raises(CondiffError):
            fn(x, y, chunk_size=0)
    with pytest.raises(CondiffError):
        precision_recall(x, y[:3], k=3)  # the fake set also needs k + 1 points
    assert density_coverage(x + 0.0, y[:1], k=3) == (0.0, 0.0)  # one fake is enough for density


# --- diversity ----------------------------------------------------------------------
def test_diversity_is_the_mean_pairwise_distance():
    assert diversity([[0.0, 0.0], [3.0, 4.0]]) == pytest.approx(5.0)
    assert diversity(np.eye(6)) == pytest.approx(math.sqrt(2))  # simplex vertices
    x, _ = real_like(19, n=300, d=7)
    expected = pdist(x).mean()
    assert diversity(x) == pytest.approx(expected, rel=1e-10)
    assert diversity(x, chunk_size=13) == pytest.approx(expected, rel=1e-10)
    assert diversity(torch.from_numpy(x)) == pytest.approx(expected, rel=1e-10)


def test_diversity_scales_linearly_and_ignores_translation():
    x, _ = real_like(20, n=400, d=5)
    base = diversity(x)
    for c in (0.01, 0.5, 3.0, -2.0):
        assert diversity(c * x) == pytest.approx(abs(c) * base, rel=1e-10)
    assert diversity(x + 100.0) == pytest.approx(base, rel=1e-6)
    assert diversity(np.repeat(x[:1], 10, axis=0)) == 0.0  # collapsed set


def test_per_class_diversity():
    x, y = real_like(21, n=600, d=4, classes=3)
    x = x.copy()
    x[y == 2] *= 5.0
    got = per_class_diversity(x, y)
    assert list(got) == [0, 1, 2]
    for c in range(3):
        assert got[c] == pytest.approx(pdist(x[y == c]).mean(), rel=1e-10)
    assert per_class_diversity(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(got)
    with pytest.raises(CondiffError):
        per_class_diversity(x[:3], [0, 0, 1])  # class 1 has a single sample
    with pytest.raises(CondiffError):
        per_class_diversity(x, y[:-1])
    with pytest.raises(CondiffError):
        per_class_diversity(x, y.astype(float))
    with pytest.raises(CondiffError):
        diversity(x[:1])


# --- judge classifier ---------------------------------------------------------------
def test_judge_accuracy_on_hand_made_logits():
    logits = torch.tensor(
        [
            [2.0, 0.0, 0.0, 0.0],  # target 0: right
            [0.0, 2.0, 0.0, 0.0],  # target 1: right
            [0.0, 0.0, 2.0, 0.0],  # target 2: right
            [2.0, 0.0, 0.0, 0.0],  # target 1: wrong
            [0.0, 0.0, 0.0, 0.0],  # target 2: a tie goes to class 0, wrong
        ]
    )
    targets = [0, 1, 2, 1, 2]
    p = math.exp(2) / (math.exp(2) + 3)  # softmax mass on the peaked class
    q = 1 / (math.exp(2) + 3)  # on each other class
    out = judge_accuracy(logits, targets, num_classes=4)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["confidence"] == pytest.approx((3 * p + q + 0.25) / 5)
    assert out["per_class_count"] == [1, 2, 2, 0]
    acc, conf = out["per_class_accuracy"], out["per_class_confidence"]
    assert acc[:3] == pytest.approx([1.0, 0.5, 0.5]) and math.isnan(acc[3])
    assert conf[:3] == pytest.approx([p, (p + q) / 2, (p + 0.25) / 2]) and math.isnan(conf[3])
    # numpy input; logits shifted per row or huge give the same / saturated values
    shifted = judge_accuracy(logits.numpy() + np.arange(5.0)[:, None] * 100, np.array(targets), 4)
    assert shifted["confidence"] == pytest.approx(out["confidence"], rel=1e-12)
    big = judge_accuracy(1000.0 * np.eye(4), np.arange(4), 4)
    assert big["accuracy"] == 1.0 and big["confidence"] == pytest.approx(1.0)


def test_judge_accuracy_rejects_bad_inputs():
    z = np.zeros((4, 3))
    with pytest.raises(CondiffError):
        judge_accuracy(z, [0, 1, 2, 3], 3)  # target out of range
    with pytest.raises(CondiffError):
        judge_accuracy(z, [0, 1, 2, -1], 3)
    with pytest.raises(CondiffError):
        judge_accuracy(z, [0, 1, 2], 3)  # length mismatch
    with pytest.raises(CondiffError):
        judge_accuracy(z, [0, 1, 2, 0], 4)  # logits have 3 columns
    with pytest.raises(CondiffError):
        judge_accuracy(z, [0.0, 1.0, 2.0, 0.0], 3)  # float targets
    with pytest.raises(CondiffError):
        judge_accuracy(z, [0, 1, 2, 0], 0)
    with pytest.raises(CondiffError):
        judge_accuracy(np.zeros((0, 3)), [], 3)
