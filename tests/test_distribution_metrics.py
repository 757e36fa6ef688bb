"""FID, KID, Inception Score and precision/recall against closed forms and direct computations."""
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from ldm_jax.evaluation import distribution_metrics as dm


def _features(seed, n=600, d=24, shift=0.0, scale=1.0):
    """Correlated Gaussian features; the same seed-independent covariance for a given d."""
    mixing = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    return (np.random.default_rng(seed).normal(size=(n, d)) @ mixing) * scale + shift


def test_fid_of_a_set_with_itself_is_zero():
    f = _features(0)
    assert abs(dm.fid(f, f)) < 1e-9


def test_fid_of_two_gaussians_equals_the_closed_form():
    # Diagonal covariances: FID = |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.normal(size=16), rng.normal(size=16)
    var_a, var_b = rng.uniform(0.2, 3, 16), rng.uniform(0.2, 3, 16)
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert dm.frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == \
        pytest.approx(closed, rel=1e-12)
    # And from samples of those Gaussians, up to the sampling error of 200k draws.
    a = mu_a + rng.normal(size=(200_000, 16)) * np.sqrt(var_a)
    b = mu_b + rng.normal(size=(200_000, 16)) * np.sqrt(var_b)
    assert dm.fid(a, b) == pytest.approx(closed, rel=0.01)


def test_fid_equals_scipy_sqrtm_computation():
    a, b = _features(2), _features(3, shift=0.3, scale=1.4)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    direct = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert dm.fid(a, b) == pytest.approx(direct, rel=1e-8)


def test_fid_is_finite_when_the_covariances_are_singular():
    # Fewer samples than dimensions (the usual case for 2048-d features and small N).
    a, b = _features(4, n=20, d=64), _features(5, n=20, d=64, shift=0.5)
    value = dm.fid(a, b)
    assert np.isfinite(value) and value > 0


def _kid_direct(x, y):
    """The unbiased MMD^2 of one subset pair, written as the sums over index pairs."""
    d, m = x.shape[1], len(x)
    k = lambda u, v: (u @ v / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_direct_sum_over_the_same_subsets():
    a, b = _features(6, n=40, d=8), _features(7, n=50, d=8, shift=0.4)  # subsets of 15 < 40 // 2
    mean, std = dm.kernel_inception_distance(a, b, num_subsets=3, subset_size=15, seed=11)
    rng = np.random.default_rng(11)
    values = []
    for _ in range(3):
        x = a[rng.choice(len(a), 15, replace=False)]
        y = b[rng.choice(len(b), 15, replace=False)]
        values.append(_kid_direct(x, y))
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    a, b = _features(8, n=2000), _features(9, n=2000)
    mean, std = dm.kernel_inception_distance(a, b, num_subsets=20, subset_size=500)
    assert abs(mean) < 3 * std / np.sqrt(20) + 1e-3
    far, _ = dm.kernel_inception_distance(a, _features(9, n=2000, shift=1.0), num_subsets=5)
    assert far > 100 * abs(mean)


def test_inception_score_equals_scipy_entropy_computation():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(100, 12)) * 3
    mean, std = dm.inception_score(logits, splits=4)
    p = scipy.special.softmax(logits, axis=1)
    scores = []
    for part in np.array_split(p, 4):
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in part])))
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    # Confident, evenly spread predictions score the number of classes.
    assert dm.inception_score(np.eye(12)[np.arange(120) % 12] * 100, splits=1)[0] == \
        pytest.approx(12, rel=1e-6)


def _inside_direct(queries, support, k):
    radii = [sorted(np.linalg.norm(support - s, axis=1))[k] for s in support]
    return np.mean([any(np.linalg.norm(q - s) <= r for s, r in zip(support, radii))
                    for q in queries])


def test_precision_recall_equals_the_brute_force_definition():
    real, fake = _features(12, n=60, d=5), _features(13, n=45, d=5, shift=0.8, scale=0.6)
    precision, recall = dm.precision_recall(real, fake, k=3, chunk=16)
    assert precision == pytest.approx(_inside_direct(fake, real, 3))
    assert recall == pytest.approx(_inside_direct(real, fake, 3))
    assert 0 < recall < 1 and 0 < precision <= 1
    same, same_recall = dm.precision_recall(real, real, k=3)
    assert same == 1.0 and same_recall == 1.0


def test_bad_inputs_name_the_cause():
    with pytest.raises(ValueError, match="N >= 2"):
        dm.fid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="different dimensions"):
        dm.fid(_features(0, d=4), _features(1, d=5))
    with pytest.raises(ValueError, match="needs at least 10 images"):
        dm.inception_score(np.zeros((5, 3)))
