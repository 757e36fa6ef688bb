"""The FID Inception-v3: TensorFlow's 2015-12-05 Inception graph, in Flax Linen.

FID, KID, precision/recall and the Inception Score are defined by this one frozen network; a
retrained or torchvision Inception gives other numbers. This port reproduces the graph's
quirks, which differ from torchvision's Inception3:

* input: pixel values in [0, 255], resized to 299x299 by TF1 `ResizeBilinear` with
  `align_corners=False`, which maps output pixel j to input coordinate j * in/out (no half-pixel
  offset, edge pixels repeated, no antialiasing), then scaled by (x - 128) / 128, i.e. into
  [-1, 0.9921875];
* every conv is bias-free and followed by inference batch norm with eps 0.001, then ReLU;
* the pooling branches of the A, C and first E blocks average over the window's in-image pixels
  only (TF SAME padding: padded zeros are not counted); the last E block (Mixed_7c) max-pools;
* features are the 2048-d global average ("pool_3"); the classifier has 1008 classes.

Parameters use torchvision's layer names (Conv2d_1a_3x3, Mixed_5b/branch1x1, ..., fc). Each conv
holds its batch-norm constants beside the kernel: {"kernel" (HWIO), "scale", "bias", "mean",
"var"}; this network is never trained, so its running statistics are plain parameters and one
tree holds everything. The "fc" head (kernel (2048, 1008), bias) is optional: weights that lack
it give features only. Weights come from `ldm_jax.convert.inception_weights`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3

# Full fp32 convolutions by default. XLA's default on GPUs (TF32 arithmetic) ran 4x faster on an
# H200 but moved the features by ~5e-4 relative (against 3e-7 at HIGHEST), which is no longer the
# reference network.
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


def resize_bilinear_tf(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """NHWC float images resized to size x size as TF1 `ResizeBilinear(align_corners=False)`.

    Output index j samples input coordinate j * in_size / size; the neighbours are
    floor(c) and min(floor(c) + 1, in_size - 1). Separable, so one axis at a time, each by
    two gathers and a lerp (exact in fp32, unlike a matmul under reduced GPU precision).
    """
    def along(x, axis):
        in_size = x.shape[axis]
        if in_size == size:
            return x
        coord = jnp.arange(size, dtype=jnp.float32) * jnp.float32(in_size / size)
        lo = jnp.floor(coord).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, in_size - 1)
        shape = [1] * x.ndim
        shape[axis] = size
        frac = (coord - lo).reshape(shape)
        a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
        return a + (b - a) * frac

    return along(along(images, 2), 1)  # width first, then height, as TF does


def preprocess(images: jax.Array) -> jax.Array:
    """(N, H, W, 3) pixels in [0, 255] (uint8 or float) -> the network's 299x299 input."""
    x = resize_bilinear_tf(images.astype(jnp.float32))
    return (x - 128.0) * (1.0 / 128.0)


class ConvBN(nn.Module):
    """Bias-free conv, inference batch norm (eps 0.001), ReLU."""
    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric (rows, cols) zero padding
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, kernel, (self.strides, self.strides), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        multiplier = scale * jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(y * multiplier + (bias - mean * multiplier))


