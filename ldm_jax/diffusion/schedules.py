"""Noise schedules and the closed-form quantities of the forward process q.

Conventions: timesteps are 0-based, t in [0, T). `alphas_cumprod[t]` is
alpha_bar of the DDPM paper's step t+1, so x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps
is already one step of noise away from the data at t = 0.
"""
from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_KINDS = ("linear", "scaled_linear", "cosine")

_DEFAULT_RANGE = {
    "linear": (1e-4, 0.02),            # Ho et al. 2020
    "scaled_linear": (0.00085, 0.012),  # Rombach et al. 2022 (LDM / Stable Diffusion)
}


def make_betas(kind, num_timesteps, beta_start=None, beta_end=None,
               cosine_s=0.008, max_beta=0.999):
    """Per-step betas as a float64 numpy array of length `num_timesteps`."""
    if kind not in BETA_KINDS:
        raise ValueError(f"unknown beta schedule {kind!r}; expected one of {BETA_KINDS}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    T = int(num_timesteps)
    if kind == "cosine":
        # Nichol & Dhariwal 2021: define alpha_bar directly, derive betas from
        # consecutive ratios; the clip keeps the last steps from being singular.
        def f(t):
            return math.cos((t / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        ab = np.array([f(t) / f(0) for t in range(T + 1)], dtype=np.float64)
        return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)
    start, end = _DEFAULT_RANGE[kind]
    start = start if beta_start is None else beta_start
    end = end if beta_end is None else beta_end
    if kind == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    # scaled_linear: linear in sqrt(beta), as in the LDM/SD configs.
    return np.linspace(math.sqrt(start), math.sqrt(end), T, dtype=np.float64) ** 2


@flax.struct.dataclass
class Schedule:
    """All per-timestep coefficients (length T), stored as jnp arrays."""
    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, dtype=jnp.float32) -> "Schedule":
        # Everything in float64 first: cumprod over 1000 float32 factors loses
        # several digits in the small alpha_bar values near t = T.
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if np.any(betas <= 0) or np.any(betas > 1):
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # post_var[0] is 0; borrow the next value so the log stays finite
        # (improved-diffusion convention; only used for likelihood terms).
        post_logvar = np.log(np.append(post_var[1], post_var[1:]) if betas.size > 1
                             else np.maximum(post_var, 1e-20))
        coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
        coef2 = (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)
        cast = lambda a: jnp.asarray(a, dtype=dtype)
        return cls(
            betas=cast(betas),
            alphas_cumprod=cast(ab),
            alphas_cumprod_prev=cast(ab_prev),
            sqrt_alphas_cumprod=cast(np.sqrt(ab)),
            sqrt_one_minus_alphas_cumprod=cast(np.sqrt(1.0 - ab)),
            posterior_variance=cast(post_var),
            posterior_log_variance_clipped=cast(post_logvar),
            posterior_mean_coef1=cast(coef1),
            posterior_mean_coef2=cast(coef2),
        )


def make_schedule(kind, num_timesteps, dtype=jnp.float32, **kw) -> Schedule:
    """`make_betas` + `Schedule.from_betas`; extra keywords go to `make_betas`."""
    return Schedule.from_betas(make_betas(kind, num_timesteps, **kw), dtype=dtype)


def extract(arr, t, x_shape):
    """arr[t] for t of shape (B,), reshaped to (B, 1, ..., 1) to broadcast over x."""
    out = jnp.take(arr, t, axis=0)
    return out.reshape(out.shape + (1,) * (len(x_shape) - out.ndim))


def q_sample(schedule: Schedule, x0, t, noise):
    """Draw x_t ~ q(x_t | x0) with the given noise."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def q_posterior(schedule: Schedule, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0).

    Variance terms are returned shaped (B, 1, ..., 1), broadcastable against x.
    """
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
    var = extract(schedule.posterior_variance, t, x_t.shape)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, var, log_var


def snr(schedule: Schedule, t):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at t, shape (B,)."""
    # From the stored roots: 1 - ab in float32 is inaccurate near t = 0.
    ratio = (jnp.take(schedule.sqrt_alphas_cumprod, t, axis=0)
             / jnp.take(schedule.sqrt_one_minus_alphas_cumprod, t, axis=0))
    return ratio ** 2
