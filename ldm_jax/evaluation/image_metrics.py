"""Image-quality metrics for autoencoder evaluation: PSNR and SSIM in jnp (jit-able, on device).

Both take batches of NHWC images in [-1, 1] (so ``data_range=2.0``), compute in float32 and
return one value per image, shape ``(B,)``.

``ssim`` reproduces ``skimage.metrics.structural_similarity(a, b, channel_axis=-1,
data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, i.e.
Wang et al. (2004):

* local (weighted) statistics from a normalised Gaussian window, sigma 1.5, truncated at
  ``truncate = 3.5`` sigmas with radius ``r = int(truncate * sigma + 0.5)`` (= 5, an 11x11
  window), as ``scipy.ndimage.gaussian_filter`` builds it (separable: one 1-D pass along H, one
  along W);
* population (co)variances ``E[xy] - E[x]E[y]`` (no N/(N-1) factor);
* ``C1 = (K1 R)^2``, ``C2 = (K2 R)^2`` with ``K1 = 0.01``, ``K2 = 0.03``, ``R = data_range``;
* the SSIM map is cropped by ``pad = (win_size - 1) // 2 = r`` on every border, averaged per
  channel, and the channel means are averaged (all channels have the same pixel count, so this
  is the mean over the cropped H x W x C map).

skimage filters with ``mode='reflect'`` and then crops ``r`` pixels from each border. Every kept
pixel's window lies fully inside the image, so the padded values never reach the mean, and a
``VALID`` convolution (no padding) gives exactly the cropped map.
"""

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gaussian_kernel1d", "psnr", "ssim"]


def _check_pair(x, y):
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images (4 dims), got shape {x.shape}")
    return x.astype(jnp.float32), y.astype(jnp.float32)


def psnr(x, y, data_range=2.0):
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / mse)``, shape ``(B,)``.

    ``x``, ``y``: NHWC images (default range [-1, 1], ``data_range=2.0``); the MSE is taken over
    H, W and C of each image, in float32. Identical images (mse == 0) give ``+inf``.
    Matches ``skimage.metrics.peak_signal_noise_ratio(x[i], y[i], data_range=data_range)``.
    """
    x, y = _check_pair(x, y)
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
    return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def gaussian_kernel1d(sigma=1.5, truncate=3.5):
    """The normalised 1-D Gaussian taps scipy.ndimage.gaussian_filter uses (float64 numpy):
    radius ``int(truncate * sigma + 0.5)``, weights ``exp(-x^2 / (2 sigma^2))`` summing to 1."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / (sigma * sigma) * t * t)
    return w / w.sum()


def _filter_valid(maps, taps):
    """Separable Gaussian filter of NHWC ``maps`` (depthwise), VALID: (B, H-2r, W-2r, C)."""
    channels = maps.shape[-1]
    k = jnp.asarray(taps, jnp.float32)
    n = k.shape[0]
    # HWIO depthwise kernels: feature_group_count = channels, one input channel per group.
    kh = jnp.broadcast_to(k.reshape(n, 1, 1, 1), (n, 1, 1, channels))
    kw = jnp.broadcast_to(k.reshape(1, n, 1, 1), (1, n, 1, channels))
    conv = lambda v, w: jax.lax.conv_general_dilated(  # noqa: E731
        v, w, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST)  # no bf16/TF32 passes on GPU/TPU
    return conv(conv(maps, kh), kw)


def ssim(x, y, data_range=2.0, *, sigma=1.5, k1=0.01, k2=0.03):
    """Mean SSIM per image (Wang et al. 2004, Gaussian window), shape ``(B,)``, float32.

    ``x``, ``y``: NHWC images (default range [-1, 1], ``data_range=2.0``); H and W must be at
    least the window size (11 for sigma 1.5). Matches skimage's ``structural_similarity(...,
    channel_axis=-1, gaussian_weights=True, sigma=sigma, use_sample_covariance=False, K1=k1,
    K2=k2)``; see the module docstring for the details. ``ssim(x, x) == 1``.
    """
    x, y = _check_pair(x, y)
    taps = gaussian_kernel1d(sigma, truncate=3.5)
    win = taps.shape[0]
    if x.shape[1] < win or x.shape[2] < win:
        raise ValueError(f"images {x.shape[1]}x{x.shape[2]} are smaller than the "
                         f"{win}x{win} SSIM window")
    c = x.shape[-1]
    # All five local moments in one depthwise pass: [x, y, xx, yy, xy] stacked on channels.
    stats = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
    ux, uy, uxx, uyy, uxy = (stats[..., i * c:(i + 1) * c] for i in range(5))
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    r = jnp.float32(data_range)
    c1 = (k1 * r) ** 2
    c2 = (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))
