"""Distances between two sets of Inception features: FID, KID, Inception Score, precision/recall.

NumPy/SciPy on the host, float64 where the figure is sensitive to round-off:

* FID (Heusel et al. 2017): |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), with
  unbiased (N-1) covariances in float64. tr sqrt(S_a S_b) is computed as the sum of the square
  roots of the eigenvalues of the symmetric PSD matrix sqrt(S_a) S_b sqrt(S_a) (same eigenvalues
  as S_a S_b), so no non-symmetric matrix square root is needed: no complex parts to discard and
  no retry with eps * I added, unlike scipy.linalg.sqrtm on near-singular covariances.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3,
  averaged over random subsets (up to 1000 features, at most half of each set); reported
  with its standard deviation over the subsets.
* Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over `splits` parts.
* Precision / recall (Kynkaenniemi et al. 2019): a sample is inside the other set's manifold when
  it lies within the k-th-nearest-neighbour radius (k = 3) of some feature of that set.
"""
from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of an (N, D) feature array, float64, covariance with N - 1."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """FID between two Gaussians given by their means and covariances."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"statistics of different dimensions: {mu_a.shape} vs {mu_b.shape}")
    root_a = _psd_sqrt(sigma_a)
    inner = root_a @ sigma_b @ root_a
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * tr_covmean)


def fid(features_a, features_b) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def kernel_inception_distance(features_a, features_b, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over `num_subsets` random subsets of the unbiased MMD^2, cubic kernel.

    Subsets have min(subset_size, N_a // 2, N_b // 2) elements, drawn without replacement: at
    most half of each set, so that the subsets differ and the std says something (with
    subsets as large as the sets, every subset would be the whole set). The mean estimates the
    same MMD^2 whatever the subset size."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(subset_size, len(a) // 2, len(b) // 2)
    if m < 2:
        raise ValueError(f"KID needs at least 4 features per set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        within = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1))
        values[i] = within - 2 * k_xy.mean()
    return float(values.mean()), float(values.std())


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(E KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, np.float64)
    if len(logits) < splits:
        raise ValueError(f"Inception Score over {splits} splits needs at least {splits} images, "
                         f"got {len(logits)}")
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.maximum(d, 0)


def _knn_radii(features: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance of each feature to its k-th nearest other feature of the same set."""
    radii = np.empty(len(features))
    for s in range(0, len(features), chunk):
        d = _squared_distances(features[s:s + chunk], features)
        # Index k, not k - 1: the nearest "neighbour" at index 0 is the point itself.
        radii[s:s + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside_manifold(queries: np.ndarray, support: np.ndarray, radii: np.ndarray,
                     chunk: int) -> np.ndarray:
    inside = np.zeros(len(queries), bool)
    for s in range(0, len(queries), chunk):
        d = _squared_distances(queries[s:s + chunk], support)
        inside[s:s + chunk] = (d <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real_features, fake_features, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """(precision, recall): the fraction of fakes inside the reals' k-NN manifold, and of reals
    inside the fakes'."""
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, "
                         f"got {len(real)} and {len(fake)}")
    precision = _inside_manifold(fake, real, _knn_radii(real, k, chunk), chunk).mean()
    recall = _inside_manifold(real, fake, _knn_radii(fake, k, chunk), chunk).mean()
    return float(precision), float(recall)
