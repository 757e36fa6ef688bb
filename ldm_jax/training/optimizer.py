"""AdamW with linear warm-up, an optional cosine decay, and global-norm clipping."""
from __future__ import annotations

import optax


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
    warmup = max(int(opt_config.warmup_steps), 0)
    if opt_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, opt_config.lr, max(warmup, 1),
                                                  max(total_steps, warmup + 1), end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(opt_config.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, opt_config.lr, warmup),
                                 optax.constant_schedule(opt_config.lr)], [warmup])


def make_optimizer(opt_config, total_steps: int):
    """Returns (optax transformation, learning-rate schedule) for logging the lr."""
    lr = learning_rate_schedule(opt_config, total_steps)
    parts = []
    if opt_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt_config.grad_clip))
    parts.append(optax.adamw(lr, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                             weight_decay=opt_config.weight_decay))
    return optax.chain(*parts), lr
