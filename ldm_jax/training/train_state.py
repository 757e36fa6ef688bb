"""The train state: everything a step reads and writes, one pytree, checkpointed as a whole."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # float32 master weights
    ema_params: Any          # exponential moving average of params, used for sampling
    opt_state: Any
    rng: jax.Array           # base key; each step folds in its step number

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   ema_params=jax.tree_util.tree_map(jnp.copy, params),
                   opt_state=tx.init(params), rng=rng)


def ema_update(ema, params, decay):
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)


EMA_WARMUPS = ("compvis", "power", "none")


def ema_decay_at(n, training):
    """The decay of EMA update number `n` (1-based: the update after optimizer step n), from
    training.ema_decay and its warm-up, training.ema_warmup. `n` may be traced.

    A fixed decay d still holds d**n of the random init after n updates (86% at d=0.9999 after
    1500), so the EMA would sample noise long after the params draw well. The warm-ups cap the
    decay by one that grows with n:
      compvis  min(d, (1 + n) / (10 + n))                    CompVis latent-diffusion's LitEma
      power    min(d, 1 - (1 + s / inv_gamma) ** -power), s = n - 1, and 0 at s = 0
               (the EMA becomes a copy of the params)        diffusers' EMAModel, use_ema_warmup
      none     d
    """
    decay = training.ema_decay
    if training.ema_warmup == "none":
        return decay  # a Python float: the arithmetic of runs from before the warm-up existed
    n = jnp.asarray(n, jnp.result_type(float))
    if training.ema_warmup == "compvis":
        return jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    if training.ema_warmup != "power":
        raise ValueError(f"training.ema_warmup={training.ema_warmup!r} is not one of "
                         f"{list(EMA_WARMUPS)}")
    s = jnp.maximum(n - 1.0, 0.0)
    warm = 1.0 - (1.0 + s / training.ema_inv_gamma) ** -training.ema_power
    return jnp.where(s <= 0, 0.0, jnp.minimum(decay, warm))


def ema_after_step(ema, params, step, training):
    """The EMA after optimizer step `step` (0-based, the state's counter before it increments)
    has produced `params`: update number step + 1, which the checkpointed counter makes exact
    on resume."""
    return ema_update(ema, params, ema_decay_at(step + 1, training))
