"""Config checks of the pixel-space DDPM stage: every field it reads, named in the message."""
from __future__ import annotations

import math

from ldm_jax.config_checks import ConfigError, check_data, check_training, one_of
from ldm_jax.evaluation.eval_checks import check_eval_config

MAX_TIMESTEPS = 100_000  # diffusion.num_timesteps beyond this is a typo, not a schedule


def validate(config) -> None:
    """Reject configs that would fail later with an obscure trace, naming the field to change."""
    from ldm_jax.diffusion import objectives, samplers, schedules
    from ldm_jax.models.unet import check_input_size

    check_data(config.data)
    check_eval_config(config, "samples")
    one_of(config.diffusion.schedule, schedules.BETA_KINDS, "diffusion.schedule")
    one_of(config.diffusion.parameterization, objectives.PARAMETERIZATIONS,
           "diffusion.parameterization")
    one_of(config.diffusion.loss_weighting, objectives.WEIGHTINGS, "diffusion.loss_weighting")
    one_of(config.diffusion.timestep_sampling, objectives.T_SAMPLINGS,
           "diffusion.timestep_sampling")
    if config.diffusion.logit_std <= 0:
        raise ConfigError(f"diffusion.logit_std={config.diffusion.logit_std} must be positive")
    one_of(config.sampling.sampler, samplers.SAMPLERS, "sampling.sampler")
    one_of(config.sampling.spacing, samplers.SPACINGS, "sampling.spacing")
    one_of(config.sampling.ddpm_variance, samplers.DDPM_VARIANCES, "sampling.ddpm_variance")
    if not 0.0 <= config.sampling.guidance_rescale <= 1.0:
        raise ConfigError(f"sampling.guidance_rescale={config.sampling.guidance_rescale} must be "
                          "in [0, 1] (0: plain guidance)")
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
    check_kernels(config.model)
    _check_labels(config)
    check_diffusion(config.diffusion)
    check_sampling(config.sampling, config.diffusion.num_timesteps)
    check_training(config)


def check_diffusion(d) -> None:
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


def check_sampling(s, num_timesteps) -> None:
    if not 1 <= s.num_steps <= num_timesteps:
        raise ConfigError(f"sampling.num_steps={s.num_steps} must be between 1 and "
                          f"diffusion.num_timesteps={num_timesteps}")
    if not 0.0 <= s.eta <= 1.0:
        raise ConfigError(f"sampling.eta={s.eta} must be in [0, 1] (0: deterministic DDIM, "
                          "1: as noisy as DDPM)")


def check_kernels(m) -> None:
    """model.attention and model.remat, read by the U-Net only when it is traced."""
    from ldm_jax.models import attention_impl, remat
    one_of(m.attention, attention_impl.IMPLEMENTATIONS, "model.attention")
    try:
        remat.parse(m.remat)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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


def check_label_keys(config) -> tuple:
    """model.label_keys, each a label of the dataset, none twice."""
    from ldm_jax.data import pipeline

    keys = tuple(config.model.label_keys)
    if not keys:  # nothing to look up: an unprepared dataset is reported where it is read
        return keys
    available = pipeline.label_sizes(config.data)
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise ConfigError(f"model.label_keys {unknown} are not labels of the {config.data.name} "
                          f"dataset; choose from {sorted(available)}")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"model.label_keys {list(keys)} names a label twice")
    return keys


def _check_labels(config) -> None:
    keys = check_label_keys(config)
    if not 0.0 <= config.training.label_drop_prob < 1.0:
        raise ConfigError(f"training.label_drop_prob={config.training.label_drop_prob} must be in [0, 1)")
    if config.sampling.guidance_scale != 1.0 and not keys:
        raise ConfigError(f"sampling.guidance_scale={config.sampling.guidance_scale} needs a "
                          "label-conditioned model; set model.label_keys or leave the scale at 1")
    if config.sampling.guidance_scale != 1.0 and config.training.label_drop_prob == 0:
        raise ConfigError("sampling.guidance_scale != 1 needs an unconditional model too; "
                          "train with training.label_drop_prob > 0 (e.g. 0.1)")
