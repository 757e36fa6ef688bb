"""Classifier-free guidance (Ho & Salimans 2022) for label-conditioned models.

Training withholds all labels of a random fraction of the examples, so one network learns both
the conditional and the unconditional model; sampling then extrapolates from the second to the
first: out = uncond + scale * (cond - uncond). scale 1 is the plain conditional model.

Guidance rescale (Lin et al. 2023, sec. 3.4) pulls the guided output's per-sample standard
deviation back towards the conditional output's, against the over-saturation of large scales:
out = rescale * guided * std(cond) / std(guided) + (1 - rescale) * guided.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.models.label_embedding import DROPPED


def drop_labels(labels, key, prob):
    """Withhold every label of each row (set it to DROPPED) with probability `prob`."""
    drop = jax.random.bernoulli(key, prob, (labels.shape[0], 1))
    return jnp.where(drop, DROPPED, labels)


def combine(cond, uncond, scale, rescale=0.0):
    """The guided model output from the conditional and unconditional ones."""
    guided = uncond + scale * (cond - uncond)
    axes = tuple(range(1, cond.ndim))
    ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
    return rescale * (guided * ratio) + (1 - rescale) * guided


def guided_output(apply, x, t, labels, scale, rescale=0.0):
    """apply(x, t, labels) under guidance `scale` (and `rescale`); both halves run as one batch
    of 2N."""
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, jnp.full_like(labels, DROPPED)]))
    cond, uncond = jnp.split(out, 2)
    return combine(cond, uncond, scale, rescale)
