"""Sampling entry point. DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) live
here; the other samplers, each matching a diffusers scheduler, have their own
modules and are dispatched to by `sample`:
  plms            plms.py        PNDMScheduler(skip_prk_steps=True)
  dpmpp_2m        dpm_solver.py  DPMSolverMultistepScheduler, 'dpmsolver++', order 2
  dpmpp_2m_sde    dpm_solver.py  the same with 'sde-dpmsolver++'
  euler           euler.py       EulerDiscreteScheduler
  euler_a         euler.py       EulerAncestralDiscreteScheduler
`sampler_timesteps` lists where each evaluates the model. The rest of this
docstring is about DDPM and DDIM.

Both samplers walk a descending subsequence tau_{n-1} > ... > tau_0 of the
training timesteps. Step k goes from tau_k to tau_{k-1}; the last step (k = 0)
goes to "time -1", whose alpha_bar is `final_alpha_cumprod`:
  1.0  (default) the clean data; diffusers' DDIM `set_alpha_to_one=True`.
  None alphas_cumprod[0], as CompVis LDM's DDIM sampler does.

Timestep spacings for n steps out of T (listed ascending, k = 0..n-1):
  leading:  tau_k = k * (T // n) + steps_offset. diffusers 'leading'; CompVis
            LDM 'uniform' with steps_offset=1 (identical when n divides T).
  trailing: tau_k = round((k + 1) * T / n) - 1. diffusers 'trailing'
            (round(T - j*T/n) - 1 for j = 0..n-1, descending); always ends at T-1.
  linspace: tau_k = round(k * (T - 1) / (n - 1)). diffusers 'linspace'.
Rounding is exact integer arithmetic, ties to even. diffusers rounds float64
values instead, so the two can differ by one at exact .5 ties (e.g. trailing
with T=1000, n=48), and diffusers' float arange occasionally yields n+1
trailing steps; here there are always n. steps_offset only affects 'leading'.

Randomness: rng is split into (init_rng, step_rng); x_T ~ N(0, I) from
init_rng and the noise of loop iteration i from fold_in(step_rng, i). DDPM
and DDIM with the same rng and step count therefore share their noise, and
the Python and fori_loop versions agree.

img2img and inpainting (all samplers; diffusers' StableDiffusionImg2ImgPipeline
and the 4-channel StableDiffusionInpaintPipeline, img2img.py):
  init          clean data x0 of `shape`.
  strength      s in [0, 1], may be traced. Of the n steps only the last
                m = min(floor(n s), n) run (diffusers' get_timesteps); m = 0
                returns `init`. The state starts as `init` noised to the first
                remaining model timestep t with z ~ N(0, I) from init_rng (the
                draw that is x_T otherwise): sqrt(ab_t) x0 + sqrt(1 - ab_t) z
                for DDPM, DDIM, PLMS and DPM-Solver++; y = x0 + sigma_t z for
                Euler (whose state is y = x_t / sqrt(ab_t)). Multistep history
                restarts empty: DPM-Solver++ takes a first-order step first,
                PLMS runs its warm-up from the m-th last entry of its
                evaluation list (as diffusers' schedulers do on truncated
                timesteps). Loop iteration i (from 0) draws the step noise.
  inpaint_mask  1 = generate, 0 = keep `init`; broadcastable to `shape`, e.g.
                (N, H, W, 1). After each step x = (1 - mask) init_t' + mask x,
                with init_t' = `init` noised with the same z to the timestep of
                the next model evaluation, and `init` itself after the last
                step, so the result equals `init` where mask == 0. At s = 1 the
                start is the plain x_T, as diffusers' inpaint pipeline does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import dpm_solver, img2img, plms
from ldm_jax.diffusion.euler import sample_euler
from ldm_jax.diffusion.img2img import blend, start
from ldm_jax.diffusion.loop import run_steps
from ldm_jax.diffusion.objectives import (PARAMETERIZATIONS, eps_from_x0, make_denoiser,
                                          x0_eps_from_output)
from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.diffusion.timesteps import SPACINGS, ddim_grid, traced_grid

SAMPLERS = ("ddpm", "ddim", "plms", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_a")
DDPM_VARIANCES = ("fixed_small", "fixed_large")


def ddim_timesteps(num_timesteps, num_steps, spacing="leading", steps_offset=0):
    """The timesteps visited by `sample`, in sampling (descending) order."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    T, n = int(num_timesteps), int(num_steps)
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {n}")
    k = np.arange(n, dtype=np.int64)
    ts = ddim_grid(k, np.int64(n), np.int64(T), spacing, np.int64(steps_offset))
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"timesteps {ts.min()}..{ts.max()} fall outside [0, {T})")
    return ts[::-1].astype(np.int64)


