"""LDM's kl-f4 first stage (models/first_stage_models/kl-f4): f=4, 3 latent channels.
256x256 images give 64x64x3 latents.

COMMAND: python train.py --config=configs/autoencoder_kl_f4.py --workdir=workdirs/kl_f4 \
    --config.loss.lpips_path=lpips.safetensors
"""
from configs import autoencoder_base


def get_config():
    return autoencoder_base.ldm_first_stage("kl", 3, (1, 2, 4), ())
