"""A converted Stable Diffusion model saved as an ldm-jax workdir, which `sample.py --workdir`
samples and fine-tuning configs start from (`init_from`):

    DST/config.json, checkpoints/0/     the latent model (U-Net params) and its config
    DST/first_stage.json, tokenizer.json
    DST/vae/                            the VAE as an autoencoder workdir (latent_scale.json)
    DST/text_encoder/                   the frozen CLIP text encoder (models/text_encoder_io)
The parts are named relative to DST, so the folder can be moved or copied whole.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp

from ldm_jax import config_utils
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config_checks import ConfigError

VAE_DIR, TEXT_DIR = "vae", "text_encoder"


def _save_checkpoint(workdir: str, state: dict, config) -> None:
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(0, state, {}, config.to_dict())
    ckpt.close()


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def write_workdir(sd, dst: str) -> str:
    """Save an SDModel (stable_diffusion.read) as a workdir at `dst` (new or empty)."""
    from ldm_jax.models.autoencoder import downsampling_factor
    from ldm_jax.models.text_encoder import TextTransformer
    from ldm_jax.models.text_encoder_io import save_pretrained
    from ldm_jax.stages.autoencoder import LATENT_SCALE_FILE
    from ldm_jax.stages.first_stage import RECORD_FILE
    from ldm_jax.stages.ldm_text import TOKENIZER_FILE

    dst = os.path.abspath(os.path.expanduser(dst))
    if os.path.exists(dst) and os.listdir(dst):
        raise ConfigError(f"{dst} exists and is not empty; convert into a new folder")
    scale = float(sd.latent_scale)

    vae_dir = os.path.join(dst, VAE_DIR)
    config_utils.save_config(sd.vae_config, vae_dir)
    _save_checkpoint(vae_dir, {"params": {"autoencoder": sd.vae,
                                          "logvar": jnp.zeros((), jnp.float32)}},
                     sd.vae_config)
    _write_json(os.path.join(vae_dir, LATENT_SCALE_FILE),
                {"step": 0, "mode": "fixed", "scale": scale, "mode_scale": scale})

    save_pretrained(os.path.join(dst, TEXT_DIR), TextTransformer(**sd.text_kwargs), sd.text,
                    sd.tokenizer)

    config = sd.config.copy_and_resolve_references()
    config.first_stage.workdir = VAE_DIR
    config.text_encoder.pretrained = TEXT_DIR
    config_utils.save_config(config, dst)
    _save_checkpoint(dst, {"params": {"unet": sd.unet}}, config)
    vae_model = sd.vae_config.model
    _write_json(os.path.join(dst, RECORD_FILE),
                {"workdir": VAE_DIR, "step": 0, "scale": scale,
                 "posterior": config.first_stage.posterior, "kind": "kl",
                 "factor": downsampling_factor(vae_model.ch_mult),
                 "channels": vae_model.z_channels})
    sd.tokenizer.save(os.path.join(dst, TOKENIZER_FILE))
    return dst
