"""Model parameterisations (eps / x0 / v) and the denoising training loss.

With x_t = sqrt(ab) x0 + sqrt(1-ab) eps:
  eps: the network predicts the noise (Ho et al. 2020).
  x0:  the network predicts the clean sample.
  v:   the network predicts v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import Schedule, extract, q_sample, snr

PARAMETERIZATIONS = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr", "truncated_snr")


def _check_parameterization(parameterization):
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; "
                         f"expected one of {PARAMETERIZATIONS}")


# The helpers below take sqrt(ab) and sqrt(1 - ab) separately (both broadcast
# against x): near t = 0, 1 - ab computed from a float32 ab loses ~3 digits,
# while the schedule stores sqrt(1 - ab) computed in float64.

def x0_eps_from_output(parameterization, x_t, model_output, sa, s1a):
    """(x0, eps) implied by a model output."""
    _check_parameterization(parameterization)
    if parameterization == "eps":
        return (x_t - s1a * model_output) / sa, model_output
    if parameterization == "x0":
        return model_output, (x_t - sa * model_output) / s1a
    # v: rotate (x_t, v) back to (x0, eps); no division, so stable at both ends.
    return sa * x_t - s1a * model_output, s1a * x_t + sa * model_output


def output_from_x0_eps(parameterization, x0, eps, sa, s1a):
    """What a perfect model of the given parameterisation would output."""
    _check_parameterization(parameterization)
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    return sa * eps - s1a * x0


def eps_from_x0(x_t, x0, sa, s1a):
    """The noise that takes x0 to x_t."""
    return (x_t - sa * x0) / s1a


def _coefs(schedule, t, shape):
    return (extract(schedule.sqrt_alphas_cumprod, t, shape),
            extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape))


def to_x0_and_eps(schedule: Schedule, parameterization, x_t, t, model_output):
    """(x0, eps) from a model output at integer timesteps t of shape (B,)."""
    return x0_eps_from_output(parameterization, x_t, model_output,
                              *_coefs(schedule, t, x_t.shape))


def training_target(schedule: Schedule, parameterization, x0, eps, t):
    """Regression target of the given parameterisation at timesteps t (B,)."""
    return output_from_x0_eps(parameterization, x0, eps, *_coefs(schedule, t, x0.shape))


def loss_weight(snr_t, parameterization, weighting="none", snr_gamma=5.0):
    """Per-example weight applied to the MSE on the parameterisation's target.

    Weightings are defined in x0-space and converted: for a fixed x_t the
    squared errors relate as |d eps|^2 = snr |d x0|^2 and
    |d v|^2 = (snr + 1) |d x0|^2.
      none:          plain MSE on the target (weight 1).
      min_snr:       x0-space weight min(snr, gamma) (Hang et al. 2023).
      truncated_snr: x0-space weight max(snr, 1) (Salimans & Ho 2022).
    """
    _check_parameterization(parameterization)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if weighting == "none":
        return jnp.ones_like(snr_t)
    if weighting == "min_snr":
        # Written as min(1, g/snr) etc. so snr -> 0 or inf stays finite.
        if parameterization == "eps":
            return jnp.minimum(1.0, snr_gamma / snr_t)
        if parameterization == "x0":
            return jnp.minimum(snr_t, snr_gamma)
        return jnp.minimum(snr_t, snr_gamma) / (snr_t + 1.0)
    # truncated_snr
    if parameterization == "eps":
        return jnp.maximum(1.0, 1.0 / snr_t)
    if parameterization == "x0":
        return jnp.maximum(snr_t, 1.0)
    # max(snr, 1) / (snr + 1), rearranged to stay finite for huge snr.
    return 1.0 / (1.0 + jnp.minimum(snr_t, 1.0 / snr_t))


T_SAMPLINGS = ("uniform", "logit_normal")


def draw_timesteps(schedule: Schedule, rng, batch: int, sampling="uniform",
                   logit_mean=0.0, logit_std=1.0):
    """Integer timesteps (B,) for training.

    uniform:      t ~ U{0..T-1} (Ho et al. 2020).
    logit_normal: t = floor(T * sigmoid(u)), u ~ N(logit_mean, logit_std^2) (Esser et al. 2024):
                  more of the batch at intermediate noise, where image structure is decided,
                  and less at the nearly clean and nearly pure-noise ends.
    """
    if sampling not in T_SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {sampling!r}; expected one of {T_SAMPLINGS}")
    n = schedule.num_timesteps
    if sampling == "uniform":
        return jax.random.randint(rng, (batch,), 0, n, dtype=jnp.int32)
    u = logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32)
    return jnp.clip(jnp.floor(n * jax.nn.sigmoid(u)), 0, n - 1).astype(jnp.int32)


def draw_t_and_noise(schedule: Schedule, rng, shape, dtype=jnp.float32, sampling="uniform",
                     logit_mean=0.0, logit_std=1.0):
    """Timesteps (B,) (see draw_timesteps) and eps ~ N(0, I) of `shape`, from one key split in two."""
    t_rng, noise_rng = jax.random.split(rng)
    t = draw_timesteps(schedule, t_rng, shape[0], sampling, logit_mean, logit_std)
    return t, jax.random.normal(noise_rng, shape, dtype=dtype)


def diffusion_loss(apply_fn, schedule: Schedule, x0, rng, parameterization="eps",
                   weighting="none", snr_gamma=5.0, t=None, noise=None):
    """Denoising loss with t ~ U{0..T-1} and eps ~ N(0, I).

    `apply_fn(x_t, t) -> model_output` with t int32 of shape (B,). t and noise are drawn
    from `rng` (see draw_t_and_noise) unless given, e.g. as slices of a larger batch's draw.
    The loss is computed in at least float32 whatever the model's output dtype.
    Returns (scalar mean loss, per-example (B,)).
    """
    _check_parameterization(parameterization)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    x0 = x0.astype(dtype)
    batch = x0.shape[0]
    if t is None or noise is None:
        t, noise = draw_t_and_noise(schedule, rng, x0.shape, dtype)
    noise = noise.astype(dtype)
    coef_schedule = jax.tree_util.tree_map(lambda a: a.astype(dtype), schedule)
    x_t = q_sample(coef_schedule, x0, t, noise)
    out = apply_fn(x_t, t).astype(dtype)
    target = training_target(coef_schedule, parameterization, x0, noise, t)
    mse = jnp.mean(jnp.square(out - target).reshape(batch, -1), axis=1)
    w = loss_weight(snr(coef_schedule, t), parameterization, weighting, snr_gamma)
    per_example = w * mse
    return jnp.mean(per_example), per_example


def make_denoiser(parameterization, clip_denoised=False, clip_range=1.0):
    """fn(x_t, model_output, sa, s1a) -> (x0, eps), x0 optionally clipped to
    [-clip_range, clip_range] with eps recomputed so the pair still gives x_t."""
    _check_parameterization(parameterization)

    def denoise(x_t, model_output, sa, s1a):
        x0, eps = x0_eps_from_output(parameterization, x_t, model_output, sa, s1a)
        if clip_denoised:
            x0 = jnp.clip(x0, -clip_range, clip_range)
            eps = eps_from_x0(x_t, x0, sa, s1a)
        return x0, eps

    return denoise
