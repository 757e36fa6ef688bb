"""The latent-diffusion spatial transformer: self-attention, cross-attention to a context
(text embeddings), and a GEGLU feed-forward over the pixels of an NHWC feature map.

Attention runs the implementation `attention_impl.choose` picks (or the one asked for):
`jax.nn.dot_product_attention` with XLA's or cuDNN's kernel, or, by default on the CPU,
`chunked_attention`, which computes the same function query block by query block and
recomputes the softmax in the backward pass instead of keeping it. Layer norms and the group
norm compute their statistics in float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.attention_kernels import attention
from ldm_jax.models.initializers import lecun_normal
from ldm_jax.models.layers import GroupNorm

Dtype = Any


class Attention(nn.Module):
    """Multi-head attention of `x` (B, L, C) to `context` (B, S, D), or to itself when
    `context` is None. q/k/v carry no bias, the output projection does (as SD v1)."""
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    implementation: str = "auto"  # attention_impl.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        kv = x if context is None else context.astype(self.dtype)
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), use_bias=False,
                                            dtype=self.dtype, kernel_init=lecun_normal, name=name)
        q, k, v = proj("to_q")(x), proj("to_k")(kv), proj("to_v")(kv)
        out = attention(q, k, v, mask, self.implementation)  # scale 1/sqrt(head_dim)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), dtype=self.dtype,
                               kernel_init=lecun_normal, name="to_out")(out)


class FeedForward(nn.Module):
    """GEGLU: one projection to 2 x inner, half of it gated by gelu of the other half."""
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        inner = self.mult * x.shape[-1]
        h = nn.Dense(2 * inner, dtype=self.dtype, kernel_init=lecun_normal, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)  # exact (erf) gelu, as PyTorch's default
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=lecun_normal, name="out")(h)


class BasicTransformerBlock(nn.Module):
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # attention_impl.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.head_dim, self.dtype, self.attention,
                                      name=name)
        x = x + attn("attn1")(norm("norm1")(x))
        # Without a context, the second attention is self-attention again (mask is for context).
        x = x + attn("attn2")(norm("norm2")(x), context,
                              context_mask if context is not None else None)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, projection in, `depth` transformer blocks over the H*W tokens, projection
    out, residual. Projections are 1x1 convs (SD v1) or linear layers (SD v2)."""
    heads: int
    head_dim: int
    depth: int = 1
    norm_groups: int = 32
    use_linear_projection: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # attention_impl.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        b, hgt, wid, c = x.shape
        inner = self.heads * self.head_dim

        def proj(features, name, zero_init=False):
            init = nn.initializers.zeros if zero_init else lecun_normal
            if self.use_linear_projection:
                return nn.Dense(features, dtype=self.dtype, kernel_init=init, name=name)
            return nn.Conv(features, (1, 1), dtype=self.dtype, kernel_init=init, name=name)

        h = GroupNorm(self.norm_groups, 1e-6, dtype=self.dtype, name="norm")(x)
        # A 1x1 conv and a Dense are the same map on NHWC; only the parameter shape differs.
        h = proj(inner, "proj_in")(h).reshape(b, hgt * wid, inner)
        for j in range(self.depth):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.dtype, self.attention,
                                      name=f"block{j}")(h, context, context_mask)
        # Zero-initialised output: each transformer starts as the identity, as in LDM.
        h = proj(c, "proj_out", zero_init=True)(h.reshape(b, hgt, wid, inner))
        return x.astype(self.dtype) + h
