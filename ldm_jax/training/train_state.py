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