def _avg_pool_3x3(x):
    # TF SAME padding: the mean over the pixels inside the image.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):  # Mixed_5b..5d, 35x35
    pool_features: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        conv = lambda c, k, name, pad=0: ConvBN(c, (k, k), padding=(pad, pad),
                                                precision=self.precision, name=name)
        b1 = conv(64, 1, "branch1x1")(x)
        b5 = conv(64, 5, "branch5x5_2", 2)(conv(48, 1, "branch5x5_1")(x))
        b3 = conv(64, 1, "branch3x3dbl_1")(x)
        b3 = conv(96, 3, "branch3x3dbl_3", 1)(conv(96, 3, "branch3x3dbl_2", 1)(b3))
        bp = conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b3 = ConvBN(384, (3, 3), strides=2, precision=p, name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), precision=p, name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), padding=(1, 1), precision=p, name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=2, precision=p, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convs
    channels_7x7: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        c7, p = self.channels_7x7, self.precision
        row = lambda c, name: ConvBN(c, (1, 7), padding=(0, 3), precision=p, name=name)
        col = lambda c, name: ConvBN(c, (7, 1), padding=(3, 0), precision=p, name=name)
        one = lambda c, name: ConvBN(c, (1, 1), precision=p, name=name)
        b1 = one(192, "branch1x1")(x)
        b7 = col(192, "branch7x7_3")(row(c7, "branch7x7_2")(one(c7, "branch7x7_1")(x)))
        bd = one(c7, "branch7x7dbl_1")(x)
        bd = row(c7, "branch7x7dbl_3")(col(c7, "branch7x7dbl_2")(bd))
        bd = row(192, "branch7x7dbl_5")(col(c7, "branch7x7dbl_4")(bd))
        bp = one(192, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b3 = ConvBN(192, (1, 1), precision=p, name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), strides=2, precision=p, name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), precision=p, name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), precision=p, name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), precision=p, name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), strides=2, precision=p, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool), 8x8
    max_pool: bool
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x):
        p = self.precision
        row = lambda name: ConvBN(384, (1, 3), padding=(0, 1), precision=p, name=name)
        col = lambda name: ConvBN(384, (3, 1), padding=(1, 0), precision=p, name=name)
        b1 = ConvBN(320, (1, 1), precision=p, name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), precision=p, name="branch3x3_1")(x)
        bd = ConvBN(448, (1, 1), precision=p, name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), padding=(1, 1), precision=p, name="branch3x3dbl_2")(bd)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = ConvBN(192, (1, 1), precision=p, name="branch_pool")(pooled)
        return jnp.concatenate([b1, row("branch3x3_2a")(b3), col("branch3x3_2b")(b3),
                                row("branch3x3dbl_3a")(bd), col("branch3x3dbl_3b")(bd), bp],
                               axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception on preprocessed input (N, 299, 299, 3) in [-1, 1].

    Returns {"pool": (N, 2048)} and, with `with_logits`, "logits": (N, 1008) from the "fc" head.
    """
    with_logits: bool = False
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x) -> dict[str, jax.Array]:
        p = self.precision
        x = ConvBN(32, (3, 3), strides=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = ConvBN(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, precision=p, name=name)(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, precision=p, name=name)(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))  # the 8x8 map of a 299x299 input
        out = {"pool": pool}
        if self.with_logits:
            fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
            out["logits"] = fc(pool)
            # The original Inception Score code multiplied by the kernel alone (no bias).
            out["logits_unbiased"] = out["logits"] - fc.variables["params"]["bias"]
        return out


def inception_features(params: dict, images: jax.Array, *,
                       precision: Any = DEFAULT_PRECISION) -> dict[str, jax.Array]:
    """FID Inception outputs for a batch of images, as the TF graph computes them.

    params: the `InceptionV3` parameter tree (from `ldm_jax.convert.inception_weights`); the
      "logits" output appears iff it holds the "fc" head.
    images: (N, H, W, 3) pixel values in [0, 255], any H and W: uint8, or float read on the same
      scale and not rounded (round first to measure images as a saved PNG would hold them).
      Resized to 299x299 by TF1 bilinear resampling (see `resize_bilinear_tf`).
    precision: of the convs and the fc; the default reproduces the reference, a lower one trades
      that for speed on GPUs (static: `jax.jit(..., static_argnames="precision")`).
    Returns {"pool": (N, 2048) float32} and, with the head, "logits" (N, 1008) float32 with
      the fc bias and "logits_unbiased" without it (what the Inception Score is computed from,
      as the original Inception Score code did).

    A pure function of its arguments: jit it, with the batch sharded across devices if wanted.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    model = InceptionV3(with_logits="fc" in params, precision=precision)
    return model.apply({"params": params}, preprocess(images))


def abstract_params(with_logits: bool = True) -> dict:
    """The parameter tree's shapes and dtypes (jax.ShapeDtypeStruct leaves), without computing."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    model = InceptionV3(with_logits=with_logits)
    return jax.eval_shape(lambda a: model.init(jax.random.PRNGKey(0), a), x)["params"]
