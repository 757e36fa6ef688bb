"""Euler and Euler-ancestral sampling in sigma space (Karras et al. 2022), as
diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler run them.

The state is y = x_t / sqrt(ab) at sigma = sqrt((1 - ab) / ab); the model
sees x_t = y / sqrt(sigma^2 + 1). Timesteps follow the 'ddim' grid
(timesteps.py) with sigma = 0 after the last one. y starts as noise times
sqrt(sigma_max^2 + 1) for 'leading' and sigma_max otherwise (diffusers'
init_noise_sigma). With eps the model's noise estimate (from a clipped x0
when clipping is on):
  euler:   y' = y + eps (sigma' - sigma)
  euler_a: sigma_up = sigma' sqrt(1 - sigma'^2 / sigma^2),
           sigma_down = sqrt(sigma'^2 - sigma_up^2),
           y' = y + eps (sigma_down - sigma) + sigma_up z.
diffusers' Euler with 'linspace' spacing uses fractional timesteps
(interpolated sigmas); here timesteps are integers, so the two agree only
when (T - 1) / (n - 1) is an integer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.img2img import blend, start
from ldm_jax.diffusion.loop import run_steps
from ldm_jax.diffusion.timesteps import ddim_grid, traced_grid


def sample_euler(model_fn, schedule, noise, step_rng, *, num_steps, spacing, steps_offset,
                 denoise, dtype, ancestral=False, use_python_loop=False, img=None):
    T = schedule.num_timesteps
    sa_all = schedule.sqrt_alphas_cumprod.astype(dtype)
    s1a_all = schedule.sqrt_one_minus_alphas_cumprod.astype(dtype)
    n = jnp.asarray(num_steps, jnp.int32)
    batch = noise.shape[0]

    grid = traced_grid(ddim_grid, n, T, spacing, steps_offset)
    skip = jnp.int32(0) if img is None else img.skip

    def body(i, y):
        i = jnp.asarray(i, jnp.int32)
        k = n - 1 - skip - i
        t, t_next = grid(k), grid(jnp.maximum(k - 1, 0))
        sa, s1a = sa_all[t], s1a_all[t]
        sig = s1a / sa
        sig_n = jnp.where(k > 0, s1a_all[t_next] / sa_all[t_next], 0.0).astype(dtype)
        x_t = y * sa
        out = model_fn(x_t, jnp.full((batch,), t, jnp.int32)).astype(dtype)
        _, eps = denoise(x_t, out, sa, s1a)
        if not ancestral:
            y_new = y + eps * (sig_n - sig)
        else:
            sig_up = jnp.sqrt(sig_n ** 2 * (sig ** 2 - sig_n ** 2) / sig ** 2)
            sig_down = jnp.sqrt(jnp.maximum(sig_n ** 2 - sig_up ** 2, 0.0))
            z = jax.random.normal(jax.random.fold_in(step_rng, i), noise.shape, dtype)
            y_new = y + eps * (sig_down - sig) + sig_up * z
        # In y the forward process is y = x0 + sigma * noise.
        return blend(y_new, img, 1.0, sig_n, noise, k == 0)

    t_top = grid(n - 1)
    sig_max = s1a_all[t_top] / sa_all[t_top]
    scale = jnp.sqrt(sig_max ** 2 + 1) if spacing == "leading" else sig_max
    t0 = grid(n - 1 - skip)
    y = start(noise * scale, img, 1.0, s1a_all[t0] / sa_all[t0], noise)
    return run_steps(body, n - skip, y, use_python_loop)
