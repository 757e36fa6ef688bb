"""Config checks of the first stage (KL and VQ autoencoders with a PatchGAN)."""
from __future__ import annotations

import os

from ldm_jax.config_checks import ConfigError, at_least, check_data, check_training, one_of
from ldm_jax.evaluation.eval_checks import check_eval_config

KINDS = ("kl", "vq")
LATENT_SCALES = ("std", "fixed")


def validate(config) -> None:
    from ldm_jax.losses.autoencoder import DISC_LOSSES, PIXEL_LOSSES
    from ldm_jax.models.discriminator import NORMS

    check_data(config.data)
    check_eval_config(config, "reconstructions")
    check_training(config)
    m, lc = config.model, config.loss
    one_of(m.kind, KINDS, "model.kind")
    if not m.ch_mult:
        raise ConfigError("model.ch_mult is empty; give one multiplier per level, e.g. (1,2,4,4)")
    f = 2 ** (len(m.ch_mult) - 1)
    size = config.data.image_size
    if size % f:
        raise ConfigError(f"data.image_size={size} is not divisible by the downsampling factor "
                          f"{f} of model.ch_mult={tuple(m.ch_mult)}; use a multiple of {f}")
    levels = [size // 2 ** i for i in range(len(m.ch_mult))]
    stray = [r for r in m.attn_resolutions if r not in levels]
    if stray:
        raise ConfigError(f"model.attn_resolutions {stray} never occur for {size}x{size} images "
                          f"(the levels are {levels}); choose from those")
    for mult in m.ch_mult:
        if (m.ch * mult) % m.norm_groups:
            raise ConfigError(f"model.ch * {mult} = {m.ch * mult} is not divisible by "
                              f"model.norm_groups={m.norm_groups}")
    at_least(m.num_res_blocks, 1, "model.num_res_blocks", "residual blocks per level")
    at_least(m.z_channels, 1, "model.z_channels", "latent channels")
    if m.kind == "vq":
        at_least(m.n_embed, 2, "model.n_embed", "codebook entries")
        at_least(m.embed_dim, 1, "model.embed_dim", "code dimensions")
        if m.vq_restart_dead_codes and not m.vq_ema:
            raise ConfigError("model.vq_restart_dead_codes needs model.vq_ema=True (the codebook "
                              "must be an EMA statistic to be rewritten)")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    _check_loss(config, lc, size, DISC_LOSSES, PIXEL_LOSSES, NORMS)
    if config.optimizer.grad_accum_steps != 1:
        raise ConfigError(f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}: the "
                          "autoencoder's GAN step does not accumulate; set 1 and a smaller "
                          "training.batch_size")
    one_of(config.latent.scale, LATENT_SCALES, "latent.scale")
    at_least(config.latent.num_images, 1, "latent.num_images", "images for the latent scale")


def _check_loss(config, lc, size, disc_losses, pixel_losses, norms) -> None:
    one_of(lc.disc_loss, disc_losses, "loss.disc_loss")
    one_of(lc.pixel_loss, pixel_losses, "loss.pixel_loss")
    one_of(lc.disc_norm, norms, "loss.disc_norm")
    for field in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight",
                  "disc_factor", "disc_start", "disc_lr"):
        if lc[field] < 0:
            raise ConfigError(f"loss.{field}={lc[field]} is negative; set 0 or more")
    if lc.perceptual_weight > 0:
        if not lc.lpips_path:
            raise ConfigError(
                f"loss.perceptual_weight={lc.perceptual_weight} needs LPIPS weights: convert them "
                "once with `python -m ldm_jax.convert.lpips_weights --vgg=vgg16-397923af.pth "
                "--out=lpips.safetensors` and set loss.lpips_path, or set loss.perceptual_weight=0")
        if not os.path.isfile(os.path.expanduser(lc.lpips_path)):
            raise ConfigError(f"loss.lpips_path={lc.lpips_path!r} is not a file; convert the "
                              "weights with `python -m ldm_jax.convert.lpips_weights` first")
    at_least(lc.disc_layers, 1, "loss.disc_layers", "discriminator layers")
    at_least(lc.disc_channels, 1, "loss.disc_channels", "discriminator channels")
    if lc.disc_weight > 0 and size // 2 ** lc.disc_layers < 2:
        raise ConfigError(f"loss.disc_layers={lc.disc_layers} shrinks {size}x{size} images below "
                          "the discriminator's 4x4 convs; use fewer layers or set "
                          "loss.disc_weight=0")
