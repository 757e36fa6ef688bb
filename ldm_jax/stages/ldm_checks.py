"""Config checks of the latent-diffusion stage: every field it reads, named in the message.

The first stage itself (exists, finished, latent channels) is checked when it is loaded
(`first_stage.inspect`), since that needs the filesystem.
"""
from __future__ import annotations

from ldm_jax.config_checks import ConfigError, at_least, check_data, check_training, one_of
from ldm_jax.evaluation.eval_checks import check_eval_config
from ldm_jax.models.concat_inputs import CONCAT_KINDS, LOWRES_FACTOR
from ldm_jax.stages.ddpm_checks import (check_diffusion, check_kernels, check_label_keys,
                                         check_sampling)


def validate(config) -> None:
    from ldm_jax.diffusion import objectives, samplers, schedules

    check_data(config.data)
    check_eval_config(config, "samples")
    d, s = config.diffusion, config.sampling
    one_of(d.schedule, schedules.BETA_KINDS, "diffusion.schedule")
    one_of(d.parameterization, objectives.PARAMETERIZATIONS, "diffusion.parameterization")
    one_of(d.loss_weighting, objectives.WEIGHTINGS, "diffusion.loss_weighting")
    one_of(d.timestep_sampling, objectives.T_SAMPLINGS, "diffusion.timestep_sampling")
    one_of(s.sampler, samplers.SAMPLERS, "sampling.sampler")
    one_of(s.spacing, samplers.SPACINGS, "sampling.spacing")
    one_of(s.ddpm_variance, samplers.DDPM_VARIANCES, "sampling.ddpm_variance")
    if not 0.0 <= s.guidance_rescale <= 1.0:
        raise ConfigError(f"sampling.guidance_rescale={s.guidance_rescale} must be in [0, 1]")
    check_diffusion(d)
    check_sampling(s, d.num_timesteps)
    at_least(config.first_stage.latent_channels, 1, "first_stage.latent_channels",
             "latent channels")
    one_of(config.first_stage.posterior, ("sample", "mode"), "first_stage.posterior")
    _check_conditioning(config)
    _check_model(config.model)
    check_kernels(config.model)
    check_training(config)


def check_training_data(config, source) -> None:
    """What training reads beyond the config itself (sampling a trained model needs no data)."""
    from ldm_jax.data import pipeline
    if config.data.name == "latents" and config.conditioning.concat != "none":
        raise ConfigError(f"conditioning.concat={config.conditioning.concat!r} builds its inputs "
                          "from the images, which a latent cache does not hold; train on images")
    if config.data.name == "latents" and config.eval.every:
        raise ConfigError("eval.every: evaluation compares samples with the dataset's images, "
                          "which a latent cache does not hold; set --config.eval.every=0 and "
                          "evaluate the workdir with `python -m ldm_jax.evaluate` on the image "
                          "dataset")
    if config.conditioning.text and not pipeline.has_captions(config.data, source):
        raise ConfigError(f"conditioning.text needs captions; this {config.data.name} dataset "
                          "has none (shapes, tar shards, and folders with .txt captions or a "
                          "manifest have)")


def _check_conditioning(config) -> None:
    c = config.conditioning
    one_of(c.concat, CONCAT_KINDS, "conditioning.concat")
    if not 0.0 <= c.p_uncond < 1.0:
        raise ConfigError(f"conditioning.p_uncond={c.p_uncond} must be in [0, 1) (0.1 is usual)")
    if not 0.0 <= c.inpaint_full_mask_prob <= 1.0:
        raise ConfigError(f"conditioning.inpaint_full_mask_prob={c.inpaint_full_mask_prob} "
                          "must be in [0, 1]")
    keys = check_label_keys(config)
    if c.class_context:
        if not keys:
            raise ConfigError("conditioning.class_context needs labels: set model.label_keys")
        if c.text:
            raise ConfigError("conditioning.class_context and conditioning.text both fill the "
                              "cross-attention context; choose one")
        at_least(c.class_embed_dim, 1, "conditioning.class_embed_dim", "token width")
    conditional = c.text or bool(keys)
    if config.sampling.guidance_scale != 1.0:
        if not conditional:
            raise ConfigError(f"sampling.guidance_scale={config.sampling.guidance_scale} needs "
                              "text or label conditioning (conditioning.text, model.label_keys)")
        if c.p_uncond == 0:
            raise ConfigError("sampling.guidance_scale != 1 needs an unconditional model too; "
                              "train with conditioning.p_uncond > 0 (e.g. 0.1)")
    if c.concat == "lowres" and config.data.image_size % (2 * LOWRES_FACTOR):
        raise ConfigError(f"data.image_size={config.data.image_size}: super-resolution needs "
                          f"a multiple of {2 * LOWRES_FACTOR}")
    te = config.text_encoder
    if c.text:
        at_least(te.max_length, 3, "text_encoder.max_length", "tokens ([BOS], a word, [EOS])")
        at_least(te.depth, 1, "text_encoder.depth", "transformer layers")
        at_least(te.heads, 1, "text_encoder.heads", "attention heads")
        if te.width % te.heads:
            raise ConfigError(f"text_encoder.width={te.width} is not divisible by "
                              f"text_encoder.heads={te.heads}")
        if te.output not in ("last", "penultimate"):
            raise ConfigError(f"text_encoder.output={te.output!r}; use 'last' or 'penultimate'")


def _check_model(m) -> None:
    levels = len(m.channel_mult)
    bad = [lv for lv in m.attention_levels if not 0 <= lv < levels]
    if bad:
        raise ConfigError(f"model.attention_levels {list(m.attention_levels)}: {bad} are not "
                          f"level indices below {levels} (the length of model.channel_mult)")
    for name in ("num_heads", "head_dim", "transformer_depth"):
        value = m[name]
        if isinstance(value, (list, tuple)) and len(value) != levels:
            raise ConfigError(f"model.{name}={list(value)} needs one value per level ({levels}, "
                              "the length of model.channel_mult) or a single int")
    per_level = lambda v, i: v[i] if isinstance(v, (list, tuple)) else v
    for i, mult in enumerate(m.channel_mult):
        ch = m.base_channels * mult
        if ch % m.norm_groups:
            raise ConfigError(f"model.base_channels * {mult} = {ch} is not divisible by "
                              f"model.norm_groups={m.norm_groups}")
        head_dim, num_heads = per_level(m.head_dim, i), per_level(m.num_heads, i)
        heads = ch // head_dim if head_dim else num_heads
        if heads < 1 or ch % heads:
            field = "model.head_dim" if head_dim else "model.num_heads"
            raise ConfigError(f"{field}={head_dim or num_heads} does not split the {ch} "
                              f"channels of level {i} into whole heads")
