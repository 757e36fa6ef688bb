"""LDM's vq-f4 first stage (models/first_stage_models/vq-f4), trained with taming's
VQLPIPSWithDiscriminator: f=4, 8192 codes of dimension 3; 256x256 images give 64x64x3 latents.

COMMAND: python train.py --config=configs/autoencoder_vq_f4.py --workdir=workdirs/vq_f4 \
    --config.loss.lpips_path=lpips.safetensors
"""
from configs import autoencoder_base


def get_config():
    return autoencoder_base.ldm_first_stage("vq", 3, (1, 2, 4), n_embed=8192)