def sampler_timesteps(sampler, num_timesteps, num_steps, spacing="leading", steps_offset=0):
    """Timesteps at which `sample` evaluates the model, in order (diffusers'
    `scheduler.timesteps` for the corresponding scheduler)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "plms":
        ddim_timesteps(num_timesteps, num_steps, spacing, steps_offset)  # validates
        return plms.eval_timesteps(num_timesteps, num_steps, spacing, steps_offset)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
        return dpm_solver.eval_timesteps(num_timesteps, num_steps, spacing, steps_offset)
    return ddim_timesteps(num_timesteps, num_steps, spacing, steps_offset)


def _check_static(sampler, parameterization, spacing, ddpm_variance):
    for name, value, allowed in (("sampler", sampler, SAMPLERS),
                                 ("parameterization", parameterization, PARAMETERIZATIONS),
                                 ("spacing", spacing, SPACINGS),
                                 ("ddpm_variance", ddpm_variance, DDPM_VARIANCES)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def sample(model_fn, schedule: Schedule, rng, shape, *, sampler="ddim", num_steps=50,
           eta=0.0, parameterization="eps", clip_denoised=True, clip_range=1.0,
           spacing="leading", steps_offset=0, ddpm_variance="fixed_small",
           final_alpha_cumprod=1.0, dtype=jnp.float32, use_python_loop=False,
           init=None, strength=1.0, inpaint_mask=None, noise=None):
    """Draw samples of `shape` by running the reverse process from pure noise.

    model_fn(x_t, t) -> model output, with t int32 of shape (shape[0],) holding
    the original training timestep. num_steps, eta, rng, clip_range,
    steps_offset and final_alpha_cumprod may be traced; sampler,
    parameterization, spacing, ddpm_variance, clip_denoised, shape and dtype
    must be static. `eta` is ignored by 'ddpm'. With sampler='ddpm',
    num_steps=T, spacing='leading', steps_offset=0 this is exactly Algorithm 2
    of the DDPM paper (sigma^2 = posterior variance for 'fixed_small', beta_t
    for 'fixed_large'; no noise on the last step). Strided DDPM uses the
    respaced betas beta'_k = 1 - ab[tau_k] / ab[tau_{k-1}]. With eta=1, DDIM
    is the same process as DDPM 'fixed_small' and, given the same rng and
    steps, returns the same samples up to rounding.

    The other samplers (see the module docstring) take the same arguments;
    they ignore eta and ddpm_variance (their stochasticity is fixed), and only
    'plms' uses final_alpha_cumprod (1.0 is diffusers' set_alpha_to_one=True,
    None its False). With clip_denoised each clips its x0 prediction, which
    diffusers' schedulers do not do. Noise: x_T from init_rng as above (the
    Euler samplers multiply it by diffusers' init_noise_sigma); the stochastic
    samplers draw the noise of step i from fold_in(step_rng, i).

    img2img (see the module docstring): `init` (clean data of `shape`) with
    `strength` in [0, 1] runs only the last min(floor(num_steps * strength),
    num_steps) steps from `init` noised to the first of them; 0 steps return
    `init`. `inpaint_mask` (broadcastable to `shape`, 1 = generate, 0 = keep
    `init`) blends `init` back in after every step. strength may be traced;
    without init it must be 1.0 (a traced one is ignored).

    `noise` (of `shape`), when given, replaces the standard normal x_T drawn from init_rng:
    unit-variance noise, before any sampler's initial scaling (diffusers' `latents` argument).

    Returns the final x (the x0 samples) of `shape` and `dtype`.
    """
    _check_static(sampler, parameterization, spacing, ddpm_variance)
    T = schedule.num_timesteps
    batch = shape[0]
    sa_all = schedule.sqrt_alphas_cumprod.astype(dtype)
    s1a_all = schedule.sqrt_one_minus_alphas_cumprod.astype(dtype)
    ab_all = schedule.alphas_cumprod.astype(dtype)
    if final_alpha_cumprod is None:
        ab_final, sa_final, s1a_final = ab_all[0], sa_all[0], s1a_all[0]
    else:
        ab_final = jnp.asarray(final_alpha_cumprod, dtype)
        sa_final, s1a_final = jnp.sqrt(ab_final), jnp.sqrt(1 - ab_final)
    eta = jnp.asarray(eta, dtype)
    img, steps = _img2img(init, strength, inpaint_mask, shape, dtype, num_steps, T)
    init_rng, step_rng = jax.random.split(rng)
    if noise is None:
        noise = jax.random.normal(init_rng, shape, dtype)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the samples {tuple(shape)}")
    noise = jnp.asarray(noise, dtype)
    if sampler not in ("ddpm", "ddim"):
        denoise = make_denoiser(parameterization, clip_denoised, clip_range)
        common = dict(num_steps=num_steps, spacing=spacing, steps_offset=steps_offset,
                      denoise=denoise, dtype=dtype, use_python_loop=use_python_loop, img=img)
        if sampler == "plms":
            x = plms.sample_plms(model_fn, schedule, noise, sa_final=sa_final,
                                 s1a_final=s1a_final, **common)
        elif sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
            x = dpm_solver.sample_dpmpp_2m(model_fn, schedule, noise, step_rng,
                                           sde=sampler == "dpmpp_2m_sde", **common)
        else:
            x = sample_euler(model_fn, schedule, noise, step_rng,
                             ancestral=sampler == "euler_a", **common)
        return _finish(x, img, steps)

    grid = traced_grid(ddim_grid, num_steps, T, spacing, steps_offset)
    skip = jnp.int32(0) if img is None else img.skip

    def body(i, x):
        i = jnp.asarray(i, jnp.int32)
        k = jnp.asarray(num_steps, jnp.int32) - 1 - skip - i
        t, t_prev = grid(k), grid(jnp.maximum(k - 1, 0))
        sa, s1a = sa_all[t], s1a_all[t]
        sa_prev = jnp.where(k > 0, sa_all[t_prev], sa_final)
        s1a_prev = jnp.where(k > 0, s1a_all[t_prev], s1a_final)
        ab, ab_prev = ab_all[t], jnp.where(k > 0, ab_all[t_prev], ab_final)
        # 1 - ab from the stored float64-derived root: in float32, 1 - ab
        # itself would lose ~3 digits near t = 0.
        one_m_ab, one_m_ab_prev = s1a ** 2, s1a_prev ** 2
        # Respaced beta' = 1 - ab / ab_prev (Nichol & Dhariwal 2021, Sec. 4).
        # When ab is near 1 the difference of the (1 - ab) terms is the exact one.
        beta = jnp.where(ab > 0.5, (one_m_ab - one_m_ab_prev) / ab_prev, 1 - ab / ab_prev)
        beta = jnp.maximum(beta, 0.0)  # 0 when the last step maps ab[0] to itself

        out = model_fn(x, jnp.full((batch,), t, jnp.int32)).astype(dtype)
        x0, eps = x0_eps_from_output(parameterization, x, out, sa, s1a)
        if clip_denoised:
            x0 = jnp.clip(x0, -clip_range, clip_range)
            # Keep (x0, eps) consistent with x_t after clipping.
            eps = eps_from_x0(x, x0, sa, s1a)
        z = jax.random.normal(jax.random.fold_in(step_rng, i), shape, dtype)

        if sampler == "ddim":
            # Song et al. 2021, eq. 12 and 16.
            sigma = eta * jnp.sqrt(one_m_ab_prev / one_m_ab * beta)
            dir_coef = jnp.sqrt(jnp.maximum(one_m_ab_prev - sigma ** 2, 0.0))
            x_new = sa_prev * x0 + dir_coef * eps + sigma * z
        else:
            # DDPM: posterior q(x_{t'} | x_t, x0) of the respaced chain, mean
            # from the (clipped) x0 prediction.
            coef1 = beta * sa_prev / one_m_ab
            coef2 = one_m_ab_prev * jnp.sqrt(1 - beta) / one_m_ab
            mean = coef1 * x0 + coef2 * x
            if ddpm_variance == "fixed_small":
                var = beta * one_m_ab_prev / one_m_ab
            else:
                var = beta  # sigma^2 = beta_t, the DDPM paper's other choice
            # No noise on the final step (DDPM Algorithm 2, z = 0 at t = 1).
            x_new = mean + jnp.where(k > 0, jnp.sqrt(var), 0.0).astype(dtype) * z
        return blend(x_new, img, sa_prev, s1a_prev, noise, k == 0)

    t0 = grid(jnp.asarray(num_steps, jnp.int32) - 1 - skip)
    x = start(noise, img, sa_all[t0], s1a_all[t0], noise)
    return _finish(run_steps(body, steps, x, use_python_loop), img, steps)


def _img2img(init, strength, inpaint_mask, shape, dtype, num_steps, num_timesteps):
    """(Img2Img or None, loop steps m) from sample's img2img arguments."""
    img2img.check_strength(strength)
    if init is None:
        if inpaint_mask is not None:
            raise ValueError("inpaint_mask needs init: pass the image (or latent) to inpaint")
        if isinstance(strength, (int, float)) and strength != 1.0:
            raise ValueError(f"strength={strength} needs init: pass the image (or latent) "
                             "to start from, or leave strength at 1.0")
        return None, num_steps
    if tuple(jnp.shape(init)) != tuple(shape):
        raise ValueError(f"init has shape {tuple(jnp.shape(init))}; it must have the sample "
                         f"shape {tuple(shape)}")
    mask, from_noise = None, jnp.bool_(False)
    if inpaint_mask is not None:
        try:
            fits = (jnp.ndim(inpaint_mask) == len(shape) and
                    np.broadcast_shapes(jnp.shape(inpaint_mask), tuple(shape)) == tuple(shape))
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"inpaint_mask has shape {tuple(jnp.shape(inpaint_mask))}; it must "
                             f"broadcast to the sample shape {tuple(shape)}, e.g. (N, H, W, 1)")
        mask = jnp.asarray(inpaint_mask, dtype)
        # diffusers' inpaint pipeline starts from its plain x_T at strength 1.
        from_noise = jnp.asarray(strength) >= 1
    m = img2img.run_length(num_steps, strength, num_timesteps)
    img = img2img.Img2Img(jnp.asarray(init, dtype), jnp.asarray(num_steps, jnp.int32) - m,
                          mask, from_noise)
    return img, m


def _finish(x, img, steps):
    # With no steps to run the result is init itself, not init noised.
    return x if img is None else jnp.where(steps == 0, img.init, x)
