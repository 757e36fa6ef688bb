"""A latent-diffusion model ready to sample, from any of the places one can be: an ldm-jax
workdir (trained here, or converted with `python -m ldm_jax.convert`), a diffusers Stable
Diffusion folder or a CompVis single file (both converted in memory).
"""
from __future__ import annotations

import os

from ldm_jax import config_utils, parallel
from ldm_jax.config_checks import ConfigError
from ldm_jax.stable_diffusion import parts
from ldm_jax.stages import ldm_sample


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
    from ldm_jax.stable_diffusion import read
    sd = read.read(path, tokenizer=tokenizer, use_ema=use_ema is not False,
                               parameterization=parameterization)
    return sd.config, parts.from_sd_model(sd, mesh)
