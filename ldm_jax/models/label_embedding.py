"""Integer labels -> one vector added to the U-Net's time embedding (ADM-style class conditioning);
and `VectorEmbedding`, the same for a real-valued conditioning vector.

A model may be conditioned on several labels at once (the shapes dataset has ten: background,
and colour, shape, size and position of each object). Each label has its own table; the rows
picked are summed. Two values besides 0..size-1 are understood:
  ABSENT  (-1) the attribute does not exist, e.g. the second object of a one-object image;
  DROPPED (-2) the label is withheld: the unconditional model of classifier-free guidance.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.initializers import lecun_normal

ABSENT = -1
DROPPED = -2
_OFFSET = 2  # table row of value v is v + 2, so DROPPED -> 0 and ABSENT -> 1


class LabelEmbedding(nn.Module):
    sizes: Sequence[int]  # number of values of each label, in the column order of `labels`
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels):
        if labels.ndim != 2 or labels.shape[1] != len(self.sizes):
            raise ValueError(f"labels must have shape (batch, {len(self.sizes)}), got {labels.shape}")
        # Unit-variance rows would sum to a vector len(sizes) times the time embedding's variance.
        init = nn.initializers.normal(len(self.sizes) ** -0.5)
        out = 0.0
        for i, size in enumerate(self.sizes):
            table = nn.Embed(size + _OFFSET, self.features, dtype=self.dtype,
                             embedding_init=init, name=f"label{i}")
            out = out + table(labels[:, i] + _OFFSET)
        return out


class VectorEmbedding(nn.Module):
    """A conditioning vector (B, D) -> Dense, SiLU, Dense -> added to the time embedding, as the
    time embedding itself is made (e.g. a noise-level or image embedding)."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, vector):
        h = nn.Dense(self.features, dtype=self.dtype, kernel_init=lecun_normal, name="dense1")(
            vector.astype(self.dtype))
        return nn.Dense(self.features, dtype=self.dtype, kernel_init=lecun_normal,
                        name="dense2")(nn.silu(h))


class LabelTokens(nn.Module):
    """Labels as a sequence of `features`-wide tokens, one per label (B, K, features), for a
    U-Net to cross-attend to: LDM's ClassEmbedder for its class-conditional models. Row 0 of
    each table is DROPPED, the unconditional token of classifier-free guidance."""
    sizes: Sequence[int]
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels):
        if labels.ndim != 2 or labels.shape[1] != len(self.sizes):
            raise ValueError(f"labels must have shape (batch, {len(self.sizes)}), got {labels.shape}")
        tokens = [nn.Embed(size + _OFFSET, self.features, dtype=self.dtype,
                           embedding_init=nn.initializers.normal(1.0),
                           name=f"label{i}")(labels[:, i] + _OFFSET)
                  for i, size in enumerate(self.sizes)]
        return jnp.stack(tokens, axis=1)
