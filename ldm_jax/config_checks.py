"""Config checks every stage shares, and the error they raise.

A ConfigError message names the field, the bad value and what to set instead; the command
lines print it as one line.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def one_of(value, allowed, field):
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not one of {list(allowed)}")


def at_least(value, minimum, field, what, alternative=""):
    if value < minimum:
        raise ConfigError(f"{field}={value}: {what} must be at least {minimum}; set "
                          f"{field}={minimum} or more{alternative}")


def check_training_intervals(t) -> None:
    at_least(t.batch_size, 1, "training.batch_size", "images per step")
    at_least(t.log_every, 1, "training.log_every", "steps between log lines")
    at_least(t.checkpoint_every, 1, "training.checkpoint_every", "steps between checkpoints")
    at_least(t.keep_checkpoints, 1, "training.keep_checkpoints", "checkpoints kept")
    if t.sample_every < 0:
        raise ConfigError(f"training.sample_every={t.sample_every} is negative; set a number of "
                          "steps between sample grids, or 0 to draw none")
    if t.sample_every > 0:
        at_least(t.num_samples, 1, "training.num_samples", "images per sample grid",
                  ", or training.sample_every=0 to draw none")


def check_optimizer(o) -> None:
    if not o.lr > 0:  # also catches NaN
        raise ConfigError(f"optimizer.lr={o.lr} must be positive (e.g. 1e-4)")
    if o.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} is negative; "
                          "set 0 for no warm-up")


def check_training(config) -> None:
    """The training and optimizer fields every stage has."""
    t = config.training
    one_of(config.optimizer.schedule, ("constant", "cosine"), "optimizer.schedule")
    one_of(t.compute_dtype, ("float32", "bfloat16"), "training.compute_dtype")
    check_optimizer(config.optimizer)
    check_training_intervals(t)
    accum = config.optimizer.grad_accum_steps
    if accum < 1 or t.batch_size % accum:
        raise ConfigError(f"training.batch_size={t.batch_size} must split into "
                          f"optimizer.grad_accum_steps={accum} equal micro-batches")
    if t.num_steps < 1:
        raise ConfigError(f"training.num_steps={t.num_steps} must be at least 1")
    check_ema(t)


def check_ema(t) -> None:
    """The EMA's decay and its warm-up (training.ema_warmup, see train_state.ema_decay_at)."""
    from ldm_jax.training.train_state import EMA_WARMUPS

    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay={t.ema_decay} must be in [0, 1)")
    one_of(t.ema_warmup, EMA_WARMUPS, "training.ema_warmup")
    if not t.ema_inv_gamma > 0:  # also catches NaN
        raise ConfigError(f"training.ema_inv_gamma={t.ema_inv_gamma} must be positive; set "
                          "training.ema_inv_gamma=1.0 (diffusers' default)")
    if not t.ema_power > 0:
        raise ConfigError(f"training.ema_power={t.ema_power} must be positive; set "
                          "training.ema_power=0.6667 (long runs) or 0.75 (short ones)")


def check_data(data) -> None:
    """The dataset fields every stage reads."""
    from ldm_jax.data import shapes
    from ldm_jax.data.dataset_names import resolve

    one_of(data.name, ("shapes", "cifar10", "tfds", "folder", "webdataset", "latents"),
           "data.name")
    data = resolve(data)  # the shorthand "cifar10" is checked as the tfds source
    if data.name == "latents" and not data.path:
        raise ConfigError("data.name='latents' needs data.path, a cache written by `python -m "
                          "ldm_jax.data.cache`")
    one_of(data.crop, ("center", "random"), "data.crop")
    if data.name in ("folder", "webdataset"):
        if not data.path and not (data.name == "folder" and data.manifest):
            raise ConfigError(f"data.name={data.name!r} needs data.path (the "
                              + ("image folder" if data.name == "folder" else
                                 "tar shards, e.g. 'shards/{000000..000099}.tar'") + ")")
        at_least(data.image_size, 8, "data.image_size", "pixels per side")
    if data.name == "tfds":
        at_least(data.image_size, 8, "data.image_size", "pixels per side")
        if data.num_classes < 0:
            raise ConfigError(f"data.num_classes={data.num_classes} is negative; 0 reads it "
                              "from the dataset")
    if data.name == "shapes":
        one_of(data.image_size, shapes.ALLOWED_IMAGE_SIZES, "data.image_size (shapes dataset)")
        at_least(data.num_train, 1, "data.num_train", "images to generate")
        one_of(data.get("max_objects", shapes.MAX_OBJECTS), tuple(range(1, shapes.MAX_OBJECTS + 1)),
               "data.max_objects (shapes dataset)")
    cifar10 = data.name == "tfds" and data.tfds_name.split(":")[0] == "cifar10"
    if cifar10 and data.image_size != 32:
        raise ConfigError(f"data.image_size={data.image_size}: CIFAR-10 images are 32x32; set 32")


def check_batch_divides(batch_size: int, num_devices: int, num_processes: int, accum: int) -> None:
    per_micro = batch_size // accum
    if per_micro % num_devices:
        raise ConfigError(f"training.batch_size={batch_size} (micro-batch {per_micro}) is not divisible by "
                          f"the {num_devices} devices; use a multiple of {num_devices * accum}")
    if batch_size % num_processes:
        raise ConfigError(f"training.batch_size={batch_size} is not divisible by {num_processes} processes")
