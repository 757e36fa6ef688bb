"""LPIPS (Zhang et al. 2018), the `lpips` package's "vgg" variant, version 0.1, in Flax Linen.

The perceptual term of the first-stage (autoencoder) loss. It is only LPIPS with real weights:
ImageNet VGG16 convs and the learned v0.1 heads, loaded by `ldm_jax.convert.lpips_weights`.
`LPIPS().init(...)` gives a random VGG, which measures nothing perceptual; callers must refuse
to use it under that name.

Inputs are NHWC images in [-1, 1]. Parameters are float32; `dtype` is the VGG's compute dtype.
Normalisation, heads and means always run in float32 (a bf16 sum of squares over 512 channels
is too coarse, and the distances of near-identical images are small).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision's VGG16 `features`: conv widths per block, a 2x2 max-pool between blocks.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# LPIPS taps the last ReLU of each block: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_CHANNELS = tuple(block[-1] for block in VGG16_BLOCKS)
# The lpips package's ScalingLayer (ImageNet mean/std expressed for [-1, 1] inputs).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor's eps: x / (||x||_channels + eps).
LPIPS_EPS = 1e-10
# Four 2x pools: relu5_3 must keep at least one pixel.
MIN_SIZE = 16


def vgg_conv_name(block: int, index: int) -> str:
    """Our name of VGG16 conv `index` (0-based) in `block` (0-based): conv1_1 ... conv5_3."""
    return f"conv{block + 1}_{index + 1}"


class VGG16Features(nn.Module):
    """The 13 3x3 convs of torchvision's VGG16 (padding 1, ReLU, floor-mode 2x2 max-pools).

    Returns the five block outputs LPIPS compares, (relu1_2, ..., relu5_3); the last pool is
    never reached.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x) -> tuple[jax.Array, ...]:
        taps = []
        h = x.astype(self.dtype)
        for b, widths in enumerate(VGG16_BLOCKS):
            if b:
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
            for i, width in enumerate(widths):
                h = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            param_dtype=jnp.float32, name=vgg_conv_name(b, i))(h)
                h = nn.relu(h)
            taps.append(h)
        return tuple(taps)


def _norm(f: jax.Array) -> jax.Array:
    """Each pixel's feature length over channels, plus the package's eps."""
    return jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + LPIPS_EPS


def _normalised_difference(fx: jax.Array, fy: jax.Array) -> jax.Array:
    """fx / |fx| - fy / |fy|, written as (fx - fy * (|fx| / |fy|)) / |fx|.

    The plain form is not exactly 0 for identical features: XLA turns each division into a
    multiply by a reciprocal and may fuse one side's multiply into the subtraction (an FMA),
    leaving a rounding error (LPIPS(x, x) ~ 1e-15). Here equal norms give a ratio of exactly
    1 and the difference is exact, contracted or not.
    """
    nx, ny = _norm(fx), _norm(fy)
    return (fx - fy * (nx / ny)) / nx


def _check_images(x, y):
    if x.shape != y.shape:
        raise ValueError(f"LPIPS: the two image batches differ in shape, {x.shape} vs {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS: expected NHWC RGB images (B, H, W, 3), got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"LPIPS: images of {x.shape[1]}x{x.shape[2]} are too small; VGG16's "
                         f"four pools need at least {MIN_SIZE}x{MIN_SIZE}")


class LPIPS(nn.Module):
    """Perceptual distance between image batches `x` and `y` in [-1, 1], one value per image (B,).

    Zero for identical images, symmetric, non-negative (the heads are). The heads' dropout is
    active only while the lpips package trains them, so there is none here.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y) -> jax.Array:
        _check_images(x, y)
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        vgg = VGG16Features(dtype=self.dtype, name="vgg")
        # Two passes rather than one over the concatenated batch: a loss's gradient then
        # flows back through the reconstruction's pass only, not through both halves.
        feats_x, feats_y = (vgg((a.astype(jnp.float32) - shift) / scale) for a in (x, y))
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = jnp.square(_normalised_difference(fx.astype(jnp.float32),
                                                     fy.astype(jnp.float32)))
            # A 1x1 conv to one channel without bias; ones (the package's un-learned baseline,
            # a plain channel sum) until the learned heads are loaded.
            head = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones,
                            param_dtype=jnp.float32, name=f"lin{k}")(diff)
            total = total + jnp.mean(head[..., 0], axis=(1, 2))
        return total
