"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022), as diffusers'
DPMSolverMultistepScheduler runs them with solver_order=2,
algorithm_type 'dpmsolver++' / 'sde-dpmsolver++' and final_sigmas_type='zero'.

With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), the
model's x0 prediction m_i at step i and h = lambda_next - lambda_i:
  ODE: x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D
  SDE: x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D
            + sigma' sqrt(1 - e^{-2h}) z
with D = m_i on the first step (first order) and otherwise
D = m_i + (m_i - m_{i-1}) h / (2 h_prev) (second-order multistep). The last
step goes to sigma = 0 and returns m_{n-1} (first order, as diffusers does
with final_sigmas_type='zero'). Timesteps follow the 'dpm' grid (timesteps.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.img2img import blend, start
from ldm_jax.diffusion.loop import run_steps
from ldm_jax.diffusion.timesteps import dpm_grid, traced_grid


def eval_timesteps(num_timesteps, num_steps, spacing="leading", steps_offset=0):
    n = int(num_steps)
    k = np.arange(n, dtype=np.int64)[::-1]
    return dpm_grid(k, np.int64(n), np.int64(num_timesteps), spacing, np.int64(steps_offset))


def sample_dpmpp_2m(model_fn, schedule, noise, step_rng, *, num_steps, spacing, steps_offset,
                    denoise, dtype, sde=False, use_python_loop=False, img=None):
    T = schedule.num_timesteps
    sa_all = schedule.sqrt_alphas_cumprod.astype(dtype)
    s1a_all = schedule.sqrt_one_minus_alphas_cumprod.astype(dtype)
    n = jnp.asarray(num_steps, jnp.int32)
    batch = noise.shape[0]

    grid = traced_grid(dpm_grid, n, T, spacing, steps_offset)
    # img2img starts `skip` steps in with an empty history (first order), as
    # diffusers does after set_begin_index.
    skip = jnp.int32(0) if img is None else img.skip

    def body(i, carry):
        x, m_prev, h_prev = carry
        i = jnp.asarray(i, jnp.int32)
        k = n - 1 - skip - i
        t, t_next = grid(k), grid(jnp.maximum(k - 1, 0))
        sa, s1a, sa_n, s1a_n = sa_all[t], s1a_all[t], sa_all[t_next], s1a_all[t_next]
        out = model_fn(x, jnp.full((batch,), t, jnp.int32)).astype(dtype)
        m, _ = denoise(x, out, sa, s1a)
        h = (jnp.log(sa_n) - jnp.log(s1a_n)) - (jnp.log(sa) - jnp.log(s1a))
        d = jnp.where(i > 0, m + (m - m_prev) * (h / (2 * h_prev)), m)
        if sde:
            z = jax.random.normal(jax.random.fold_in(step_rng, i), noise.shape, dtype)
            x_new = (s1a_n / s1a * jnp.exp(-h)) * x - (sa_n * jnp.expm1(-2 * h)) * d \
                + (s1a_n * jnp.sqrt(-jnp.expm1(-2 * h))) * z
        else:
            x_new = (s1a_n / s1a) * x - (sa_n * jnp.expm1(-h)) * d
        last = k == 0
        x_new = blend(jnp.where(last, m, x_new), img, sa_n, s1a_n, noise, last)
        # On the last step h is meaningless (t_next == t); keep h_prev finite.
        return x_new, m, jnp.where(last, h_prev, h)

    t0 = grid(n - 1 - skip)
    x = start(noise, img, sa_all[t0], s1a_all[t0], noise)
    carry = (x, jnp.zeros_like(noise), jnp.ones((), dtype))
    x, _, _ = run_steps(body, n - skip, carry, use_python_loop)
    return x
