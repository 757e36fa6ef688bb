"""PLMS: pseudo linear multistep sampling (Liu et al. 2022, PNDM), in the form
diffusers' PNDMScheduler runs with skip_prk_steps=True (LDM / Stable Diffusion).

For n steps on the 'ddim' timestep grid tau_{n-1} > ... > tau_0 and r = T // n,
the model is evaluated n + 1 times (once when n = 1):
  eval 0: at tau_{n-1}; a plain DDIM step to tau_{n-1} - r.
  eval 1: at tau_{n-2}; averages this output with eval 0's and redoes the step
          from the saved x at tau_{n-1}, treated as time tau_{n-2} + r, to tau_{n-2}.
  eval i >= 2: at tau_{n-i}; Adams-Bashforth of order min(i, 4) on the
          outputs of evals 0, 2, 3, ..., i, stepping from tau_{n-i} to tau_{n-i} - r.
The step length is always r, as in diffusers, even where the grid
('trailing', 'linspace') is not evenly spaced by r; a target time below 0
means alpha_bar = final_alpha_cumprod. The raw model outputs are combined
and then converted to (x0, eps) at the state the step starts from (which is
what diffusers does for v-prediction), and the step itself is the DDIM
(eta = 0) update x' = sqrt(ab') x0 + sqrt(1 - ab') eps.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.img2img import blend, start
from ldm_jax.diffusion.loop import run_steps
from ldm_jax.diffusion.timesteps import ddim_grid, traced_grid

# Row j: weights on the last four stored outputs (oldest first) for
# j = 0: the averaging re-step (eval 1); j = 1..4: Adams-Bashforth order j.
_WEIGHTS = np.array([[0, 0, 1 / 2, 1 / 2],
                     [0, 0, 0, 1],
                     [0, 0, -1 / 2, 3 / 2],
                     [0, 5 / 12, -16 / 12, 23 / 12],
                     [-9 / 24, 37 / 24, -59 / 24, 55 / 24]])


def num_evals(num_steps):
    return num_steps + (num_steps > 1)


def eval_timesteps(num_timesteps, num_steps, spacing="leading", steps_offset=0):
    """Timesteps of the model evaluations in order (diffusers' `timesteps`)."""
    n, T = int(num_steps), int(num_timesteps)
    i = np.arange(num_evals(n), dtype=np.int64)
    return ddim_grid(n - 1 - i + (i >= 2), np.int64(n), np.int64(T), spacing, np.int64(steps_offset))


def sample_plms(model_fn, schedule, noise, *, num_steps, spacing, steps_offset, denoise,
                sa_final, s1a_final, dtype, use_python_loop=False, img=None):
    T = schedule.num_timesteps
    sa_all = schedule.sqrt_alphas_cumprod.astype(dtype)
    s1a_all = schedule.sqrt_one_minus_alphas_cumprod.astype(dtype)
    weights = jnp.asarray(_WEIGHTS, dtype)
    n = jnp.asarray(num_steps, jnp.int32)
    r = T // n
    batch = noise.shape[0]
    skip = jnp.int32(0) if img is None else img.skip
    m = n - skip
    # img2img runs the evaluations from index `skip` of the full list on a
    # fresh multistep history, as diffusers' PNDM does on truncated timesteps.
    count = jnp.where(m > 0, m + (n > 1).astype(jnp.int32), 0)

    grid = traced_grid(ddim_grid, n, T, spacing, steps_offset)

    def eval_t(e):
        return grid(n - 1 - e + (e >= 2).astype(jnp.int32))

    def body(j, carry):
        x, saved, outs = carry
        j = jnp.asarray(j, jnp.int32)
        t = eval_t(skip + j)
        out = model_fn(x, jnp.full((batch,), t, jnp.int32)).astype(dtype)
        appended = jnp.concatenate([outs[1:], out[None]], axis=0)
        restep = j == 1
        row = jnp.where(restep, 0, jnp.clip(j, 1, 4))
        combined = jnp.tensordot(weights[row], appended, axes=1)
        x_from = jnp.where(restep, saved, x)
        t_from = jnp.where(restep, t + r, t)
        t_to = jnp.where(restep, t, t - r)
        sa, s1a = sa_all[jnp.clip(t_from, 0, T - 1)], s1a_all[jnp.clip(t_from, 0, T - 1)]
        to = jnp.clip(t_to, 0, T - 1)
        sa_to = jnp.where(t_to >= 0, sa_all[to], sa_final)
        s1a_to = jnp.where(t_to >= 0, s1a_all[to], s1a_final)
        x0, eps = denoise(x_from, combined, sa, s1a)
        x_new = sa_to * x0 + s1a_to * eps
        # Blending re-noises init to the next evaluation's timestep, whatever
        # level the step reached (they differ right after the re-step).
        t_next = eval_t(jnp.minimum(skip + j + 1, num_evals(n) - 1))
        x_new = blend(x_new, img, sa_all[t_next], s1a_all[t_next], noise, j == count - 1)
        return (x_new, jnp.where(j == 0, x, saved), jnp.where(restep, outs, appended))

    t0 = eval_t(jnp.minimum(skip, num_evals(n) - 1))
    x = start(noise, img, sa_all[t0], s1a_all[t0], noise)
    outs = jnp.zeros((4,) + noise.shape, dtype)
    x, _, _ = run_steps(body, count, (x, x, outs), use_python_loop)
    return x
