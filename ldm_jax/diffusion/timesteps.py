"""Integer timestep grids for n sampling steps out of T training steps.

Each grid is given by its ascending index k = 0..n-1 and works on numpy and
traced integers alike, so a sampler can compute its timesteps inside a loop
whose step count is traced.

'ddim' grid (DDIM/DDPM, PLMS and Euler samplers):
  leading:  tau_k = k * (T // n) + steps_offset
  trailing: tau_k = round((k + 1) * T / n) - 1
  linspace: tau_k = round(k * (T - 1) / (n - 1))
'dpm' grid (DPM-Solver++ samplers): n + 1 points are laid out and the lowest
is dropped, so the grid never reaches t = 0 (except through steps_offset):
  leading:  tau_k = (k + 1) * (T // (n + 1)) + steps_offset
  trailing: as 'ddim'
  linspace: tau_k = round((k + 1) * (T - 1) / n)
Rounding is exact integer arithmetic, ties to even.
"""
from __future__ import annotations

import jax.numpy as jnp

SPACINGS = ("leading", "trailing", "linspace")


def round_div(a, b):
    """round(a / b) for non-negative integers, ties to even; numpy or jnp."""
    q = a // b
    r = a - q * b
    up = (2 * r > b) | ((2 * r == b) & (q % 2 == 1))
    return q + up.astype(q.dtype)


def _bad_spacing(spacing):
    return ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def ddim_grid(k, n, T, spacing, steps_offset):
    """tau_k of the 'ddim' grid."""
    if spacing == "leading":
        return k * (T // n) + steps_offset
    if spacing == "trailing":
        return round_div((k + 1) * T, n) - 1
    if spacing == "linspace":
        # (n - 1) + (n == 1): a divisor of 1 when n == 1, for numpy and jnp alike.
        return round_div(k * (T - 1), (n - 1) + (n == 1))
    raise _bad_spacing(spacing)


def dpm_grid(k, n, T, spacing, steps_offset):
    """tau_k of the 'dpm' grid."""
    if spacing == "leading":
        return (k + 1) * (T // (n + 1)) + steps_offset
    if spacing == "trailing":
        return round_div((k + 1) * T, n) - 1
    if spacing == "linspace":
        return round_div((k + 1) * (T - 1), n)
    raise _bad_spacing(spacing)


def traced_grid(grid, num_steps, num_timesteps, spacing, steps_offset):
    """k -> the grid's timestep for ascending index k, with a traced step count and offset,
    clamped to [0, T) (a bad offset clamps rather than wraps)."""
    n, T = jnp.asarray(num_steps, jnp.int32), int(num_timesteps)
    offset = jnp.asarray(steps_offset, jnp.int32)
    return lambda k: jnp.clip(grid(k, n, jnp.int32(T), spacing, offset), 0, T - 1)
