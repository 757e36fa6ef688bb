"""Config checks, and the copy of the resolved config kept in every workdir."""
from __future__ import annotations

import json
import math
import os

import ml_collections

CONFIG_FILE = "config.json"
MAX_TIMESTEPS = 100_000  # diffusion.num_timesteps beyond this is a typo, not a schedule


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def _one_of(value, allowed, field):
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not one of {list(allowed)}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject configs that would fail later with an obscure trace, naming the field to change."""
    from ldm_jax.data import shapes
    from ldm_jax.diffusion import objectives, samplers, schedules
    from ldm_jax.models.unet import check_input_size

    _one_of(config.stage, ("ddpm",), "stage")
    _one_of(config.data.name, ("shapes", "cifar10"), "data.name")
    _one_of(config.diffusion.schedule, schedules.BETA_KINDS, "diffusion.schedule")
    _one_of(config.diffusion.parameterization, objectives.PARAMETERIZATIONS,
            "diffusion.parameterization")
    _one_of(config.diffusion.loss_weighting, objectives.WEIGHTINGS, "diffusion.loss_weighting")
    _one_of(config.diffusion.timestep_sampling, objectives.T_SAMPLINGS,
            "diffusion.timestep_sampling")
    if config.diffusion.logit_std <= 0:
        raise ConfigError(f"diffusion.logit_std={config.diffusion.logit_std} must be positive")
    _one_of(config.optimizer.schedule, ("constant", "cosine"), "optimizer.schedule")
    _one_of(config.training.compute_dtype, ("float32", "bfloat16"), "training.compute_dtype")
    _one_of(config.sampling.sampler, samplers.SAMPLERS, "sampling.sampler")
    _one_of(config.sampling.spacing, samplers.SPACINGS, "sampling.spacing")
    _one_of(config.sampling.ddpm_variance, samplers.DDPM_VARIANCES, "sampling.ddpm_variance")
    if config.data.name == "shapes":
        _one_of(config.data.image_size, shapes.ALLOWED_IMAGE_SIZES, "data.image_size (shapes dataset)")
    if config.data.name == "cifar10" and config.data.image_size != 32:
        raise ConfigError(f"data.image_size={config.data.image_size}: CIFAR-10 images are 32x32; set 32")
    try:
        check_input_size(config.data.image_size, config.model.channel_mult,
                         config.model.attention_resolutions)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for ch_mult in config.model.channel_mult:
        if (config.model.base_channels * ch_mult) % config.model.norm_groups:
            raise ConfigError(f"model.base_channels * {ch_mult} is not divisible by "
                              f"model.norm_groups={config.model.norm_groups}")
    _check_attention_heads(config.model, config.data.image_size)
    _check_labels(config)
    _check_diffusion(config.diffusion)
    _check_sampling(config.sampling, config.diffusion.num_timesteps)
    _check_optimizer(config.optimizer)
    _check_training(config.training)
    if config.data.name == "shapes":
        _at_least(config.data.num_train, 1, "data.num_train", "images to generate")
    t = config.training
    accum = config.optimizer.grad_accum_steps
    if accum < 1 or t.batch_size % accum:
        raise ConfigError(f"training.batch_size={t.batch_size} must split into "
                          f"optimizer.grad_accum_steps={accum} equal micro-batches")
    if t.num_steps < 1:
        raise ConfigError(f"training.num_steps={t.num_steps} must be at least 1")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay={t.ema_decay} must be in [0, 1)")


def _at_least(value, minimum, field, what, alternative=""):
    if value < minimum:
        raise ConfigError(f"{field}={value}: {what} must be at least {minimum}; set "
                          f"{field}={minimum} or more{alternative}")


def _check_training(t) -> None:
    _at_least(t.batch_size, 1, "training.batch_size", "images per step")
    _at_least(t.log_every, 1, "training.log_every", "steps between log lines")
    _at_least(t.checkpoint_every, 1, "training.checkpoint_every", "steps between checkpoints")
    _at_least(t.keep_checkpoints, 1, "training.keep_checkpoints", "checkpoints kept")
    if t.sample_every < 0:
        raise ConfigError(f"training.sample_every={t.sample_every} is negative; set a number of "
                          "steps between sample grids, or 0 to draw none")
    if t.sample_every > 0:
        _at_least(t.num_samples, 1, "training.num_samples", "images per sample grid",
                  ", or training.sample_every=0 to draw none")


def _check_diffusion(d) -> None:
    if not 2 <= d.num_timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"diffusion.num_timesteps={d.num_timesteps} must be between 2 and "
                          f"{MAX_TIMESTEPS}; 1000 is the usual choice")
    if d.schedule == "cosine":
        return  # the cosine schedule has no beta range
    for field in ("beta_start", "beta_end"):
        if not 0.0 < d[field] < 1.0:
            raise ConfigError(f"diffusion.{field}={d[field]} must be in (0, 1) for the "
                              f"{d.schedule} schedule (e.g. beta_start=1e-4, beta_end=0.02)")
    if d.beta_start > d.beta_end:
        raise ConfigError(f"diffusion.beta_start={d.beta_start} is above diffusion.beta_end="
                          f"{d.beta_end}; noise must grow with t, so swap them")


def _check_sampling(s, num_timesteps) -> None:
    if not 1 <= s.num_steps <= num_timesteps:
        raise ConfigError(f"sampling.num_steps={s.num_steps} must be between 1 and "
                          f"diffusion.num_timesteps={num_timesteps}")
    if not 0.0 <= s.eta <= 1.0:
        raise ConfigError(f"sampling.eta={s.eta} must be in [0, 1] (0: deterministic DDIM, "
                          "1: as noisy as DDPM)")


def _check_optimizer(o) -> None:
    if not o.lr > 0:  # also catches NaN
        raise ConfigError(f"optimizer.lr={o.lr} must be positive (e.g. 1e-4)")
    if o.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} is negative; "
                          "set 0 for no warm-up")


def _check_attention_heads(m, image_size) -> None:
    """Each attention layer splits its channels into heads (layers.SelfAttentionBlock)."""
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim={m.head_dim} is negative; set channels per head, "
                          "or 0 to use model.num_heads")
    if not m.head_dim and m.num_heads < 1:
        raise ConfigError(f"model.num_heads={m.num_heads}: attention needs at least one head; "
                          "set model.num_heads=1 or more")
    # Attention runs at the levels whose resolution is listed, and always in the middle block.
    levels = [(image_size // 2 ** i, m.base_channels * mult) for i, mult in enumerate(m.channel_mult)]
    used = [lv for lv in levels if lv[0] in m.attention_resolutions] + [levels[-1]]
    field, value = ("model.head_dim", m.head_dim) if m.head_dim else ("model.num_heads", m.num_heads)
    common = math.gcd(*(channels for _, channels in used))
    for resolution, channels in used:
        if channels % value:
            divisors = [k for k in range(1, common + 1) if common % k == 0]
            raise ConfigError(f"{field}={value} does not divide the {channels} channels of the "
                              f"attention at {resolution}x{resolution}; set one of {divisors}"
                              + (" or model.head_dim=0" if m.head_dim else ""))


def _check_labels(config) -> None:
    from ldm_jax.data import pipeline

    available = pipeline.label_sizes(config.data)
    keys = tuple(config.model.label_keys)
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise ConfigError(f"model.label_keys {unknown} are not labels of the {config.data.name} "
                          f"dataset; choose from {sorted(available)}")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"model.label_keys {list(keys)} names a label twice")
    if not 0.0 <= config.training.label_drop_prob < 1.0:
        raise ConfigError(f"training.label_drop_prob={config.training.label_drop_prob} must be in [0, 1)")
    if config.sampling.guidance_scale != 1.0 and not keys:
        raise ConfigError(f"sampling.guidance_scale={config.sampling.guidance_scale} needs a "
                          "label-conditioned model; set model.label_keys or leave the scale at 1")
    if config.sampling.guidance_scale != 1.0 and config.training.label_drop_prob == 0:
        raise ConfigError("sampling.guidance_scale != 1 needs an unconditional model too; "
                          "train with training.label_drop_prob > 0 (e.g. 0.1)")


def check_batch_divides(batch_size: int, num_devices: int, num_processes: int, accum: int) -> None:
    per_micro = batch_size // accum
    if per_micro % num_devices:
        raise ConfigError(f"training.batch_size={batch_size} (micro-batch {per_micro}) is not divisible by "
                          f"the {num_devices} devices; use a multiple of {num_devices * accum}")
    if batch_size % num_processes:
        raise ConfigError(f"training.batch_size={batch_size} is not divisible by {num_processes} processes")


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written config
    return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in workdir {workdir!r}: is this the --workdir "
                                "a train.py run wrote to?")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(_corrupt_config(workdir, path, f"is not valid JSON ({e})")) from None
    if not isinstance(saved, dict):
        raise ConfigError(_corrupt_config(workdir, path, f"holds a {type(saved).__name__}, "
                                          "not a JSON object"))
    return config_from_dict(saved)


def _corrupt_config(workdir: str, path: str, what: str) -> str:
    """The message for a damaged WORKDIR/config.json: where an intact copy is (every checkpoint
    holds one, written by Checkpointer.save as the item "config")."""
    from ldm_jax.checkpoint import CHECKPOINT_DIR
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    steps = sorted(int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ())
                   if d.isdigit() and os.path.isfile(os.path.join(ckpt_dir, d, "config", "metadata")))
    copy = os.path.join(ckpt_dir, str(steps[-1]) if steps else "STEP", "config", "metadata")
    return f"{path} {what}; restore it from the copy {copy}, or use another --workdir"


def _merge(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = (_merge(defaults[key], value)
                    if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value)
    return out


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A stored config dict with the fields added since it was written set to their defaults,
    which keep the old behaviour."""
    from configs import ddpm_base
    return ml_collections.ConfigDict(_merge(ddpm_base.get_config().to_dict(), saved))
