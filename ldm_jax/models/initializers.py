"""Parameter initialisers that can share one random draw for the whole model.

Flax gives every parameter its own key and its own RNG call. Under `jax.jit`, XLA on CPU then
compiles one random-number kernel per parameter, and initialising a few hundred parameters
takes longer to compile than to run. `init_from_one_draw` runs a module's init with every
random initialiser of this file reading consecutive slices of a single truncated-normal draw:
the result is still a pure function of the key, with one RNG kernel instead of hundreds.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp

# Truncated at +-2 std; dividing by this constant restores unit variance (as flax's lecun_normal).
_TRUNCATED_STD = 0.87962566103423978

# Set only while init_from_one_draw traces an init: {"draw": array or None, "sizes": [], "offset": int}
_SHARED_DRAW = contextvars.ContextVar("shared_draw", default=None)


def lecun_normal(key, shape, dtype=jnp.float32):
    """Truncated normal with variance 1/fan_in, fan_in = product of all but the last dim."""
    std = 1.0 / math.sqrt(max(math.prod(shape[:-1]), 1)) / _TRUNCATED_STD
    shared = _SHARED_DRAW.get()
    if shared is None:
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)
    n = math.prod(shape)
    if shared["draw"] is None:  # first pass: only count
        shared["sizes"].append(n)
        return jnp.zeros(shape, dtype)
    start = shared["offset"]
    shared["offset"] += n
    return (shared["draw"][start:start + n].reshape(shape) * std).astype(dtype)


@contextlib.contextmanager
def _sharing(state):
    token = _SHARED_DRAW.set(state)
    try:
        yield
    finally:
        _SHARED_DRAW.reset(token)


def init_from_one_draw(init_fn, rng, *args, **kwargs):
    """`init_fn(rng, *args, **kwargs)` (e.g. `module.init`), with one RNG draw for all weights.

    Traceable: call it inside `jax.jit`/`jax.eval_shape`. Initialisers are called in the same
    order on both passes because module construction is deterministic.
    """
    counting = {"draw": None, "sizes": [], "offset": 0}
    with _sharing(counting):
        jax.eval_shape(lambda: init_fn(rng, *args, **kwargs))
    total = sum(counting["sizes"])
    draw_key = jax.random.fold_in(rng, 0x5EED)
    # The barrier keeps XLA from fusing (and so duplicating) the RNG into every slice.
    draw = jax.lax.optimization_barrier(
        jax.random.truncated_normal(draw_key, -2.0, 2.0, (max(total, 1),), jnp.float32))
    serving = {"draw": draw, "sizes": [], "offset": 0}
    with _sharing(serving):
        variables = init_fn(rng, *args, **kwargs)
    if serving["offset"] != total:
        raise RuntimeError("initialisers were called differently on the two init passes")
    return variables
