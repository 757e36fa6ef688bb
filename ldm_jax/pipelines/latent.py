"""Sampling from a latent-diffusion model: txt2img, class-conditional, img2img, inpainting and
super-resolution, as one compiled program per (image count, sampler, task).

Everything that changes from call to call is a traced argument: params, seed, step count,
eta, guidance scale, prompts (as token ids), labels, init images, strength and masks. A new
prompt, seed, step count or scale therefore reuses the compiled program.

The text is encoded once per call, outside the sampling loop. With guidance each step runs the
conditional and the unconditional inputs as one batch of 2N: the unconditional half has the
negative prompt (default: the empty caption) and withheld labels; concat inputs (masked image,
low-resolution image) are kept in both halves, as SD's inpainting and upscaling pipelines do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.diffusion import guidance, samplers
from ldm_jax.models import concat_inputs
from ldm_jax.parallel import BATCH_AXES

TASKS = ("generate", "img2img", "inpaint")


def make_latent_sampler(model, first, schedule, config, num: int, mesh=None,
                        guided: bool = False, task: str = "generate", size=None):
    """Returns jitted fn(params, frozen, rng, num_steps, eta, scale, cond, uncond,
    images=None, strength=1.0, mask=None, noise=None) -> images in [-1, 1] (num, H, W, 3).

    `size`: (H, W) of the images (default: data.image_size square), multiples of the first
    stage's factor. `noise`: the initial latents (num, H/f, W/f, C) instead of ones drawn from
    `rng` (unit variance, before any sampler's own scaling).

    `cond` / `uncond`: dicts of the conditioning inputs (labels, ids and mask, concat) for the
    `num` images; `uncond` is read only when `guided`. Tasks:
      generate  from noise (txt2img, class-conditional, concat-conditioned inpainting and
                super-resolution, whose inputs are in cond["concat"])
      img2img   from `images` encoded and noised to `strength`
      inpaint   blending for models without mask conditioning: `mask` (num, H, W, 1), 1 where
                to generate; elsewhere the latents are pinned to those of `images` and the
                decoded pixels are replaced by `images`' own, so they come back unchanged.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    s = config.sampling
    height, width = size or (config.data.image_size,) * 2
    shape = (num, height // first.factor, width // first.factor, first.channels)
    spread = mesh is not None and num % mesh.devices.size == 0

    def run(params, frozen, rng, num_steps, eta, scale, cond, uncond, images=None,
            strength=1.0, mask=None, noise=None):
        text = model.text_encoder is not None
        ctx = model.encode_text(params, cond["ids"], cond["mask"]) if text else None
        if guided:
            both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
            if text:
                ctx = jnp.concatenate([ctx, model.encode_text(params, uncond["ids"],
                                                              uncond["mask"])])
        else:
            both = cond

        def model_fn(x, t):
            if guided:
                x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
            if spread:
                x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
            out = model.apply(params, x, t, both, context=ctx)
            if not guided:
                return out
            out_c, out_u = jnp.split(out, 2)
            return guidance.combine(out_c, out_u, scale, s.guidance_rescale)

        init_rng, sample_rng = jax.random.split(rng)
        init = latent_mask = None
        if task != "generate":
            init = first.encode(frozen, images, init_rng)
        if task == "inpaint":
            latent_mask = concat_inputs.mask_to_latent(mask, first.factor)
        latents = samplers.sample(
            model_fn, schedule, sample_rng, shape, sampler=s.sampler, num_steps=num_steps,
            eta=eta, parameterization=config.diffusion.parameterization,
            clip_denoised=s.clip_denoised, spacing=s.spacing, steps_offset=s.steps_offset,
            ddpm_variance=s.ddpm_variance,
            final_alpha_cumprod=1.0 if s.set_alpha_to_one else None,
            init=init, strength=strength if task == "img2img" else 1.0,
            inpaint_mask=latent_mask, noise=noise)
        out = jnp.clip(first.decode(frozen, latents), -1.0, 1.0)
        if task == "inpaint":
            out = mask * out + (1.0 - mask) * images
        return out

    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, out_shardings=NamedSharding(mesh, P()))


def sample_latent_images(fn, params, frozen, seed: int, num_steps: int, eta: float,
                         scale: float, cond: dict, uncond: dict | None = None, images=None,
                         strength: float = 1.0, mask=None, noise=None):
    """Call a `make_latent_sampler` program with host values converted to traced arrays."""
    as_arrays = lambda d: jax.tree_util.tree_map(jnp.asarray, d or {})
    return fn(params, frozen, jax.random.PRNGKey(seed), jnp.int32(num_steps), jnp.float32(eta),
              jnp.float32(scale), as_arrays(cond), as_arrays(uncond),
              None if images is None else jnp.asarray(images, jnp.float32),
              jnp.float32(strength), None if mask is None else jnp.asarray(mask, jnp.float32),
              None if noise is None else jnp.asarray(noise, jnp.float32))
