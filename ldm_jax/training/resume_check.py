"""Before resuming, compare the command's config with the one stored in the latest checkpoint.

Resuming promises the run continues as if never interrupted. A changed model, objective,
optimiser, batch, seed or dataset breaks that promise (or the restore itself), so such changes
stop the run with one line naming them, unless the user lists them as meant. Fields that only
say how often to log, sample or save never change the trained numbers and pass silently.
"""
from __future__ import annotations

import json

from ldm_jax.config_checks import ConfigError

# Changing these never changes the trained numbers.
HARMLESS = (
    "training.log_every", "training.checkpoint_every", "training.keep_checkpoints",
    "training.async_checkpointing", "training.sample_every", "training.num_samples",
    "training.progress_bar", "data.num_threads", "data.prefetch", "data.data_dir",
    "sampling.",  # how grids are drawn during training; the weights do not see it
    "eval.",      # what is evaluated during training; the weights do not see it
    "parallel.",  # the mesh: checkpoints restore onto any mesh shape (sums may round apart)
    "model.attention", "model.remat",  # kernels and recomputation: the same function, rounded
)
NUM_STEPS = "training.num_steps"  # allowed: extends (or ends) the run; the lr schedule is redrawn


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, with tuples written as lists as JSON stores them."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value))
    return out


def _harmless(field: str) -> bool:
    return any(field == h or (h.endswith(".") and field.startswith(h)) for h in HARMLESS)


def differences(stored: dict, current: dict) -> dict:
    """Fields whose values differ: {field: (stored, current)}; a missing field counts as None."""
    a, b = flatten(stored), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(stored: dict, current: dict, step: int, allowed=()) -> list[str]:
    """Raise ConfigError for changes that break exact resumption and are not in `allowed`
    (field names, or "all"); return notes on the changes that are let through."""
    diffs = differences(stored, current)
    blocking = {k: v for k, v in diffs.items() if not _harmless(k) and k != NUM_STEPS}
    meant = set(allowed)
    unmeant = {k: v for k, v in blocking.items() if k not in meant and "all" not in meant}
    if unmeant:
        changes = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in unmeant.items())
        raise ConfigError(
            f"the checkpoint at step {step} was trained with a different config ({changes}); "
            "resuming would not continue that run. Use a new --workdir, or pass "
            f"--allow_config_change={','.join(unmeant)} if you mean it")
    notes = [f"config change allowed by --allow_config_change: {k} {_show(a)} -> {_show(b)}"
             for k, (a, b) in blocking.items()]
    return notes


def _show(value) -> str:
    if isinstance(value, list):
        return "(" + ",".join(str(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


def num_steps_note(old_config, new_config, step: int) -> str | None:
    """What extending (or shortening) training.num_steps does to the learning rate."""
    from ldm_jax.training.optimizer import learning_rate_schedule

    old_n, new_n = old_config.training.num_steps, new_config.training.num_steps
    if old_n == new_n:
        return None
    if step >= new_n:
        return (f"training.num_steps {old_n} -> {new_n}: the checkpoint is already at step "
                f"{step}, so there is nothing left to train")
    old_lr = float(learning_rate_schedule(old_config.optimizer, old_n)(step))
    new_lr = float(learning_rate_schedule(new_config.optimizer, new_n)(step))
    if abs(old_lr - new_lr) <= 1e-12 + 1e-6 * abs(old_lr):
        effect = f"the learning rate at step {step} is unchanged ({new_lr:.3g})"
    else:
        effect = (f"the learning-rate schedule is redrawn over {new_n} steps, so at step {step} "
                  f"the lr moves from {old_lr:.3g} to {new_lr:.3g}")
    return f"training.num_steps {old_n} -> {new_n}: {effect}"
