"""The step loop shared by the samplers: one fori_loop over a traced count."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def run_steps(body, count, carry, use_python_loop=False):
    """carry = body(i, carry) for i in [0, count); count may be traced unless
    use_python_loop, which unrolls it in Python (for tests and debugging)."""
    if use_python_loop:
        for i in range(int(count)):
            carry = body(jnp.int32(i), carry)
        return carry
    return jax.lax.fori_loop(0, jnp.asarray(count, jnp.int32), body, carry)
