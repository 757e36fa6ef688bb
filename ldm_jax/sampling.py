"""Compiled sampling from a model's params, and loading the latest checkpoint of a workdir.

The sampler is one jitted program taking (params, rng, num_steps, eta) as traced arguments,
so a new seed, step count or eta reuses the compiled program; only the image count, size and
sampler kind are compiled in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.diffusion import samplers
from ldm_jax.parallel import DATA_AXIS


def make_sample_fn(model, schedule, sampling_config, parameterization: str, shape: tuple,
                   mesh=None):
    """Returns jitted fn(params, rng, num_steps, eta) -> images in [-1, 1] of `shape` (NHWC).

    With a mesh, the images are spread over its data axis when the count divides, and the
    result is replicated so every process can read it.
    """
    s = sampling_config
    spread = mesh is not None and shape[0] % mesh.devices.size == 0

    def model_fn(params, x, t):
        if spread:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA_AXIS)))
        return model.apply({"params": params}, x, t, train=False)

    def run(params, rng, num_steps, eta):
        return samplers.sample(lambda x, t: model_fn(params, x, t), schedule, rng, shape,
                               sampler=s.sampler, num_steps=num_steps, eta=eta,
                               parameterization=parameterization, clip_denoised=s.clip_denoised,
                               spacing=s.spacing, steps_offset=s.steps_offset,
                               ddpm_variance=s.ddpm_variance)

    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, out_shardings=NamedSharding(mesh, P()))


def sample_images(sample_fn, params, seed: int, num_steps: int, eta: float):
    return sample_fn(params, jax.random.PRNGKey(seed), jnp.int32(num_steps), jnp.float32(eta))
