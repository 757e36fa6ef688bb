"""LDM's kl-f8 first stage (models/first_stage_models/kl-f8): f=8, 4 latent channels.
256x256 images give 32x32x4 latents.

COMMAND: python train.py --config=configs/autoencoder_kl_f8.py --workdir=workdirs/kl_f8 \
    --config.loss.lpips_path=lpips.safetensors
"""
from configs import autoencoder_base


def get_config():
    return autoencoder_base.ldm_first_stage("kl", 4, (1, 2, 4, 4), ())
