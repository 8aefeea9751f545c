"""Sample-quality metrics on feature vectors: FID, precision/recall, density/coverage,
diversity, and the accuracy of an independent judge classifier.

Everything here is a pure function of arrays: features come from whatever
embedding the caller chooses (a domain classifier's penultimate layer for
Fashion-MNIST, say), as torch tensors or numpy arrays, and every computation
runs in float64.  Pairwise distances are computed in row chunks (``chunk_size``
rows at a time, ``torch.cdist``), so 10 000 x 10 000 comparisons never hold
the full distance matrix in memory.

References:
- Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to
  a local Nash equilibrium" (FID); reference code: pytorch-fid / TTUR.
- Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing
  generative models" (k-NN manifold precision and recall).
- Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative
  models" (density and coverage).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import CondiffError

__all__ = [
    "FID_EPS",
    "frechet_distance",
    "feature_stats",
    "fid_from_features",
    "precision_recall",
    "density_coverage",
    "diversity",
    "per_class_diversity",
    "judge_accuracy",
]

#: Relative diagonal offset for near-singular covariances in frechet_distance;
#: the reference FID code (pytorch-fid, TTUR) uses 1e-6 (absolute) when sqrtm fails.
FID_EPS = 1e-6

# Number of distance-matrix entries computed at once when chunk_size is None
# (2**23 float64 values = 64 MiB per chunk).
_CHUNK_ELEMENTS = 2**23


# --- input conversion ---------------------------------------------------------------
def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CondiffError(f"{name}: expected a numeric array, got {type(x).__name__}") from e
    if not np.isfinite(arr).all():
        raise CondiffError(f"{name}: contains NaN or infinite values")
    return arr


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(torch.float64)
    else:
        t = torch.from_numpy(_to_numpy(x, name))
    if not torch.isfinite(t).all():
        raise CondiffError(f"{name}: contains NaN or infinite values")
    return t


def _features(x, name: str, min_rows: int) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.dim() != 2:
        raise CondiffError(f"{name}: expected features of shape (n, d), got {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise CondiffError(f"{name}: features have dimension 0")
    if t.shape[0] < min_rows:
        raise CondiffError(f"{name}: need at least {min_rows} samples, got {t.shape[0]}")
    return t


def _same_dim(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise CondiffError(f"{na} and {nb} have different feature dimensions: {a.shape[1]} vs {b.shape[1]}")


def _check_k(k, n_min: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CondiffError(f"k must be a positive integer, got {k!r}")
    if k >= n_min:
        raise CondiffError(f"k={k} needs more than k samples in {what}, got {n_min}")
    return int(k)


def _rows_per_chunk(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise CondiffError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def _chunks(a: torch.Tensor, b: torch.Tensor, chunk_size: int | None):
    """Yield (start, cdist(a[start:stop], b)) row block by row block."""
    rows = _rows_per_chunk(b.shape[0], chunk_size)
    for start in range(0, a.shape[0], rows):
        yield start, torch.cdist(a[start : start + rows], b)


def _knn_radii(x: torch.Tensor, k: int, chunk_size: int | None) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row of x, shape (n,)."""
    radii = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for start, d in _chunks(x, x, chunk_size):
        # The point itself is at distance 0 (the smallest), so the (k+1)-th smallest
        # value is the k-th nearest *other* point; a duplicate gives the same value.
        radii[start : start + d.shape[0]] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


