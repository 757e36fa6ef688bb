"""Compiled sampling from a model's params, and loading the latest checkpoint of a workdir.

The sampler is one jitted program taking (params, rng, num_steps, eta, labels, guidance scale)
as traced arguments, so a new seed, step count, eta, labels or scale reuses the compiled
program; only the image count, size, sampler kind and whether guidance is on are compiled in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.diffusion import guidance, samplers
from ldm_jax.parallel import BATCH_AXES


def make_sample_fn(model, schedule, sampling_config, parameterization: str, shape: tuple,
                   mesh=None, guided: bool = False):
    """Returns jitted fn(params, rng, num_steps, eta, labels=None, scale=1.0) -> images in
    [-1, 1] of `shape` (NHWC).

    A label-conditioned model takes `labels` (shape[0], K) int32; with `guided` each step also
    runs the unconditional model and applies classifier-free guidance of strength `scale`.
    With a mesh, the images are spread over its data axis when the count divides, and the
    result is replicated so every process can read it.
    """
    s = sampling_config
    spread = mesh is not None and shape[0] % mesh.devices.size == 0

    def apply(params, x, t, labels):
        if spread:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
        return model.apply({"params": params}, x, t, labels=labels, train=False)

    def model_fn(params, x, t, labels, scale):
        if guided:
            return guidance.guided_output(lambda *a: apply(params, *a), x, t, labels, scale,
                                          s.guidance_rescale)
        return apply(params, x, t, labels)

    def run(params, rng, num_steps, eta, labels=None, scale=1.0):
        return samplers.sample(lambda x, t: model_fn(params, x, t, labels, scale), schedule, rng, shape,
                               sampler=s.sampler, num_steps=num_steps, eta=eta,
                               parameterization=parameterization, clip_denoised=s.clip_denoised,
                               spacing=s.spacing, steps_offset=s.steps_offset,
                               ddpm_variance=s.ddpm_variance,
                               final_alpha_cumprod=1.0 if s.set_alpha_to_one else None)

    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, out_shardings=NamedSharding(mesh, P()))


def sample_images(sample_fn, params, seed: int, num_steps: int, eta: float, labels=None,
                  guidance_scale: float = 1.0):
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    return sample_fn(params, jax.random.PRNGKey(seed), jnp.int32(num_steps), jnp.float32(eta),
                     labels, jnp.float32(guidance_scale))
