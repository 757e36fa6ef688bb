"""Config checks, and the copy of the resolved config kept in every workdir."""
from __future__ import annotations

import json
import os

import ml_collections

CONFIG_FILE = "config.json"


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
    _check_labels(config)
    t = config.training
    accum = config.optimizer.grad_accum_steps
    if accum < 1 or t.batch_size % accum:
        raise ConfigError(f"training.batch_size={t.batch_size} must split into "
                          f"optimizer.grad_accum_steps={accum} equal micro-batches")
    if t.num_steps < 1:
        raise ConfigError(f"training.num_steps={t.num_steps} must be at least 1")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay={t.ema_decay} must be in [0, 1)")


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
    with open(path) as f:
        saved = json.load(f)
    # Fields added after a workdir was written take their defaults, which keep the old behaviour.
    from configs import ddpm_base
    return ml_collections.ConfigDict(_merge(ddpm_base.get_config().to_dict(), saved))


def _merge(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = (_merge(defaults[key], value)
                    if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value)
    return out