# --- Frechet distance ---------------------------------------------------------------
def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).

    tr (S1 S2)^(1/2) is computed as the sum of the square roots of the eigenvalues
    of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), so
    no complex parts appear, unlike ``scipy.linalg.sqrtm(S1 @ S2)`` in the reference
    code; eigenvalues that round-off makes slightly negative are clipped to 0.
    Near-singular covariances (sample covariances with n <= d always are) make the
    square root ill-conditioned; as the reference code does when sqrtm fails, an
    offset ``eps * I`` is then added to both covariances.  Here ``eps`` is relative:
    if either covariance has smallest eigenvalue below ``eps * lam_max`` (lam_max the
    largest eigenvalue of the two), both get ``eps * lam_max * I``, so the result
    keeps the scaling FD(c X, c Y) = c^2 FD(X, Y) and moves by O(d * eps * lam_max).
    The result is clipped at 0 (round-off can make FD(X, X) slightly negative).

    Args:
        mu1, mu2: means, shape (d,).
        sigma1, sigma2: covariances, shape (d, d), symmetric positive semi-definite.
        eps: relative diagonal offset for near-singular covariances (default 1e-6,
            the reference code's value; 0 disables it).
    """
    mu1, mu2 = _to_numpy(mu1, "mu1"), _to_numpy(mu2, "mu2")
    s1, s2 = _to_numpy(sigma1, "sigma1"), _to_numpy(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise CondiffError(f"means must be vectors of the same shape (d,), got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if d < 1:
        raise CondiffError("means have dimension 0")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise CondiffError(f"{name}: expected shape ({d}, {d}) to match the means, got {s.shape}")
        if np.abs(s - s.T).max() > 1e-5 * np.abs(s).max():
            raise CondiffError(f"{name}: covariance is not symmetric")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise CondiffError(f"eps must be a finite number >= 0, got {eps!r}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2

    if eps > 0:
        w1, w2 = np.linalg.eigvalsh(s1), np.linalg.eigvalsh(s2)
        lam_max = max(w1[-1], w2[-1], 0.0)
        if min(w1[0], w2[0]) < eps * lam_max:
            offset = eps * lam_max * np.eye(d)
            s1, s2 = s1 + offset, s2 + offset

    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (ddof=1) covariance of a feature set, in float64.

    Args:
        feats: features, shape (n, d), n >= 2.

    Returns:
        (mu, sigma): numpy arrays of shape (d,) and (d, d).
    """
    x = _features(feats, "feats", min_rows=2).cpu().numpy()
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def fid_from_features(f1, f2, eps: float = FID_EPS) -> float:
    """FID: Frechet distance between Gaussians fitted to two feature sets.

    Args:
        f1: features, shape (n1, d), n1 >= 2 (e.g. real images).
        f2: features, shape (n2, d), n2 >= 2 (e.g. generated images).
        eps: see :func:`frechet_distance`.
    """
    a, b = _features(f1, "f1", 2), _features(f2, "f2", 2)
    _same_dim(a, b, "f1", "f2")
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    return frechet_distance(mu1, s1, mu2, s2, eps=eps)


# --- k-NN manifold metrics ----------------------------------------------------------
def _cross_counts(real, fake, r_real, r_fake, chunk_size):
    """One chunked pass over d(real_i, fake_j); all four PRDC counts.

    Returns (fake_in_real, real_in_fake, balls_per_fake, real_covered):
    fake_in_real[j]  = fake j lies in some real k-NN ball (precision),
    real_in_fake[i]  = real i lies in some fake k-NN ball (recall; None without r_fake),
    balls_per_fake[j] = number of real balls containing fake j (density),
    real_covered[i]  = the ball of real i contains some fake (coverage).
    """
    n, m = real.shape[0], fake.shape[0]
    dev = real.device
    balls_per_fake = torch.zeros(m, dtype=torch.int64, device=dev)
    real_in_fake = None if r_fake is None else torch.zeros(n, dtype=torch.bool, device=dev)
    real_covered = torch.zeros(n, dtype=torch.bool, device=dev)
    for start, d in _chunks(real, fake, chunk_size):  # d: (rows, m)
        stop = start + d.shape[0]
        inside = d <= r_real[start:stop, None]  # fake j inside the ball of real i
        balls_per_fake += inside.sum(dim=0, dtype=torch.int32)  # < 2**31 rows a chunk
        real_covered[start:stop] = inside.any(dim=1)
        if r_fake is not None:
            real_in_fake[start:stop] = (d <= r_fake[None, :]).any(dim=1)
    return balls_per_fake > 0, real_in_fake, balls_per_fake, real_covered


def precision_recall(real, fake, k: int = 3, chunk_size: int | None = None) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius the
    distance to the k-th nearest neighbour within the set.  Precision is the
    fraction of fake points inside the real manifold, recall the fraction of real
    points inside the fake manifold (a point on a ball's boundary counts as inside).

    Args:
        real: real features, shape (n, d), n > k.
        fake: generated features, shape (m, d), m > k.
        k: neighbour index defining the ball radii (default 3, as in the paper).
        chunk_size: rows of each distance block (default: about 2**23 entries a block).

    Returns:
        (precision, recall), floats in [0, 1].
    """
    r, f = _features(real, "real", 2), _features(fake, "fake", 2)
    _same_dim(r, f, "real", "fake")
    f = f.to(r.device)
    k = _check_k(k, min(r.shape[0], f.shape[0]), "real and fake")
    r_real = _knn_radii(r, k, chunk_size)
    r_fake = _knn_radii(f, k, chunk_size)
    fake_in_real, real_in_fake, _, _ = _cross_counts(r, f, r_real, r_fake, chunk_size)
    return fake_in_real.double().mean().item(), real_in_fake.double().mean().item()


def density_coverage(real, fake, k: int = 5, chunk_size: int | None = None) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) from k-NN balls around the real points.

    density  = 1/(k m) sum_j #{i : fake_j in B(real_i, NND_k(real_i))}  (1 in expectation
    when fake and real come from the same distribution; can exceed 1),
    coverage = 1/n #{i : B(real_i, NND_k(real_i)) contains some fake_j}  (in [0, 1]).

    Args:
        real: real features, shape (n, d), n > k.
        fake: generated features, shape (m, d), m >= 1.
        k: neighbour index defining the ball radii (default 5, as in the paper).
        chunk_size: rows of each distance block (default: about 2**23 entries a block).

    Returns:
        (density, coverage) as floats.
    """
    r, f = _features(real, "real", 2), _features(fake, "fake", 1)
    _same_dim(r, f, "real", "fake")
    f = f.to(r.device)
    k = _check_k(k, r.shape[0], "real")
    r_real = _knn_radii(r, k, chunk_size)
    _, _, balls_per_fake, real_covered = _cross_counts(r, f, r_real, None, chunk_size)
    density = balls_per_fake.double().sum().item() / (k * f.shape[0])
    return density, real_covered.double().mean().item()


# --- diversity ----------------------------------------------------------------------
def _mean_pairwise(x: torch.Tensor, chunk_size: int | None) -> float:
    n = x.shape[0]
    total = 0.0
    for start, d in _chunks(x, x, chunk_size):
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, start + rows] = 0.0  # exact zeros on the diagonal (cdist may round)
        total += d.sum().item()
    return total / (n * (n - 1))


def diversity(feats, chunk_size: int | None = None) -> float:
    """Mean Euclidean distance over all pairs of distinct samples, 1/(n(n-1)) sum_{i != j} |x_i - x_j|.

    Args:
        feats: features, shape (n, d), n >= 2.
        chunk_size: rows of each distance block (default: about 2**23 entries a block).
    """
    return _mean_pairwise(_features(feats, "feats", 2), chunk_size)


def per_class_diversity(feats, labels, chunk_size: int | None = None) -> dict[int, float]:
    """:func:`diversity` within each class present in ``labels``.

    Args:
        feats: features, shape (n, d).
        labels: integer class labels, shape (n,); every class present needs >= 2 samples.
        chunk_size: rows of each distance block.

    Returns:
        {class label: mean pairwise distance among that class's samples}, sorted by label.
    """
    x = _features(feats, "feats", 1)
    y = _labels(labels, "labels", x.shape[0]).to(x.device)
    out = {}
    for c in torch.unique(y).tolist():
        xc = x[y == c]
        if xc.shape[0] < 2:
            raise CondiffError(f"class {c} has {xc.shape[0]} sample; diversity needs at least 2")
        out[int(c)] = _mean_pairwise(xc, chunk_size)
    return out


def _labels(labels, name: str, n: int) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        y = labels.detach()
    else:
        try:
            y = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError) as e:
            raise CondiffError(f"{name}: expected integer labels") from e
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise CondiffError(f"{name}: expected integer labels, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise CondiffError(f"{name}: expected shape ({n},), got {tuple(y.shape)}")
    return y.long()


# --- judge classifier ---------------------------------------------------------------
def judge_accuracy(logits, targets, num_classes: int) -> dict:
    """Accuracy and target-class confidence of an independent judge classifier on samples.

    A sample counts as correct when argmax(logits) equals its target (ties go to the
    lowest class index); its confidence is softmax(logits)[target].

    Args:
        logits: judge classifier outputs, shape (n, num_classes), n >= 1.
        targets: intended class of each sample, integers in [0, num_classes), shape (n,).
        num_classes: number of classes C.

    Returns:
        dict with ``accuracy`` (float), ``confidence`` (float, mean target-class
        probability), ``per_class_accuracy`` and ``per_class_confidence`` (lists of
        length C, indexed by target class, NaN for a class without samples) and
        ``per_class_count`` (list of C ints).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise CondiffError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    z = _features(logits, "logits", 1)
    if z.shape[1] != num_classes:
        raise CondiffError(f"logits: expected shape (n, {num_classes}), got {tuple(z.shape)}")
    y = _labels(targets, "targets", z.shape[0]).to(z.device)
    if (y < 0).any() or (y >= num_classes).any():
        raise CondiffError(f"targets must lie in [0, {num_classes - 1}]")

    correct = (z.argmax(dim=1) == y).double()
    conf = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    count = torch.bincount(y, minlength=num_classes).double()
    acc_sum = torch.zeros(num_classes, dtype=torch.float64, device=z.device).index_add_(0, y, correct)
    conf_sum = torch.zeros(num_classes, dtype=torch.float64, device=z.device).index_add_(0, y, conf)
    nan = torch.full_like(count, float("nan"))
    has = count > 0
    return {
        "accuracy": correct.mean().item(),
        "confidence": conf.mean().item(),
        "per_class_accuracy": torch.where(has, acc_sum / count.clamp_min(1), nan).tolist(),
        "per_class_confidence": torch.where(has, conf_sum / count.clamp_min(1), nan).tolist(),
        "per_class_count": [int(c) for c in count.tolist()],
    }
