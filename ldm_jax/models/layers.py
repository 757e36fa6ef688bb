"""Building blocks of the DDPM/ADM-style U-Net: time embedding, residual and attention blocks.

All modules take NHWC inputs. Parameters are float32 (`param_dtype`); `dtype` is the compute
dtype, so bf16 training keeps fp32 master weights. Normalisation statistics and softmax are
always computed in float32.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention_kernels import attention
from ldm_jax.models.initializers import lecun_normal

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       freq_shift: float = 1.0, flip_sin_to_cos: bool = False) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B,) -> (B, dim).

    The defaults reproduce the DDPM paper's embedding (frequencies exp(-log(P) k / (half - 1)),
    sines first); SD uses freq_shift=0 and cosines first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """GroupNorm with float32 statistics whatever the compute dtype (bf16 variance is too coarse)."""
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups; "
                             "choose channel widths that are multiples of model.norm_groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        g = xf.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = g.reshape(x.shape) * scale + bias
        return y.astype(self.dtype)


def _conv(features, kernel=3, stride=1, dtype=jnp.float32, name=None, zero_init=False, padding=None):
    pad = kernel // 2
    padding = ((pad, pad), (pad, pad)) if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=padding, dtype=dtype, name=name,
                   kernel_init=nn.initializers.zeros if zero_init else lecun_normal)


class ResBlock(nn.Module):
    """GN-SiLU-conv, plus the projected time embedding, GN-SiLU-dropout-conv, residual."""
    out_channels: int
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x, temb, train: bool):
        norm = lambda name: GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name=name)
        h = nn.silu(norm("norm1")(x))
        h = _conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        t = nn.Dense(self.out_channels, dtype=self.dtype, kernel_init=lecun_normal, name="time_proj")(nn.silu(temb))
        h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(norm("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Zero-initialised last conv: each block starts as the identity (DDPM's init_scale=0).
        h = _conv(self.out_channels, dtype=self.dtype, name="conv2", zero_init=True)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, kernel=1, dtype=self.dtype, name="skip")(x)
        return x.astype(self.dtype) + h


class SelfAttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection.

    Attention runs through `attention_kernels.attention`, so `attention` picks its kernel as in
    the cross-attention blocks (attention_impl.IMPLEMENTATIONS).
    """
    num_heads: int = 1
    head_dim: int | None = None  # when set, overrides num_heads = channels // head_dim
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-5
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        heads = c // self.head_dim if self.head_dim else self.num_heads
        if c % heads:
            raise ValueError(f"attention: {c} channels cannot be split into {heads} heads")
        h = GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm")(x)
        h = h.reshape(b, hgt * wid, c)
        qkv = nn.DenseGeneral((3, heads, c // heads), dtype=self.dtype, kernel_init=lecun_normal,
                              name="qkv")(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention(q, k, v, implementation=self.attention)
        out = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, name="proj_out",
                              kernel_init=nn.initializers.zeros)(out)
        return x.astype(self.dtype) + out.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding=1 pads every side (ADM, SD); padding=0 pads only bottom/right,
    which is TensorFlow's 'SAME' on even sizes, as in the DDPM reference (diffusers'
    downsample_padding=0)."""
    channels: int
    dtype: Dtype = jnp.float32
    padding: int = 1

    @nn.compact
    def __call__(self, x):
        if self.padding not in (0, 1):
            raise ValueError(f"Downsample: padding must be 0 or 1, got {self.padding}")
        pad = ((1, 1), (1, 1)) if self.padding else ((0, 1), (0, 1))
        return _conv(self.channels, stride=2, dtype=self.dtype, name="conv", padding=pad)(x)


class Upsample(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        # Nearest-neighbour 2x by broadcasting: cheaper than jax.image.resize on CPU and exact.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return _conv(self.channels, dtype=self.dtype, name="conv")(x)
