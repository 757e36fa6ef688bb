"""A latent-diffusion model ready to sample, from any of the places one can be:
an ldm-jax workdir (trained here, or converted with `python -m ldm_jax.convert`), a diffusers
Stable Diffusion folder or a CompVis single file (both converted in memory).
"""
from __future__ import annotations

import os

import jax

from ldm_jax import config_utils, parallel
from ldm_jax.config_checks import ConfigError
from ldm_jax.stages import ldm_sample
from ldm_jax.stages.first_stage import FirstStage


def is_workdir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, config_utils.CONFIG_FILE))


def load(path: str, mesh=None, *, tokenizer: str | None = None, use_ema: bool | None = None,
         parameterization: str | None = None, step: int | None = None):
    """(config, ldm_sample.Loaded). `tokenizer` and `parameterization` serve CompVis files,
    `step` and `use_ema` (default: the config's sampling.use_ema) workdirs."""
    mesh = mesh or parallel.make_mesh()
    path = os.path.expanduser(path)
    if is_workdir(path):
        config = config_utils.load_config(path)
        if config.stage != "ldm":
            raise ConfigError(f"{path} is a {config.stage!r} workdir, not a latent-diffusion "
                              "model; sample it with `python sample.py --workdir`")
        use_ema = config.sampling.use_ema if use_ema is None else use_ema
        return config, ldm_sample.load_workdir(path, config, mesh, step, use_ema)
    from ldm_jax.convert import stable_diffusion
    sd = stable_diffusion.read(path, tokenizer=tokenizer, use_ema=use_ema is not False,
                               parameterization=parameterization)
    return sd.config, from_sd_model(sd, mesh)


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
