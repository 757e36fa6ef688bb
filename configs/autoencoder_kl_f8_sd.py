"""Stable Diffusion's VAE shape (the kl-f8 autoencoder SD v1/v2 use): ch 128, mult (1,2,4,4),
2 residual blocks, 4 latent channels, attention only in the middle block; latents scaled by
SD's fixed 0.18215. Converted SD VAE weights load into this model (ldm_jax.convert).

COMMAND: python train.py --config=configs/autoencoder_kl_f8_sd.py --workdir=workdirs/sd_vae \
    --config.data.name=... --config.loss.lpips_path=lpips.safetensors
512x512 images give 64x64x4 latents.
"""
from configs import autoencoder_kl_f8


def get_config():
    config = autoencoder_kl_f8.get_config()
    config.data.image_size = 512
    config.data.num_train = 2000
    config.latent.scale = "fixed"
    config.latent.fixed_scale = 0.18215
    return config
