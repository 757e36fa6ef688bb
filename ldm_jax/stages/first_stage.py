"""The frozen first stage of a latent-diffusion run: a finished autoencoder workdir.

The autoencoder's params (EMA when kept), its config and its latent scale are read from
`first_stage.workdir`; the latent stage never trains them. Which checkpoint and scale a run
used is recorded in the run's own workdir (first_stage.json), so sampling and resuming use
exactly those, and a first stage that has changed since is an error, not a silent mismatch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.config_checks import ConfigError

RECORD_FILE = "first_stage.json"


@dataclasses.dataclass(frozen=True)
class FirstStage:
    model: Any
    kind: str           # kl | vq
    scale: float        # latents are multiplied by it before diffusion
    posterior: str      # sample | mode: which KL latents the diffusion model sees
    factor: int         # image pixels per latent pixel, per side
    channels: int       # latent channels
    step: int           # the autoencoder checkpoint used
    workdir: str        # absolute path
    params: Any = None  # {"params": ..., "model_state": ...}: what `encode`/`decode` take

    def encode(self, frozen, images, key):
        """[-1, 1] NHWC images -> scaled latents (a posterior sample or mean for KL, the
        quantised latents for VQ)."""
        variables = {"params": frozen["params"]["autoencoder"], **frozen["model_state"]}
        out = self.model.apply(variables, images, train=False, method=self.model.encode)
        if self.kind == "kl":
            z = out.sample(key) if self.posterior == "sample" else out.mode()
        else:
            z = out[0]
        return jax.lax.stop_gradient(z) * self.scale

    def cacheable(self, frozen, images):
        """What a latent cache stores for `images`: the KL posterior's mean and (clamped)
        log-variance side by side, or the VQ latents; `from_cache` turns it into what `encode`
        gives, with the same key giving the same sample."""
        variables = {"params": frozen["params"]["autoencoder"], **frozen["model_state"]}
        out = self.model.apply(variables, images, train=False, method=self.model.encode)
        if self.kind == "kl":
            return jnp.concatenate([out.mean, out.logvar], axis=-1)
        return out[0]

    def from_cache(self, cached, key):
        """Scaled latents from `cacheable`'s output, as `encode` would give them."""
        if self.kind == "kl":
            from ldm_jax.models.autoencoder import DiagonalGaussian
            dist = DiagonalGaussian.from_moments(cached)
            z = dist.sample(key) if self.posterior == "sample" else dist.mode()
        else:
            z = cached
        return jax.lax.stop_gradient(z) * self.scale

    def decode(self, frozen, latents):
        variables = {"params": frozen["params"]["autoencoder"], **frozen["model_state"]}
        return self.model.apply(variables, latents / self.scale, train=False,
                                method=self.model.decode)

    def record(self) -> dict:
        return {"workdir": self.workdir, "step": self.step, "scale": self.scale,
                "posterior": self.posterior, "kind": self.kind, "factor": self.factor,
                "channels": self.channels}


def _train_hint(config, workdir: str) -> str:
    return (f"train it with `python train.py --config={config.first_stage.config} "
            f"--workdir={workdir}`, or set --config.first_stage.workdir to a finished "
            "autoencoder run")


def inspect(config, workdir: str | None = None) -> dict:
    """What the first stage in `workdir` (default first_stage.workdir) is, without loading
    weights: {config, scale record, factor, channels}. Raises ConfigError naming the fix."""
    from ldm_jax import config_utils
    from ldm_jax.models.autoencoder import downsampling_factor
    from ldm_jax.stages.autoencoder import LATENT_SCALE_FILE

    workdir = os.path.abspath(os.path.expanduser(workdir or config.first_stage.workdir))
    if not os.path.isdir(workdir):
        raise ConfigError(f"first stage not found: {workdir} does not exist; "
                          + _train_hint(config, workdir))
    try:
        ae_config = config_utils.load_config(workdir)
    except FileNotFoundError:
        raise ConfigError(f"first stage {workdir} holds no training run (no config.json); "
                          + _train_hint(config, workdir)) from None
    if ae_config.stage != "autoencoder":
        raise ConfigError(f"first stage {workdir} is a {ae_config.stage!r} run, not an "
                          "autoencoder; " + _train_hint(config, workdir))
    scale_path = os.path.join(workdir, LATENT_SCALE_FILE)
    if not os.path.exists(scale_path):
        raise ConfigError(f"the first stage in {workdir} has not finished training (its "
                          f"{LATENT_SCALE_FILE} is written at step training.num_steps="
                          f"{ae_config.training.num_steps}); finish it with `python train.py "
                          f"--config={config.first_stage.config} --workdir={workdir}`")
    with open(scale_path) as f:
        scale = json.load(f)
    channels = ae_config.model.embed_dim
    if channels != config.first_stage.latent_channels:
        raise ConfigError(f"the first stage in {workdir} has {channels} latent channels but "
                          f"first_stage.latent_channels={config.first_stage.latent_channels}; "
                          "use an autoencoder with that many or change the field")
    factor = downsampling_factor(ae_config.model.ch_mult)
    if config.data.image_size % factor:
        raise ConfigError(f"data.image_size={config.data.image_size} is not divisible by the "
                          f"first stage's downsampling factor {factor}")
    return {"workdir": workdir, "config": ae_config, "scale": scale, "factor": factor,
            "channels": channels}


def load(config, mesh, record: dict | None = None) -> FirstStage:
    """The frozen first stage, its params replicated on `mesh`. With `record` (a run's
    first_stage.json), exactly the checkpoint and scale that run used."""
    from ldm_jax import parallel
    from ldm_jax.stages import autoencoder

    info = inspect(config, record["workdir"] if record else None)
    posterior = record.get("posterior", "sample") if record else config.first_stage.posterior
    stored = info["scale"]
    key = "scale" if posterior == "sample" else "mode_scale"
    if key not in stored:
        raise ConfigError(f"{info['workdir']}/latent_scale.json predates first_stage.posterior="
                          f"'mode'; recompute it with `python sample.py --workdir="
                          f"{info['workdir']} --latent_scale`")
    scale, step = float(stored[key]), int(stored["step"])
    if record is not None and (int(record["step"]) != step
                               or abs(float(record["scale"]) - scale) > 1e-12):
        raise ConfigError(
            f"the first stage in {info['workdir']} changed since this run started (it used "
            f"step {record['step']}, scale {record['scale']:.6g}; now step {step}, scale "
            f"{scale:.6g}); the latent model only fits the first; restore that "
            "autoencoder or train the latent model again in a new --workdir")
    model, params, model_state, step = autoencoder.restore_for_use(
        info["workdir"], info["config"], step, config.first_stage.use_ema)
    frozen = jax.device_put({"params": params, "model_state": model_state},
                            parallel.replicated(mesh))
    return FirstStage(model=model, kind=info["config"].model.kind, scale=scale,
                      posterior=posterior,
                      factor=info["factor"], channels=info["channels"], step=step,
                      workdir=info["workdir"], params=frozen)


def read_record(workdir: str) -> dict | None:
    path = os.path.join(workdir, RECORD_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_record(first: FirstStage, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RECORD_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(first.record(), f, indent=2)
    os.replace(path + ".tmp", path)


def latent_shape(config, first: FirstStage | dict, batch: int) -> tuple:
    factor = first.factor if isinstance(first, FirstStage) else first["factor"]
    channels = first.channels if isinstance(first, FirstStage) else first["channels"]
    s = config.data.image_size // factor
    return (batch, s, s, channels)
