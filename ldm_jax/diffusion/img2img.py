"""img2img and blended inpainting for the samplers (diffusers' img2img and
4-channel inpaint pipelines).

Of n grid steps, strength s runs the last m = min(floor(n s), n), skipping
the first n - m; the state starts as the clean `init` noised to the first
remaining timestep with the sampler's own forward process, and with an
inpainting mask every step is followed by
  x = (1 - mask) * init_noised_to_the_next_timestep + mask * x
(`init` itself after the last step). The sampler modules supply the noising
coefficients; this module holds what they share.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Img2Img(NamedTuple):
    init: jax.Array                 # clean data x0, in the sampler's dtype
    skip: jax.Array                 # int32: grid steps skipped, n - m
    mask: Optional[jax.Array]       # 1 = generate, 0 = keep init; None: no blending
    from_noise: jax.Array           # bool: start from the plain x_T, not noised init


def _is_concrete_scalar(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_strength(strength):
    if _is_concrete_scalar(strength) and not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def run_length(num_steps, strength, num_timesteps):
    """m = min(floor(num_steps * strength), num_steps), as int32.

    diffusers computes int(n * s) in float64. A Python strength reproduces
    that exactly through a host table over n = 0..T; a traced strength is
    multiplied in its own float dtype, so a float32 one can land one step
    off when n * s is within float32 rounding of an integer."""
    n = jnp.asarray(num_steps, jnp.int32)
    if _is_concrete_scalar(strength):
        s = float(strength)
        table = np.array([min(int(k * s), k) for k in range(int(num_timesteps) + 1)], np.int32)
        return jnp.asarray(table)[jnp.clip(n, 0, int(num_timesteps))]
    s = jnp.asarray(strength)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.float32)
    m = jnp.floor(n.astype(s.dtype) * s).astype(jnp.int32)
    return jnp.clip(m, 0, n)


def start(plain, img, c_init, c_noise, noise):
    """The initial state: `plain` (the usual x_T) without img2img, else
    c_init * init + c_noise * noise unless img.from_noise."""
    if img is None:
        return plain
    noised = c_init * img.init + c_noise * noise
    return jnp.where(img.from_noise, plain, noised)


def blend(x, img, c_init, c_noise, noise, last):
    """After a step: keep the generated x where mask = 1 and init, noised to
    the next timestep (or clean after the last step), where mask = 0."""
    if img is None or img.mask is None:
        return x
    target = jnp.where(last, img.init, c_init * img.init + c_noise * noise)
    return (1 - img.mask) * target + img.mask * x
