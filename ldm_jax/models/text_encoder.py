"""A transformer text encoder: LDM's from-scratch caption encoder and, with CLIP's settings,
CLIP's text model.

Token embedding + learned position embedding, `depth` pre-LayerNorm blocks (self-attention with
biased q/k/v/out projections, then an MLP fc1 -> activation -> fc2), and a final LayerNorm.
Parameter names follow that structure so a CLIP checkpoint maps onto them one to one:

    token_embedding/embedding         (vocab_size, width)
    position_embedding/embedding      (max_length, width)
    layers_{i}/norm1, norm2           scale, bias (width,)
    layers_{i}/attn/{q,k,v,out}       kernel (width, width), bias (width,)
    layers_{i}/mlp/fc1                kernel (width, mlp_ratio*width), bias
    layers_{i}/mlp/fc2                kernel (mlp_ratio*width, width), bias
    final_norm                        scale, bias (width,)

CLIP (SD v1: ViT-L/14 text) is `causal=True, activation="quick_gelu"`; SD v2's OpenCLIP text
model uses `activation="gelu"` and `output="penultimate"`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.initializers import lecun_normal

Dtype = Any

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf, PyTorch's default
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}
OUTPUTS = ("last", "penultimate")


def _normal(std: float):
    """Truncated normal with a fixed std, drawn through `lecun_normal` so that it shares
    `init_from_one_draw`'s single random draw (lecun_normal's std is 1/sqrt(fan_in))."""
    def init(key, shape, dtype=jnp.float32):
        fan_in = max(math.prod(shape[:-1]), 1)
        return (lecun_normal(key, shape, jnp.float32) * (std * math.sqrt(fan_in))).astype(dtype)
    return init


def _dense(features: int, dtype, name: str):
    return nn.Dense(features, dtype=dtype, kernel_init=lecun_normal, name=name)


class SelfAttention(nn.Module):
    heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, length, width = x.shape
        split = lambda t: t.reshape(b, length, self.heads, width // self.heads)
        q = split(_dense(width, self.dtype, "q")(x))
        k = split(_dense(width, self.dtype, "k")(x))
        v = split(_dense(width, self.dtype, "v")(x))
        if mask is not None:  # key padding mask (B, L) -> (B, heads, L, L) by broadcasting
            mask = mask.astype(bool)[:, None, None, :]
        # Combines the key mask with the causal mask; scale 1/sqrt(head_dim).
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
        return _dense(width, self.dtype, "out")(out.reshape(b, length, width))


class MLP(nn.Module):
    mlp_ratio: int = 4
    activation: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _dense(self.mlp_ratio * x.shape[-1], self.dtype, "fc1")(x)
        return _dense(x.shape[-1], self.dtype, "fc2")(ACTIVATIONS[self.activation](h))


class TextBlock(nn.Module):
    heads: int
    mlp_ratio: int = 4
    activation: str = "gelu"
    causal: bool = False
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        # Flax LayerNorm computes its statistics in float32 whatever the compute dtype.
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + SelfAttention(self.heads, self.causal, self.dtype, name="attn")(
            norm("norm1")(x), mask)
        return x + MLP(self.mlp_ratio, self.activation, self.dtype, name="mlp")(norm("norm2")(x))


class TextTransformer(nn.Module):
    """ids (B, L) int, L <= max_length, and an optional mask (B, L), True on real tokens ->
    hidden states (B, L, width) in `dtype`.

    output="last": the final LayerNorm of the last block's output (CLIP's last_hidden_state).
    output="penultimate": the final LayerNorm of block depth-1's output, i.e. of the last
    block's input (SD v2, and diffusers' clip_skip=1). The last block's weights are still
    created at init, so one parameter tree serves both outputs.
    """
    vocab_size: int
    max_length: int
    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    activation: str = "gelu"
    causal: bool = False
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask=None, output: str = "last"):
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}; use one of {OUTPUTS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; use one of {tuple(ACTIVATIONS)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if output == "penultimate" and self.depth < 2:
            raise ValueError("output='penultimate' needs depth >= 2")
        length = ids.shape[-1]
        if length > self.max_length:
            raise ValueError(f"{length} tokens, more than the text encoder's max_length "
                             f"{self.max_length}; tokenize with max_length={self.max_length}")
        tokens = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                          embedding_init=_normal(0.02), name="token_embedding")(ids)
        positions = nn.Embed(self.max_length, self.width, dtype=self.dtype,
                             embedding_init=_normal(0.01), name="position_embedding")
        x = tokens + positions(jnp.arange(length))[None]
        stop = self.depth - 1 if output == "penultimate" else self.depth
        for i in range(self.depth):
            # Skipping the unused last block saves its compute, except at init.
            if i >= stop and not self.is_initializing():
                break
            h = TextBlock(self.heads, self.mlp_ratio, self.activation, self.causal,
                          self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x, mask)
            x = h if i < stop else x
        return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_norm")(x)


def pooled(hidden, ids, eos_id: int | None = None):
    """The hidden state (B, width) at each sequence's end token, as CLIP pools its text.

    eos_id=None: at the highest token id (original CLIP, whose end token has the largest id);
    otherwise at the first position holding `eos_id` (sequences padded with the end token, or
    vocabularies where it is not the largest id).
    """
    if eos_id is None:
        pos = jnp.argmax(ids, axis=-1)
    else:
        pos = jnp.argmax(ids == eos_id, axis=-1)  # first match
    return jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]


class TextProjection(nn.Module):
    """CLIPTextModelWithProjection's head: pooled end-token states (B, width) -> text_embeds
    (B, features), one linear map without bias (CLIP's text side of CLIP score).

    Converted CLIP checkpoints keep its params beside the encoder's, as params["text_projection"]
    (TextTransformer ignores that entry):
    `TextProjection(dim).apply({"params": params["text_projection"]}, pooled(hidden, ids))`.
    """
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", lecun_normal, (x.shape[-1], self.features))
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
