"""Attention kernels: `attention` runs the one `attention_impl` picks for the call, and
`chunked_attention` is our blocked kernel for the CPU (query blocks in a loop, the softmax
recomputed in the backward pass instead of kept), which also stands in for flash attention
where no fused kernel is available.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ldm_jax.models import attention_impl

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
