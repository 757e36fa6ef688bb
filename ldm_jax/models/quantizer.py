"""Vector quantisation for VQ autoencoders (taming-transformers' VectorQuantizer2 and
EMAVectorQuantizer semantics), NHWC: the last axis of z is the code dimension `e_dim`.

For every vector z_i the nearest code (squared L2 distance, first index on ties) is e_k, and

    zq   = z + stop_gradient(e_k - z)          straight-through: d zq / d z = I
    commitment = mean((stop_gradient(e_k) - z)^2)      pulls the encoder to its code
    codebook   = mean((e_k - stop_gradient(z))^2)      pulls the code to the encoder
    loss (legacy=True,  taming's default) = commitment + beta * codebook
    loss (legacy=False, the VQ-VAE paper) = beta * commitment + codebook

taming keeps `legacy=True` (the beta on the wrong term) for its released checkpoints; new models
should use legacy=False. Codebook init: U(-1/n_e, 1/n_e), as taming.

ema=True (VQ-VAE / VQ-VAE-2, taming's EMAVectorQuantizer): the codebook is not a parameter but
lives, with its statistics, in the `vq_stats` collection {embedding, cluster_size, embed_avg,
steps}, initialised as taming's EmbeddingEMA (embedding ~ N(0, 1), embed_avg = embedding,
cluster_size = 0). With train=True (and `vq_stats` mutable) each call, after quantising with the
current codebook, does taming's update:
    cluster_size <- decay * cluster_size + (1 - decay) * counts          counts_k = #{i: k_i = k}
    embed_avg    <- decay * embed_avg    + (1 - decay) * sum_{i: k_i = k} z_i
    n = sum(cluster_size);  smoothed = (cluster_size + eps) / (n + n_e * eps) * n
    embedding    <- embed_avg / smoothed
and loss = beta * commitment (no codebook term, no codebook gradient). As in taming there is no
bias correction: a code never used on the first step becomes about decay/eps times its initial
value and is, in effect, dead; `restart_dead_codes` is the remedy.

restart_dead_codes (ema=True only): after the update, every code whose bias-corrected EMA count
per batch, cluster_size / (1 - decay^steps), is below `dead_code_threshold` is moved onto an
encoder output of the current batch drawn uniformly (with replacement) with the rng stream
"vq_restart" (`apply(..., rngs={"vq_restart": key})`); its embed_avg is set to
vector * smoothed so that embedding == embed_avg / smoothed still holds. A restarted code that
then gets assignments takes their mean; one that gets none is moved again on the next step.
The threshold is in assignments per batch: compare it with the average, N / n_e, for N vectors
per (global) batch. With a gradient-trained codebook (ema=False) the codebook is a parameter and
cannot be rewritten inside `apply`; restarting it would belong in the train step, which this
module does not do (it raises).

Sharding: under `jax.jit` with the batch sharded, counts, sums, perplexity and usage are
computed with jnp over the whole (global) batch, so they are global statistics; the random
restart draws from the global batch too.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform(bound):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def nearest_code(flat, codebook):
    """Index of the nearest code (squared L2) for each row of flat (N, D); codebook (K, D)."""
    dots = jnp.einsum("nd,kd->nk", flat, codebook, precision=jax.lax.Precision.HIGHEST)
    d = (jnp.sum(jnp.square(flat), axis=1, keepdims=True)
         + jnp.sum(jnp.square(codebook), axis=1)[None, :] - 2.0 * dots)
    return jnp.argmin(d, axis=1).astype(jnp.int32)


def code_statistics(indices, n_e):
    """(counts (n_e,), perplexity, usage) of a flat index array.

    perplexity = exp(-sum_k p_k log(p_k + 1e-10)), p_k = counts_k / N (taming's formula):
    k for a uniform use of k codes. usage = fraction of the n_e codes used at least once."""
    counts = jnp.zeros((n_e,), jnp.float32).at[indices].add(1.0)
    p = counts / indices.shape[0]
    perplexity = jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))
    usage = jnp.mean((counts > 0).astype(jnp.float32))
    return counts, perplexity, usage


class VectorQuantizer(nn.Module):
    """z (..., e_dim) -> (zq, loss, info); see the module docstring.

    info: indices (z.shape[:-1], int32), perplexity, usage, commitment_loss, codebook_loss.
    """
    n_e: int
    e_dim: int
    beta: float = 0.25
    legacy: bool = True
    ema: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    restart_dead_codes: bool = False
    dead_code_threshold: float = 1e-2

    @nn.compact
    def __call__(self, z, train: bool = False):
        if z.shape[-1] != self.e_dim:
            raise ValueError(f"VectorQuantizer: the last axis of z has {z.shape[-1]} channels, "
                             f"expected e_dim={self.e_dim}")
        if self.restart_dead_codes and not self.ema:
            raise ValueError("VectorQuantizer: restart_dead_codes needs ema=True (a gradient-"
                             "trained codebook is a parameter and cannot be rewritten in apply)")
        dtype = jnp.promote_types(z.dtype, jnp.float32)
        zf = z.astype(dtype)
        flat = zf.reshape(-1, self.e_dim)
        if self.ema:
            emb = self.variable("vq_stats", "embedding", lambda: jax.random.normal(
                self.make_rng("params"), (self.n_e, self.e_dim), jnp.float32))
            cluster = self.variable("vq_stats", "cluster_size",
                                    lambda: jnp.zeros((self.n_e,), jnp.float32))
            embed_avg = self.variable("vq_stats", "embed_avg", lambda: emb.value)
            steps = self.variable("vq_stats", "steps", lambda: jnp.zeros((), jnp.int32))
            codebook = jax.lax.stop_gradient(emb.value.astype(dtype))
        else:
            codebook = self.param("embedding", _uniform(1.0 / self.n_e), (self.n_e, self.e_dim),
                                  jnp.float32).astype(dtype)

        idx = nearest_code(jax.lax.stop_gradient(flat), jax.lax.stop_gradient(codebook))
        zq = jnp.take(codebook, idx, axis=0).reshape(zf.shape)
        counts, perplexity, usage = code_statistics(idx, self.n_e)

        commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - zf))
        codebook_term = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(zf)))
        if self.ema:
            loss = self.beta * commitment
        elif self.legacy:
            loss = commitment + self.beta * codebook_term
        else:
            loss = self.beta * commitment + codebook_term

        if (self.ema and train and not self.is_initializing()
                and self.is_mutable_collection("vq_stats")):
            self._ema_update(jax.lax.stop_gradient(flat), idx, counts, emb, cluster, embed_avg,
                             steps)

        zq = zf + jax.lax.stop_gradient(zq - zf)
        info = {"indices": idx.reshape(z.shape[:-1]), "perplexity": perplexity, "usage": usage,
                "commitment_loss": commitment, "codebook_loss": codebook_term}
        return zq.astype(z.dtype), loss, info

    def _ema_update(self, flat, idx, counts, emb, cluster, embed_avg, steps):
        d = self.decay
        flat = flat.astype(jnp.float32)
        embed_sum = jnp.zeros((self.n_e, self.e_dim), jnp.float32).at[idx].add(flat)
        new_cluster = d * cluster.value + (1 - d) * counts
        new_avg = d * embed_avg.value + (1 - d) * embed_sum
        n = jnp.sum(new_cluster)
        smoothed = (new_cluster + self.eps) / (n + self.n_e * self.eps) * n
        new_emb = new_avg / smoothed[:, None]
        new_steps = steps.value + 1
        if self.restart_dead_codes:
            debiased = new_cluster / (1.0 - d ** new_steps.astype(jnp.float32))
            dead = (debiased < self.dead_code_threshold)[:, None]
            pick = jax.random.randint(self.make_rng("vq_restart"), (self.n_e,), 0, flat.shape[0])
            fresh = jnp.take(flat, pick, axis=0)
            new_emb = jnp.where(dead, fresh, new_emb)
            new_avg = jnp.where(dead, fresh * smoothed[:, None], new_avg)
        cluster.value = new_cluster
        embed_avg.value = new_avg
        emb.value = new_emb
        steps.value = new_steps
