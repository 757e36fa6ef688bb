"""The latent-diffusion spatial transformer: self-attention, cross-attention to a context
(text embeddings), and a GEGLU feed-forward over the pixels of an NHWC feature map.

Attention runs the implementation `attention_impl.choose` picks (or the one asked for):
`jax.nn.dot_product_attention` with XLA's or cuDNN's kernel, or, by default on the CPU,
`chunked_attention`, which computes the same function query block by query block and
recomputes the softmax in the backward pass instead of keeping it. Layer norms and the group
norm compute their statistics in float32.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import attention_impl
from ldm_jax.models.initializers import lecun_normal
from ldm_jax.models.layers import GroupNorm

Dtype = Any

# Elements of one block of attention scores (batch x heads x query block x keys) in
# chunked_attention: 2**19 float32 = 2 MiB, which stays in cache between the ops that read it.
# At the sd-small U-Net's 32x32 level (batch 4, 8 heads of 8 channels, 1024 tokens) the whole
# score tensor is 128 MiB; there jax.nn.dot_product_attention took about 1.5 s forward and
# backward and 0.37 s forward on 2 shared CPU cores, against 0.16-0.2 s and 0.025 s in blocks
# of 16-64 queries, and its backward needed 513 MiB of XLA scratch against 10-22 MiB.
_SCORE_BLOCK_ELEMENTS = 2 ** 19


def attention(q, k, v, mask=None, implementation: str = "auto"):
    """Multi-head attention of q (B, T, N, H) to k, v (B, S, N, H) with an optional key mask
    (B, S) (True = attend); scale 1/sqrt(H). `implementation` is one of
    attention_impl.IMPLEMENTATIONS; "auto" lets the platform, dtype and shapes choose."""
    impl = attention_impl.choose(q.dtype, q.shape[-1], mask is not None, implementation)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask)
    if mask is not None:  # key padding mask (B, S) -> (B, heads, T, S) by broadcasting
        mask = mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def chunked_attention(q, k, v, mask=None, block=None):
    """`attention` in blocks of `block` queries (default: as many as keep one block of scores
    near _SCORE_BLOCK_ELEMENTS), as a loop, so each block's scores stay in cache. The backward
    pass recomputes the softmax from q, k and each query's log-sum-exp (as flash attention),
    so no (T, S) tensor outlives its block. Scores and softmax are float32."""
    b, t, n, h = q.shape
    s = k.shape[1]
    if block is None:
        block = _query_block(t, max(1, _SCORE_BLOCK_ELEMENTS // (b * n * s)))
    elif t % block:
        raise ValueError(f"chunked_attention: block {block} does not divide {t} queries")
    bias = None
    if mask is not None:  # finite, as jax.nn.dot_product_attention, so masked rows stay finite
        bias = jnp.where(mask.astype(bool), 0.0, -0.7 * jnp.finfo(jnp.float32).max)
        bias = bias[:, None, None, :].astype(jnp.float32)
    heads_major = lambda a: a.transpose(0, 2, 1, 3)  # (B, N, L, H): each head's rows contiguous
    out = _attention_core(heads_major(q * jnp.asarray(h ** -0.5, q.dtype)), heads_major(k),
                          heads_major(v), bias, block)
    return heads_major(out)


def _query_block(t: int, limit: int) -> int:
    """The largest divisor of t that is at most limit."""
    return max(d for d in range(1, min(t, limit) + 1) if t % d == 0)


def _to_blocks(a, block):  # (B, N, T, X) -> (T / block, B, N, block, X)
    b, n, t, x = a.shape
    return a.reshape(b, n, t // block, block, x).transpose(2, 0, 1, 3, 4)


def _from_blocks(a):
    nb, b, n, block, x = a.shape
    return a.transpose(1, 2, 0, 3, 4).reshape(b, n, nb * block, x)


def _scores(q, k, bias):
    s = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    return s if bias is None else s + bias


def _forward_block(q, k, v, bias):
    s = _scores(q, k, bias)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    total = p.sum(-1, keepdims=True)
    out = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    return out.astype(q.dtype), m + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q, k, v, bias, block):
    return _attention_forward(q, k, v, bias, block)[0]


def _attention_forward(q, k, v, bias, block):
    if block >= q.shape[2]:
        out, lse = _forward_block(q, k, v, bias)
    else:
        out, lse = jax.lax.map(lambda qb: _forward_block(qb, k, v, bias), _to_blocks(q, block))
        out, lse = _from_blocks(out), _from_blocks(lse)
    return out, (q, k, v, bias, out, lse)


def _backward_block(k, v, bias, q, out, lse, dout):
    p = jnp.exp(_scores(q, k, bias) - lse)
    dout32 = dout.astype(jnp.float32)
    dv = jnp.einsum("bnts,bnth->bnsh", p, dout32)
    dp = jnp.einsum("bnth,bnsh->bnts", dout32, v, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.sum(dout32 * out.astype(jnp.float32), -1, keepdims=True))
    dq = jnp.einsum("bnts,bnsh->bnth", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnts,bnth->bnsh", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _attention_backward(block, residuals, dout):
    q, k, v, bias, out, lse = residuals
    if block >= q.shape[2]:
        dq, dk, dv = _backward_block(k, v, bias, q, out, lse, dout)
    else:
        def step(acc, blocks):
            dq, dk, dv = _backward_block(k, v, bias, *blocks)
            return (acc[0] + dk, acc[1] + dv), dq

        zeros = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(step, zeros, tuple(_to_blocks(a, block)
                                                       for a in (q, out, lse, dout)))
        dq = _from_blocks(dq)
    dbias = None if bias is None else jnp.zeros_like(bias)  # the mask is not differentiated
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


_attention_core.defvjp(_attention_forward, _attention_backward)


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
