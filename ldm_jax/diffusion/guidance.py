"""Classifier-free guidance (Ho & Salimans 2022) for label-conditioned models.

Training withholds all labels of a random fraction of the examples, so one network learns both
the conditional and the unconditional model; sampling then extrapolates from the second to the
first: out = uncond + scale * (cond - uncond). scale 1 is the plain conditional model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.models.label_embedding import DROPPED


def drop_labels(labels, key, prob):
    """Withhold every label of each row (set it to DROPPED) with probability `prob`."""
    drop = jax.random.bernoulli(key, prob, (labels.shape[0], 1))
    return jnp.where(drop, DROPPED, labels)


def guided_output(apply, x, t, labels, scale):
    """apply(x, t, labels) under guidance `scale`; both halves run as one batch of 2N."""
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, jnp.full_like(labels, DROPPED)]))
    cond, uncond = jnp.split(out, 2)
    return uncond + scale * (cond - uncond)
