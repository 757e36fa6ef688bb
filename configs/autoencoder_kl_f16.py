"""LDM's kl-f16 first stage (models/first_stage_models/kl-f16): f=16, 16 latent channels, attention at 16x16.
256x256 images give 16x16x16 latents.

COMMAND: python train.py --config=configs/autoencoder_kl_f16.py --workdir=workdirs/kl_f16 \
    --config.loss.lpips_path=lpips.safetensors
"""
from configs import autoencoder_base


def get_config():
    return autoencoder_base.ldm_first_stage("kl", 16, (1, 1, 2, 2, 4), (16,))
