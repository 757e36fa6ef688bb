"""A Stable Diffusion model converted in memory (stable_diffusion.read.SDModel) as the
parts sampling takes: the frozen first stage, the latent model, its tokenizer and params."""
from __future__ import annotations

import jax

from ldm_jax import parallel
from ldm_jax.stages import ldm_sample
from ldm_jax.stages.first_stage import FirstStage


def first_stage_of(sd, mesh) -> FirstStage:
    """The converted VAE as the frozen first stage."""
    from ldm_jax.models.autoencoder import downsampling_factor
    from ldm_jax.stages import autoencoder
    c = sd.vae_config
    frozen = jax.device_put({"params": {"autoencoder": sd.vae}, "model_state": {}},
                            parallel.replicated(mesh))
    return FirstStage(model=autoencoder.build_model(c), kind="kl", scale=sd.latent_scale,
                      posterior=sd.config.first_stage.posterior,
                      factor=downsampling_factor(c.model.ch_mult), channels=c.model.z_channels,
                      step=0, workdir=sd.source, params=frozen)


def from_sd_model(sd, mesh) -> ldm_sample.Loaded:
    from ldm_jax.models.text_encoder import TextTransformer
    from ldm_jax.training.ldm_step import build_parts
    first = first_stage_of(sd, mesh)
    model, schedule = build_parts(sd.config, first, sd.tokenizer, TextTransformer(**sd.text_kwargs))
    params = jax.device_put({"unet": sd.unet, "text_encoder": sd.text},
                            parallel.replicated(mesh))
    return ldm_sample.Loaded(model, first, schedule, sd.tokenizer, params, 0)
