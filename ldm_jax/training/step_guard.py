"""What every train step reports besides its metrics: whether it was finite, and whether any
process asked to stop. The loop reads these one step late, so the device is never idle.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class TrainingDivergedError(RuntimeError):
    """A step produced a NaN or Inf metric; the message names the step and the last checkpoint."""


def guard_step(step_fn, skip_nonfinite: bool):
    """Wrap a stage's step(state, batch, frozen) -> (state, metrics) into
    step(state, batch, frozen, stop_flags) -> (state, metrics, controls).

    `stop_flags` holds one value per device (each process's pre-emption flag); `controls` has
    their maximum over the mesh ("stop") and whether every float metric is finite ("finite").
    With `skip_nonfinite`, a non-finite step leaves the state as it was except for the step
    counter, so the next step draws new data and noise.
    """
    def guarded(state, batch, frozen, stop_flags):
        new_state, metrics = step_fn(state, batch, frozen)
        checks = [jnp.all(jnp.isfinite(v)) for v in metrics.values()
                  if jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact)]
        finite = jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)
        if skip_nonfinite:
            kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                          new_state, state)
            new_state = kept.replace(step=new_state.step)
        return new_state, metrics, {"stop": jnp.max(stop_flags), "finite": finite}

    return guarded


class StepWatch:
    """Host side: reads the controls of finished steps, counts skipped ones, stops on divergence.

    Every process reads the same replicated values at the same steps, so all of them decide to
    stop (or fail) at the same step.
    """

    def __init__(self, skip_nonfinite: bool, skipped: int = 0, note=print):
        self.skip_nonfinite = skip_nonfinite
        self.skipped = skipped
        self.stop_requested = False
        self._unread = []
        self._note = note

    def push(self, step: int, metrics, controls) -> None:
        self._unread.append((step, metrics, controls))

    def settle(self, keep_newest: bool = False) -> list:
        """Read the controls of all unread steps (all but the newest with `keep_newest`,
        which leaves one step in flight); returns [(step, metrics, finite)] of those read."""
        ready = self._unread[:-1] if keep_newest else self._unread
        self._unread = self._unread[len(ready):]
        out = []
        for step, metrics, controls in ready:
            controls = jax.device_get(controls)
            self.stop_requested |= bool(controls["stop"])
            finite = bool(controls["finite"])
            if not finite:
                values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                if not self.skip_nonfinite:
                    raise TrainingDivergedError(f"step {step} produced non-finite values ({shown})")
                self.skipped += 1
                self._note(f"step {step} skipped: non-finite values ({shown}); "
                           f"{self.skipped} skipped so far")
            out.append((step, metrics, finite))
        return out
