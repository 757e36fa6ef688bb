"""PSNR / SSIM in jnp (ldm_jax.evaluation.image_metrics) against scikit-image's references.

SSIM reference: skimage.metrics.structural_similarity(..., channel_axis=-1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False) per image (Wang et al. 2004); PSNR reference:
skimage.metrics.peak_signal_noise_ratio per image. Images are NHWC in [-1, 1] (data range 2).
The references get float64 copies, so the errors measured are those of our float32 path.
"""
import functools

import numpy as np
import pytest

skm = pytest.importorskip("skimage.metrics")
from skimage import data as skdata  # noqa: E402
from skimage import filters as skfilters  # noqa: E402
from skimage import transform as sktransform  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ldm_jax.evaluation.image_metrics import gaussian_kernel1d, psnr, ssim  # noqa: E402

SSIM_ATOL = 1e-4
PSNR_RTOL = 1e-4

jit_psnr = jax.jit(psnr, static_argnames="data_range")
jit_ssim = jax.jit(ssim, static_argnames=("data_range", "sigma", "k1", "k2"))


@functools.lru_cache(maxsize=None)
def _astronaut(size):
    """skimage's astronaut photo, resized to 64x64 (anti-aliased), centre-cropped to `size`,
    mapped to [-1, 1]."""
    img = sktransform.resize(skdata.astronaut().astype(np.float64) / 255.0, (64, 64),
                             anti_aliasing=True)
    o = (64 - size) // 2
    return img[o:o + size, o:o + size] * 2.0 - 1.0


def _pairs(size, seed=0):
    """A batch of 3 (reference, distorted) pairs, NHWC float64 in [-1, 1]:
    0: the astronaut photo vs. a blurred + slightly noisy copy,
    1: a smooth colour gradient plus noise vs. more noise,
    2: uniform random noise vs. a noisy copy."""
    rng = np.random.default_rng(seed + size)
    photo = _astronaut(size)
    blurred = skfilters.gaussian(photo, sigma=1.0, channel_axis=-1, preserve_range=True)
    photo_d = blurred + 0.02 * rng.normal(size=photo.shape)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    grad = np.stack([0.8 * xx, 0.6 * yy, 0.5 * (xx * yy)], axis=-1)
    grad = grad + 0.05 * rng.normal(size=grad.shape)
    grad_d = grad + 0.1 * rng.normal(size=grad.shape)
    rand = rng.uniform(-1, 1, size=(size, size, 3))
    rand_d = rand + 0.3 * rng.normal(size=rand.shape)
    x = np.stack([photo, grad, rand])
    y = np.clip(np.stack([photo_d, grad_d, rand_d]), -1.0, 1.0)
    return x, y


def _ref_ssim(x, y, data_range=2.0, sigma=1.5):
    return np.array([skm.structural_similarity(
        a, b, channel_axis=-1, data_range=data_range, gaussian_weights=True, sigma=sigma,
        use_sample_covariance=False) for a, b in zip(x, y)])


def _ref_psnr(x, y, data_range=2.0):
    return np.array([skm.peak_signal_noise_ratio(a, b, data_range=data_range)
                     for a, b in zip(x, y)])


@pytest.mark.parametrize("size", [32, 64])
def test_ssim_matches_skimage(size):
    x, y = _pairs(size)
    ref = _ref_ssim(x, y)
    got = np.asarray(jit_ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    assert got.shape == (3,) and got.dtype == np.float32
    # the three pairs are genuinely different regimes (not all ~0 or ~1)
    assert np.ptp(ref) > 0.05 and np.all(ref < 0.99)
    np.testing.assert_allclose(got, ref, rtol=0, atol=SSIM_ATOL)


@pytest.mark.parametrize("size", [32, 64])
def test_psnr_matches_skimage(size):
    x, y = _pairs(size)
    ref = _ref_psnr(x, y)
    got = np.asarray(jit_psnr(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=PSNR_RTOL, atol=0)


def test_non_default_data_range_and_sigma():
    """data_range enters C1/C2 (SSIM) and the peak (PSNR); sigma sets the window (here 7x7)."""
    x, y = _pairs(32, seed=1)
    x01, y01 = (x + 1) / 2, (y + 1) / 2  # [0, 1] images, data range 1
    got = np.asarray(jit_ssim(jnp.asarray(x01, jnp.float32), jnp.asarray(y01, jnp.float32),
                              data_range=1.0, sigma=1.0))
    np.testing.assert_allclose(got, _ref_ssim(x01, y01, data_range=1.0, sigma=1.0),
                               rtol=0, atol=SSIM_ATOL)
    np.testing.assert_allclose(np.asarray(jit_psnr(x01, y01, data_range=1.0)),
                               _ref_psnr(x01, y01, data_range=1.0), rtol=PSNR_RTOL, atol=0)


def test_gaussian_window_is_skimage_window():
    """11 taps for sigma 1.5 (radius int(3.5 * 1.5 + 0.5) = 5), equal to scipy's own filter
    response to a unit impulse."""
    from scipy import ndimage as ndi
    taps = gaussian_kernel1d(1.5, 3.5)
    impulse = np.zeros(21)
    impulse[10] = 1.0
    resp = ndi.gaussian_filter1d(impulse, 1.5, truncate=3.5, mode="reflect")
    assert taps.shape == (11,)
    np.testing.assert_allclose(taps, resp[5:16], rtol=0, atol=1e-15)
    np.testing.assert_allclose(resp[:5], 0.0, atol=0)


def test_identity_and_monotonic_in_noise():
    x, _ = _pairs(32)
    xj = jnp.asarray(x, jnp.float32)
    s = np.asarray(jit_ssim(xj, xj))
    np.testing.assert_allclose(s, 1.0, rtol=0, atol=1e-6)
    p = np.asarray(jit_psnr(xj, xj))
    assert p.shape == (3,) and np.all(np.isposinf(p))  # mse == 0 -> +inf, documented

    rng = np.random.default_rng(3)
    noise = rng.normal(size=x.shape)
    ps, ss = [], []
    for level in (0.01, 0.03, 0.1, 0.3):
        y = jnp.asarray(x + level * noise, jnp.float32)
        ps.append(np.asarray(jit_psnr(xj, y)))
        ss.append(np.asarray(jit_ssim(xj, y)))
    ps, ss = np.stack(ps), np.stack(ss)  # (levels, B)
    assert np.all(np.isfinite(ps)) and np.all(np.diff(ps, axis=0) < 0)
    assert np.all(np.diff(ss, axis=0) < 0) and np.all(ss < 1.0)
    # PSNR of additive Gaussian noise: 10 log10(4 / level^2) up to the sample variance
    np.testing.assert_allclose(ps[-1], 10 * np.log10(4 / 0.3 ** 2), atol=0.2)


def test_shapes_dtypes_and_errors():
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (5, 16, 24, 1)).astype(np.float32)
    y = rng.uniform(-1, 1, (5, 16, 24, 1)).astype(np.float32)
    for f in (jit_psnr, jit_ssim):
        out = f(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
        assert out.shape == (5,) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[:, :10], y[:, :10])
    with pytest.raises(ValueError, match="differ"):
        psnr(x, y[:, :, :20])
    with pytest.raises(ValueError, match="NHWC"):
        ssim(x[0], y[0])
