"""LDM's kl-f32 first stage (models/first_stage_models/kl-f32): f=32, 64 latent channels, attention at 16x16 and 8x8.
256x256 images give 8x8x64 latents.

COMMAND: python train.py --config=configs/autoencoder_kl_f32.py --workdir=workdirs/kl_f32 \
    --config.loss.lpips_path=lpips.safetensors
"""
from configs import autoencoder_base


def get_config():
    return autoencoder_base.ldm_first_stage("kl", 64, (1, 1, 2, 2, 4, 4), (16, 8))
